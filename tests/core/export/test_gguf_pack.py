"""GGUF block packing: what gguf's own dequantizer reads back is exactly our quantized weight."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from birdbone.core.export.gguf import QK, container, pack, quantized_bytes
from birdbone.core.quantize import Grid, codes, rtn
from birdbone.errors import ExportError


def _weight(rows: int = 8, cols: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("grid", "kind"),
    [
        (Grid(8, 32, True), "Q8_0"),
        (Grid(4, 32, True), "Q4_0"),
        (Grid(4, 32, False), "Q4_1"),
        (Grid(5, 32, True), "Q5_0"),
        (Grid(5, 32, False), "Q5_1"),
        (Grid(3, 32, True), "Q4_0"),  # fewer bits in a wider block: the same values
        (Grid(2, 32, False), "Q4_1"),
        (Grid(6, 32, True), "Q8_0"),
        (Grid(4, 64, True), "Q4_0"),  # a group of 64: its scale repeated in two blocks
        (Grid(4, None, False), "Q4_1"),  # one group per row
    ],
)
def test_packed_blocks_dequantize_to_our_weights_exactly(grid: Grid, kind: str) -> None:
    values, (d, m) = rtn(_weight(), grid)
    storage = container(grid, values.shape[1])
    assert storage.type == kind
    assert (storage.note is None) == (
        grid in (Grid(8, 32, True), Grid(4, 32, True), Grid(4, 32, False), Grid(5, 32, True), Grid(5, 32, False))
    )
    raw = pack(kind, codes(values, (d, m), grid), d, m)
    qtype = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert block == QK and raw.shape == (values.shape[0], values.shape[1] // QK * size)
    back = gguf.quants.dequantize(raw, qtype)
    assert np.array_equal(back, values.numpy())


def test_pruned_weights_stay_exactly_zero_in_symmetric_blocks() -> None:
    w = _weight()
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    w = w * keep
    values, scales = rtn(w, Grid(4, 32, True), keep)
    raw = quantized_bytes("w", values, container(Grid(4, 32, True), w.shape[1]), scales, keep)
    back = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_0)
    assert np.all(back[~keep.numpy()] == 0)
    assert np.array_equal(back, values.numpy())


def test_groups_that_do_not_fill_a_block_fall_back_to_float16_with_the_reason() -> None:
    storage = container(Grid(4, 16, True), 128)
    assert storage.type == "F16" and storage.grid is None
    assert "32 weights" in storage.note
    assert container(Grid(8, 32, False), 128).type == "F16"
    assert "asymmetric" in container(Grid(8, 32, False), 128).note


def test_a_weight_off_its_grid_is_refused_by_name() -> None:
    w = _weight()
    with pytest.raises(ExportError, match="blk.0.ffn_up.weight is marked as lying on 4-bit sym g32"):
        quantized_bytes("blk.0.ffn_up.weight", w, container(Grid(4, 32, True), 128), None, None)
    # the export's own rounding (the embedding) is allowed
    raw = quantized_bytes("token_embd.weight", w, container(Grid(8, 32, True), 128), None, None, rounding=True)
    assert np.array_equal(
        gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0), rtn(w, Grid(8, 32, True))[0].numpy()
    )


def test_k_quant_grid_packs_into_q4_k_exactly() -> None:
    w = _weight(4, 512)
    grid = Grid(4, 32, False, 256)
    values, (d, m) = rtn(w, grid)
    assert grid.bits_per_weight(512) == 4.5 and grid.gguf_type() == "Q4_K"
    assert bool((m <= 0).all())
    storage = container(grid, 512)
    assert storage.type == "Q4_K" and storage.note is None
    raw = pack("Q4_K", codes(values, (d, m), grid), d, m)
    assert raw.shape == (4, 2 * 144)
    assert np.array_equal(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K), values.numpy())
    # closer to the weights than Q4_0 at the same 4.5 bits
    assert float((values - w).pow(2).mean()) < float((rtn(w, Grid(4, 32, True))[0] - w).pow(2).mean())


def test_k_quant_grids_refuse_rows_that_are_not_whole_superblocks() -> None:
    from birdbone.core.quantize import check_grid
    from birdbone.errors import QuantizeError

    with pytest.raises(QuantizeError, match="ffn_up has 576 input columns, not a multiple of 256"):
        check_grid("ffn_up", (1536, 576), Grid(4, 32, False, 256))
    with pytest.raises(QuantizeError, match="K-quant layout"):
        check_grid("ffn_up", (1536, 512), Grid(4, 32, True, 256))
