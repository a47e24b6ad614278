"""``dvc repro`` over the Kedro stages in a fresh ``git clone`` of the project (the test
env's tiny model): a second repro does nothing, a changed setting reruns only the stages downstream
of it, and ``git checkout`` + ``dvc checkout`` (or ``dvc pull`` from a local remote)
brings back every model of the first commit bit for bit."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

BIN = Path(sys.executable).parent


def _sh(repo: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "KEDRO_DISABLE_TELEMETRY": "true"}
    done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True)
    if done.returncode:
        raise AssertionError(
            f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done.stdout + done.stderr


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def _weights(repo: Path) -> dict[str, str]:
    return {
        str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted((repo / "models").rglob("*.safetensors"))
    }


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    """A ``git clone`` of the project, as a new user makes it: what is committed is what is
    tested (a file the clone lacks or holds too many breaks here, as it would for them)."""
    repo = tmp_path / "project"
    _sh(tmp_path, "git", "clone", "-q", "--no-tags", str(ROOT), str(repo))
    _sh(repo, "git", "config", "user.email", "test@example.com")
    _sh(repo, "git", "config", "user.name", "test")
    _sh(repo, "dvc", "remote", "modify", "--local", "local", "url", str(tmp_path / "remote"))
    _sh(repo, "birdbone", "params", "--env", "test")
    shutil.copy(ROOT / "scripts/hooks/post-commit", repo / ".git/hooks/post-commit")  # as the set-up installs it
    return repo


def _commit(repo: Path, message: str) -> None:
    _sh(repo, "git", "add", "-A")
    _sh(repo, "git", "commit", "-q", "-m", message)


def test_repro_reruns_what_changed_and_checkout_restores_every_model_bit_for_bit(repo: Path) -> None:
    first = _sh(repo, "dvc", "repro")
    assert _ran(first) == {"params", "baseline", "profile", "decay", "quantize", "export"}
    again = _sh(repo, "dvc", "repro")
    assert _ran(again) == set() and "Data and pipelines are up to date" in again
    # kedro run right after dvc repro: the journal knows the files by their bytes, so nothing is redone
    resumed = _sh(repo, "kedro", "run", "--env", "test")
    assert "Skipping all" in resumed and "Nothing new was written (resumed)" in resumed
    assert _ran(_sh(repo, "dvc", "repro")) == set()  # and it left DVC's outputs as they were
    before = _weights(repo)
    assert "models/healed/model.safetensors" in before and "models/quantized/model.safetensors" in before
    _commit(repo, "first")
    _sh(repo, "dvc", "push", "-q")

    # an experiment on params.yaml, DVC's one source of truth: the stages downstream run it, it stays
    experiment = _sh(repo, "dvc", "exp", "run", "-S", "decay.pattern.sparsity=0.3")
    assert _ran(experiment) == {"decay", "quantize", "export"}
    assert yaml.safe_load((repo / "params.yaml").read_text())["decay"]["pattern"]["sparsity"] == 0.3
    decay_report = json.loads((repo / "data/08_reporting/decay.json").read_text())
    assert decay_report["decay"]["pattern"]["sparsity"] == 0.3 and decay_report["final"]["sparsity"] <= 0.3 + 1e-6
    assert _ran(_sh(repo, "dvc", "repro")) == set()  # not undone by the params stage
    experiments = list(csv.DictReader(io.StringIO(_sh(repo, "dvc", "exp", "show", "--csv"))))
    assert any(e["Experiment"] and e["decay.pattern.sparsity"] == "0.3" for e in experiments), experiments

    decay = repo / "conf/test/parameters_decay.yml"
    decay.write_text(decay.read_text().replace("sparsity: 0.5", "sparsity: 0.4"))
    changed = _sh(repo, "dvc", "repro")
    assert _ran(changed) == {"params", "decay", "quantize", "export"}  # baseline and profile untouched
    after = _weights(repo)
    assert after["models/baseline/model.safetensors"] == before["models/baseline/model.safetensors"]
    assert after["models/healed/masks.safetensors"] != before["models/healed/masks.safetensors"]
    _commit(repo, "sparsity 0.4")
    # the hook wrote the commit's diff bundle: the setting, the masks, the metrics, the hashes
    sha = _sh(repo, "git", "rev-parse", "HEAD").strip()
    bundle = json.loads((repo / "diffs" / sha / "bundle.json").read_text())
    assert {"key": "decay.pattern.sparsity", "before": 0.5, "after": 0.4} in bundle["params"]
    files = [f for f in bundle["files"] if not f.startswith("diffs/")]  # the first commit's bundle came along
    assert files == ["conf/test/parameters_decay.yml", "dvc.lock", "params.yaml"]
    masks = bundle["masks"]
    assert masks["model"] == "models/quantized" and masks["changed_layers"] == 2 * 7
    assert masks["revived"] > 0 and masks["revived"] - masks["removed"] == sum(
        r["kept_after"] - r["kept_before"] for r in masks["layers"]
    )
    assert any(m["key"] == "quantize.ppl_test" for m in bundle["metrics"])
    assert bundle["weights_sha256"] == after
    assert "`decay.pattern.sparsity`: 0.5 -> 0.4" in (repo / "diffs" / sha / "README.md").read_text()
    bumped = _sh(repo, "birdbone", "bump")  # by hand: the bundle again, a version tag, the models pushed
    assert f"tagged {sha[:12]} as model-v1" in bumped and "pushed the DVC outputs" in bumped
    assert _sh(repo, "git", "tag", "--list", "model-v*").split() == ["model-v1"]
    again = _sh(repo, "birdbone", "bump")  # the same commit again (as its advice after a failed push says)
    assert f"{sha[:12]} is already model-v1; no new tag" in again
    assert _sh(repo, "git", "tag", "--list", "model-v*").split() == ["model-v1"]
    metrics = _sh(repo, "dvc", "metrics", "diff", "HEAD~1", "HEAD")
    assert "data/08_reporting/metrics.json" in metrics and "decay.sparsity" in metrics
    shown = _sh(repo, "dvc", "metrics", "show")  # one small flat table, not six nested reports
    assert "final.ppl_general" in shown and len(shown) < 1000  # it was 10,000 characters wide
    assert "decay.json" not in shown
    _sh(repo, "dvc", "plots", "diff", "HEAD~1", "HEAD", "-o", str(repo.parent / "plots"))
    assert (repo.parent / "plots" / "index.html").is_file()

    _sh(repo, "git", "checkout", "-q", "HEAD~1")
    _sh(repo, "dvc", "checkout", "-q")
    assert _weights(repo) == before
    assert "sparsity: 0.5" in decay.read_text()
    # from the remote alone: no cache, no models
    shutil.rmtree(repo / ".dvc/cache")
    shutil.rmtree(repo / "models/healed")
    _sh(repo, "dvc", "pull", "-q")
    assert _weights(repo) == before
    # a setting the decay does not read (the head's bits) reruns quantize and export alone
    quantize = repo / "conf/test/parameters_quantize.yml"
    quantize.write_text(quantize.read_text().replace("method: gptq, bits: 4", "method: gptq, bits: 8"))
    assert _ran(_sh(repo, "dvc", "repro")) == {"params", "quantize", "export"}


def test_the_committed_params_yaml_is_the_default_recipe(tmp_path: Path) -> None:
    """``params.yaml`` in the repository is what ``birdbone params`` makes of conf/ now
    (conf/local empty, as in a fresh clone), so ``dvc repro`` starts from the truth."""
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf, ignore=shutil.ignore_patterns("local"))
    (conf / "local").mkdir()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(
        ["birdbone", "params", "--conf", str(conf), "--out", str(tmp_path / "params.yaml")],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "params.yaml").read_text() == (ROOT / "params.yaml").read_text(), (
        "params.yaml is stale: run birdbone params --env local"
    )
