"""The recovery ladder: a wave that spikes tries healing, regrowth of its spiking cluster,
a partial rollback, then a revert; every step is recorded and a revert is bit-exact."""

import pytest
import torch

from birdbone.config import DecayConfig, HealConfig, ProfileConfig
from birdbone.core import cluster_decay, evaluate, recovery, waves
from birdbone.core.masks import MaskSet
from birdbone.core.profile import profile_usage
from tests.conftest import blocks_of


def _config(ladder, step_limit=0.03, clusters=False, **recovery_options):
    return DecayConfig(
        method="wanda",
        pattern={"kind": "unstructured", "sparsity": 0.5},
        cap=0.3,
        gate={"step_limit": step_limit, "strikes": 2, "budget": None},
        clusters={"enabled": clusters},
        recovery={"enabled": True, "ladder": ladder, **recovery_options},
    )


def _wave(state, config, wave, ppl, profile=None, **recover):
    """Decay, a scripted spike of ``ppl``, the ladder (really measured), the gate."""
    validation = blocks_of(4, 512, length=32, seed=99)
    teacher = evaluate.teacher_topk(state.bundle.model, validation, 8, 4, "cpu") if wave == 1 else recover["teacher"]
    waves.decay(state, wave, config, blocks_of(4, 512, length=32, seed=wave), None, "cpu", profile)
    state.current.update(ppl=ppl, kl=0.0)
    heal = HealConfig(enabled=True, steps=2, rank=4, batch_size=2, block_length=None, eval_every=0)
    recovery.recover(state, config, heal, 2, blocks_of(8, 512, length=32, seed=7), None, validation, teacher)
    waves.gate(state, config, "recipe")
    return teacher


def test_a_ladder_that_cannot_recover_reverts_the_wave_bit_for_bit_and_stops(tiny_bundle):
    config = _config(["heal", "rollback", "revert"], step_limit=1e-6)  # nothing passes this limit
    state = waves.start(tiny_bundle, {"ppl": 1.0}, "origin")  # a reference no wave can keep
    before = {n: w.detach().clone() for n, w in state.linears().items()}
    masks = MaskSet({n: m.clone() for n, m in state.masks.items()})
    _wave(state, config, 1, 50.0)
    row = state.rows[-1]
    assert [s["step"] for s in row["recovery"]] == ["heal", "rollback", "revert"]
    assert row["recovery"][1]["restored"] > 0 and row["recovery"][1]["sparsity"] < row["recovery"][0]["sparsity"]
    assert (
        row["decision"] == "reverted" and "recovery ladder reverted the wave (tried: heal, rollback)" in row["reason"]
    )
    assert state.gate.phase == "stopped" and state.gate.stop_reason == "recovery"
    assert all(torch.equal(w, before[n]) for n, w in state.linears().items())
    assert state.masks.equals(masks)
    # the revert and every wave after it report the state the model is back at, not the rollback's numbers
    assert row["recovery"][-1]["ppl"] == 1.0 and row["recovery"][-1]["sparsity"] == 0.0
    assert row["state_ppl"] == 1.0 and row["ppl"] != 1.0
    waves.decay(state, 2, config, blocks_of(4, 512, length=32, seed=2), None)
    waves.evaluate_state(state, blocks_of(4, 512, length=32, seed=99), {}, 4, "cpu")
    waves.gate(state, config, "recipe")
    assert state.rows[-1]["decision"] == "skipped" and state.rows[-1]["ppl"] == 1.0


def test_a_step_that_brings_the_wave_back_ends_the_ladder_and_the_wave_is_kept(tiny_bundle, monkeypatch):
    measured = iter([{"ppl": 10.9, "kl": 0.1}, {"ppl": 10.1, "kl": 0.05}])  # after heal: still high; after rollback: ok
    monkeypatch.setattr(evaluate, "quality", lambda *a, **k: next(measured))
    config = _config(["heal", "rollback", "revert"], rollback_fraction=0.5)
    state = waves.start(tiny_bundle, {"ppl": 10.0}, "origin")
    validation = blocks_of(4, 512, length=32, seed=99)
    waves.decay(state, 1, config, blocks_of(4, 512, length=32, seed=1), None)
    target = state.masks.overall_sparsity()
    state.current.update(ppl=12.0, kl=0.2)
    heal = HealConfig(enabled=True, steps=2, rank=4, batch_size=2, block_length=None, eval_every=0)
    recovery.recover(state, config, heal, 2, blocks_of(8, 512, length=32, seed=7), None, validation, {})
    waves.gate(state, config, "recipe")
    row = state.rows[-1]
    assert [s["step"] for s in row["recovery"]] == ["heal", "rollback"]
    assert row["recovery"][-1]["outcome"] == "recovered" and row["decision"] == "kept"
    assert row["reason"].startswith("after recovery (heal, rollback): perplexity 10.100")
    assert row["sparsity"] == pytest.approx(target / 2, abs=0.01)  # half of the wave's removal came back
    # the next wave removes no more than the cap of what is left, then catches up
    monkeypatch.setattr(evaluate, "quality", lambda *a, **k: {"ppl": 10.0, "kl": 0.0})
    assert waves.wave_target(config, 2, config.wave_targets(), row["sparsity"]) == pytest.approx(
        1 - (1 - row["sparsity"]) * 0.7
    )
    assert waves.wave_target(config, 9, config.wave_targets(), 0.5) is None


def test_a_non_finite_wave_is_left_to_the_gates_emergency_stop(tiny_bundle):
    config = _config(["heal", "revert"])
    state = waves.start(tiny_bundle, {"ppl": 10.0}, "origin")
    waves.decay(state, 1, config, blocks_of(4, 512, length=32, seed=1), None)
    for ppl, kl in ((float("inf"), 0.1), (float("nan"), 0.1), (12.0, float("nan"))):
        state.current.update(ppl=ppl, kl=kl)
        assert recovery.needs_recovery(state, config) == []
    state.current.update(ppl=12.0, kl=0.1)
    assert recovery.needs_recovery(state, config)  # a finite spike is


def test_regrow_restores_only_the_spiking_clusters_weights_at_their_old_values(tiny_bundle):
    config_profile = ProfileConfig(blocks=8, gradient_blocks=2, clusters={"enabled": True, "count": 4, "dims": 8})
    tensors, _ = profile_usage(tiny_bundle, blocks_of(8, 512, length=32), config_profile)
    profile = cluster_decay.from_profile(tensors, tiny_bundle.adapter, 2)
    config = _config(["regrow"], clusters=True, regrow_fraction=1.0)
    state = waves.start(tiny_bundle, {"ppl": 10.0}, "origin")
    waves.decay(state, 1, config, blocks_of(4, 512, length=32, seed=1), None, "cpu", profile)
    pruned = state.masks.copy()
    spiking = recovery._spiking_clusters(state)
    restored = recovery.restore_(state, 1.0, spiking)
    assert restored > 0
    for name, weight in state.linears().items():
        back = state.masks[name] & ~pruned[name]
        assert torch.equal(weight[back], state.before[name][back])
        if name not in profile.axes:
            assert not bool(back.any())
            continue
        block, axis = profile.axes[name]
        members = profile.labels[block] == spiking[block]
        outside = back[~members] if axis == 0 else back[:, ~members]
        assert not bool(outside.any())
        inside = (
            (state.prior[name] & ~pruned[name])[members]
            if axis == 0
            else (state.prior[name] & ~pruned[name])[:, members]
        )
        assert int(back.sum()) == int(inside.sum())  # fraction 1: all of the cluster's wave removal


def test_the_ladder_is_validated_before_any_compute():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="put revert last"):
        _config(["revert", "heal"])
    with pytest.raises(ValidationError, match=r"restore single weights.*Fix: recovery.ladder: \[heal, revert\]"):
        DecayConfig(
            method="wanda", pattern={"kind": "nm", "n": 2, "m": 4}, recovery={"enabled": True, "ladder": ["rollback"]}
        )
