"""Faults during a real run: kill -9 at five points then the same command again, two runs
at once, a read-only or full disk; and determinism (same recipe and seed twice on CPU).

Every run here is `kedro run --env test` as a subprocess, with a wider tiny model
(``SLOWER``) so that each stage lasts long enough to be killed in the middle of."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from birdbone.core.masks import MaskSet
from tests.reliability.conftest import (
    SLOWER,
    artifacts,
    assert_same_artifacts,
    finish,
    kedro,
    make_project,
    run_in_process,
    snapshot,
)
from tests.test_pipeline import mlflow_runs

# (the log line that starts the step, a temporary path to wait for before killing (None:
# kill at once), what the step would have finished had it not been killed)
KILL_POINTS = [
    ("Running node: profile_model", None, "data/04_feature/profile.safetensors"),  # profiling
    ("Running node: heal: heal_wave([wave_2.", None, "models/waves/wave_2"),  # mid-wave, in its healing
    ("Running node: gate: gate_wave([wave_3.", "models/waves/.tmp-wave_3.*", "models/waves/wave_3"),  # writing it
    ("Running node: heal_final", None, "models/healed"),  # the final heal
    ("Running node: export", "models/.tmp-export.*", "data/08_reporting/export.json"),  # writing the export
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project after one uninterrupted `kedro run`."""
    project = make_project(tmp_path_factory.mktemp("reference") / "project")
    finish(kedro(project, "--params", SLOWER))
    return project


def _kill_at(project: Path, marker: str, written: str | None) -> None:
    process = kedro(project, "--params", SLOWER)
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line)
        if marker in line:
            deadline = time.monotonic() + 10
            while written and not list(project.glob(written)) and time.monotonic() < deadline:
                time.sleep(0.001)  # kill while the artifact is being written, if we catch it
            os.killpg(process.pid, signal.SIGKILL)
            break
    process.wait()
    assert process.returncode == -signal.SIGKILL, "".join(seen)[-3000:]


def test_kill_9_at_five_points_then_the_same_command_ends_as_an_uninterrupted_run(reference, tmp_path):
    project = make_project(tmp_path / "project")
    for marker, written, unfinished in KILL_POINTS:
        _kill_at(project, marker, written)
        assert not (project / unfinished).exists(), f"killed after {unfinished} was written: not mid-step"
    log = finish(kedro(project, "--params", SLOWER))
    skipped = next(line for line in log.splitlines() if "nodes with existing outputs" in line)
    for step in ("import_model", "profile_model", "wave_2.gate", "wave_3.gate", "heal_final"):  # not redone
        assert step in skipped, skipped
    assert_same_artifacts(reference, project)
    assert not list(project.rglob(".tmp-*"))
    journal = json.loads((project / ".birdbone/journal.json").read_text())["artifacts"]
    assert "models/healed" in journal and "data/08_reporting/export.json" in journal


def test_same_recipe_and_seed_twice_gives_identical_masks_weights_and_metrics(reference, tmp_path):
    again = make_project(tmp_path / "again")
    finish(kedro(again, "--params", SLOWER))
    assert_same_artifacts(reference, again)
    for k in range(8):  # spelled out: the masks of every wave, the final weights, the numbers
        name = f"models/waves/wave_{k}/masks.safetensors"
        assert MaskSet.load(reference / name).equals(MaskSet.load(again / name)), k
    for name in ("models/quantized/model.safetensors", "models/export/model.gguf", "models/healed/model.safetensors"):
        assert (reference / name).read_bytes() == (again / name).read_bytes(), name
    a, b = (json.loads((p / "data/08_reporting/summary.json").read_text()) for p in (reference, again))
    assert a["quantize"]["ppl_test"] == b["quantize"]["ppl_test"]
    assert a["baseline"]["ppl_val"] == b["baseline"]["ppl_val"]


def test_a_second_run_in_the_same_project_is_refused_naming_the_first(reference, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(reference, project, ignore=shutil.ignore_patterns("mlflow.db", "mlruns"))
    first = kedro(project, "--params", SLOWER + ",run.resume=false")
    assert first.stderr is not None
    for line in first.stderr:
        if "Running node:" in line:
            break
    second = subprocess.run(
        [sys.executable, "-m", "kedro", "run", "--env", "test", "--params", SLOWER],
        cwd=project,
        capture_output=True,
        text=True,
    )
    assert second.returncode != 0
    assert "bird-bone stopped: RunLockedError" in second.stderr, second.stderr[-2000:]
    assert f"pid {first.pid}" in second.stderr and "-m kedro run --env test --params" in second.stderr
    assert "Fix: wait for it to finish, or kill" in second.stderr
    finish(first)
    assert len(mlflow_runs(project)) == 1  # the refused run started none
    assert_same_artifacts(reference, project)
    # the lock went with the first run: a third starts (and, resuming, has nothing to redo)
    assert "Skipping all" in finish(kedro(project, "--params", SLOWER))


def _full_disk(limit: int):
    def limit_file_size() -> None:  # every write past `limit` bytes fails as on a full disk (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_file_size


def test_a_full_disk_is_named_and_the_artifacts_already_there_stay_whole(reference, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(reference, project)
    before = snapshot(project)
    process = kedro(project, "--params", SLOWER + ",run.resume=false", preexec_fn=_full_disk(2**20))
    _, err = process.communicate(timeout=600)
    assert process.returncode != 0
    assert "bird-bone stopped: OutputError" in err, err[-3000:]
    assert re.search(r"could not write \S*/models/baseline: no space left \(File too large", err), err[-3000:]
    assert "The artifact that was there before is untouched" in err
    assert "Fix: free disk space" in err
    assert snapshot(project) == before
    assert not list(project.rglob(".tmp-*"))


def _read_only(path: Path) -> None:
    if os.geteuid() == 0:  # root writes through permission bits; the immutable flag stops it too
        subprocess.run(["chattr", "+i", str(path)], check=True)
    else:
        path.chmod(0o555)


def _writable(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o755)


def test_a_read_only_output_folder_is_named_before_any_compute(reference, tmp_path, monkeypatch):
    project = tmp_path / "project"
    shutil.copytree(reference, project)
    before = snapshot(project)
    monkeypatch.chdir(project)
    _read_only(project / "models")
    try:
        from birdbone.errors import OutputError

        with pytest.raises(OutputError, match=r"could not write .*models: the folder is not writable") as raised:
            run_in_process(project, **{"run": {"resume": False}, **_slower()})
        assert "Fix: make it writable" in str(raised.value)
    finally:
        _writable(project / "models")
    assert snapshot(project) == before  # not even the first step (tokenizing) ran
    assert not (project / ".birdbone/run.lock").read_text()


def _slower() -> dict:
    source = dict(item.split("=") for item in SLOWER.split(","))
    return {"model": {"source": {k.split(".")[-1]: int(v) for k, v in source.items()}}}


def test_resumed_artifacts_are_compared_without_timings_only(reference):
    """The comparison above leaves out wall-clock numbers and nothing else."""
    compared = artifacts(reference)
    assert "models/export/model.gguf" in compared and "models/waves/wave_3/masks.safetensors" in compared
    summary = compared["data/08_reporting/summary.json"]
    assert "ppl_test" in summary["quantize"] and "tokens_per_s" not in summary["baseline"]
    assert summary["memory"]["decay"] == {"per_stage": True}  # the peak itself is a measurement


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_and_sigterm_end_the_mlflow_run_killed_release_the_lock_and_sweep(tmp_path, stop):
    project = make_project(tmp_path / "project")
    process = kedro(project, "--params", SLOWER)
    assert process.stderr is not None
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(process.stderr), daemon=True)
    reader.start()  # the log is read aside: the run never waits on the pipe, nor the stop on the log
    deadline = time.monotonic() + 600
    while not list(project.glob("models/.tmp-export.*")) and process.poll() is None:
        assert time.monotonic() < deadline, "".join(seen)[-3000:]
        time.sleep(0.001)  # stop it while the export is being written
    os.kill(process.pid, stop)
    process.wait(timeout=120)
    reader.join(timeout=30)
    log = "".join(seen)
    assert process.returncode != 0, log[-3000:]
    assert "KeyboardInterrupt" in log or "stopped by signal" in log or "Aborted" in log, log[-3000:]
    runs = mlflow_runs(project)
    assert list(runs["status"]) == ["KILLED"], log[-3000:]
    assert not (project / ".birdbone" / "run.lock").read_text(), "the lock was not released"
    assert not [p for top in ("data", "models") for p in (project / top).rglob(".tmp*")]
    assert not (project / "models" / "export").exists()  # the half-written export never took its name


def test_the_sweep_takes_safetensors_own_staging_files_too(tmp_path):
    from birdbone.runstate import sweep_temporaries

    (tmp_path / "data" / "03_primary").mkdir(parents=True)
    (tmp_path / "models" / "healed").mkdir(parents=True)
    staged = [tmp_path / "data/03_primary/.tmpAb12Cd", tmp_path / "models/healed/.tmp-model.safetensors.x1"]
    kept = [tmp_path / "data/03_primary/.tmpnotes.txt", tmp_path / "models/healed/model.safetensors"]
    for path in staged + kept:
        path.write_bytes(b"x")
    assert sorted(sweep_temporaries(tmp_path)) == sorted(staged)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in staged)
