"""Streaming blocks from disk gives exactly what the in-memory walk gives."""

import json

import pytest
import torch

from birdbone.config import MLPChannelsPattern, ProfileConfig, UnstructuredPattern
from birdbone.core import modeling
from birdbone.core.profile import profile_usage
from birdbone.core.prune import prune_
from birdbone.core.prune.structured import prune_structure_
from birdbone.core.stream import stream_blocks
from birdbone.errors import ModelSourceError, StreamingError
from tests.conftest import blocks_of

HALF = UnstructuredPattern(kind="unstructured", sparsity=0.5)


def _saved(bundle, path, shard=None):
    bundle.model.save_pretrained(path, max_shard_size=shard) if shard else bundle.model.save_pretrained(path)
    bundle.tokenizer.save_pretrained(path)
    return path


def _calibration():
    return blocks_of(6, 512, length=32, seed=3)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("shard", [None, "60KB"])
def test_streamed_prune_equals_in_memory_bit_for_bit(tiny_bundle, tmp_path, method, shard):
    source = _saved(tiny_bundle, tmp_path / "dense", shard)
    expected_masks, _ = prune_(tiny_bundle, method, HALF, _calibration())
    with stream_blocks(source, tmp_path / "pruned") as streamed:
        masks, report = prune_(streamed, method, HALF, _calibration())
        assert not (tmp_path / "pruned").exists()  # appears only when the walk is done
    assert masks.equals(expected_masks)
    assert report["sparsity"] == pytest.approx(0.5, abs=0.01)
    pruned = modeling.load_model_dir(tmp_path / "pruned")  # stock transformers reads the shards
    expected = tiny_bundle.model.state_dict()
    for name, tensor in pruned.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    index = json.loads((tmp_path / "pruned" / "model.safetensors.index.json").read_text())
    assert "model.layers.1.mlp.down_proj.weight" in index["weight_map"]
    source_state = modeling.load_model_dir(source).model.state_dict()
    assert float((source_state["model.layers.0.mlp.up_proj.weight"] == 0).float().mean()) == 0  # source untouched


def test_streamed_profile_equals_in_memory(tiny_bundle, tmp_path):
    source = _saved(tiny_bundle, tmp_path / "dense")
    config = ProfileConfig(blocks=None, batch_size=2, gradient_blocks=0, gram=True)
    expected, _ = profile_usage(tiny_bundle, _calibration(), config)
    with stream_blocks(source) as streamed:
        tensors, summary = profile_usage(streamed, _calibration(), config)
    assert tensors.keys() == expected.keys()
    for key, tensor in tensors.items():
        assert torch.equal(tensor, expected[key]), key
    assert len(summary["block_influence"]) == 2


def test_steps_that_need_the_whole_model_refuse_before_compute(tiny_bundle, tmp_path):
    source = _saved(tiny_bundle, tmp_path / "dense")
    with stream_blocks(source) as streamed:
        with pytest.raises(StreamingError, match="whole model in memory"):
            prune_(streamed, "gradient", HALF, _calibration())
        with pytest.raises(StreamingError, match="structured pruning"):
            prune_structure_(streamed, MLPChannelsPattern(kind="mlp_channels", ratio=0.25), _calibration())
        with pytest.raises(StreamingError, match="gradient_blocks"):
            profile_usage(streamed, _calibration(), ProfileConfig(gradient_blocks=2))


def test_a_failed_walk_leaves_no_output(tiny_bundle, tmp_path):
    source = _saved(tiny_bundle, tmp_path / "dense")
    with pytest.raises(RuntimeError, match="boom"), stream_blocks(source, tmp_path / "pruned") as streamed:
        prune_(streamed, "magnitude", HALF)
        raise RuntimeError("boom")
    assert not (tmp_path / "pruned").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["dense"]


def test_streaming_needs_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelSourceError, match="streaming reads safetensors only"), stream_blocks(tmp_path):
        pass
