"""Decay waves on the tiny model: the stop-loss, full and gradual rollback, the cap."""

import pytest
import torch

from birdbone.config import DecayConfig
from birdbone.core import evaluate, waves
from birdbone.core.masks import MaskSet
from tests.conftest import blocks_of


def _config(**gate):
    return DecayConfig(
        method="wanda",
        pattern={"kind": "unstructured", "sparsity": 0.5},
        cap=0.2,
        gate={"step_limit": 0.03, "strikes": 2, "budget": None, **gate},
    )


def _snapshot(state):
    return {n: w.detach().clone() for n, w in state.linears().items()}, MaskSet({n: m for n, m in state.masks.items()})


def _same(state, snapshot):
    weights, masks = snapshot
    now = state.linears()
    return all(torch.equal(now[n], w) for n, w in weights.items()) and state.masks.equals(masks)


def _run(state, config, wave, ppl, general=None):
    """One wave with a scripted perplexity (a synthetic good or bad wave), and a scripted
    general perplexity (KL 0.1, top-1 0.9) when given."""
    waves.decay(state, wave, config, blocks_of(4, 512, length=32, seed=wave), None)
    state.current.update(ppl=ppl, kl=0.0, general=None if general is None else {"ppl": general, "kl": 0.1, "top1": 0.9})
    return waves.gate(state, config, "recipe")


DENSE_GENERAL = {"ppl": 10.0, "general": {"ppl": 50.0, "kl": 0.0, "top1": 1.0}}


def test_a_wave_that_helps_in_domain_and_hurts_general_text_is_a_strike(tiny_bundle):
    config = _config(general={"step_limit": 0.03, "budget": None})  # +6 % over dense: no budget to pass
    state = waves.start(tiny_bundle, DENSE_GENERAL, "origin")
    _run(state, config, 1, 9.0, general=51.0)  # better in-domain, +2 % general: kept
    assert state.rows[-1]["decision"] == "kept" and "general 51.000 (+2.0% against dense)" in state.rows[-1]["reason"]
    _run(state, config, 2, 8.5, general=53.0)  # in-domain better still, general +3.9 % over wave 1
    row = state.rows[-1]
    assert row["decision"] == "strike"
    assert "general perplexity 53.000 is +3.9% over the accepted 51.000 (wave 1), limit +3%" in row["reason"]
    assert row["general"] == {"ppl": 53.0, "kl": 0.1, "top1": 0.9}


def test_the_general_kl_limit_and_budget_judge_too(tiny_bundle):
    config = _config(general={"step_limit": None, "kl_limit": 0.05, "budget": None})
    state = waves.start(tiny_bundle, DENSE_GENERAL, "origin")
    _run(state, config, 1, 10.0, general=50.0)  # KL 0.1 > 0.05
    row = state.rows[-1]
    assert row["decision"] == "strike" and "general KL 0.1000 over the limit 0.05" in row["reason"]
    config = _config(general={"step_limit": 0.03, "budget": 0.05})
    state = waves.start(tiny_bundle, DENSE_GENERAL, "origin")
    for wave, general in [(1, 51.0), (2, 52.0)]:
        _run(state, config, wave, 10.0, general=general)
    accepted = _snapshot(state)
    _run(state, config, 3, 10.0, general=53.5)  # +2.9 % over wave 2, +7 % over dense: past the budget
    row = state.rows[-1]
    assert row["decision"] == "reverted" and "general perplexity 53.500 is +7.0% over dense" in row["reason"]
    assert row["state_general"]["ppl"] == 52.0 and _same(state, accepted)


def test_general_limits_off_or_no_general_split_judge_in_domain_only(tiny_bundle):
    config = _config(general={"step_limit": None, "kl_limit": None, "budget": None})
    state = waves.start(tiny_bundle, DENSE_GENERAL, "origin")
    _run(state, config, 1, 10.0, general=90.0)
    assert state.rows[-1]["decision"] == "kept"
    state = waves.start(tiny_bundle, {"ppl": 10.0}, "origin")  # no general split: nothing to judge there
    _run(state, _config(), 1, 10.0)
    assert state.rows[-1]["decision"] == "kept" and state.rows[-1]["general"] is None


def test_a_non_finite_general_perplexity_stops_the_decay(tiny_bundle):
    state = waves.start(tiny_bundle, DENSE_GENERAL, "origin")
    accepted = _snapshot(state)
    _run(state, _config(), 1, 10.0, general=float("nan"))
    assert state.rows[-1]["decision"] == "reverted" and "general perplexity is nan" in state.rows[-1]["reason"]
    assert _same(state, accepted)


def test_a_wave_is_measured_on_the_general_split_against_dense(tiny_bundle):
    from birdbone.core import generate

    model = tiny_bundle.model
    general_blocks = generate.sample_blocks(model, tiny_bundle.tokenizer, 2, 16, seed=1, batch_size=2)
    general = {"blocks": general_blocks, **evaluate.teacher_topk(model, general_blocks, k=8)}
    validation = blocks_of(2, 512, length=16, seed=3)
    teacher = evaluate.teacher_topk(model, validation, k=8)
    state = waves.start(tiny_bundle, {"ppl": 10.0}, "origin")
    config = _config()
    waves.decay(state, 1, config, blocks_of(4, 512, length=32, seed=1), None)
    waves.evaluate_state(state, validation, teacher, 2, "cpu", general)
    measured = state.current["general"]
    direct = evaluate.quality(model, general_blocks, general, 2, with_top1=True)
    assert measured == {k: direct[k] for k in ("ppl", "kl", "top1")}
    assert measured["kl"] > 0 and 0 < measured["top1"] < 1


def test_two_bad_waves_in_a_row_are_undone_bit_for_bit(tiny_bundle):
    config = _config(rollback="full")
    state = waves.start(tiny_bundle, {"ppl": 10.0}, "origin")
    _run(state, config, 1, 10.1)
    accepted = _snapshot(state)
    _run(state, config, 2, 12.0)
    assert state.rows[-1]["decision"] == "strike"
    _run(state, config, 3, 13.0)
    assert state.rows[-1]["decision"] == "reverted" and "waves 2, 3 undone" in state.rows[-1]["reason"]
    assert _same(state, accepted)
    _run(state, config, 4, 99.0)
    assert state.rows[-1]["decision"] == "skipped" and "stop-loss" in state.rows[-1]["reason"]
    assert _same(state, accepted)


def test_one_bad_wave_then_a_good_one_is_kept(tiny_bundle):
    config = _config()
    state = waves.start(tiny_bundle, {"ppl": 10.0}, "origin")
    _run(state, config, 1, 10.5)  # +5 %: strike 1
    _run(state, config, 2, 10.2)  # +2 % over the accepted dense state: kept, strikes reset
    assert [r["decision"] for r in state.rows[1:]] == ["strike", "kept"]
    assert state.gate.strikes == 0 and state.gate.reference_wave == 2


def test_a_healed_wave_below_dense_is_no_margin_the_next_wave_must_keep(tiny_bundle):
    config = _config()
    state = waves.start(tiny_bundle, {"ppl": 10.0}, "origin")
    _run(state, config, 1, 8.0)  # healing on the user's text: below dense
    _run(state, config, 2, 10.2)  # +27.5 % over wave 1, but +2 % over dense: kept
    assert state.rows[-1]["decision"] == "kept" and "(+2.0% against dense 10.000" in state.rows[-1]["reason"]
    _run(state, config, 3, 10.6)  # above dense now: judged against wave 2 (+3.9 %)
    assert state.rows[-1]["decision"] == "strike" and "over the accepted 10.200 (wave 2)" in state.rows[-1]["reason"]


def test_the_accepted_reference_makes_later_waves_keep_a_healed_gain(tiny_bundle):
    config = _config(reference="accepted")
    state = waves.start(tiny_bundle, {"ppl": 10.0}, "origin")
    _run(state, config, 1, 8.0)
    _run(state, config, 2, 8.4)  # +5 % over wave 1: a strike, though below dense
    assert state.rows[-1]["decision"] == "strike" and "over the accepted 8.000 (wave 1)" in state.rows[-1]["reason"]


def test_a_strike_in_the_last_wave_stands_and_the_skipped_waves_say_so(tiny_bundle):
    config = _config()
    last = len(config.wave_targets())
    state = waves.start(tiny_bundle, {"ppl": 10.0}, "origin")
    for wave in range(1, last):
        _run(state, config, wave, 10.0)
    _run(state, config, last, 11.0)
    assert state.rows[-1]["decision"] == "strike"
    _run(state, config, last + 1, 11.0)
    assert state.rows[-1]["decision"] == "skipped"
    assert state.rows[-1]["reason"] == (
        f"schedule complete; wave {last} stays with 1 strike(s) of 2 (the stop-loss reverts only after that many "
        "in a row)"
    )


def test_a_last_wave_past_the_general_budget_is_undone_though_only_a_strike(tiny_bundle):
    # the default recipe's two block waves on SmolLM2: each a strike at +23 % and +36 %
    # general perplexity; a strike past the budget must not stand as the last wave
    config = _config(general={"step_limit": 0.03, "budget": 0.05})
    last = len(config.wave_targets())
    state = waves.start(tiny_bundle, DENSE_GENERAL, "origin")
    for wave in range(1, last):
        _run(state, config, wave, 10.0, general=50.0)
    accepted = _snapshot(state)
    _run(state, config, last, 10.0, general=61.5)
    row = state.rows[-1]
    assert row["decision"] == "reverted"
    assert "general perplexity 61.500 is +23.0% over dense, past the budget +5%" in row["reason"]
    assert f"back to the accepted state of wave {last - 1}, decay stopped" in row["reason"]
    assert _same(state, accepted)


def test_gradual_rollback_restores_a_third_per_wave_most_important_first(tiny_bundle):
    config = _config(rollback="gradual", rollback_waves=3)
    state = waves.start(tiny_bundle, {"ppl": 10.0}, "origin")
    _run(state, config, 1, 10.0)
    accepted = _snapshot(state)
    _run(state, config, 2, 11.0)
    _run(state, config, 3, 12.0)
    assert state.rows[-1]["decision"] == "rolling back"
    to_restore = state.rollback.removed()
    zeros = [sum(int((w == 0).sum()) for w in state.linears().values())]
    for wave in (4, 5, 6):
        _run(state, config, wave, 50.0)  # the rollback ignores the scripted perplexity
        zeros.append(sum(int((w == 0).sum()) for w in state.linears().values()))
    restored = [a - b for a, b in zip(zeros, zeros[1:], strict=False)]
    assert sum(restored) == to_restore
    assert max(restored) - min(restored) <= len(state.masks)  # a third per parameter, rounded down
    assert all(abs(r - to_restore / 3) <= len(state.masks) for r in restored)
    assert [r["decision"] for r in state.rows[4:]] == ["rolling back", "rolling back", "reverted"]
    assert _same(state, accepted)


def test_the_budget_stops_the_decay_and_undoes_the_wave(tiny_bundle):
    config = _config(budget=0.1)
    state = waves.start(tiny_bundle, {"ppl": 10.0}, "origin")
    for wave, ppl in [(1, 10.2), (2, 10.5), (3, 10.8)]:
        _run(state, config, wave, ppl)
    accepted = _snapshot(state)
    _run(state, config, 4, 11.1)  # +2.8 % over wave 3, but +11 % over dense
    assert state.rows[-1]["decision"] == "reverted" and "budget" in state.rows[-1]["reason"]
    assert _same(state, accepted)


def test_waves_never_pass_the_cap_and_reach_the_target(tiny_bundle):
    config = _config(budget=None, step_limit=1000.0)
    validation = blocks_of(4, 512, length=32, seed=9)
    teacher = evaluate.teacher_topk(tiny_bundle.model, validation, k=8)
    state = waves.start(tiny_bundle, evaluate.quality(tiny_bundle.model, validation, teacher), "origin")
    targets = config.wave_targets()
    for wave in range(1, len(targets) + 1):
        waves.decay(state, wave, config, blocks_of(4, 512, length=32, seed=wave), None)
        waves.evaluate_state(state, validation, teacher, 4, "cpu")
        waves.gate(state, config, "recipe")
    rows = state.rows
    assert rows[0]["kl"] == 0.0 and all(r["kl"] > 0 for r in rows[1:])
    rows_per_layer = sum(state.masks.shape(n)[0] for n in state.masks)
    total = sum(state.masks.numel(n) for n in state.masks)
    for before, after in zip(rows, rows[1:], strict=False):
        removed = (after["sparsity"] - before["sparsity"]) * total
        present = (1 - before["sparsity"]) * total
        assert removed <= config.cap * present + rows_per_layer, after["wave"]  # within a weight per row
    assert rows[-1]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert [r["decision"] for r in rows[1:]] == ["kept"] * len(targets)


def test_the_rollback_restores_by_the_profile_usage_score(tiny_bundle):
    """Most important first means |W| times the profile's input norm, not |W| alone."""
    config = _config(rollback="gradual")
    generator = torch.Generator().manual_seed(3)
    linears = {f"{n}.weight": m.weight for n, m in tiny_bundle.adapter.linears(tiny_bundle.model).items()}
    importance = {name: torch.rand(w.shape[1], generator=generator) * 100 for name, w in linears.items()}
    state = waves.start(tiny_bundle, {"ppl": 10.0}, "origin")
    for wave, ppl in [(1, 10.0), (2, 11.0), (3, 12.0)]:
        waves.decay(state, wave, config, blocks_of(4, 512, length=32, seed=wave), importance)
        state.current.update(ppl=ppl, kl=0.0)
        waves.gate(state, config, "recipe")
    assert state.rows[-1]["decision"] == "rolling back"
    for name, delta in state.rollback.params.items():
        cols = linears[name].shape[1]
        score = delta.removed_value.abs() * importance[name][delta.removed_index % cols]
        assert bool((score[:-1] >= score[1:]).all()), name
        by_magnitude = delta.removed_value.abs()
        assert not bool((by_magnitude[:-1] >= by_magnitude[1:]).all()), name  # a different order than |W|


def _structured(pattern, **gate):
    return DecayConfig(
        method="wanda", pattern=pattern, cap=0.2, gate={"step_limit": 0.03, "strikes": 2, "budget": None, **gate}
    )


def _channels_kept(state):
    return [int(state.masks[f"model.layers.{i}.mlp.down_proj.weight"].any(0).sum()) for i in range(2)]


def test_structured_waves_remove_whole_channels_under_the_cap(tiny_bundle):
    config = _structured({"kind": "mlp_channels", "ratio": 0.5, "multiple": 8})
    state = waves.start(tiny_bundle, {"ppl": 10.0}, "origin")
    targets = config.wave_targets()
    kept = [_channels_kept(state)]
    for wave in range(1, len(targets) + 1):
        _run(state, config, wave, 10.0)
        kept.append(_channels_kept(state))
    for before, after in zip(kept, kept[1:], strict=False):
        assert all(b - a <= config.cap * b for a, b in zip(after, before, strict=True))  # at most 20 % a wave
        assert all(a % 8 == 0 for a in after)
    assert kept[-1] == [64, 64]
    assert state.rows[-1]["params"] == sum(p.numel() for p in tiny_bundle.model.parameters()) - 2 * 64 * 3 * 64
    assert state.rows[1]["target_units"]["kind"] == "mlp_channels" and state.rows[1]["target_sparsity"] is None


def test_a_structured_gradual_rollback_restores_whole_channels_and_ends_bit_exact(tiny_bundle):
    config = _structured({"kind": "mlp_channels", "ratio": 0.5, "multiple": 8}, rollback="gradual")
    state = waves.start(tiny_bundle, {"ppl": 10.0}, "origin")
    _run(state, config, 1, 10.0)
    accepted = _snapshot(state)
    _run(state, config, 2, 11.0)
    _run(state, config, 3, 12.0)
    assert state.rows[-1]["decision"] == "rolling back" and state.rollback.units > 0
    units = state.rollback.units
    counts = [sum(_channels_kept(state))]
    for wave in (4, 5, 6):
        _run(state, config, wave, 50.0)
        counts.append(sum(_channels_kept(state)))
        # whole channels: a channel is either fully present or fully masked in gate, up and down
        for i in range(2):
            gate = state.masks[f"model.layers.{i}.mlp.gate_proj.weight"]
            down = state.masks[f"model.layers.{i}.mlp.down_proj.weight"]
            assert torch.equal(gate.all(1), gate.any(1)) and torch.equal(gate.any(1), down.any(0))
    restored = [b - a for a, b in zip(counts, counts[1:], strict=False)]
    assert sum(restored) == units and all(abs(r - units / 3) <= 1 for r in restored)
    assert _same(state, accepted)


def test_blocks_go_one_a_wave_and_never_the_same_twice(tiny_bundle):
    config = _structured({"kind": "blocks", "count": 1})
    assert config.wave_targets() == [1.0]
    state = waves.start(tiny_bundle, {"ppl": 10.0}, "origin")
    _run(state, config, 1, 10.0)
    gone = [i for i in range(2) if state.masks.kept(f"model.layers.{i}.mlp.down_proj.weight") == 0]
    assert len(gone) == 1
    dense = sum(p.numel() for p in tiny_bundle.model.parameters())
    block = sum(p.numel() for p in tiny_bundle.model.model.layers[0].parameters())
    assert state.rows[-1]["params"] == dense - block


def test_an_undo_restores_the_masks_of_weights_that_were_zero_already(tiny_bundle):
    """A weight that was exactly zero before it was pruned leaves no trace in the weight
    delta; the masks still come back exactly (the accepted state's masks)."""
    with torch.no_grad():
        tiny_bundle.model.model.layers[0].mlp.down_proj.weight[:, :5] = 0.0
    for rollback in ("full", "gradual"):
        config = _config(rollback=rollback)
        state = waves.start(tiny_bundle, {"ppl": 10.0}, "origin")
        accepted = _snapshot(state)
        for wave, ppl in [(1, 12.0), (2, 13.0), (3, 13.0), (4, 13.0), (5, 13.0)]:
            _run(state, config, wave, ppl)
        assert state.rows[-1]["decision"] in {"reverted", "skipped"}
        assert _same(state, accepted), rollback


def test_a_decay_the_gate_undid_whole_is_known_to_be_back_at_dense(tiny_bundle):
    config = _config(rollback="full", general={"step_limit": 0.03, "budget": 0.05})
    dense = _snapshot(waves.start(tiny_bundle, DENSE_GENERAL, "origin"))
    state = waves.start(tiny_bundle, DENSE_GENERAL, "origin")
    assert waves.back_at_dense(state)
    _run(state, config, 1, 10.0, general=52.0)  # +4 % general: a strike, pending
    assert not waves.back_at_dense(state)
    _run(state, config, 2, 10.0, general=60.0)  # past the budget: both undone
    assert state.rows[-1]["decision"] == "reverted"
    assert waves.back_at_dense(state) and _same(state, dense)
    kept = waves.start(tiny_bundle, DENSE_GENERAL, "origin")
    _run(kept, config, 1, 10.0, general=50.0)
    assert kept.rows[-1]["decision"] == "kept" and not waves.back_at_dense(kept)
