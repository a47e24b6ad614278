"""The README's commands work as written, in order, in a fresh ``git clone`` with the
set-up's ``.venv``: every command of its bash blocks runs (in the test env where it names
one), except the few listed in ``LONG`` with the reason; the MLflow UI is started, answers,
and is stopped."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.conftest import ROOT

VENV = Path(sys.executable).parent.parent

# commands not run here, each with why; every other README command is
LONG = {
    "bash scripts/setup.sh": "the set-up itself: this test runs in the .venv it made",
    "bash scripts/test.sh": "the test command: CI runs it (.ci/run), and with it this test",
    "kedro run": "the default recipe on SmolLM2 (about 15 minutes): bench/frontier.py runs and times it",
}


def readme_commands() -> list[str]:
    """Every command line of the README's bash blocks, comments dropped, in order."""
    text = (ROOT / "README.md").read_text()
    lines = [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()]
    return [line.split(" #")[0].strip() for line in lines if line.split(" #")[0].strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_and_stop(repo: Path, command: str, env: dict[str, str]) -> None:
    port = _free_port()
    server = subprocess.Popen(
        ["bash", "-c", f"source .venv/bin/activate && {command} --port {port}"],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as page:
                    assert page.status == 200
                    break
            except OSError:
                assert server.poll() is None, f"{command} exited with {server.returncode}"
                assert time.monotonic() < deadline, f"{command} did not answer on port {port}"
                time.sleep(1)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the server and the workers it started
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_the_readme_commands_work_as_written_in_a_fresh_clone(tmp_path: Path) -> None:
    commands = readme_commands()
    assert set(LONG) <= set(commands), "a command LONG names is no longer in the README"
    repo = tmp_path / "bird-bone"
    subprocess.run(["git", "clone", "-q", "--no-tags", str(ROOT), str(repo)], check=True)
    (repo / ".venv").symlink_to(VENV)  # what the set-up made
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["KEDRO_DISABLE_TELEMETRY"] = "true"
    ran = []
    for command in commands:
        if command in LONG or command == "source .venv/bin/activate":
            continue
        if " mlflow ui " in f" {command} ":
            _serve_and_stop(repo, command, env)
        else:
            done = subprocess.run(
                ["bash", "-c", f"source .venv/bin/activate && {command}"],
                cwd=repo,
                env=env,
                capture_output=True,
                text=True,
            )
            assert done.returncode == 0, f"{command}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            if command.startswith("kedro run"):
                assert "bird-bone: done in" in done.stdout + done.stderr, command
        ran.append(command)
    assert ran[0] == "kedro run --env test" and "birdbone report" in ran, ran
    assert (repo / "models/export/model.gguf").is_file() and (repo / "data/08_reporting/report.md").is_file()
