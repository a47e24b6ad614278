"""Helpers for the reliability tests: a finished project to damage, runs in-process and as
`kedro run` subprocesses, and snapshots of every artifact."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

ROOT = Path(__file__).resolve().parents[2]

# A wider tiny model, so that each stage runs long enough to be killed in the middle of.
SLOWER = "model.source.hidden=256,model.source.intermediate=1024,model.source.heads=8,model.source.kv_heads=4"

# Keys whose values are measurements of the machine (wall-clock times, peak memory): the only
# numbers two runs may differ in.
TIMING = re.compile(r"seconds|tokens_per_s|_ms$|x_dense_f16|peak_rss_mb|peak_gpu_mb")
# Figures that draw timings.
TIMING_PLOTS = {"data/08_reporting/baseline.png", "data/08_reporting/timeline.png"}


def make_project(where: Path) -> Path:
    """A copy of the project's conf and raw data at ``where`` (nothing run yet)."""
    for name in ("conf", "data/01_raw"):
        shutil.copytree(ROOT / name, where / name, ignore=shutil.ignore_patterns("local"))
    (where / "conf" / "local").mkdir()
    (where / "src").mkdir()
    for name in ("pyproject.toml", ".telemetry"):
        shutil.copy(ROOT / name, where / name)
    return where


def run_in_process(project: Path, env: str = "test", **params: Any) -> None:
    """``kedro run --env ENV`` in this process (the working directory must be ``project``)."""
    bootstrap_project(project)
    with KedroSession.create(project_path=project, env=env, runtime_params=params or None) as session:
        session.run()


def kedro(project: Path, *extra: str, **popen: Any) -> subprocess.Popen:
    """``kedro run --env test EXTRA`` as a subprocess in its own process group; its log on stderr."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "kedro", "run", "--env", "test", *extra]
    return subprocess.Popen(
        command,
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **popen,
    )


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    """Waits for a `kedro` subprocess and returns its log; fails the test if it failed."""
    _, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-4000:]
    return err


def env_with(project: Path, name: str, **sections: Any) -> str:
    """A configuration env ``name``: conf/test with the given top-level sections replaced."""
    target = project / "conf" / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(project / "conf" / "test", target)
    for key, value in sections.items():
        (target / f"parameters_{key}.yml").write_text(yaml.safe_dump({key: value}))
    return name


def snapshot(project: Path) -> dict[str, str]:
    """SHA-256 of every file under data/ and models/."""
    out = {}
    for top in ("data", "models"):
        for path in sorted((project / top).rglob("*")):
            if path.is_file():
                out[str(path.relative_to(project))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if not TIMING.search(str(k))}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def artifacts(project: Path) -> dict[str, Any]:
    """Every artifact of a run, comparable across runs: file bytes (as SHA-256), JSON with
    the timings and memory peaks left out, and no figure that draws timings."""
    out: dict[str, Any] = {}
    for name, digest in snapshot(project).items():
        if name in TIMING_PLOTS or name.startswith("data/01_raw"):
            continue
        out[name] = _without_timings(json.loads((project / name).read_text())) if name.endswith(".json") else digest
    return out


def assert_same_artifacts(a: Path, b: Path) -> None:
    left, right = artifacts(a), artifacts(b)
    assert sorted(left) == sorted(right)
    different = [name for name in left if left[name] != right[name]]
    assert not different, different


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project that finished `kedro run --env test` (in-process), to try bad input on."""
    project = make_project(tmp_path_factory.mktemp("finished") / "project")
    cwd = Path.cwd()
    os.chdir(project)
    try:
        run_in_process(project)
    finally:
        os.chdir(cwd)
    return project
