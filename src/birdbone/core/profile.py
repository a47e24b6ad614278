"""Usage profiling: how much each part of the model is used on calibration data.

One calibration walk (the model is not changed) collects, per block Linear, the
input-channel activation norms (Wanda's ||X_j||), the activation frequency (share of
tokens with |x| > eps) and optionally the Gram matrix X^T X; per block, its influence
1 - cos(input, output) and the importance of each attention head (the activation-weighted
norm of the o_proj columns the head writes, summed over its head_dim). Gradient magnitude
E|dL/dW| comes from backward passes over calibration blocks, one block at a time so memory
stays at the model, its gradients and one accumulator.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from birdbone.core import clusters
from birdbone.core.progress import bar
from birdbone.core.stream import require_in_memory
from birdbone.core.walk import InputStats, ReadOnlyMethod, autocast_dtype, calibration_walk


def block_influence_of(inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """1 - mean over tokens of cos(block input, block output) (ShortGPT's block influence)."""
    total, count = 0.0, 0
    for x, y in zip(inputs, outputs, strict=True):
        cos = nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
        total += float(cos.sum())
        count += cos.numel()
    return 1.0 - total / count


def column_importance(input_norm: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """||X_c||_2 * ||W[:, c]||_2 per input column c: how much that input feeds the output."""
    return input_norm.to(weight.device) * weight.detach().float().norm(dim=0)


def head_importance(input_norm: torch.Tensor, o_weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Per query head: the column importance of o_proj summed over the head's columns."""
    return column_importance(input_norm, o_weight).reshape(-1, head_dim).sum(-1)


class _Profiler(ReadOnlyMethod):
    """A walk method that records statistics and changes nothing."""

    needs_frequency = True

    def __init__(
        self, adapter: Any, config: Any, want_gram: bool, frequency_eps: float = 1e-3, cluster_config: Any = None
    ):
        self.adapter = adapter
        self.clusters = cluster_config if cluster_config is not None and cluster_config.enabled else None
        self.keep_gram = want_gram
        self.needs_gram = want_gram or (self.clusters is not None and self.clusters.method == "coactivation")
        # clusters alone need only the MLP channels' Gram (the last Linear's inputs)
        self.gram_for = None if want_gram else {adapter.last_linear}
        self.frequency_eps = frequency_eps
        self.heads, self.kv_heads, self.head_dim = adapter.attention_shape(config)
        self.tensors: dict[str, torch.Tensor] = {}
        self.influence: dict[int, float] = {}

    def process(
        self, index: int, block: nn.Module, linears: dict[str, nn.Linear], stats: dict[str, InputStats]
    ) -> None:
        prefix = f"{self.adapter.blocks_path}.{index}"
        for name, stat in stats.items():
            self.tensors[f"{prefix}.{name}.input_norm"] = stat.norm()
            self.tensors[f"{prefix}.{name}.frequency"] = stat.frequency()
            if stat.gram is not None and self.keep_gram:
                self.tensors[f"{prefix}.{name}.gram"] = stat.gram / max(stat.tokens, 1)
        if self.clusters is not None:
            last = self.adapter.last_linear
            c = self.clusters
            labels = clusters.cluster(c.method, c.count, c.seed, c.dims, stats[last].gram, linears[last].weight)
            self.tensors[f"{prefix}.{self.adapter.mlp_path}.clusters"] = labels
        o_name = f"{self.adapter.attention_path}.{self.adapter.attention_linears[3]}"
        self.tensors[f"{prefix}.head_importance"] = head_importance(
            stats[o_name].norm(), linears[o_name].weight, self.head_dim
        )

    def after_block(self, index: int, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        self.influence[index] = block_influence_of(inputs, outputs)


def gradient_magnitude(
    bundle: Any, blocks: torch.Tensor, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """E|dL/dW| for every block Linear weight: the mean absolute gradient of the
    next-token loss over ``blocks``, one block per backward pass."""
    require_in_memory(bundle, "gradient magnitude")
    model = bundle.model
    linears = bundle.adapter.linears(model)
    sums = {name: torch.zeros_like(m.weight, dtype=torch.float32) for name, m in linears.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for module in linears.values():
        module.weight.requires_grad_(True)
    try:
        for row in bar(blocks, desc="gradients", unit="block"):
            ids = row[None].to(device)
            loss = model(ids, labels=ids, use_cache=False).loss
            loss.backward()
            for name, module in linears.items():
                sums[name] += module.weight.grad.detach().abs().float()
                module.weight.grad = None
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    return {f"{name}.weight": total / max(blocks.shape[0], 1) for name, total in sums.items()}


def profile_usage(
    bundle: Any,
    calibration: torch.Tensor,
    config: Any,
    device: torch.device | str = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Profiles ``bundle.model`` on calibration blocks (see the module docstring).

    Args:
        config: a ``ProfileConfig`` (batch_size, compute_dtype, gram, gradient_blocks).

    Returns:
        Tensors keyed ``<linear>.input_norm|frequency|gram``, ``<block>.head_importance``,
        ``<linear>.weight.grad_abs`` and ``block_influence``; and a JSON-able summary.
    """
    if config.gradient_blocks:
        require_in_memory(bundle, "profile.gradient_blocks > 0 (gradient magnitude)")
    start = time.perf_counter()
    if config.blocks is not None:
        calibration = calibration[: config.blocks]
    method = _Profiler(bundle.adapter, bundle.model.config, config.gram, config.frequency_eps, config.clusters)
    dtype = autocast_dtype(config.compute_dtype)
    calibration_walk(bundle, calibration, method, config.batch_size, device, "profiling", dtype)
    tensors = dict(method.tensors)
    blocks = len(method.influence)
    tensors["block_influence"] = torch.tensor([method.influence[i] for i in range(blocks)])
    walked = time.perf_counter() - start
    if config.gradient_blocks:
        for name, grad in gradient_magnitude(bundle, calibration[: config.gradient_blocks], device).items():
            tensors[f"{name}.grad_abs"] = grad
    summary = {
        "calibration_blocks": int(calibration.shape[0]),
        "gradient_blocks": int(min(config.gradient_blocks, calibration.shape[0])),
        "frequency_eps": config.frequency_eps,
        "block_influence": [round(float(v), 6) for v in tensors["block_influence"]],
        "mean_frequency": {
            key.removesuffix(".frequency"): float(t.mean()) for key, t in tensors.items() if key.endswith(".frequency")
        },
        "head_importance": {
            key.removesuffix(".head_importance"): [float(v) for v in t]
            for key, t in tensors.items()
            if key.endswith(".head_importance")
        },
        "seconds": {"walk": walked, "total": time.perf_counter() - start},
    }
    if method.clusters is not None:
        last = bundle.adapter.last_linear
        summary["clusters"] = {
            "units": "mlp_channels",
            "method": config.clusters.method,
            "count": config.clusters.count,
            "layers": {
                key.removesuffix(f".{bundle.adapter.mlp_path}.clusters"): clusters.describe(
                    t, tensors[key.replace(f"{bundle.adapter.mlp_path}.clusters", f"{last}.input_norm")]
                )
                for key, t in tensors.items()
                if key.endswith(".clusters")
            },
        }
    return tensors, summary
