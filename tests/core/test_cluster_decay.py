"""Cluster-aware decay: each cluster's share of a wave follows its health, the layer still
reaches its target, earlier removals stay, and the next wave follows the measured cost."""

import pytest
import torch
from pydantic import ValidationError

from birdbone.config import DecayConfig, ProfileConfig
from birdbone.core import cluster_decay, clusters, plots, waves
from birdbone.core.profile import profile_usage
from tests.conftest import blocks_of


def test_water_fill_reaches_the_target_within_floors_and_keeps_the_factor_order():
    sizes = torch.tensor([10, 30, 20, 40])
    factors = torch.tensor([0.5, 1.5, 1.0, 0.8])
    floors = torch.tensor([0.0, 0.1, 0.3, 0.0])
    shares = clusters.water_fill(0.4, sizes, factors, floors)
    assert float((shares * sizes).sum() / sizes.sum()) == pytest.approx(0.4, abs=1e-9)
    assert bool((shares >= floors - 1e-12).all())
    free = shares > floors + 1e-9  # clusters not held at their floor follow their factors
    ratio = shares[free] / factors[free].double()
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))


def test_health_factors_take_less_from_busier_and_costlier_clusters_within_bounds():
    sizes = torch.tensor([10, 10, 10])
    usage = torch.tensor([1.0, 2.0, 4.0])
    factors = clusters.health_factors(usage, None, sizes, (0.5, 1.5), 1.0)
    assert factors[0] > factors[1] > factors[2] and float(factors.min()) >= 0.5 and float(factors.max()) <= 1.5
    costly = clusters.health_factors(torch.ones(3), torch.tensor([1.0, 1.0, 3.0]), sizes, (0.25, 4.0), 1.0)
    assert costly[2] < costly[0] == costly[1]


@pytest.mark.parametrize("axis", [0, 1])
def test_keep_mask_removes_each_clusters_share_and_never_brings_back_a_removed_weight(axis):
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(48, 64, generator=generator)
    labels = torch.arange(3).repeat_interleave(16 if axis == 0 else 64 // 3 + 1)[: scores.shape[axis]]
    prior = torch.rand(48, 64, generator=generator) > 0.1  # 10 % removed already
    sparsities = torch.tensor([0.2, 0.5, 0.35])
    mask = clusters.keep_mask(scores, labels, axis, sparsities, prior)
    assert not bool((mask & ~prior).any())
    got = clusters.cluster_sparsity(mask, labels, axis, 3)
    assert torch.allclose(got, sparsities.double(), atol=0.02)


CLUSTER_WAVES = DecayConfig(
    method="wanda",
    pattern={"kind": "unstructured", "sparsity": 0.5},
    cap=0.3,
    gate={"budget": None},
    clusters={"enabled": True, "bounds": [0.5, 1.5], "strength": 1.0},
)


@pytest.fixture()
def clustered(tiny_bundle):
    config = ProfileConfig(blocks=8, gradient_blocks=2, clusters={"enabled": True, "count": 4, "dims": 8})
    tensors, _ = profile_usage(tiny_bundle, blocks_of(8, 512, length=32), config)
    return tiny_bundle, cluster_decay.from_profile(tensors, tiny_bundle.adapter, 2)


def test_cluster_waves_reach_the_target_and_share_the_removal_by_health(clustered):
    bundle, profile = clustered
    config = CLUSTER_WAVES
    state = waves.start(bundle, {"ppl": 10.0}, "origin")
    targets = config.wave_targets()
    for wave in (1, 2):
        prior = state.masks.copy()
        waves.decay(state, wave, config, blocks_of(4, 512, length=32, seed=wave), None, "cpu", profile)
        assert state.masks.overall_sparsity() == pytest.approx(targets[wave - 1], abs=0.01)
        for name in state.masks:
            assert not bool((state.masks[name] & ~prior[name]).any())  # removed stays removed
        record = state.current["clusters"]
        assert set(record) == {"factors", "sensitivity", "spiked"}
        if wave == 1:
            first, after_first = record["factors"], state.masks.copy()
        state.current.update(ppl=10.0, kl=0.0)
        waves.gate(state, config, "recipe")
    # wave 1: the busiest cluster of each block loses the least of gate_proj
    for i in range(2):
        name = f"model.layers.{i}.mlp.gate_proj.weight"
        labels = profile.labels[i]
        got = clusters.cluster_sparsity(after_first[name], labels, 0, profile.count)
        busiest, idlest = int(profile.usage[i].argmax()), int(profile.usage[i].argmin())
        assert got[busiest] < got[idlest]
        assert first[str(i)][busiest] < first[str(i)][idlest]
    # wave 2 followed wave 1's measured cost
    assert state.rows[2]["clusters"]["factors"] != first
    assert "sensitivity" in state.clusters and state.rows[2]["sparsity"] == pytest.approx(targets[1], abs=0.01)
    assert len(plots.decay_figure(state.rows, 10.0).axes) == 3  # the factors' spread, wave by wave


def test_cluster_decay_needs_an_unstructured_score_ranking():
    with pytest.raises(ValidationError, match="decay.clusters gives each cluster its own share"):
        DecayConfig(method="wanda", pattern={"kind": "nm", "n": 2, "m": 4}, clusters={"enabled": True})
    with pytest.raises(ValidationError, match="bounds .* must hold 1"):
        DecayConfig(method="wanda", pattern={"kind": "unstructured", "sparsity": 0.5}, clusters={"bounds": [1.2, 2]})


def test_cluster_decay_without_profile_clusters_names_the_fix(tiny_bundle):
    from birdbone.errors import PruneError

    with pytest.raises(PruneError, match="profile.clusters.enabled: true"):
        cluster_decay.from_profile({}, tiny_bundle.adapter, 2)


def test_bundle_healing_adapts_only_the_most_pruned_clusters_channels_one_at_a_time(clustered):
    from birdbone.config import HealConfig

    bundle, profile = clustered
    config = CLUSTER_WAVES
    state = waves.start(bundle, {"ppl": 10.0}, "origin")
    waves.decay(state, 1, config, blocks_of(4, 512, length=32, seed=1), None, "cpu", profile)
    pruned = {n: w.detach().clone() for n, w in state.linears().items()}
    chosen = cluster_decay.bundles(profile, state.prior, state.masks, 2)
    heal = HealConfig(
        steps=6, lr=5e-2, eval_every=0, distill=0.0, pool_blocks=8, block_length=32, bundles={"enabled": True}
    )
    waves.heal(state, heal, 1, blocks_of(8, 512, length=32, seed=3), None, None, "cpu")
    report = state.current["heal"]
    assert [b["steps"] for b in report["bundles"]] == [3, 3] and report["steps"] == 6 and report["merged"]
    assert [b["clusters"] for b in report["bundles"]] == [{str(i): c for i, c in b.clusters.items()} for b in chosen]
    for i in range(2):  # bundle 1 holds each block's cluster the wave took most from, bundle 2 the next
        removed = torch.zeros(profile.count, dtype=torch.float64)
        for name, (block, axis) in profile.axes.items():
            if block == i:
                gone = state.prior[name] & ~state.masks[name]
                removed += clusters.removal_cost(gone, torch.ones(1, 1), profile.labels[i], axis, profile.count)[1]
        assert removed[chosen[0].clusters[i]] == removed.max() >= removed[chosen[1].clusters[i]]
    healed = set()
    for name, weight in state.linears().items():
        changed = weight.detach() != pruned[name]
        assert not bool((changed & ~state.masks[name]).any())  # pruned weights stay zero
        if name not in profile.axes:  # attention: not healed in bundle mode
            assert not bool(changed.any()), name
            continue
        block, axis = profile.axes[name]
        members = torch.zeros(profile.labels[block].shape, dtype=torch.bool)
        for b in chosen:
            members |= profile.labels[block] == b.clusters[block]
        inside = members[:, None] if axis == 0 else members[None, :]
        assert not bool((changed & ~inside).any()), name  # outside the bundles: bit for bit as pruned
        if bool(changed.any()):
            healed.add(name)
    assert healed == set(profile.axes)  # every MLP Linear of every block was healed inside its bundles
