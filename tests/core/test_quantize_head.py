"""The output head quantized by the quantize stage (``quantize.head``): GPTQ with the
Hessian of the head's inputs, on its grid, tied or not."""

from __future__ import annotations

import pytest
import torch

from birdbone.core import modeling
from birdbone.core.quantize import Grid, codes, head_weights, quantize_model_, rtn
from birdbone.errors import QuantizeError
from tests.conftest import blocks_of

GRID = Grid(4, 32, True)


@torch.no_grad()
def _head_inputs(bundle: modeling.ModelBundle, ids: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = bundle.adapter.head(bundle.model).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        bundle.model(ids)
    finally:
        handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])


def _copy(bundle: modeling.ModelBundle) -> modeling.ModelBundle:
    model = modeling.tiny_model("llama", 2, 64, 4, 2, 128, bundle.model.config.vocab_size, seed=0)
    model.load_state_dict(bundle.model.state_dict())
    return modeling.ModelBundle(model, bundle.tokenizer, modeling.adapter_for(model))


def test_gptq_head_lies_on_its_grid_and_reconstructs_the_logits_better_than_rtn(tiny_bundle) -> None:
    ids = blocks_of(8, len(tiny_bundle.tokenizer), 32)
    head_name, embed_name = "lm_head.weight", "model.embed_tokens.weight"
    assert list(head_weights(tiny_bundle)) == [head_name, embed_name]  # untied: the head first
    original = {n: w.detach().clone() for n, w in head_weights(tiny_bundle).items()}
    results = {}
    for method in ("rtn", "gptq"):
        bundle = _copy(tiny_bundle)
        grids = {f"{n}.weight": None for n in bundle.adapter.linears(bundle.model)}
        scales = quantize_model_(bundle, grids, "rtn", ids, 4, head=(GRID, method))
        weights = head_weights(bundle)
        for name in (head_name, embed_name):
            codes(weights[name], scales[name], GRID)  # on the grid of the scales returned
        # the untied embedding is rounded to nearest either way; block Linears left alone (no grid)
        assert torch.equal(weights[embed_name], rtn(original[embed_name], GRID)[0])
        up = bundle.model.model.layers[0].mlp.up_proj.weight
        assert torch.equal(up, tiny_bundle.model.model.layers[0].mlp.up_proj.weight)
        x = _head_inputs(bundle, ids)
        results[method] = float(((x @ (weights[head_name].detach() - original[head_name]).T) ** 2).mean())
    assert results["gptq"] < 0.8 * results["rtn"]


def test_a_tied_head_is_quantized_once_for_both_uses(tiny_bundle) -> None:
    model = tiny_bundle.model
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    ids = blocks_of(4, len(tiny_bundle.tokenizer), 32)
    grids = {f"{n}.weight": GRID for n in tiny_bundle.adapter.linears(model)}
    scales = quantize_model_(tiny_bundle, grids, "gptq", ids, 4, options=_Options(), head=(GRID, "gptq"))
    assert list(head_weights(tiny_bundle)) == ["model.embed_tokens.weight"]
    assert "lm_head.weight" not in scales
    codes(model.lm_head.weight, scales["model.embed_tokens.weight"], GRID)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_head_grid_the_embedding_cannot_take_is_named_before_compute(tiny_bundle) -> None:
    before = tiny_bundle.model.lm_head.weight.detach().clone()
    with pytest.raises(
        QuantizeError,
        match="lm_head.weight has 64 columns .the model.s width., which quantize.head.group 48 does not divide",
    ):
        quantize_model_(tiny_bundle, {}, "rtn", None, head=(Grid(4, 48, True), "rtn"))
    with pytest.raises(QuantizeError, match="GPTQ needs calibration blocks"):
        quantize_model_(tiny_bundle, {}, "rtn", None, head=(GRID, "gptq"))
    assert torch.equal(tiny_bundle.model.lm_head.weight, before)


class _Options:
    block_size, damp, act_order = 32, 0.01, True
