"""DeltaHistory: exact, memory-light undo of waves."""

import torch

from birdbone.config import UnstructuredPattern
from birdbone.core.masks import DeltaHistory, WaveDelta
from birdbone.core.prune import prune_
from tests.conftest import blocks_of


def _linears(bundle):
    return {f"{n}.weight": m.weight.detach().clone() for n, m in bundle.adapter.linears(bundle.model).items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _wave(bundle, method, sparsity, history, index):
    before = _linears(bundle)
    pattern = UnstructuredPattern(kind="unstructured", sparsity=sparsity)
    prune_(bundle, method, pattern, blocks_of(4, 512, length=32, seed=index))
    delta = WaveDelta.between(before, _linears(bundle))
    history.record(index, delta)
    return delta


def test_waves_undo_bit_for_bit_newest_first(tiny_bundle):
    history = DeltaHistory()
    dense = _linears(tiny_bundle)
    _wave(tiny_bundle, "wanda", 0.2, history, 1)
    after_one = _linears(tiny_bundle)
    second = _wave(tiny_bundle, "sparsegpt", 0.4, history, 2)  # SparseGPT also moves kept weights
    assert sum(d.updated_index.numel() for d in second.params.values()) > 0
    history.undo_(tiny_bundle.model, 2)
    assert _same(_linears(tiny_bundle), after_one)
    history.undo_(tiny_bundle.model, 1)
    assert _same(_linears(tiny_bundle), dense)
    assert not history.waves


def test_delta_stores_only_what_changed(tiny_bundle, tmp_path):
    history = DeltaHistory()
    delta = _wave(tiny_bundle, "wanda", 0.3, history, 1)
    total = sum(t.numel() for t in _linears(tiny_bundle).values())
    assert abs(delta.removed() - 0.3 * total) < 0.01 * total
    assert all(d.updated_index.numel() == 0 for d in delta.params.values())  # Wanda only removes
    delta.save(tmp_path / "delta.safetensors")
    back = WaveDelta.load(tmp_path / "delta.safetensors")
    assert back.params.keys() == delta.params.keys()
    for name, d in delta.params.items():
        assert torch.equal(back.params[name].removed_index, d.removed_index)
        assert torch.equal(back.params[name].removed_value, d.removed_value)


def test_restoring_in_thirds_brings_back_a_third_each_most_important_first(tiny_bundle):
    dense = _linears(tiny_bundle)
    history = DeltaHistory()
    delta = _wave(tiny_bundle, "magnitude", 0.5, history, 1)
    removed = delta.removed()
    counts, previous = [], removed
    for part in range(3):
        delta.restore_(tiny_bundle.model, part, 3)
        zeros = sum(int((t == 0).sum()) for t in _linears(tiny_bundle).values())
        counts.append(previous - zeros)
        previous = zeros
    assert sum(counts) == removed
    assert max(counts) - min(counts) <= len(delta.params)  # a third per parameter, rounded
    assert _same(_linears(tiny_bundle), dense)
    name = next(iter(delta.params))
    values = delta.params[name].removed_value.abs()
    assert bool((values[:-1] >= values[1:]).all())  # magnitude order: most important first


def test_combined_delta_since_a_wave(tiny_bundle):
    dense = _linears(tiny_bundle)
    history = DeltaHistory()
    _wave(tiny_bundle, "wanda", 0.2, history, 1)
    _wave(tiny_bundle, "sparsegpt", 0.4, history, 2)
    combined = history.since(tiny_bundle.model, 1)
    combined.invert_(tiny_bundle.model)
    assert _same(_linears(tiny_bundle), dense)
