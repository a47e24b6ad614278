"""Mixed precision under a bit budget on the tiny model: the budget holds, low-usage layers
go down first, stressed blocks are boosted; bad budgets and groups are named errors."""

import pytest
import torch

from birdbone.config import QuantizeConfig
from birdbone.core import bits, quantize
from birdbone.core.quantize import Grid
from birdbone.errors import QuantizeError
from tests.conftest import blocks_of


def test_the_allocation_meets_the_budget_and_lowers_the_least_used_layers_first(tiny_bundle):
    # make block 1's up_proj barely used: its inputs are scaled down by the norm before it
    with torch.no_grad():
        tiny_bundle.model.model.layers[1].post_attention_layernorm.weight.mul_(1e-3)
    plan = bits.allocate(tiny_bundle, [8, 4], 32, True, 6.0, blocks_of(8, 512, seed=1))
    assert plan.average_bits() <= 6.0
    assert plan.average_bits() > 5.5  # no lower than it needs to be
    assert plan.grids["model.layers.1.mlp.up_proj.weight"].bits == 4
    assert plan.grids["model.layers.1.mlp.gate_proj.weight"].bits == 4
    assert {g.bits for g in plan.grids.values()} == {8, 4}


def _allocate(bundle, loss_spike):
    return bits.allocate(
        bundle, [8, 4, 2], 32, True, 5.0, blocks_of(8, 512, seed=1), blocks_of(4, 512, seed=2), loss_spike=loss_spike
    )


def test_a_stressed_block_is_boosted_and_the_others_pay_for_it(tiny_bundle):
    calm = _allocate(tiny_bundle, loss_spike=10.0)  # nothing is stressed
    rises = {b["block"]: b["loss_rise"] for b in calm.stress[0]["blocks"]}
    assert calm.boosted == [] and len(rises) == 2
    worst = max(rises, key=rises.get)
    plan = _allocate(tiny_bundle, loss_spike=(rises[0] + rises[1]) / 2)  # only the worst block is over
    assert [b["block"] for b in plan.boosted[0]["blocks"]] == [worst]
    assert "loss" in plan.boosted[0]["blocks"][0]["why"]
    assert plan.average_bits() <= 5.0 + 1e-9

    def mean_bits(p, block):
        return sum(g.bits for n, g in p.grids.items() if p.block_of[n] == block) / 7

    assert mean_bits(plan, worst) > mean_bits(calm, worst)
    assert mean_bits(plan, 1 - worst) < mean_bits(calm, 1 - worst)


def test_boosts_that_do_not_fit_the_budget_are_dropped(tiny_bundle):
    calm = _allocate(tiny_bundle, loss_spike=10.0)
    plan = _allocate(tiny_bundle, loss_spike=-1.0)  # every block stressed: nobody left to pay
    assert plan.boosted[0] == {"round": 1, "blocks": [], "note": "boosts do not fit the budget; kept the plan"}
    assert plan.grids == calm.grids


def test_a_budget_below_the_lowest_level_is_refused_before_compute(tiny_bundle):
    sizes = {f"{n}.weight": tuple(m.weight.shape) for n, m in tiny_bundle.adapter.linears(tiny_bundle.model).items()}
    with pytest.raises(QuantizeError, match=r"a bit budget of 4.2 bits per weight is below .* 4 bits allows \(4.500"):
        quantize.check_budget(sizes, [8, 4], 32, True, 4.2)
    config = QuantizeConfig(enabled=True, mixed={"enabled": True, "levels": [8, 4], "group": None, "avg_bits": 4.01})
    with pytest.raises(QuantizeError, match="Fix: raise quantize.mixed.avg_bits to at least 4.2"):
        quantize.check_quantize(tiny_bundle, config)  # one group per 64- or 128-wide row: 4.125 or 4.25
    # low-rank corrections take their float16 numbers out of the budget
    from birdbone.core.lowrank import correction_bits

    mixed = {"enabled": True, "levels": [8, 4], "group": 32, "avg_bits": 4.6}
    quantize.check_quantize(tiny_bundle, QuantizeConfig(enabled=True, mixed=mixed))
    config = QuantizeConfig(enabled=True, mixed=mixed, lowrank={"correction_rank": 2})
    reserved = correction_bits(sizes, 2)
    assert reserved > 0.1 and quantize.weight_budget(config, sizes) == pytest.approx(4.6 - reserved)
    with pytest.raises(QuantizeError, match=rf"4.6 bits per weight, {reserved:.3f} of them for the low-rank corr"):
        quantize.check_quantize(tiny_bundle, config)


def test_a_group_that_does_not_divide_a_layer_names_the_layer(tiny_bundle):
    config = QuantizeConfig(enabled=True, group=48)
    with pytest.raises(QuantizeError, match=r"model.layers.0.self_attn.q_proj.weight has 64 input columns"):
        quantize.check_quantize(tiny_bundle, config)


def test_rtn_and_gptq_keep_the_models_masks_and_gptq_loses_less(tiny_bundle):
    from birdbone.config import GPTQOptions, UnstructuredPattern
    from birdbone.core import evaluate
    from birdbone.core.prune import prune_

    calibration, test = blocks_of(16, 512, seed=3), blocks_of(8, 512, seed=4)
    masks, _ = prune_(tiny_bundle, "wanda", UnstructuredPattern(kind="unstructured", sparsity=0.5), calibration)
    tiny_bundle.masks = masks
    start = {n: m.weight.detach().clone() for n, m in tiny_bundle.adapter.linears(tiny_bundle.model).items()}
    teacher = evaluate.teacher_topk(tiny_bundle.model, test, 16)
    kl = {}
    for method in ("rtn", "gptq"):
        for n, m in tiny_bundle.adapter.linears(tiny_bundle.model).items():
            m.weight.data.copy_(start[n])
        grids, _ = quantize.plan_grids(tiny_bundle, Grid(3, 32, True))
        scales = quantize.quantize_model_(tiny_bundle, grids, method, calibration, options=GPTQOptions())
        for n, m in tiny_bundle.adapter.linears(tiny_bundle.model).items():
            keep = masks[f"{n}.weight"]
            assert torch.all(m.weight[~keep] == 0)
            quantize.codes(m.weight, scales[f"{n}.weight"], Grid(3, 32, True), keep)
        kl[method] = evaluate.quality(tiny_bundle.model, test, teacher)["kl"]
    assert kl["gptq"] < kl["rtn"]
