"""Quantization onto llama.cpp-style group grids: round-to-nearest and GPTQ, masks kept.

A ``Grid`` is (bits, group, sym). Each row of a weight is cut into groups of ``group``
consecutive input columns (None: the whole row is one group), and each group gets a scale
``d`` (and, asymmetric, an offset ``m``), stored as float16 the way GGUF stores them:

- symmetric: x ~ d q, q in [-2^(b-1), 2^(b-1) - 1], d = v / -2^(b-1) with v the group's
  value of largest magnitude, so that value lands exactly on the grid's end (llama.cpp's
  Q4_0 / Q5_0). At 8 bits d = max|x| / 127 and q in [-127, 127] (Q8_0).
- asymmetric: x ~ d q + m, q in [0, 2^b - 1], m = min, d = (max - min) / (2^b - 1)
  (llama.cpp's Q4_1 / Q5_1).
- asymmetric in superblocks (``superblock: 256``, llama.cpp's K-quants, Q4_K): the groups
  of 32 of each run of 256 columns share two float16 superblock scales, and each group's
  d and -m are 6-bit multiples of them (m <= 0); 4.5 bits per weight at 4 bits, the same
  as Q4_0, with an offset per group.

The quantized weights are kept dequantized (float), so the model runs as before and its
perplexity is exactly what a file holding these codes and scales gives. Pruned weights
(keep-mask False) take no part in a group's range and are exactly 0 afterwards.

GPTQ (Frantar et al., 2022, arXiv:2210.17323) quantizes one column at a time and spreads
each column's rounding error over the columns not yet quantized through the upper
Cholesky factor of H^-1 (H = 2 X^T X / n from the calibration walk), in blocks with lazy
updates; with ``act_order`` it takes the columns in order of decreasing diag(H), with the
groups' scales fixed beforehand on the original columns so that groups stay contiguous.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from birdbone.core.io import default_umask
from birdbone.core.linalg import inverse_cholesky, invertible_hessian
from birdbone.core.walk import InputStats, calibration_walk
from birdbone.errors import QuantizeError

MIN_BITS, MAX_BITS = 2, 8
SCALE_BITS = 16  # d and m are float16
K_SCALE_BITS = 6  # a K-quant group's d and m: 6-bit multiples of the superblock's two scales
K_SUPERBLOCK, K_GROUP = 256, 32


@dataclass(frozen=True)
class Grid:
    """The quantization grid of one layer."""

    bits: int
    group: int | None = 32
    sym: bool = True
    superblock: int | None = None  # 256: K-quant scales (6-bit multiples of two per-superblock scales)

    def describe(self) -> str:
        k = f" in {self.superblock}-superblocks" if self.superblock else ""
        return f"{self.bits}-bit {'sym' if self.sym else 'asym'} g{self.group or 'row'}{k}"

    def levels(self) -> tuple[int, int]:
        """The smallest and largest code."""
        if self.sym:
            half = 2 ** (self.bits - 1)
            return (-127, 127) if self.bits == 8 else (-half, half - 1)
        return 0, 2**self.bits - 1

    def bits_per_weight(self, columns: int) -> float:
        """Storage bits per weight, scales (and offsets) included."""
        group = self.group or columns
        if self.superblock:
            return self.bits + 2 * K_SCALE_BITS / group + 2 * SCALE_BITS / self.superblock
        return self.bits + SCALE_BITS * (1 if self.sym else 2) / group

    def gguf_type(self) -> str | None:
        """The llama.cpp type that stores exactly this grid, if one does."""
        if self.group != 32:
            return None
        if self.superblock:
            return "Q4_K" if (self.bits, self.sym, self.superblock) == (4, False, 256) else None
        return {(8, True): "Q8_0", (4, True): "Q4_0", (4, False): "Q4_1", (5, True): "Q5_0", (5, False): "Q5_1"}.get(
            (self.bits, self.sym)
        )


def check_grid(name: str, shape: tuple[int, ...], grid: Grid) -> None:
    """Raises before any compute if ``name`` cannot take ``grid``."""
    if not MIN_BITS <= grid.bits <= MAX_BITS:
        raise QuantizeError(f"{grid.bits} bits is outside {MIN_BITS}-{MAX_BITS}. Fix: quantize.bits in 2..8.")
    if grid.superblock is not None:
        if (grid.superblock, grid.group, grid.sym) != (K_SUPERBLOCK, K_GROUP, False) or grid.bits > 4:
            raise QuantizeError(
                f"superblock grids are llama.cpp's K-quant layout: {K_SUPERBLOCK} columns, asymmetric groups of "
                f"{K_GROUP}, at most 4 bits (Q4_K); got {grid.describe()}. Fix: quantize.superblock: 256 with "
                "group: 32, sym: false, bits <= 4, or superblock: null."
            )
        if shape[1] % K_SUPERBLOCK:
            raise QuantizeError(
                f"{name} has {shape[1]} input columns, not a multiple of {K_SUPERBLOCK}, so no K-quant superblock "
                "fits its rows. Fix: quantize.superblock: null for this model (or widths that are multiples of 256)."
            )
    if grid.group is not None and (grid.group < 1 or shape[1] % grid.group):
        raise QuantizeError(
            f"{name} has {shape[1]} input columns, which groups of {grid.group} do not divide. "
            "Fix: choose a quantize.group that divides every layer's input width (32 and 64 divide "
            "most), or null for one group per row."
        )


def group_params(x: torch.Tensor, keep: torch.Tensor | None, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset ``[rows, 1]`` of the group ``x`` ``[rows, g]`` over its kept weights
    (float16-rounded, as stored); a group with nothing kept gets d = m = 0."""
    if keep is None:
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    else:
        lo = torch.where(keep, x, torch.full_like(x, float("inf"))).amin(1, keepdim=True)
        hi = torch.where(keep, x, torch.full_like(x, float("-inf"))).amax(1, keepdim=True)
        empty = ~keep.any(1, keepdim=True)
        lo, hi = lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)
    if grid.sym:
        if grid.bits == 8:
            d = torch.maximum(lo.abs(), hi.abs()) / 127
        else:
            d = torch.where(hi.abs() > lo.abs(), hi, lo) / -(2 ** (grid.bits - 1))
        m = torch.zeros_like(d)
    elif grid.superblock:  # K-quant: m <= 0 (a 6-bit multiple of -M), rounded per superblock later
        m = lo.clamp_max(0)
        d = (hi - m) / (2**grid.bits - 1)
        return d, m
    else:
        m = lo
        d = (hi - lo) / (2**grid.bits - 1)
    return d.half().float(), m.half().float()


def k_scales(d: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group scales and offsets ``[rows, groups]`` (asymmetric, unrounded) made K-quant
    ones: per superblock of 8 groups, d = D sc and m = -M mn with D, M float16 and sc, mn
    6-bit; the largest group scale (and offset) gets sc = 63 exactly. Float32 results are
    exactly what llama.cpp computes from the stored numbers."""
    rows, groups = d.shape
    per = K_SUPERBLOCK // K_GROUP
    top = 2**K_SCALE_BITS - 1
    d = d.reshape(rows, groups // per, per)
    neg = (-m).clamp_min(0).reshape(rows, groups // per, per)
    outs = []
    for v in (d, neg):
        big = (v.amax(-1, keepdim=True) / top).half().float()
        safe = torch.where(big == 0, torch.ones_like(big), big)
        level = torch.where(big == 0, torch.zeros_like(v), torch.clamp(torch.round(v / safe), 0, top))
        outs.append((big * level).reshape(rows, groups))
    return outs[0], -outs[1]


def round_to_grid(x: torch.Tensor, d: torch.Tensor, m: torch.Tensor, grid: Grid) -> torch.Tensor:
    """x rounded to d q + m (dequantized), codes clamped to the grid's range."""
    low, high = grid.levels()
    safe = torch.where(d == 0, torch.ones_like(d), d)
    q = torch.clamp(torch.round((x - m) / safe), low, high)
    return torch.where(d == 0, m.expand_as(x), q * d + m)


def _groups(columns: int, grid: Grid) -> int:
    return grid.group or columns


Scales = tuple[torch.Tensor, torch.Tensor]  # d, m: [rows, groups], what a file stores with the codes


@torch.no_grad()
def rtn_(weight: torch.Tensor, grid: Grid, keep: torch.Tensor | None = None) -> Scales:
    """Rounds ``weight`` ``[out, in]`` to ``grid`` in place (round-to-nearest); returns the scales."""
    values, scales = rtn(weight, grid, keep)
    weight.copy_(values.to(weight.dtype))
    return scales


@torch.no_grad()
def rtn(weight: torch.Tensor, grid: Grid, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, Scales]:
    """``weight`` rounded to ``grid`` (float32, pruned weights exactly 0), and its scales."""
    rows, cols = weight.shape
    g = _groups(cols, grid)
    x = weight.detach().float().reshape(rows * (cols // g), g)
    k = None if keep is None else keep.to(x.device).reshape(rows * (cols // g), g)
    d, m = group_params(x, k, grid)
    if grid.superblock:
        d, m = (t.reshape(rows * (cols // g), 1) for t in k_scales(d.reshape(rows, -1), m.reshape(rows, -1)))
    out = round_to_grid(x, d, m, grid)
    if k is not None:
        out = out.masked_fill(~k, 0.0)
    return out.reshape(rows, cols), (d.reshape(rows, cols // g), m.reshape(rows, cols // g))


def codes(weight: torch.Tensor, scales: Scales, grid: Grid, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The integer codes of a quantized ``weight`` under its ``scales`` (what a file stores).

    Raises:
        QuantizeError: a kept weight is not d q + m for an integer code in range (the
            weight was changed after quantizing, or the scales are not its own).
    """
    d, m = scales
    g = weight.shape[1] // d.shape[1]
    d, m = d.repeat_interleave(g, 1), m.repeat_interleave(g, 1)
    w = weight.detach().float()
    low, high = grid.levels()
    q = torch.where(d == 0, torch.zeros_like(w), (w - m) / torch.where(d == 0, torch.ones_like(d), d))
    rounded = q.round().clamp(low, high)
    kept = torch.ones_like(w, dtype=torch.bool) if keep is None else keep.to(w.device).bool()
    back = torch.where(d == 0, m, rounded * d + m)
    bad = kept & ((back - w).abs() > 1e-6 * max(float(w.abs().max()), 1e-30))
    if bool(bad.any()):
        raise QuantizeError(
            f"{int(bad.sum())} weights are not on the {grid.describe()} grid of their scales. Fix: export "
            "the quantized model as the quantize stage wrote it (no changes after quantizing)."
        )
    return rounded.to(torch.int8)


@torch.no_grad()
def gptq_(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: Grid,
    keep: torch.Tensor | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    name: str = "layer",
) -> Scales:
    """Quantizes ``weight`` ``[out, in]`` to ``grid`` in place with GPTQ; returns the scales.

    ``block_size`` is rounded up to a multiple of the group so that a group's scale is
    taken from its columns after every earlier column's error has reached them.
    """
    rows, cols = weight.shape
    w = weight.detach().float().clone()
    h, _ = invertible_hessian(hessian, w.device)
    kept = torch.ones_like(w, dtype=torch.bool) if keep is None else keep.to(w.device).bool()
    g = _groups(cols, grid)
    static = None
    if act_order or grid.group is None or grid.superblock:  # scales fixed on the original columns, per group
        x = w.reshape(rows * (cols // g), g)
        d, m = group_params(x, kept.reshape(rows * (cols // g), g), grid)
        static = (d.reshape(rows, cols // g), m.reshape(rows, cols // g))
        if grid.superblock:
            static = k_scales(*static)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols, device=w.device)
    w, h, kept = w[:, perm], h[perm][:, perm], kept[:, perm]
    try:
        hinv = inverse_cholesky(h, damp)
    except torch.linalg.LinAlgError as exc:
        raise QuantizeError(
            f"{name}: the calibration Hessian is not positive definite even with damping {damp}. "
            "Fix: raise quantize.gptq.damp (e.g. 0.1) or use more calibration blocks."
        ) from exc
    if static is None:
        block_size = -(-block_size // g) * g
    groups = cols // g
    scales = (torch.zeros(rows, groups, device=w.device), torch.zeros(rows, groups, device=w.device))
    d = m = torch.zeros(rows, device=w.device)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = i1 + i
            if static is not None:
                group = int(perm[column]) // g
                d, m = static[0][:, group], static[1][:, group]
            elif column % g == 0:
                d2, m2 = group_params(w1[:, i : i + g], kept[:, column : column + g], grid)
                d, m = d2[:, 0], m2[:, 0]
                scales[0][:, column // g], scales[1][:, column // g] = d, m
            col = w1[:, i]
            q = round_to_grid(col, d, m, grid).masked_fill(~kept[:, column], 0.0)
            q1[:, i] = q
            err = (col - q) / hinv1[i, i]
            w1[:, i:] -= err[:, None] @ hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    w = w[:, torch.argsort(perm)]
    if not torch.isfinite(w).all():
        raise QuantizeError(f"{name}: GPTQ produced non-finite weights. Fix: raise quantize.gptq.damp.")
    weight.copy_(w.to(weight.dtype))
    return static if static is not None else scales


def on_grid(weight: torch.Tensor, grid: Grid, keep: torch.Tensor | None = None, tolerance: float = 1e-6) -> bool:
    """Whether ``weight``'s kept values already lie on ``grid`` (rounding them changes
    nothing beyond float rounding): weights dequantized from a GGUF file of that type do."""
    w = weight.detach().float()
    if w.shape[1] % _groups(w.shape[1], grid):
        return False
    scale = float(w.abs().max())
    return scale == 0 or float((rtn(w, grid, keep)[0] - w).abs().max()) <= tolerance * scale


# The grids GGUF files store the common models in; the first one a model's weights lie on
# is the grid they came from.
SOURCE_GRIDS = (Grid(4, 32, False), Grid(4, 32, True), Grid(5, 32, False), Grid(5, 32, True), Grid(8, 32, True))


def detect_grid(weights: dict[str, torch.Tensor], masks: Any = None) -> Grid | None:
    """The grid every weight already lies on (pruned weights ignored), or None."""
    for grid in SOURCE_GRIDS:
        if all(
            on_grid(w, grid, None if masks is None or name not in masks else masks[name]) for name, w in weights.items()
        ):
            return grid
    return None


# --------------------------------------------------------------------------- whole model


class _Quantizer:
    """A calibration-walk method that quantizes every Linear of each block to its grid
    (GPTQ with the block's Hessians, or round-to-nearest from the weights alone), and
    gathers the output head's Hessian from the last block's normed outputs when the head
    is to be quantized with GPTQ."""

    needs_frequency = False

    def __init__(
        self,
        grids: dict[str, Grid | None],
        method: str,
        prefix: str,
        masks: Any,
        options: Any,
        head: tuple[nn.Module, int] | None = None,
    ):
        self.grids, self.method, self.prefix, self.masks, self.options = grids, method, prefix, masks, options
        self.needs_gram = method == "gptq"
        self.needs_inputs = self.needs_gram or head is not None
        self.scales: dict[str, Scales] = {}
        self.head = head  # (the final norm, the last block's index): the head's inputs are collected
        self.head_inputs: InputStats | None = None

    def process(self, index: int, block: Any, linears: dict[str, Any], stats: dict[str, Any]) -> None:
        for name, linear in linears.items():
            full = f"{self.prefix}.{index}.{name}.weight"
            grid = self.grids[full]
            if grid is None:  # kept as it is (already on its source grid)
                continue
            keep = self.masks[full] if self.masks is not None and full in self.masks else None
            if self.method == "gptq":
                self.scales[full] = gptq_(
                    linear.weight.data,
                    stats[name].hessian(),
                    grid,
                    keep,
                    self.options.block_size,
                    self.options.damp,
                    self.options.act_order,
                    full,
                )
            else:
                self.scales[full] = rtn_(linear.weight.data, grid, keep)

    def after_block(self, index: int, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        if self.head is None or index != self.head[1]:
            return
        norm = self.head[0]
        for out in outputs:
            if self.head_inputs is None:
                self.head_inputs = InputStats(out.shape[-1], want_gram=True)
            self.head_inputs.add(norm(out.float()))


def head_weights(bundle: Any) -> dict[str, nn.Parameter]:
    """The output head's weight by name (the embedding's name when the two are tied), and
    the embedding's when it is not tied."""
    model, adapter = bundle.model, bundle.adapter
    embed = {f"{adapter.embed_path}.weight": adapter.embeddings(model).weight}
    if getattr(model.config, "tie_word_embeddings", False):
        return embed
    return {f"{adapter.head_path}.weight": adapter.head(model).weight, **embed}


def check_head(bundle: Any, grid: Grid) -> None:
    """Raises before any compute if the head (or embedding) cannot take ``grid``."""
    for name, weight in head_weights(bundle).items():
        columns = weight.shape[1]
        if grid.group is not None and columns % grid.group:
            raise QuantizeError(
                f"the output head {name} has {columns} columns (the model's width), which quantize.head.group "
                f"{grid.group} does not divide. Fix: a quantize.head.group that divides {columns}, or null for one "
                "group per row."
            )
        check_grid(name, tuple(weight.shape), grid)


def quantize_model_(
    bundle: Any,
    grids: dict[str, Grid | None],
    method: str = "rtn",
    calibration: torch.Tensor | None = None,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    options: Any = None,
    compute_dtype: torch.dtype | None = None,
    head: tuple[Grid, str] | None = None,
) -> dict[str, Scales]:
    """Quantizes every decoder-block Linear of ``bundle.model`` in place to its grid
    (None: left as it is) and returns the scales of each quantized weight.

    Args:
        grids: full weight name -> grid (from ``plan_grids`` or ``bits.allocate``).
        method: ``rtn`` or ``gptq`` (needs ``calibration`` and ``options`` with block_size,
            damp, act_order).
        compute_dtype: autocast type of the calibration forward passes (GPTQ's math is float32).
        head: (grid, ``rtn`` or ``gptq``): the output head too, after the blocks: GPTQ with
            the Hessian of its inputs (the quantized blocks' normed outputs); an untied
            embedding goes to the same grid by round-to-nearest. Their scales are returned
            under ``head_weights``' names.
    """
    for m in (method, *([head[1]] if head else [])):
        if m not in ("rtn", "gptq"):
            raise QuantizeError(
                f"unknown quantization method '{m}'. Fix: quantize.method (or head.method) rtn or gptq."
            )
    gptq_head = head is not None and head[1] == "gptq"
    if (method == "gptq" or gptq_head) and (calibration is None or calibration.shape[0] == 0):
        raise QuantizeError("GPTQ needs calibration blocks. Fix: data.splits.calibration > 0, or quantize.method rtn.")
    if head is not None:
        check_head(bundle, head[0])
    adapter = bundle.adapter
    last = len(adapter.blocks(bundle.model)) - 1
    quantizer = _Quantizer(
        grids,
        method,
        adapter.blocks_path,
        bundle.masks,
        options,
        (adapter.final_norm(bundle.model), last) if gptq_head else None,
    )
    calibration_walk(bundle, calibration, quantizer, batch_size, device, f"{method} quantization", compute_dtype)  # type: ignore[arg-type]
    if head is not None:
        quantizer.scales.update(_quantize_head_(bundle, head[0], quantizer if gptq_head else None, options))
    return quantizer.scales


@torch.no_grad()
def _quantize_head_(bundle: Any, grid: Grid, quantizer: _Quantizer | None, options: Any) -> dict[str, Scales]:
    """The head by GPTQ with the walk's Hessian (``quantizer``) or round-to-nearest; an
    untied embedding by round-to-nearest."""
    weights = head_weights(bundle)
    head = next(iter(weights))  # the head's name comes first
    block_size, damp, act_order = (
        (128, 0.01, True)
        if options is None
        else (
            options.block_size,
            options.damp,
            options.act_order,
        )
    )
    scales = {}
    for name, weight in weights.items():
        if quantizer is not None and name == head:
            assert quantizer.head_inputs is not None
            hessian = quantizer.head_inputs.hessian().to(weight.device)
            scales[name] = gptq_(weight.data, hessian, grid, None, block_size, damp, act_order, name)
        else:
            scales[name] = rtn_(weight.data, grid)
    return scales


def plan_grids(bundle: Any, grid: Grid, keep_source_grid: bool = True) -> tuple[dict[str, Grid | None], Grid | None]:
    """Every block Linear at ``grid``, checked before compute. With ``keep_source_grid``, a
    model whose weights already lie on a grid of at most ``grid.bits`` bits (a GGUF file's
    Q4_1, say) is left on it: requantizing it could only lose. Returns the plan (None: kept)
    and the source grid found."""
    weights = {f"{name}.weight": linear.weight for name, linear in bundle.adapter.linears(bundle.model).items()}
    for name, w in weights.items():
        check_grid(name, tuple(w.shape), grid)
    source = detect_grid(weights, bundle.masks) if keep_source_grid else None
    if source is not None and source.bits <= grid.bits:
        return {name: None for name in weights}, source
    return {name: grid for name in weights}, source


def keeps_source(grids: dict[str, Grid | None], source: Grid | None) -> bool:
    """Whether a ``plan_grids`` plan leaves every weight on the source grid it came on (the
    quantization is lossless: nothing for a fake-quant heal to learn around)."""
    return source is not None and all(grid is None for grid in grids.values())


def linear_sizes(bundle: Any) -> dict[str, tuple[int, int]]:
    """Each block Linear's weight name and shape."""
    return {f"{name}.weight": tuple(lin.weight.shape) for name, lin in bundle.adapter.linears(bundle.model).items()}


def mean_bits(grids: dict[str, Grid | None], sizes: dict[str, tuple[int, int]]) -> float:
    """Storage bits per weight over ``sizes``, scales included (no grid: 16 bits)."""
    total = sum(r * c for r, c in sizes.values())
    bits = sum((grids[n].bits_per_weight(c) if grids[n] is not None else 16.0) * r * c for n, (r, c) in sizes.items())
    return bits / max(total, 1)


def average_bits(bundle: Any, grids: dict[str, Grid | None], source: Grid | None = None) -> float:
    """Storage bits per block-Linear weight, scales included (a kept layer counts at its
    source grid, or 16 bits when it has none)."""
    return mean_bits({name: grid or source for name, grid in grids.items()}, linear_sizes(bundle))


def bytes_at_bits(bundle: Any, grids: dict[str, Grid | None], correction_bits: float = 0.0) -> int:
    """What the model takes stored at its grids, as a GGUF stores it: each weight in
    ``grids`` (block Linears, the head) at its grid's bits, scales included (``None``:
    16 bits), the block Linears' low-rank corrections at ``correction_bits`` per weight,
    every other parameter (norms, an untied embedding left alone) at 16 bits."""
    named = dict(bundle.model.named_parameters())  # a tied head counts once
    bits = 0.0
    for name, weight in named.items():
        grid = grids.get(name)
        bits += weight.numel() * (grid.bits_per_weight(weight.shape[-1]) if grid is not None else 16.0)
    bits += correction_bits * sum(r * c for r, c in linear_sizes(bundle).values())
    return int(bits // 8)


def check_budget(
    sizes: dict[str, tuple[int, int]],
    levels: list[int],
    group: int | None,
    sym: bool,
    target: float,
    reserved: float = 0.0,
) -> None:
    """Raises before compute when a bit budget is below what the lowest level gives, once
    ``reserved`` bits per weight (low-rank corrections) are taken from it."""
    floor = mean_bits(dict.fromkeys(sizes, Grid(min(levels), group, sym)), sizes)
    if target - reserved < floor - 1e-9:
        spent = f", {reserved:.3f} of them for the low-rank corrections," if reserved else ""
        raise QuantizeError(
            f"a bit budget of {target} bits per weight{spent} is below what the minimum of {min(levels)} bits allows "
            f"({floor + reserved:.3f} with {'sym' if sym else 'asym'} groups of {group or 'a row'}, scales included). "
            f"Fix: raise quantize.mixed.avg_bits to at least {floor + reserved:.3f}, or add a lower level"
            + (", or lower quantize.lowrank.correction_rank." if reserved else ".")
        )


def weight_budget(config: Any, sizes: dict[str, tuple[int, int]]) -> float:
    """The mixed budget left for the quantized weights: ``mixed.avg_bits`` less what the
    low-rank corrections take (their float16 numbers count in the average)."""
    from birdbone.core.lowrank import correction_bits

    return config.mixed.avg_bits - correction_bits(sizes, config.lowrank.correction_rank)


def check_quantize(bundle: Any, config: Any) -> None:
    """Every check a ``QuantizeConfig`` needs of the model, before any compute: the group
    divides every layer, the bit budget is reachable."""
    sizes = linear_sizes(bundle)
    grids = [config.grid()]
    if config.mixed.enabled:
        grids = [Grid(b, config.mixed.group, config.sym) for b in config.mixed.levels]
        reserved = config.mixed.avg_bits - weight_budget(config, sizes)
        check_budget(sizes, config.mixed.levels, config.mixed.group, config.sym, config.mixed.avg_bits, reserved)  # type: ignore[arg-type]
    for name, shape in sizes.items():
        for grid in grids:
            check_grid(name, shape, grid)
    if config.head.enabled:
        check_head(bundle, config.head.grid())


QUANT_FILE = "quant.safetensors"


def grid_list(grid: Grid) -> list[Any]:
    """A grid as a JSON list (``Grid(*list)`` reads it back); plain grids keep the
    three-element form earlier files hold."""
    return [grid.bits, grid.group, grid.sym] + ([grid.superblock] if grid.superblock else [])


@dataclass
class QuantTable:
    """What a quantized model's file must hold besides its (dequantized) weights: each
    weight's grid and scales. ``grids[name]`` None: the weight stayed on ``source``."""

    grids: dict[str, Grid | None]
    scales: dict[str, Scales] = field(default_factory=dict)
    source: Grid | None = None
    # weight name -> (B, A): a low-rank correction of its quantization error, kept apart
    # from the quantized weights (a LoRA adapter: ``lowrank.save_adapter``)
    corrections: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # the weights whose corrections the file said it has (``load``), checked against adapter/
    corrected: list[str] = field(default_factory=list)

    def grid_of(self, name: str) -> Grid | None:
        return self.grids.get(name) or self.source

    def save(self, path: Path) -> None:
        tensors = {}
        for name, (d, m) in self.scales.items():
            tensors[f"{name}.d"], tensors[f"{name}.m"] = d.contiguous().cpu(), m.contiguous().cpu()
        table = {
            "grids": {n: None if g is None else grid_list(g) for n, g in self.grids.items()},
            "source": None if self.source is None else grid_list(self.source),
            # which weights have a correction in adapter/: a model folder missing it is refused on load
            "corrected": sorted(self.corrections),
        }
        # one metadata key: safetensors writes several in a random (hash map) order
        save_file(tensors, str(path), metadata={"birdbone.quant": json.dumps(table)})
        os.chmod(path, 0o666 & ~default_umask())  # safetensors creates 0600 files

    @classmethod
    def load(cls, path: Path) -> QuantTable:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        if "birdbone.quant" in meta:
            table = json.loads(meta["birdbone.quant"])
        else:  # written before the one-key form
            table = {"grids": json.loads(meta["grids"]), "source": json.loads(meta["source"])}
        grids = {n: None if g is None else Grid(*g) for n, g in table["grids"].items()}
        source = table["source"]
        scales = {n: (tensors[f"{n}.d"], tensors[f"{n}.m"]) for n in grids if f"{n}.d" in tensors}
        table_out = cls(grids, scales, None if source is None else Grid(*source))
        table_out.corrected = list(table.get("corrected", []))
        return table_out
