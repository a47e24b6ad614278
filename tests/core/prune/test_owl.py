"""OWL: outlier-weighted per-block sparsities."""

import pytest
import torch

from birdbone.config import NMPattern, OWLOptions, ProfileConfig, PruneConfig, UnstructuredPattern
from birdbone.core.profile import profile_usage
from birdbone.core.prune import prune_
from birdbone.core.prune.owl import block_sparsities, outlier_ratio, outlier_ratios
from birdbone.errors import PruneError
from tests.conftest import blocks_of


def test_allocation_averages_to_the_target_within_the_spread():
    ratios = [0.01, 0.05, 0.02, 0.09, 0.03]
    sparsity = block_sparsities(ratios, 0.5, 0.08)
    assert sum(sparsity) / len(sparsity) == pytest.approx(0.5, abs=1e-12)
    assert max(sparsity) - min(sparsity) == pytest.approx(0.16)
    order = sorted(range(5), key=ratios.__getitem__)
    assert [sparsity[i] for i in order] == sorted(sparsity, reverse=True)  # more outliers, fewer removed


def test_allocation_stays_inside_zero_one():
    assert block_sparsities([0.1, 0.1, 0.1], 0.5, 0.08) == [0.5, 0.5, 0.5]
    low = block_sparsities([0.0, 1.0], 0.05, 0.08)  # the spread shrinks to the target
    assert min(low) >= 0 and sum(low) / 2 == pytest.approx(0.05)
    assert block_sparsities([0.0, 1.0], 0.0, 0.08) == [0.0, 0.0]


def test_outlier_ratio_counts_scores_above_threshold_times_mean():
    scores = [torch.ones(10, 10), torch.full((1, 10), 100.0)]  # mean 10, so the ten 100s are outliers
    assert outlier_ratio(scores, 5.0) == pytest.approx(10 / 110)


def _with_outliers(bundle):
    """Block 1 gets a few huge weights: OWL must spare it."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for linear in bundle.adapter.block_linears(bundle.adapter.blocks(bundle.model)[1]).values():
            picks = torch.rand(linear.weight.shape, generator=generator) < 0.02
            linear.weight[picks] *= 40
    return bundle


def test_owl_prunes_each_block_to_its_own_target(tiny_bundle):
    bundle = _with_outliers(tiny_bundle)
    calibration = blocks_of(8, 512, length=32, seed=1)
    pattern = UnstructuredPattern(kind="unstructured", sparsity=0.5)
    masks, report = prune_(bundle, "wanda", pattern, calibration, layer_ratios=OWLOptions(spread=0.1))
    low, high = report["block_sparsity"][1], report["block_sparsity"][0]
    assert report["outlier_ratio"][1] > report["outlier_ratio"][0]
    assert low == pytest.approx(0.4) and high == pytest.approx(0.6)
    for name, sparsity in masks.sparsity().items():
        target = report["block_sparsity"][int(name.split(".")[2])]
        rows = masks.shape(name)[0]
        assert abs(sparsity - target) * masks.numel(name) <= rows, name  # within a weight per row
    assert report["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_outlier_ratios_from_a_profile_match_the_walk(tiny_bundle):
    calibration = blocks_of(8, 512, length=32, seed=1)
    tensors, _ = profile_usage(tiny_bundle, calibration, ProfileConfig(blocks=None, gradient_blocks=0))
    walked = outlier_ratios(tiny_bundle, calibration)
    assert outlier_ratios(tiny_bundle, calibration, input_norms=tensors) == pytest.approx(walked, rel=1e-6)


def test_owl_needs_an_unstructured_pattern(tiny_bundle):
    with pytest.raises(PruneError, match="unstructured pattern"):
        prune_(tiny_bundle, "wanda", NMPattern(kind="nm", n=2, m=4), blocks_of(2, 512), layer_ratios=OWLOptions())
    with pytest.raises(ValueError, match="layer_ratios: owl varies the sparsity per block"):
        PruneConfig(method="wanda", pattern={"kind": "nm", "n": 2, "m": 4}, layer_ratios="owl")
    with pytest.raises(PruneError, match="needs 2 sparsities"):
        prune_(tiny_bundle, "magnitude", UnstructuredPattern(kind="unstructured", sparsity=0.5), layer_ratios=[0.5])
