"""Mixed precision under a bit budget (the seeds' precision budgeting), by usage.

Every block Linear starts at the highest allowed bits. The layers whose lowering costs
least per bit saved go down a level, one step at a time, until the model's average
storage bits (scales included) meet the budget. A step's cost is the usage-weighted
rounding error sum_j ||X_j||^2 ||W[:, j] - Q(W)[:, j]||^2 (the diagonal of the layer's
Hessian times the squared error: what the layer's outputs lose on the calibration text),
so rarely used inputs and coarse-grid-tolerant layers go first.

Then blocks under stress are boosted a level and the rest rebalanced, for a few rounds:
a block is under stress when quantizing it alone raises the validation loss by more than
``loss_spike`` (relative), or when, with the whole plan applied, its weights' gradient
norm is above ``grad_spike`` times the blocks' mean.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from birdbone.core.progress import bar
from birdbone.core.quantize import Grid, check_budget, check_grid, mean_bits, rtn
from birdbone.core.walk import InputStats, ReadOnlyMethod, calibration_walk

log = logging.getLogger(__name__)


@dataclass
class Allocation:
    """The plan: each weight's grid, its block, and what the search did."""

    grids: dict[str, Grid]
    block_of: dict[str, int]
    sizes: dict[str, tuple[int, int]]
    target: float
    boosted: list[dict[str, Any]] = field(default_factory=list)  # per round: block, why
    stress: list[dict[str, Any]] = field(default_factory=list)  # per round: per-block loss and gradient spikes

    def average_bits(self) -> float:
        return mean_bits(self.grids, self.sizes)

    def to_json(self) -> dict[str, Any]:
        return {
            "target_bits": self.target,
            "average_bits": self.average_bits(),
            "bits": {name: grid.bits for name, grid in self.grids.items()},
            "boosted": self.boosted,
            "stress": self.stress,
        }


class _Usage(ReadOnlyMethod):
    """A read-only walk that keeps each Linear's input norms ||X_j||^2 (per token)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.norms: dict[str, torch.Tensor] = {}

    def process(
        self, index: int, block: nn.Module, linears: dict[str, nn.Linear], stats: dict[str, InputStats]
    ) -> None:
        for name in linears:
            s = stats[name]
            self.norms[f"{self.prefix}.{index}.{name}.weight"] = (s.sq_sum / max(s.tokens, 1)).float()


def usage_norms(
    bundle: Any, calibration: torch.Tensor, batch_size: int, device: Any, compute_dtype: Any = None
) -> dict[str, torch.Tensor]:
    """Mean squared input of every block Linear's input channels on ``calibration``."""
    usage = _Usage(bundle.adapter.blocks_path)
    calibration_walk(bundle, calibration, usage, batch_size, device, "usage for bit allocation", compute_dtype)  # type: ignore[arg-type]
    return usage.norms


def rounding_costs(
    weights: dict[str, torch.Tensor],
    norms: dict[str, torch.Tensor],
    levels: list[int],
    group: int | None,
    sym: bool,
    masks: Any = None,
) -> dict[str, dict[int, float]]:
    """Per weight and level, sum_j ||X_j||^2 ||W[:, j] - Q(W)[:, j]||^2."""
    costs: dict[str, dict[int, float]] = {}
    for name, w in bar(weights.items(), desc="rounding costs", unit="layer", leave=False):
        keep = masks[name] if masks is not None and name in masks else None
        costs[name] = {}
        for bits in levels:
            q, _ = rtn(w, Grid(bits, group, sym), keep)
            err = (q - w.detach().float()).pow(2).sum(0)
            costs[name][bits] = float((err * norms[name].to(err.device)).sum())
    return costs


def _lower(
    grids: dict[str, Grid],
    sizes: dict[str, tuple[int, int]],
    costs: dict[str, dict[int, float]],
    levels: list[int],
    target: float,
    frozen: set[str],
) -> bool:
    """Lowers the cheapest layers a level at a time until the average meets ``target``;
    False when the layers not ``frozen`` cannot go lower."""
    down = {high: low for high, low in zip(levels, levels[1:], strict=False)}
    while mean_bits(grids, sizes) > target + 1e-9:
        best, best_rate = None, float("inf")
        for name, grid in grids.items():
            if name in frozen or grid.bits not in down:
                continue
            low = down[grid.bits]
            rows, cols = sizes[name]
            saved = (grid.bits_per_weight(cols) - Grid(low, grid.group, grid.sym).bits_per_weight(cols)) * rows * cols
            rate = (costs[name][low] - costs[name][grid.bits]) / saved
            if rate < best_rate:
                best, best_rate = name, rate
        if best is None:
            return False
        old = grids[best]
        grids[best] = Grid(down[old.bits], old.group, old.sym)
    return True


def allocate(
    bundle: Any,
    levels: list[int],
    group: int | None,
    sym: bool,
    target: float,
    calibration: torch.Tensor,
    validation: torch.Tensor | None = None,
    batch_size: int = 4,
    device: Any = "cpu",
    loss_spike: float = 0.01,
    grad_spike: float = 2.0,
    rounds: int = 2,
    compute_dtype: Any = None,
) -> Allocation:
    """The bits of every block Linear under ``target`` average bits (see the module).

    Args:
        levels: allowed bits, e.g. [8, 4]; every layer starts at the highest.
        validation: token blocks for the stress checks (None: no boosting).
    """
    levels = sorted(set(levels), reverse=True)
    prefix = bundle.adapter.blocks_path
    weights, block_of, sizes = {}, {}, {}
    for i, block in enumerate(bundle.adapter.blocks(bundle.model)):
        for name, linear in bundle.adapter.block_linears(block).items():
            full = f"{prefix}.{i}.{name}.weight"
            check_grid(full, tuple(linear.weight.shape), Grid(levels[0], group, sym))
            weights[full], block_of[full], sizes[full] = linear.weight, i, tuple(linear.weight.shape)
    check_budget(sizes, levels, group, sym, target)
    norms = usage_norms(bundle, calibration, batch_size, device, compute_dtype)
    costs = rounding_costs(weights, norms, levels, group, sym, bundle.masks)
    grids = {name: Grid(levels[0], group, sym) for name in weights}
    _lower(grids, sizes, costs, levels, target, frozen=set())
    plan = Allocation(grids, block_of, sizes, target)
    if validation is None or validation.shape[0] == 0:
        return plan
    frozen: set[str] = set()
    for round_ in range(rounds):
        stressed = stress(bundle, plan, validation, batch_size, device, loss_spike, grad_spike)
        plan.stress.append(stressed)
        boost = [b for b in stressed["blocks"] if b["stressed"]]
        if not boost:
            break
        up = {low: high for high, low in zip(levels, levels[1:], strict=False)}
        before, frozen_before = dict(grids), set(frozen)
        for b in boost:
            for n in (n for n, i in block_of.items() if i == b["block"]):
                if grids[n].bits in up:
                    grids[n] = Grid(up[grids[n].bits], group, sym)
                frozen.add(n)
        if not _lower(grids, sizes, costs, levels, target, frozen):  # the boosts do not fit: the budget comes first
            grids.update(before)
            frozen = frozen_before
            plan.boosted.append(
                {"round": round_ + 1, "blocks": [], "note": "boosts do not fit the budget; kept the plan"}
            )
            break
        plan.boosted.append({"round": round_ + 1, "blocks": [{"block": b["block"], "why": b["why"]} for b in boost]})
        log.info("bit allocation round %d: boosted blocks %s", round_ + 1, [b["block"] for b in boost])
    return plan


@torch.no_grad()
def _loss(model: nn.Module, blocks: torch.Tensor, batch_size: int, device: Any) -> float:
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start : start + batch_size].to(device)
        out = model(ids, labels=ids, use_cache=False)
        n = ids.shape[0] * (ids.shape[1] - 1)
        total += float(out.loss) * n
        count += n
    return total / count


def stress(
    bundle: Any,
    plan: Allocation,
    validation: torch.Tensor,
    batch_size: int,
    device: Any,
    loss_spike: float,
    grad_spike: float,
) -> dict[str, Any]:
    """Per block: the validation loss rise with only that block quantized to the plan, and
    its weights' gradient norm with the whole plan applied (relative to the mean)."""
    model = bundle.model
    linears = {f"{name}.weight": lin for name, lin in bundle.adapter.linears(model).items()}
    masks = bundle.masks
    base = _loss(model, validation, batch_size, device)
    blocks = sorted(set(plan.block_of.values()))
    rises = {}
    for b in bar(blocks, desc="stress: loss per quantized block", unit="block", leave=False):
        names = [n for n, i in plan.block_of.items() if i == b]
        saved = {n: linears[n].weight.data.clone() for n in names}
        for n in names:
            linears[n].weight.data.copy_(
                rtn(saved[n], plan.grids[n], masks[n] if masks is not None and n in masks else None)[0]
            )
        rises[b] = _loss(model, validation, batch_size, device) / base - 1.0
        for n in names:
            linears[n].weight.data.copy_(saved[n])
    saved = {n: lin.weight.data.clone() for n, lin in linears.items()}
    for n, lin in linears.items():
        lin.weight.data.copy_(rtn(saved[n], plan.grids[n], masks[n] if masks is not None and n in masks else None)[0])
    norms = dict.fromkeys(blocks, 0.0)
    wanted = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.enable_grad():
        for lin in linears.values():
            lin.weight.requires_grad_(True)
        for start in range(0, validation.shape[0], batch_size):
            ids = validation[start : start + batch_size].to(device)
            model(ids, labels=ids, use_cache=False).loss.backward()
    for n, lin in linears.items():
        if lin.weight.grad is not None:
            norms[plan.block_of[n]] += float(lin.weight.grad.float().pow(2).sum())
        lin.weight.grad = None
        lin.weight.data.copy_(saved[n])
    for name, p in model.named_parameters():
        p.requires_grad_(wanted[name])
    mean = sum(v**0.5 for v in norms.values()) / len(norms)
    rows = []
    for b in blocks:
        g = norms[b] ** 0.5 / mean if mean > 0 else 0.0
        why = []
        if rises[b] > loss_spike:
            why.append(f"loss {rises[b]:+.2%} > {loss_spike:+.1%}")
        if g > grad_spike:
            why.append(f"gradient norm {g:.2f}x the mean > {grad_spike}x")
        rows.append({"block": b, "loss_rise": rises[b], "grad_ratio": g, "stressed": bool(why), "why": "; ".join(why)})
    return {"base_loss": base, "blocks": rows}
