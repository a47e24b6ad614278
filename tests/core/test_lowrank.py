"""Low-rank factors and the quantization-error correction, on exact matrices and the tiny model."""

import pytest
import torch

from birdbone.core import lowrank
from birdbone.core.quantize import Grid, rtn
from birdbone.errors import QuantizeError
from tests.conftest import blocks_of


def low_rank(rows, cols, rank, seed=0, noise=0.0):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, rank, generator=generator) @ torch.randn(rank, cols, generator=generator)
    return w + noise * torch.randn(rows, cols, generator=generator)


def test_the_rank_is_the_smallest_that_explains_the_target():
    values = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert lowrank.rank_for(values, 14.0, 9 / 14) == 1
    assert lowrank.rank_for(values, 14.0, 0.7) == 2
    assert lowrank.rank_for(values, 14.0, 13 / 14) == 2
    assert lowrank.rank_for(values, 14.0, 1.0) == 3


@pytest.mark.parametrize("target", [0.0, -0.1, 1.5])
def test_an_explained_variance_target_outside_0_1_is_refused(target):
    with pytest.raises(QuantizeError, match=r"outside \(0, 1\].*Fix: quantize.lowrank.explained_variance in \(0, 1\]"):
        lowrank.plan_factors({"w": torch.eye(4)}, target)


def test_only_matrices_that_save_numbers_are_factorized_and_pruned_ones_stay_sparse():
    weights = {
        "a.weight": low_rank(64, 128, 4, noise=1e-4),  # rank 4: 4 x 192 numbers for 8192
        "b.weight": torch.randn(64, 128, generator=torch.Generator().manual_seed(1)),  # full rank at 0.99
        "c.weight": low_rank(64, 128, 4, seed=2),
    }
    masks = {"c.weight": torch.ones(64, 128, dtype=torch.bool)}
    plan = {f.name: f for f in lowrank.plan_factors(weights, 0.99, min_saving=0.1, masks=masks)}
    assert plan["a.weight"].factorized and plan["a.weight"].rank == 4
    assert plan["a.weight"].params_factored == 4 * (64 + 128) and plan["a.weight"].explained >= 0.99
    assert not plan["b.weight"].factorized and "stays dense" in plan["b.weight"].reason
    assert not plan["c.weight"].factorized and "pruned" in plan["c.weight"].reason


def test_factorizing_the_tiny_model_keeps_its_outputs_and_saves_what_it_reports(tiny_bundle):
    linears = tiny_bundle.adapter.linears(tiny_bundle.model)
    name = "model.layers.0.self_attn.q_proj"
    with torch.no_grad():
        linears[name].weight.copy_(low_rank(64, 64, 3, seed=4) / 10)
    ids = blocks_of(2, 128, 16)
    before = tiny_bundle.model(input_ids=ids).logits
    weights = {f"{n}.weight": m.weight for n, m in linears.items()}
    plan = lowrank.plan_factors(weights, 0.999999, min_saving=0.1)
    assert [f.name for f in plan if f.factorized] == [f"{name}.weight"]
    saved = lowrank.factorize_(tiny_bundle, plan)
    module = tiny_bundle.model.get_submodule(name)
    assert isinstance(module, lowrank.LowRankLinear) and module.rank == 3
    assert saved["params_before"] - saved["params_after"] == 64 * 64 - 3 * 128
    assert torch.allclose(tiny_bundle.model(input_ids=ids).logits, before, atol=1e-4)


def test_the_correction_is_the_error_at_full_rank_and_shrinks_it_with_rank():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    q, _ = rtn(w, Grid(3, 32, True))
    b, a = lowrank.error_correction(w, q, 32)
    assert torch.allclose(q + b @ a, w, atol=1e-5)
    norms = torch.linspace(0.1, 3.0, 64)
    errors = []
    for rank in (1, 4, 16):
        b, a = lowrank.error_correction(w, q, rank, norms)
        errors.append(float(((w - q - b @ a) * norms).norm()))
    assert errors[0] > errors[1] > errors[2]
    plain_b, plain_a = lowrank.error_correction(w, q, 4)
    assert errors[1] < float(((w - q - plain_b @ plain_a) * norms).norm())  # weighted beats plain where it counts
    with pytest.raises(QuantizeError, match="Fix: quantize.lowrank.correction_rank between 1 and 32"):
        lowrank.error_correction(w, q, 33)


def test_the_correction_adapter_loads_in_peft_and_matches_the_dense_sum(tiny_bundle, tmp_path):
    import copy

    from peft import PeftModel

    corrections = {}
    for name, linear in tiny_bundle.adapter.linears(tiny_bundle.model).items():
        original = linear.weight.detach().clone()
        q, _ = rtn(original, Grid(4, 32, True))
        linear.weight.data = q
        corrections[f"{name}.weight"] = lowrank.error_correction(original, q, 4)
    lowrank.save_adapter(tmp_path / "adapter", corrections)
    dense = copy.deepcopy(tiny_bundle)
    lowrank.add_factors_(dense, corrections)
    ids = blocks_of(2, 128, 16)
    served = PeftModel.from_pretrained(copy.deepcopy(tiny_bundle.model), str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.allclose(served(input_ids=ids).logits, dense.model(input_ids=ids).logits, atol=1e-4)
        assert not torch.allclose(tiny_bundle.model(input_ids=ids).logits, dense.model(input_ids=ids).logits)
