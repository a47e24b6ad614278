"""Structured pruning by masks (decay waves) and the compaction that makes it physical."""

import pytest
import torch

from birdbone.config import BlocksPattern, HeadsPattern, MLPChannelsPattern
from birdbone.core import structure
from birdbone.core.masks import WaveDelta
from birdbone.core.prune.structured import (
    compact_,
    compact_param_count,
    mask_structure_,
    unit_ids,
    wave_pattern,
)
from tests.conftest import blocks_of

PATTERNS = [
    MLPChannelsPattern(kind="mlp_channels", ratio=0.5, multiple=32),
    HeadsPattern(kind="heads", ratio=0.5, mode="query"),
    HeadsPattern(kind="heads", ratio=0.5, mode="kv_groups"),
    BlocksPattern(kind="blocks", count=1),
]


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def weights(bundle):
    return {f"{n}.weight": m.weight.detach().clone() for n, m in bundle.adapter.linears(bundle.model).items()}


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: f"{p.kind}-{getattr(p, 'mode', '')}")
def test_masked_units_compute_what_the_compacted_model_computes(tiny_bundle, pattern):
    ids = blocks_of(2, 512, length=20, seed=9)
    masks, report = mask_structure_(tiny_bundle, pattern, blocks_of(6, 512, seed=2), prior=None)
    for name, w in weights(tiny_bundle).items():  # masked weights are zero, shapes kept
        assert w.shape == masks.shape(name) and not bool(w[~masks[name]].any())
    masked = logits(tiny_bundle.model, ids)
    expected = compact_param_count(tiny_bundle, masks)
    left, info = compact_(tiny_bundle, masks)
    assert torch.allclose(logits(tiny_bundle.model, ids), masked, atol=1e-5)
    assert info["params_after"] == expected < info["params_before"]
    assert left.overall_sparsity() == 0.0  # nothing masked is left: the units are gone
    shapes = structure.layer_shapes(tiny_bundle.model, tiny_bundle.adapter)
    if pattern.kind == "mlp_channels":
        assert all(s["intermediate_size"] == 64 for s in shapes)
    elif pattern.kind == "heads" and pattern.mode == "query":
        assert all(s["num_attention_heads"] == 2 and s["num_key_value_heads"] == 2 for s in shapes)
    elif pattern.kind == "heads":
        assert all(s["num_attention_heads"] == 2 and s["num_key_value_heads"] == 1 for s in shapes)
    else:
        assert len(shapes) == 1 and report["removed"]["blocks"] == info["blocks_removed"]


def test_waves_keep_what_earlier_waves_removed_and_reach_the_target(tiny_bundle):
    pattern = MLPChannelsPattern(kind="mlp_channels", ratio=0.5, multiple=16)
    calibration = blocks_of(6, 512, seed=2)
    prior = None
    kept_before = None
    for fraction, last in ((1 / 3, False), (2 / 3, False), (1.0, True)):
        step = wave_pattern(pattern, tiny_bundle, fraction, last)
        masks, _ = mask_structure_(tiny_bundle, step, calibration, prior=prior)
        down = masks["model.layers.0.mlp.down_proj.weight"].any(0)
        if kept_before is not None:
            assert not bool((down & ~kept_before).any())  # removed channels stay removed
            assert int(kept_before.sum()) - int(down.sum()) <= 128 * 0.5 / 3 + 16  # no more than its share
        kept_before, prior = down, masks
    assert int(kept_before.sum()) == 64


def test_wave_patterns_round_to_whole_units(tiny_bundle):
    channels = MLPChannelsPattern(kind="mlp_channels", ratio=0.5, multiple=32)
    assert [wave_pattern(channels, tiny_bundle, f, False).ratio for f in (0.25, 0.5)] == [0.0, 0.25]
    heads = HeadsPattern(kind="heads", ratio=0.5, mode="query")  # 2 heads a group: one step
    assert wave_pattern(heads, tiny_bundle, 0.1, False).ratio == 0.5
    blocks = BlocksPattern(kind="blocks", count=1)
    assert wave_pattern(blocks, tiny_bundle, 0.5, False).count == 1


@pytest.mark.parametrize("pattern", PATTERNS[:3], ids=["channels", "query", "kv_groups"])
def test_a_third_of_a_structured_rollback_restores_whole_units(tiny_bundle, pattern):
    before = weights(tiny_bundle)
    masks, _ = mask_structure_(tiny_bundle, pattern, blocks_of(6, 512, seed=2), prior=None)
    after = weights(tiny_bundle)
    delta = WaveDelta.between(before, after)
    delta.group_units_(unit_ids(pattern, tiny_bundle))
    assert delta.units > 0
    for part in range(3):
        masks.keep_(delta.part_index(part, 3))
        delta.restore_(tiny_bundle.model, part, 3)
        # every unit is either whole or gone: compaction removes exactly the still-masked ones
        plan_params = compact_param_count(tiny_bundle, masks)
        zero_units = sum(int(masks.numel(n) - masks.kept(n)) for n in masks)
        assert plan_params == sum(p.numel() for p in tiny_bundle.model.parameters()) - zero_units
    for name, w in weights(tiny_bundle).items():
        assert torch.equal(w, before[name])
    assert masks.overall_sparsity() == 0.0


def test_structured_deltas_keep_their_unit_order_on_disk(tiny_bundle, tmp_path):
    pattern = PATTERNS[0]
    before = weights(tiny_bundle)
    mask_structure_(tiny_bundle, pattern, blocks_of(6, 512, seed=2), prior=None)
    delta = WaveDelta.between(before, weights(tiny_bundle))
    delta.group_units_(unit_ids(pattern, tiny_bundle))
    delta.save(tmp_path / "d.safetensors")
    loaded = WaveDelta.load(tmp_path / "d.safetensors")
    assert loaded.units == delta.units
    for part in range(3):
        for name, index in delta.part_index(part, 3).items():
            assert torch.equal(loaded.part_index(part, 3)[name], index)
