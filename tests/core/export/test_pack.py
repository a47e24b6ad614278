"""compress_model / decompress_model: every strategy round-trips bit for bit; auto picks
the smallest; pruned + quantized weights shrink to their real size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from birdbone.core.export.pack import STRATEGIES, compress_model
from birdbone.core.export.unpack import decompress_model
from birdbone.core.masks import MaskSet
from birdbone.core.quantize import Grid, QuantTable, head_weights, quantize_model_
from birdbone.datasets import ModelDataset
from birdbone.errors import ExportError


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and np.array_equal(a.view(torch.uint8).numpy(), b.view(torch.uint8).numpy())
    )


@pytest.fixture()
def model_dir(tiny_bundle, tmp_path):
    """The tiny model pruned (60 %) and quantized to 4-bit symmetric groups of 32, its
    output head and embedding too, saved as the quantize stage saves it."""
    linears = tiny_bundle.adapter.linears(tiny_bundle.model)
    generator = torch.Generator().manual_seed(0)
    masks = MaskSet(
        {f"{n}.weight": torch.rand(lin.weight.shape, generator=generator) > 0.6 for n, lin in linears.items()}
    )
    masks.apply_(tiny_bundle.model)
    tiny_bundle.masks = masks
    grids = {f"{n}.weight": Grid(4, 32, True) for n in linears}
    ids = torch.randint(0, 512, (2, 16), generator=generator)
    scales = quantize_model_(tiny_bundle, grids, "rtn", ids, 2, head=(Grid(4, 32, True), "gptq"))
    heads = dict.fromkeys(head_weights(tiny_bundle), Grid(4, 32, True))
    tiny_bundle.quant = QuantTable({**grids, **heads}, scales)
    ModelDataset(str(tmp_path / "model")).save(tiny_bundle)
    return tmp_path / "model"


@pytest.mark.parametrize("strategy", ["raw", "gzip", "rle", "sparse"])
def test_each_lossless_strategy_round_trips_every_tensor(model_dir, tmp_path, strategy) -> None:
    stats = compress_model(model_dir, tmp_path / "m.pack", strategy)
    assert set(stats["strategies"]) == set(STRATEGIES) and stats["strategies"][strategy] == len(stats["tensors"])
    out = decompress_model(tmp_path / "m.pack", tmp_path / "back")
    before, after = load_file(model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys() and all(_same_bits(before[k], after[k]) for k in before)
    assert (out / "config.json").read_bytes() == (model_dir / "config.json").read_bytes()


def test_auto_takes_the_quantized_codes_for_pruned_quantized_weights(model_dir, tmp_path) -> None:
    stats = compress_model(model_dir, tmp_path / "m.pack")
    up = stats["tensors"]["model.safetensors/model.layers.0.mlp.up_proj.weight"]
    assert up["strategy"] == "quantized"
    # 4-bit codes + a float16 scale per 32 + a 1-bit mask, against 32-bit floats
    assert up["ratio"] == pytest.approx(32 / (4 + 16 / 32 + 1), rel=0.02)
    assert stats["tensors"]["model.safetensors/model.norm.weight"]["strategy"] in ("rle", "gzip", "raw")
    for head in ("lm_head.weight", "model.embed_tokens.weight"):  # no mask: 4-bit codes and the scales
        assert stats["tensors"][f"model.safetensors/{head}"]["strategy"] == "quantized"
        assert stats["tensors"][f"model.safetensors/{head}"]["ratio"] == pytest.approx(32 / (4 + 16 / 32), rel=0.02)
    assert stats["ratio"] > 1.5 and stats["encode_ms"] > 0 and stats["decode_ms"] > 0
    back = decompress_model(tmp_path / "m.pack", tmp_path / "back")
    before, after = load_file(model_dir / "model.safetensors"), load_file(back / "model.safetensors")
    assert all(_same_bits(before[k], after[k]) for k in before)
    assert ModelDataset(str(back)).load().masks.equals(ModelDataset(str(model_dir)).load().masks)


def test_a_single_safetensors_file_packs_too(model_dir, tmp_path) -> None:
    stats = compress_model(model_dir / "model.safetensors", tmp_path / "one.pack", "sparse")
    assert stats["ratio"] > 1.2  # 60 % zeros: values + a bitmask


def test_bad_requests_are_refused_with_the_fix(model_dir, tmp_path) -> None:
    (tmp_path / "taken.pack").write_bytes(b"x")
    with pytest.raises(ExportError, match="exists. Fix: choose another path, or pass overwrite"):
        compress_model(model_dir, tmp_path / "taken.pack")
    with pytest.raises(ExportError, match="unknown pack strategy lzma. Fix: one of auto, raw, gzip"):
        compress_model(model_dir, tmp_path / "a.pack", "lzma")
    with pytest.raises(
        ExportError, match="masks.safetensors/model.layers.0.mlp.down_proj.weight has no quantization grid"
    ):
        compress_model(model_dir, tmp_path / "b.pack", "quantized")
    assert not (tmp_path / "b.pack").exists() and not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(ExportError, match="is not a bird-bone pack"):
        decompress_model(model_dir / "model.safetensors", tmp_path / "c")


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_codes_pack_at_their_bits_and_come_back(bits) -> None:
    from birdbone.core.export.pack import _pack_bits, _unpack_bits

    values = np.random.default_rng(bits).integers(0, 2**bits, 96)
    stream = _pack_bits(values, bits)
    assert stream.nbytes == 96 * bits // 8
    assert np.array_equal(_unpack_bits(stream, bits, 96), values)


def test_every_file_of_the_folder_is_packed_the_adapter_too(tiny_bundle, model_dir, tmp_path) -> None:
    from birdbone.errors import ModelSourceError

    bundle = ModelDataset(str(model_dir)).load()
    generator = torch.Generator().manual_seed(3)
    up = "model.layers.0.mlp.up_proj.weight"
    bundle.quant.corrections = {up: (torch.randn(128, 4, generator=generator), torch.randn(4, 64, generator=generator))}
    ModelDataset(str(tmp_path / "corrected")).save(bundle)
    stats = compress_model(tmp_path / "corrected", tmp_path / "c.pack")
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= set(stats["files"])
    back = decompress_model(tmp_path / "c.pack", tmp_path / "back")
    listing = sorted(str(p.relative_to(back)) for p in back.rglob("*"))
    assert listing == sorted(str(p.relative_to(tmp_path / "corrected")) for p in (tmp_path / "corrected").rglob("*"))
    b, a = ModelDataset(str(back)).load().quant.corrections[up]
    assert _same_bits(b, bundle.quant.corrections[up][0]) and _same_bits(a, bundle.quant.corrections[up][1])
    # a copy that lost adapter/ no longer loads silently without its corrections
    import shutil

    shutil.rmtree(back / "adapter")
    from kedro.io import DatasetError

    with pytest.raises(DatasetError, match=r"adapter is missing.*1 weights have low-rank corrections.*Fix: copy") as e:
        ModelDataset(str(back)).load()
    assert isinstance(e.value.__cause__, ModelSourceError)
