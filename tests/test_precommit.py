"""pre-commit's hooks pass on the repository as it stands, and the weight-hash hook refuses
a weight changed after its stage wrote it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from birdbone.core.diffs import weight_problems
from birdbone.datasets import ModelDataset
from tests.conftest import ROOT

BIN = Path(sys.executable).parent


def test_every_hook_passes_on_the_working_tree(tmp_path: Path) -> None:
    """The tracked files as they are now, in a fresh repository (so no hook can touch this one)."""
    repo = tmp_path / "repo"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    (repo / ".venv").symlink_to(ROOT / ".venv")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PRE_COMMIT_HOME": str(tmp_path / "cache")}
    for args in (["git", "init", "-q"], ["git", "add", "-A"]):
        subprocess.run(args, cwd=repo, check=True, env=env)
    done = subprocess.run(
        [str(BIN / "pre-commit"), "run", "--all-files", "--show-diff-on-failure"],
        cwd=repo,
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    for hook in ("ruff (lint)", "ruff (format)", "mdformat", "notebook outputs stripped", "weights match"):
        assert hook in done.stdout


def test_a_weight_changed_after_its_stage_is_refused_by_name(tiny_bundle, tmp_path: Path) -> None:
    ModelDataset(str(tmp_path / "models/healed")).save(tiny_bundle)
    assert weight_problems(tmp_path) == []
    weights = tmp_path / "models/healed/model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    (problem,) = weight_problems(tmp_path)
    assert problem.startswith("models/healed/model.safetensors differs from the SHA-256 in models/healed/birdbone.json")
    assert "Fix: rerun the stage (dvc repro), or dvc checkout to restore it." in problem


def test_a_deleted_weight_or_a_run_from_a_subfolder_still_fails(tiny_bundle, tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.kedro]\npackage_name = 'birdbone'\n")
    ModelDataset(str(tmp_path / "models/healed")).save(tiny_bundle)
    weights = tmp_path / "models/healed/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    env = {**os.environ, "PATH": "/usr/bin:/bin"}  # as git runs the hook: the venv not activated
    hook = [str(BIN / "birdbone"), "check-weights"]
    done = subprocess.run(hook, cwd=tmp_path / "models/healed", capture_output=True, text=True, env=env)
    assert done.returncode == 1 and "models/healed/model.safetensors differs" in done.stderr
    weights.unlink()
    (problem,) = weight_problems(tmp_path)
    assert problem.startswith("models/healed/model.safetensors is missing: models/healed/birdbone.json records it")
    outside = subprocess.run(hook, cwd=tmp_path.parent, capture_output=True, text=True, env=env)
    assert outside.returncode == 2 and "is not inside a bird-bone project" in outside.stderr


def test_the_hook_finds_dvc_without_the_venv_on_path(tiny_bundle, tmp_path: Path) -> None:
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    (tmp_path / "pyproject.toml").write_text("[tool.kedro]\npackage_name = 'birdbone'\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True, env=env)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True, env=env)
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    ModelDataset(str(tmp_path / "models/healed")).save(tiny_bundle)
    done = subprocess.run(
        [str(BIN / "birdbone"), "check-weights"], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
