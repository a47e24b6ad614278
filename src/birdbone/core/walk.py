"""The block-by-block calibration walk that profiling, Wanda, SparseGPT and GPTQ all reuse.

Capture the inputs of the first decoder block once; then for each block: hook its
Linears and run the calibration batches through it to collect input statistics, let the
method act on the block (score, mask, update weights), and run the block again so that
its (already changed) outputs feed the next block. Only one block's activations are
live at a time besides the calibration hidden states.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from birdbone.core.progress import bar

log = logging.getLogger(__name__)


@dataclass
class InputStats:
    """Running statistics of one Linear's inputs over the calibration tokens.

    ``sq_sum[j]`` is sum_t x_tj^2, so ``norm()`` is Wanda's ||X_j||_2; ``gram`` is
    sum_t x_t x_t^T (the Hessian of the layer-wise squared error is 2 gram / tokens);
    ``active[j]`` counts tokens with |x_tj| > eps. Only what was asked for is collected.
    """

    features: int
    want_gram: bool = False
    want_frequency: bool = False
    eps: float = 1e-3
    tokens: int = 0
    sq_sum: torch.Tensor = field(init=False)
    active: torch.Tensor | None = field(init=False, default=None)
    gram: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.sq_sum = torch.zeros(self.features, dtype=torch.float64)
        if self.want_frequency:
            self.active = torch.zeros(self.features, dtype=torch.float64)
        if self.want_gram:
            self.gram = torch.zeros(self.features, self.features, dtype=torch.float32)

    @torch.no_grad()
    def batch_terms(self, x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """This batch's contribution (tokens, sq_sum, active, gram); Linears that share an
        input reuse it instead of computing it again."""
        with torch.autocast(x.device.type, enabled=False):  # statistics in float32 always
            x = x.detach().reshape(-1, self.features).float()
            sq = x.pow(2).sum(0).double().cpu()
            active = (x.abs() > self.eps).sum(0).double().cpu() if self.want_frequency else None
            gram = (x.T @ x).cpu() if self.want_gram else None
        return x.shape[0], sq, active, gram

    def add_terms(self, terms: tuple[int, torch.Tensor, torch.Tensor | None, torch.Tensor | None]) -> None:
        tokens, sq, active, gram = terms
        self.tokens += tokens
        self.sq_sum += sq
        if self.active is not None and active is not None:
            self.active += active
        if self.gram is not None and gram is not None:
            self.gram += gram

    def add(self, x: torch.Tensor) -> None:
        """Adds a batch of inputs ``[..., features]``."""
        self.add_terms(self.batch_terms(x))

    def norm(self) -> torch.Tensor:
        """Per-channel L2 norm of the inputs over all calibration tokens."""
        return self.sq_sum.sqrt().float()

    def frequency(self) -> torch.Tensor:
        """Share of tokens on which each input channel is active (|x| > eps)."""
        if self.active is None:
            raise RuntimeError("this walk did not count activations (the method did not ask for it)")
        return (self.active / max(self.tokens, 1)).float()

    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / tokens, the Hessian of the layer's squared reconstruction error."""
        if self.gram is None:
            raise RuntimeError("this walk did not collect the Gram matrix (the method did not ask for it)")
        return 2 * self.gram / max(self.tokens, 1)


class _StatsDone(Exception):
    """Raised by the last Linear's hook when the rest of the block's pass is not needed."""


class _SharedInputs:
    """Forward pre-hooks that compute each distinct input's statistics once per batch (q,
    k and v see the same tensor, as do gate and up). With ``stop_after``, the hook of that
    Linear (the block's last) ends the pass once its input is recorded: a statistics pass
    whose outputs the walk will not use skips the last matmul."""

    def __init__(self, stats: dict[str, InputStats], stop_after: str | None = None):
        self.stats = stats
        self.stop_after = stop_after
        # id(x) -> (x, terms). Holding x keeps its memory (and so its id) from being reused
        # by a later input of this batch; the cache is cleared after every batch.
        self.cache: dict[int, tuple[torch.Tensor, Any]] = {}

    def hook(self, name: str) -> Any:
        def observe(module: nn.Module, args: tuple) -> None:
            x = args[0]
            entry = self.cache.get(id(x))
            if entry is None:
                entry = (x, self.stats[name].batch_terms(x))
                self.cache[id(x)] = entry
            self.stats[name].add_terms(entry[1])
            if name == self.stop_after:
                raise _StatsDone

        return observe


class BlockMethod(Protocol):
    """What a method tells the walk, and what the walk calls back."""

    needs_inputs: bool  # collect InputStats for the block's Linears
    needs_gram: bool  # ... including the Gram matrix X^T X
    needs_frequency: bool  # ... including activation counts
    # Optional, read with getattr/hasattr:
    #   gram_for (set of block-Linear names, default None: all): the Linears whose Gram matrix
    #     is collected when needs_gram;
    #   frequency_eps (float, default 1e-3): |x| above which an input channel counts as active;
    #   modifies_blocks (bool, default True): False lets the walk reuse the statistics pass's
    #     outputs instead of running the unchanged block again;
    #   after_block(index, inputs, outputs): called with the block's hidden-state inputs and
    #     its (final) outputs, one tensor per calibration batch.

    def process(
        self, index: int, block: nn.Module, linears: dict[str, nn.Linear], stats: dict[str, InputStats]
    ) -> None:
        """Acts on one block (in place) after its calibration statistics are in."""


class ReadOnlyMethod:
    """Base of the walk methods that only look: inputs collected (no Gram matrix, no
    activation counts unless a subclass asks), blocks left unchanged, so the statistics
    pass's outputs feed the next block without a second pass."""

    needs_inputs = True
    needs_gram = False
    needs_frequency = False
    modifies_blocks = False


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, blocks: torch.Tensor, batch_size: int, device: torch.device
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Runs the model up to its first decoder block for each calibration batch and keeps
    the block's hidden-state input and keyword arguments (rotary embeddings, masks)."""
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Captured

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, blocks.shape[0], batch_size):
            with contextlib.suppress(_Captured):
                model(blocks[start : start + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
    return captured


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_block(
    block: nn.Module, inputs: Iterable[tuple[torch.Tensor, dict[str, Any]]], shared: _SharedInputs | None = None
) -> list[torch.Tensor]:
    """The block's outputs for each captured input (none if ``shared`` stops the passes)."""
    outputs = []
    for hidden, kwargs in inputs:
        try:
            outputs.append(_hidden(block(hidden, **kwargs)))
        except _StatsDone:
            pass
        finally:
            if shared is not None:
                shared.cache.clear()
    return outputs


def autocast_dtype(name: str) -> torch.dtype | None:
    """A config's ``compute_dtype`` as the walk's ``compute_dtype``: None for float32 (no autocast)."""
    return None if name == "float32" else getattr(torch, name)


def resident_block(bundle: Any) -> Callable[[int], contextlib.AbstractContextManager[nn.Module]]:
    """``resident(index)``: a context giving block ``index`` with its weights in memory. A
    streamed bundle (``core.stream``) reads it from disk and writes it back; an in-memory
    model just hands it over."""
    streamed = getattr(bundle, "resident", None)
    if streamed is not None:
        return streamed
    layers = bundle.adapter.blocks(bundle.model)
    return lambda index: contextlib.nullcontext(layers[index])


def calibration_walk(
    bundle: Any,
    blocks: torch.Tensor,
    method: BlockMethod,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    desc: str = "calibration walk",
    compute_dtype: torch.dtype | None = None,
) -> None:
    """Walks the decoder blocks in order, calling ``method.process`` on each.

    Args:
        bundle: a ``ModelBundle`` (model + adapter).
        blocks: calibration token ids ``[n, length]``.
        method: what to do with each block (see ``BlockMethod``).
        compute_dtype: run the blocks' forward passes under autocast to this type (e.g.
            bfloat16, about 2.5x faster matmuls on CPUs with AVX512-BF16); statistics are
            still accumulated in float32 and weights are changed in their own dtype.
    """
    device = torch.device(device)
    autocast = torch.autocast(device.type, dtype=compute_dtype, enabled=compute_dtype is not None)
    with autocast:
        _walk(bundle, blocks, method, batch_size, device, desc)


def _walk(
    bundle: Any, blocks: torch.Tensor, method: BlockMethod, batch_size: int, device: torch.device, desc: str
) -> None:
    model, adapter = bundle.model, bundle.adapter
    layers = adapter.blocks(model)
    resident = resident_block(bundle)
    if not method.needs_inputs:  # weights alone: nothing to run through the model
        for index in bar(range(len(layers)), desc=desc, unit="block"):
            with resident(index) as block:
                method.process(index, block, adapter.block_linears(block), {})
        return
    inputs = capture_block_inputs(model, layers[0], blocks, batch_size, device)
    eps = getattr(method, "frequency_eps", 1e-3)
    for index in bar(range(len(layers)), desc=desc, unit="block"):
        with resident(index) as block:
            inputs = _walk_block(index, block, adapter, inputs, method, eps, device)


def _walk_block(
    index: int,
    block: nn.Module,
    adapter: Any,
    inputs: list[tuple[torch.Tensor, dict[str, Any]]],
    method: BlockMethod,
    eps: float,
    device: torch.device,
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Statistics, the method, and the (changed) block's outputs as the next inputs."""
    linears = adapter.block_linears(block)
    gram_for = getattr(method, "gram_for", None)
    gram = {name: method.needs_gram and (gram_for is None or name in gram_for) for name in linears}
    stats = {
        name: InputStats(linear.in_features, gram[name], method.needs_frequency, eps)
        for name, linear in linears.items()
    }
    rerun = getattr(method, "modifies_blocks", True)  # the statistics pass's outputs are then not used
    shared = _SharedInputs(stats, stop_after=adapter.last_linear if rerun else None)
    handles = [linear.register_forward_pre_hook(shared.hook(name)) for name, linear in linears.items()]
    try:
        outputs = run_block(block, inputs, shared)
    finally:
        for handle in handles:
            handle.remove()
    with torch.autocast(device.type, enabled=False):  # the method's own math in full precision
        method.process(index, block, linears, stats)
    # Autocast caches its low-precision copy of each weight and does not see in-place
    # changes: clear it so the rerun uses the changed weights, and again to free it.
    torch.clear_autocast_cache()
    if rerun:  # the changed block's outputs feed the next
        outputs = run_block(block, inputs)
        torch.clear_autocast_cache()
    if hasattr(method, "after_block"):
        with torch.autocast(device.type, enabled=False):
            method.after_block(index, [h for h, _ in inputs], outputs)
    return [(out, kwargs) for out, (_, kwargs) in zip(outputs, inputs, strict=True)]
