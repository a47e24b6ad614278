import pytest
import torch

from birdbone.config import NMPattern, PruneConfig, SparseGPTOptions, UnstructuredPattern
from birdbone.core.prune import PRUNERS, prune_
from birdbone.core.prune.sparsegpt import sparsegpt_
from birdbone.errors import PruneError
from tests.conftest import blocks_of

HALF = UnstructuredPattern(kind="unstructured", sparsity=0.5)
TWO_FOUR = NMPattern(kind="nm", n=2, m=4)


def calibration():
    return blocks_of(8, 512, length=32, seed=1)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "gradient"])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_unstructured_reaches_the_target_in_every_layer(tiny_bundle, method, sparsity):
    pattern = UnstructuredPattern(kind="unstructured", sparsity=sparsity)
    masks, report = prune_(tiny_bundle, method, pattern, calibration())
    linears = tiny_bundle.adapter.linears(tiny_bundle.model)
    assert len(masks) == len(linears) == 14
    for name, linear in linears.items():
        mask = masks[f"{name}.weight"]
        removed = int((~mask).sum())
        assert abs(removed - sparsity * mask.numel()) <= mask.shape[0], name  # within a weight per row
        assert bool((linear.weight[~mask] == 0).all()), name
    assert report["sparsity"] == pytest.approx(sparsity, abs=0.01)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "gradient"])
@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_every_nm_group_keeps_exactly_n(tiny_bundle, method, n, m):
    masks, _ = prune_(tiny_bundle, method, NMPattern(kind="nm", n=n, m=m), calibration())
    for name, mask in masks.items():
        groups = mask.reshape(mask.shape[0], -1, m).sum(-1)
        assert bool((groups == n).all()), name


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "gradient"])
def test_same_seed_same_masks_bit_for_bit(tiny_tokenizer, method):
    from birdbone.core import modeling

    runs = []
    for _ in range(2):
        model = modeling.tiny_model(seed=5, vocab=len(tiny_tokenizer))
        bundle = modeling.ModelBundle(model, tiny_tokenizer, modeling.adapter_for(model))
        masks, _ = prune_(bundle, method, HALF, calibration())
        runs.append((masks, {k: v.clone() for k, v in model.state_dict().items()}))
    assert runs[0][0].equals(runs[1][0])
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_wanda_keeps_weights_on_loud_channels(tiny_bundle):
    """Equal |W|, one input channel 100x louder: Wanda keeps that channel, magnitude cannot tell."""
    from birdbone.core.walk import InputStats

    linear = torch.nn.Linear(8, 4, bias=False)
    with torch.no_grad():
        linear.weight.fill_(1.0)
    stats = InputStats(8)
    x = torch.ones(10, 8)
    x[:, 3] = 100
    stats.add(x)
    pattern = UnstructuredPattern(kind="unstructured", sparsity=0.75)
    mask = PRUNERS["wanda"](pattern, "x").prune_linear(linear, stats, "x", pattern)
    assert bool(mask[:, 3].all())


def test_sparsegpt_reconstructs_better_than_masking(tiny_bundle):
    """On correlated inputs, SparseGPT's update gives a smaller output error than zeroing
    the same share of weights by magnitude or by Wanda's score."""
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(64, 64, generator=generator)
    x = torch.randn(2048, 64, generator=generator) @ mixing  # correlated channels
    weight = torch.randn(32, 64, generator=generator)
    hessian = 2 * x.T @ x / x.shape[0]
    errors = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        w = weight.clone()
        if name == "sparsegpt":
            mask = sparsegpt_(w, hessian, HALF, block_size=16)
        else:
            score = w.abs() * (x.pow(2).sum(0).sqrt() if name == "wanda" else 1)
            mask = torch.ones_like(w, dtype=torch.bool).scatter_(1, score.topk(32, 1, largest=False).indices, False)
            w = w * mask
        assert int((~mask).sum()) == 32 * 32
        errors[name] = float((x @ weight.T - x @ w.T).pow(2).mean())
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]


def test_sparsegpt_without_hessian_damping_room_is_a_named_error():
    weight = torch.randn(4, 4)
    with pytest.raises(PruneError, match="raise prune.sparsegpt.damp"):
        sparsegpt_(weight, -torch.eye(4), HALF, damp=0.01, name="bad")


def test_nm_that_does_not_tile_a_layer_fails_before_compute(tiny_bundle):
    before = tiny_bundle.model.model.layers[0].mlp.up_proj.weight.clone()
    with pytest.raises(PruneError, match="not a multiple of M=48"):
        prune_(tiny_bundle, "wanda", NMPattern(kind="nm", n=2, m=48), calibration())
    assert torch.equal(before, tiny_bundle.model.model.layers[0].mlp.up_proj.weight)


def test_unknown_method_and_missing_calibration(tiny_bundle):
    with pytest.raises(
        PruneError, match="unknown pruning method 'wandaa'; known: gradient, magnitude, sparsegpt, wanda"
    ):
        prune_(tiny_bundle, "wandaa", HALF)
    for method in ("wanda", "sparsegpt", "gradient"):
        with pytest.raises(PruneError, match="needs calibration blocks"):
            prune_(tiny_bundle, method, HALF, None)
    prune_(tiny_bundle, "magnitude", HALF, None)  # weights alone


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ({"kind": "unstructured", "sparsity": 1.0}, "less than 1"),
        ({"kind": "unstructured", "sparsity": -0.1}, "greater than or equal to 0"),
        ({"kind": "nm", "n": 4, "m": 4}, "N:M needs N < M, got 4:4"),
        ({"kind": "nm", "n": 5, "m": 4}, "N:M needs N < M, got 5:4"),
    ],
)
def test_bad_patterns_are_config_errors(pattern, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        PruneConfig(method="wanda", pattern=pattern)


def test_unknown_method_in_config_lists_known():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="known: gradient, magnitude, sparsegpt, wanda"):
        PruneConfig(method="obs", pattern={"kind": "unstructured", "sparsity": 0.5})
    assert PruneConfig(method="sparsegpt", pattern={"kind": "nm", "n": 2, "m": 4}).sparsegpt == SparseGPTOptions()


def test_gradient_pruner_uses_weight_times_gradient(tiny_bundle):
    """|W * dL/dW| per row: rows pruned are the ones with the lowest product."""
    from birdbone.core.profile import gradient_magnitude

    blocks = calibration()
    grads = gradient_magnitude(tiny_bundle, blocks[:8])
    weights = {n: p.detach().clone() for n, p in tiny_bundle.model.named_parameters()}
    masks, _ = prune_(tiny_bundle, "gradient", HALF, blocks)
    name = "model.layers.0.mlp.up_proj.weight"
    score = weights[name].abs() * grads[name]
    expected = torch.ones_like(score, dtype=torch.bool).scatter_(1, score.topk(32, dim=1, largest=False).indices, False)
    assert torch.equal(masks[name], expected)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "gradient"])
def test_a_second_wave_keeps_what_the_first_removed(tiny_bundle, method):
    first, _ = prune_(tiny_bundle, method, UnstructuredPattern(kind="unstructured", sparsity=0.2), calibration())
    second, report = prune_(
        tiny_bundle, method, UnstructuredPattern(kind="unstructured", sparsity=0.45), calibration(), prior=first
    )
    params = dict(tiny_bundle.model.named_parameters())
    for name, mask in second.items():
        assert not bool((mask & ~first[name]).any()), name  # nothing removed comes back
        assert bool((params[name][~mask] == 0).all()), name
    assert report["sparsity"] == pytest.approx(0.45, abs=0.01)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_nm_ramp_then_nm_reaches_exact_groups(tiny_bundle, method):
    from birdbone.core.prune.patterns import NMRamp

    ramp, _ = prune_(tiny_bundle, method, NMRamp(n=2, m=4, sparsity=0.3), calibration())
    for name, mask in ramp.items():
        groups = mask.reshape(mask.shape[0], -1, 4).sum(-1)
        assert bool((groups >= 2).all()), name
    final, _ = prune_(tiny_bundle, method, TWO_FOUR, calibration(), prior=ramp)
    for name, mask in final.items():
        assert bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all()), name
        assert not bool((mask & ~ramp[name]).any()), name


def test_a_target_below_the_sparsity_reached_raises(tiny_bundle):
    first, _ = prune_(tiny_bundle, "wanda", UnstructuredPattern(kind="unstructured", sparsity=0.5), calibration())
    with pytest.raises(PruneError, match="did not reach its target"):
        prune_(tiny_bundle, "wanda", UnstructuredPattern(kind="unstructured", sparsity=0.3), calibration(), prior=first)
