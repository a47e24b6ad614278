"""Clusters of MLP channels: planted groups are found, seeded runs agree, the profile
saves and draws them."""

import pytest
import torch

from birdbone.config import ClusterConfig, ProfileConfig
from birdbone.core import clusters, plots
from birdbone.core.profile import profile_usage
from tests.conftest import blocks_of


def planted(groups: int = 4, per: int = 12, tokens: int = 400, seed: int = 0):
    """Activations of ``groups * per`` channels; each group follows its own hidden signal."""
    generator = torch.Generator().manual_seed(seed)
    signals = torch.randn(groups, tokens, generator=generator).relu()
    truth = torch.arange(groups).repeat_interleave(per)
    acts = signals[truth] * (1 + 0.5 * torch.rand(groups * per, 1, generator=generator))
    acts = acts + 0.05 * torch.randn(acts.shape, generator=generator)
    order = torch.randperm(groups * per, generator=generator)
    return acts[order], truth[order]


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a[:, None] == a[None, :], b[:, None] == b[None, :])


def test_coactivation_finds_the_planted_groups_from_the_gram_matrix():
    acts, truth = planted()
    gram = acts @ acts.T / acts.shape[1]  # channels x channels, as the walk's X^T X / n
    labels = clusters.coactivation_clusters(gram, 4, seed=0, dims=8)
    assert same_partition(labels, truth)
    assert torch.equal(labels, clusters.coactivation_clusters(gram, 4, seed=0, dims=8))  # seeded: the same ids


def test_spectral_bundles_follow_the_singular_direction_each_column_loads_on():
    generator = torch.Generator().manual_seed(1)
    directions = torch.linalg.qr(torch.randn(32, 3, generator=generator))[0]  # orthonormal
    truth = torch.arange(3).repeat_interleave(10)
    strength = torch.tensor([9.0, 6.0, 3.0])[truth]
    weight = directions[:, truth] * strength + 0.01 * torch.randn(32, 30, generator=generator)
    labels = clusters.spectral_clusters(weight, 3)
    assert same_partition(labels, truth)


def test_every_cluster_is_used_and_impossible_counts_are_refused():
    points = torch.randn(20, 3, generator=torch.Generator().manual_seed(2))
    labels = clusters.kmeans(points, 7, seed=3)
    assert sorted(set(labels.tolist())) == list(range(7))
    with pytest.raises(ValueError, match="cannot make 21 clusters of 20 units"):
        clusters.kmeans(points, 21)


@pytest.mark.parametrize("method", ["coactivation", "spectral"])
def test_the_profile_saves_and_draws_each_blocks_clusters(tiny_bundle, method):
    config = ProfileConfig(
        blocks=4, gradient_blocks=0, clusters=ClusterConfig(enabled=True, method=method, count=4, dims=8)
    )
    tensors, summary = profile_usage(tiny_bundle, blocks_of(4, 512, length=32), config)
    for i in range(2):
        labels = tensors[f"model.layers.{i}.mlp.clusters"]
        assert labels.shape == (128,) and sorted(set(labels.tolist())) == [0, 1, 2, 3]
    layer = summary["clusters"]["layers"]["model.layers.0"]
    assert sum(layer["sizes"]) == 128 and len(layer["usage"]) == 4 and min(layer["usage"]) > 0
    assert not any(k.endswith(".gram") for k in tensors)  # the Gram was used, not stored (profile.gram false)
    figure = plots.profile_figure(summary)
    assert len(figure.axes) == 7 and "clusters per block" in figure.axes[3].get_title()  # 4 panels, 3 colour bars
    again, _ = profile_usage(tiny_bundle, blocks_of(4, 512, length=32), config)
    assert torch.equal(again["model.layers.1.mlp.clusters"], tensors["model.layers.1.mlp.clusters"])
