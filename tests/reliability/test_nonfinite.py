"""NaN and inf during the decay: in the weights, in the activations, in the healing loss.
The wave where it appears is reverted (back to the last accepted state), the reason is
in the wave table, the decay stops, and no model written holds a NaN or inf."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from birdbone.core import waves
from birdbone.core.masks import MaskSet
from tests.reliability.conftest import make_project, run_in_process


@pytest.fixture()
def project(tmp_path, monkeypatch) -> Path:
    project = make_project(tmp_path / "project")
    monkeypatch.chdir(project)
    return project


def _poison_wave(monkeypatch, wave: int, poison) -> None:
    """Applies ``poison(model)`` at the end of wave ``wave`` (after its healing and
    regrowth, before its evaluation), as a diverging update would."""
    regrow = waves.regrow

    def poisoned(state, *args, **kwargs):
        state = regrow(state, *args, **kwargs)
        if state.wave == wave and state.current.get("action") == "decay":
            with torch.no_grad():
                poison(state.bundle.model.model.layers[0])
        return state

    monkeypatch.setattr(waves, "regrow", poisoned)


def _rows(project: Path) -> list[dict]:
    return json.loads((project / "data/08_reporting/decay.json").read_text())["waves"]


def _every_model_is_finite(project: Path) -> None:
    files = sorted((project / "models").rglob("*.safetensors"))
    assert len(files) > 10
    for file in files:
        for name, tensor in load_file(file).items():
            if tensor.is_floating_point():
                assert torch.isfinite(tensor).all(), f"{file}: {name}"


def _reverted_at(project: Path, wave: int, says: str) -> None:
    rows = _rows(project)
    assert rows[wave - 1]["decision"] == "kept"
    assert rows[wave]["decision"] == "reverted", rows[wave]
    assert "non-finite" in rows[wave]["reason"] and says in rows[wave]["reason"], rows[wave]["reason"]
    assert f"back to the accepted state of wave {wave - 1}, decay stopped" in rows[wave]["reason"]
    assert all(r["decision"] == "skipped" and "decay stopped (non-finite)" in r["reason"] for r in rows[wave + 1 :])
    accepted = MaskSet.load(project / f"models/waves/wave_{wave - 1}/masks.safetensors")
    assert MaskSet.load(project / f"models/waves/wave_{wave}/masks.safetensors").equals(accepted)
    # the reverted wave's model is the accepted one, weight for weight
    before = load_file(project / f"models/waves/wave_{wave - 1}/model.safetensors")
    after = load_file(project / f"models/waves/wave_{wave}/model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert json.loads((project / "data/08_reporting/decay.json").read_text())["final"]["stop_reason"] == "non-finite"
    _every_model_is_finite(project)
    assert (project / "models/export/model.gguf").is_file()  # the last good state went on to the export


def test_nan_weights_revert_the_wave_where_they_appear(project, monkeypatch):
    def nan(layer):
        layer.mlp.down_proj.weight[0, 0] = math.nan

    _poison_wave(monkeypatch, 2, nan)
    run_in_process(project)
    _reverted_at(project, 2, "1 NaN/inf weight(s) in model.layers.0.mlp.down_proj.weight")


def test_overflowing_activations_revert_the_wave_where_they_appear(project, monkeypatch):
    def huge(layer):  # finite weights, but query . key overflows float32: softmax gives NaN
        layer.self_attn.q_proj.weight[0, :] = 1e30
        layer.self_attn.k_proj.weight[0, :] = 1e30

    _poison_wave(monkeypatch, 3, huge)
    run_in_process(project)
    _reverted_at(project, 3, "validation perplexity is")


def test_a_non_finite_healing_loss_reverts_the_wave_and_stops(project, monkeypatch):
    from birdbone.core import evaluate

    topk = evaluate.teacher_topk

    def corrupt_cache(model, blocks, *args, **kwargs):  # one NaN in the dense model's answers healing learns
        teacher = topk(model, blocks, *args, **kwargs)
        if blocks.shape[1] == 32:  # heal.block_length (conf/test); the gate's cache has 64-token blocks
            teacher["logprob"][:, 3, 0] = math.nan
        return teacher

    monkeypatch.setattr(evaluate, "teacher_topk", corrupt_cache)
    run_in_process(project)
    rows = _rows(project)
    assert rows[1]["decision"] == "reverted"
    assert "non-finite: healing: non-finite" in rows[1]["reason"], rows[1]["reason"]
    assert rows[1]["sparsity"] == 0.0  # back at the dense model
    heal = json.loads((project / "data/08_reporting/heal.json").read_text())
    assert heal["final"]["stopped"].startswith("non-finite")  # the final heal undid itself too
    _every_model_is_finite(project)
