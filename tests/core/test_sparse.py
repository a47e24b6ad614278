"""CSR Linears compute what the dense pruned Linears do."""

from __future__ import annotations

import pytest
import torch

from birdbone.core.masks import MaskSet
from birdbone.core.sparse import SparseLinear, to_csr_, to_semi_structured_
from birdbone.errors import BirdboneError


def test_csr_model_gives_the_dense_pruned_models_logits(tiny_bundle) -> None:
    linears = tiny_bundle.adapter.linears(tiny_bundle.model)
    generator = torch.Generator().manual_seed(0)
    masks = MaskSet(
        {f"{n}.weight": torch.rand(lin.weight.shape, generator=generator) > 0.7 for n, lin in linears.items()}
    )
    masks.apply_(tiny_bundle.model)
    ids = torch.randint(0, 512, (2, 16), generator=generator)
    with torch.no_grad():
        dense = tiny_bundle.model(ids).logits
    converted = to_csr_(tiny_bundle, min_sparsity=0.5)
    assert len(converted) == 2 * 7 and all(0.65 < s < 0.75 for s in converted.values())
    layer = tiny_bundle.model.model.layers[0].mlp.up_proj
    assert isinstance(layer, SparseLinear) and layer.weight.layout == torch.sparse_csr
    assert abs(layer.density() - 0.3) < 0.05
    with torch.no_grad():
        sparse = tiny_bundle.model(ids).logits
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)


def test_dense_layers_are_left_alone(tiny_bundle) -> None:
    assert to_csr_(tiny_bundle, min_sparsity=0.5) == {}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_semi_structured_without_cuda_is_refused_with_the_fix(tiny_bundle) -> None:
    with pytest.raises(BirdboneError, match="compute capability 8.0"):
        to_semi_structured_(tiny_bundle)
