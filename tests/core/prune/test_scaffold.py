"""The scaffold criterion (low-rank + sparse at the count of numbers of unstructured pruning)."""

import copy

import pytest
import torch

from birdbone.config import UnstructuredPattern
from birdbone.core import evaluate
from birdbone.core.lowrank import add_factors_
from birdbone.core.prune import prune_
from birdbone.core.prune.scaffold import budget, scaffold_, scaffold_split
from birdbone.errors import PruneError
from tests.conftest import blocks_of


def test_the_budget_keeps_the_numbers_of_unstructured_pruning():
    rank, per_row = budget(64, 128, 0.5, 0.25)
    assert rank == int(0.25 * 4096 // 192) == 5
    assert rank * (64 + 128) + 64 * per_row <= 4096 < rank * (64 + 128) + 64 * (per_row + 1)


def test_alternating_thresholding_recovers_a_low_rank_plus_sparse_matrix():
    generator = torch.Generator().manual_seed(0)
    low = torch.randn(64, 3, generator=generator) @ torch.randn(3, 128, generator=generator)
    spikes = torch.zeros(64, 128)
    spikes[torch.arange(64), torch.randint(0, 128, (64,), generator=generator)] = 10.0
    target = low + spikes
    rank, per_row = budget(64, 128, 0.85, 0.6)
    assert rank >= 3 and per_row >= 1
    errors = []
    for iterations in (1, 10, 100):
        torch.manual_seed(0)  # svd_lowrank is randomized
        sparse, keep, b, a = scaffold_split(target, None, 0.85, 0.6, iterations=iterations)
        errors.append(float((sparse + b @ a - target).norm() / target.norm()))
        assert int(keep.sum(1).max()) == per_row and bool((sparse[~keep] == 0).all())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.01


def test_scaffold_keeps_masks_and_factors_and_beats_wanda_at_the_same_count(tiny_bundle):
    calibration = blocks_of(8, 128, 64)
    validation = blocks_of(8, 128, 64, seed=3)
    wanda, again = copy.deepcopy(tiny_bundle), copy.deepcopy(tiny_bundle)
    prune_(wanda, "wanda", UnstructuredPattern(kind="unstructured", sparsity=0.7), calibration)
    masks, factors, report = scaffold_(tiny_bundle, 0.7, calibration, rank_share=0.25, iterations=10)
    assert report["sparsity"] == pytest.approx(0.7, abs=0.01)  # the factors' numbers count as kept
    assert report["sparse_part_sparsity"] > 0.7
    masks_again, factors_again, _ = scaffold_(again, 0.7, calibration, rank_share=0.25, iterations=10)
    assert masks_again.equals(masks)  # seeded: the same split twice
    assert all(torch.equal(factors[n][0], factors_again[n][0]) for n in factors)
    for name, linear in tiny_bundle.adapter.linears(tiny_bundle.model).items():
        assert bool((linear.weight[~masks[f"{name}.weight"]] == 0).all())  # the weights are S, masked
    add_factors_(tiny_bundle, factors)  # the pruned model with its scaffold adapter
    scaffolded = evaluate.perplexity(tiny_bundle.model, validation)["ppl"]
    assert scaffolded < evaluate.perplexity(wanda.model, validation)["ppl"]


def test_bad_scaffold_settings_are_named():
    with pytest.raises(PruneError, match="rank_share 1.5 is outside"):
        scaffold_(None, 0.5, blocks_of(1, 8), rank_share=1.5)
    with pytest.raises(PruneError, match="needs calibration blocks"):
        scaffold_(None, 0.5, None)
