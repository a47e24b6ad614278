import pytest
import torch

from birdbone.config import ProfileConfig
from birdbone.core.profile import gradient_magnitude, profile_usage
from tests.conftest import blocks_of


def test_profile_records_every_statistic_and_changes_nothing(tiny_bundle):
    model = tiny_bundle.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tensors, summary = profile_usage(
        tiny_bundle, blocks_of(6, 512, length=24), ProfileConfig(blocks=4, gram=True, gradient_blocks=2)
    )
    for name, linear in tiny_bundle.adapter.linears(model).items():
        assert tensors[f"{name}.input_norm"].shape == (linear.in_features,)
        frequency = tensors[f"{name}.frequency"]
        assert bool(((frequency >= 0) & (frequency <= 1)).all())
        assert tensors[f"{name}.gram"].shape == (linear.in_features, linear.in_features)
        grad = tensors[f"{name}.weight.grad_abs"]
        assert grad.shape == linear.weight.shape and bool((grad >= 0).all()) and float(grad.sum()) > 0
    assert tensors["model.layers.0.head_importance"].shape == (4,)
    assert tensors["block_influence"].shape == (2,)
    assert summary["calibration_blocks"] == 4 and summary["gradient_blocks"] == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad and p.grad is not None for p in model.parameters())


def test_gradient_magnitude_is_the_mean_absolute_gradient(tiny_bundle):
    model = tiny_bundle.model
    blocks = blocks_of(2, 512, length=16, seed=4)
    got = gradient_magnitude(tiny_bundle, blocks)
    name = "model.layers.1.mlp.down_proj.weight"
    weight = dict(model.named_parameters())[name]
    expected = torch.zeros_like(weight)
    for row in blocks:
        model.zero_grad()
        model(row[None], labels=row[None]).loss.backward()
        expected += weight.grad.abs()
    model.zero_grad()
    assert torch.allclose(got[name], expected / 2, rtol=1e-5, atol=1e-8)


def test_profile_walk_matches_a_plain_forward(tiny_bundle):
    """The profiler reuses the statistics pass's outputs: block 1's inputs must still be
    what the model itself feeds block 1."""
    blocks = blocks_of(4, 512, length=20, seed=6)
    tensors, _ = profile_usage(tiny_bundle, blocks, ProfileConfig(blocks=None, gradient_blocks=0))
    seen = []
    layer = tiny_bundle.model.model.layers[1]
    handle = layer.self_attn.q_proj.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        tiny_bundle.model(blocks, use_cache=False)
    handle.remove()
    x = seen[0].reshape(-1, 64)
    assert torch.allclose(tensors["model.layers.1.self_attn.q_proj.input_norm"], x.pow(2).sum(0).sqrt(), rtol=1e-4)
    assert "model.layers.0.self_attn.q_proj.weight.grad_abs" not in tensors


@pytest.mark.parametrize("field", ["blocks", "batch_size"])
def test_profile_config_bounds(field):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="greater than 0"):
        ProfileConfig(**{field: 0})
