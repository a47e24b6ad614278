"""Quantization grids, round-to-nearest and GPTQ on single layers: masks kept, GPTQ's
error below RTN's, GGUF grids detected and kept lossless."""

import pytest
import torch

from birdbone.core import quantize
from birdbone.core.quantize import Grid, QuantTable, codes, rtn
from birdbone.errors import QuantizeError


def _layer(rows=64, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.05
    x = torch.randn(2048, cols, generator=g) @ (torch.randn(cols, cols, generator=g) * 0.2)  # correlated inputs
    return w, x, 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("grid", [Grid(4, 32, True), Grid(4, 32, False), Grid(3, 64, True), Grid(8, None, True)])
def test_rtn_puts_every_group_on_its_grid_with_at_most_2_to_the_bits_values(grid):
    w, _, _ = _layer()
    q, _ = quantize.rtn(w, grid)
    g = grid.group or w.shape[1]
    groups = q.reshape(-1, g)
    assert max(len(torch.unique(row)) for row in groups) <= 2**grid.bits
    assert quantize.on_grid(q, grid)
    low, high = grid.levels()
    d, m = quantize.group_params(w.reshape(-1, g), None, grid)
    codes = (groups - m) / torch.where(d == 0, torch.ones_like(d), d)
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.min() >= low and codes.max() <= high


def test_symmetric_4_bit_uses_the_largest_magnitude_as_minus_8_as_q4_0_does():
    w = torch.tensor([[0.5, -1.0] + [0.1] * 30])
    q, _ = quantize.rtn(w, Grid(4, 32, True))
    assert q[0, 1] == -1.0 and q[0, 0] == pytest.approx(0.5, abs=0.125 / 2)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("grid", [Grid(4, 32, True), Grid(4, 32, False)])
def test_pruned_weights_stay_exactly_zero_and_take_no_part_in_the_range(method, grid):
    w, _, h = _layer()
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    w = w * keep
    w[~keep] = 0.0
    w[0, ~keep[0]] = 0.0
    scales = quantize.rtn_(w, grid, keep) if method == "rtn" else quantize.gptq_(w, h, grid, keep)
    assert torch.all(w[~keep] == 0)
    codes = quantize.codes(w, scales, grid, keep)  # every kept weight is d q + m, q in range
    low, high = grid.levels()
    assert codes.min() >= low and codes.max() <= high


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("grid", [Grid(4, 32, True), Grid(3, None, True), Grid(4, 32, False)])
def test_gptq_reconstructs_the_layer_output_better_than_rtn(grid, act_order):
    w, x, h = _layer()
    rtn, _ = quantize.rtn(w, grid)
    gptq = w.clone()
    scales = quantize.gptq_(gptq, h, grid, act_order=act_order)
    quantize.codes(gptq, scales, grid)
    err_rtn = ((x @ (rtn - w).T) ** 2).mean()
    err_gptq = ((x @ (gptq - w).T) ** 2).mean()
    assert err_gptq < 0.8 * err_rtn


def test_weights_from_a_q4_1_file_are_detected_and_rounding_them_again_is_lossless():
    w, _, _ = _layer()
    source, _ = quantize.rtn(w, Grid(4, 32, False))  # what dequantizing a Q4_1 tensor gives
    assert quantize.detect_grid({"a": source}) == Grid(4, 32, False)
    assert torch.equal(quantize.rtn(source, Grid(4, 32, False))[0], source)
    assert quantize.detect_grid({"a": w}) is None


def test_a_model_on_a_kept_source_grid_is_planned_lossless_so_the_fake_quant_heal_skips(tiny_bundle):
    for linear in tiny_bundle.adapter.linears(tiny_bundle.model).values():
        linear.weight.data = quantize.rtn(linear.weight.data, Grid(4, 32, False))[0]  # as from a Q4_1 GGUF
    grids, source = quantize.plan_grids(tiny_bundle, Grid(4, 32, True))
    assert source == Grid(4, 32, False) and quantize.keeps_source(grids, source)
    grids, source = quantize.plan_grids(tiny_bundle, Grid(4, 32, True), keep_source_grid=False)
    assert not quantize.keeps_source(grids, source)
    grids, source = quantize.plan_grids(tiny_bundle, Grid(3, 32, True))  # fewer bits: requantized
    assert source == Grid(4, 32, False) and not quantize.keeps_source(grids, source)


def test_codes_refuse_weights_that_left_their_grid():
    w, _, _ = _layer()
    q, scales = quantize.rtn(w, Grid(4, 32, True))
    q[3, 5] += 1e-3
    with pytest.raises(QuantizeError, match="1 weights are not on the 4-bit sym g32 grid"):
        quantize.codes(q, scales, Grid(4, 32, True))


def test_bits_per_weight_count_the_float16_scales():
    assert Grid(4, 32, True).bits_per_weight(576) == 4.5  # Q4_0
    assert Grid(4, 32, False).bits_per_weight(576) == 5.0  # Q4_1
    assert Grid(8, 32, True).bits_per_weight(576) == 8.5  # Q8_0
    assert Grid(4, None, True).bits_per_weight(512) == 4 + 16 / 512


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        (Grid(4, 40, True), "groups of 40 do not divide"),
        (Grid(9, 32, True), "9 bits is outside 2-8"),
        (Grid(1, 32, True), "1 bits is outside 2-8"),
    ],
)
def test_a_grid_a_layer_cannot_take_is_a_named_error(grid, message):
    with pytest.raises(QuantizeError, match=message):
        quantize.check_grid("model.layers.0.mlp.up_proj.weight", (1536, 576), grid)


def test_a_superblock_needs_the_k_quant_layout_before_any_compute() -> None:
    import pydantic

    from birdbone.config import QuantizeConfig

    assert QuantizeConfig(enabled=True, superblock=256, sym=False).grid() == Grid(4, 32, False, 256)
    with pytest.raises(pydantic.ValidationError, match="K-quant layout \\(Q4_K\\).*got group 32, sym True"):
        QuantizeConfig(enabled=True, superblock=256, sym=True)


def test_k_quant_table_round_trips_through_its_file(tmp_path) -> None:
    grid = Grid(4, 32, False, 256)
    w = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    values, scales = rtn(w, grid)
    QuantTable({"w": grid}, {"w": scales}).save(tmp_path / "q.safetensors")
    table = QuantTable.load(tmp_path / "q.safetensors")
    assert table.grids["w"] == grid and torch.equal(table.scales["w"][0], scales[0])
    assert torch.equal(codes(values, table.scales["w"], grid).float(), codes(values, scales, grid).float())
