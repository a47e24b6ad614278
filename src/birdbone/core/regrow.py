"""RigL regrowth (Evci et al., 2020, "Rigging the Lottery"): at constant density, swap the
weakest active connections for the pruned ones the loss wants most.

Per Linear: the ``k = fraction * pruned`` pruned connections with the largest gradient
magnitude E|dL/dW| (on healing blocks) are re-activated at zero, and the ``k`` active ones
that matter least are removed, so every layer keeps exactly its number of weights. RigL
drops the smallest |W|; in a language model that removes the small weights of the
outlier input features, which carry much of the signal (the reason Wanda beats magnitude
pruning), so the drop score here is the first-order Taylor estimate |W * dL/dW| from the
same gradients.
Only unstructured masks regrow: N:M groups and whole units have no single connection to
swap.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from birdbone.core.masks import MaskSet
from birdbone.core.profile import gradient_magnitude
from birdbone.errors import PruneError


@torch.no_grad()
def regrow_(
    bundle: Any, masks: MaskSet, blocks: torch.Tensor, fraction: float, device: torch.device | str = "cpu"
) -> tuple[MaskSet, dict[str, Any]]:
    """Drops and grows ``fraction`` of each Linear's pruned connections in place.

    Returns:
        The new masks and a report (grown = dropped per layer and in all, seconds).
    """
    if not 0 < fraction <= 1:
        raise PruneError(f"regrow fraction {fraction} is not in (0, 1]")
    start = time.perf_counter()
    with torch.enable_grad():
        gradients = gradient_magnitude(bundle, blocks, device)
    linears = {f"{n}.weight": m for n, m in bundle.adapter.linears(bundle.model).items()}
    out = MaskSet()
    swapped: dict[str, int] = {}
    for name, mask in masks.items():
        weight = linears[name].weight
        pruned = int((~mask).sum())
        count = min(int(fraction * pruned), int(mask.sum()))
        if count == 0:
            out[name] = mask
            swapped[name] = 0
            continue
        flat_mask = mask.reshape(-1)
        grad = gradients[name].reshape(-1).cpu().masked_fill(flat_mask, float("-inf"))
        grow = grad.topk(count).indices
        taylor = (weight.detach().reshape(-1).float().cpu() * gradients[name].reshape(-1).cpu()).abs()
        drop = taylor.masked_fill(~flat_mask, float("inf")).topk(count, largest=False).indices
        new = flat_mask.clone()
        new[drop] = False
        new[grow] = True
        flat = weight.data.view(-1)
        flat[drop.to(flat.device)] = 0  # dropped
        flat[grow.to(flat.device)] = 0  # regrown connections start at zero
        out[name] = new.reshape(mask.shape)
        swapped[name] = count
    return out, {
        "fraction": fraction,
        "swapped": sum(swapped.values()),
        "layers": swapped,
        "seconds": time.perf_counter() - start,
    }
