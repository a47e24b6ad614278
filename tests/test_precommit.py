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
