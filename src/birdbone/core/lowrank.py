"""Low-rank factors: W ~ U V where that saves bytes and multiply-adds, and a low-rank
correction of the quantization error.

Factorization. A ``[out, in]`` matrix at rank r holds r (out + in) numbers instead of
out x in, and a token costs as many multiply-adds, so the two savings are the same ratio.
The rank is the smallest that explains ``target`` of the matrix's energy (the baseline's
spectral scan: sum_{i<=r} s_i^2 >= target ||W||_F^2); a matrix is factorized only where
r (out + in) <= (1 - min_saving) out in, otherwise it stays dense. A pruned matrix (one
with a keep-mask) stays as it is: U V has no zeros to keep, and the masks must survive.
Factorized layers (``LowRankLinear``) run in PyTorch; llama.cpp's and transformers' model
files have no place for them.

Correction. The quantization error E = W - Q(W) of a layer is approximated by a rank-k
product B A (truncated SVD), weighted by the layer's input norms s (from the calibration
walk: columns that see large inputs matter more, as in LQER / QERA): SVD of E diag(s),
then A <- A diag(1/s). The model computes x Q^T + (x A^T) B^T: a LoRA adapter on the
quantized base, which peft, vLLM and llama.cpp (``--lora``) load as they are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from birdbone.core.io import write_json_atomic
from birdbone.errors import ModelSourceError, QuantizeError


def check_target(target: float) -> None:
    """Raises unless the explained-variance target is in (0, 1]."""
    if not 0.0 < target <= 1.0:
        raise QuantizeError(
            f"an explained-variance target of {target} is outside (0, 1]: it is the share of a matrix's "
            "energy (squared singular values) the kept ranks must explain. Fix: "
            "quantize.lowrank.explained_variance in (0, 1], e.g. 0.9"
        )


def rank_for(values: torch.Tensor, energy: float, target: float) -> int:
    """The smallest rank whose singular ``values`` explain ``target`` of ``energy``
    (= ||W||_F^2, all the singular values squared)."""
    check_target(target)
    if energy <= 0:
        return 0
    curve = values.double().pow(2).cumsum(0) / energy
    hit = (curve >= target - 1e-12).nonzero()
    return int(hit[0]) + 1 if hit.numel() else int(values.numel())


@dataclass
class Factor:
    """One matrix's factorization decision: its rank at the target and what it saves."""

    name: str
    shape: tuple[int, int]
    rank: int
    explained: float  # energy share the rank explains
    params_dense: int
    params_factored: int
    factorized: bool
    reason: str

    @property
    def saving(self) -> float:
        return 1.0 - self.params_factored / self.params_dense


def plan_factors(
    weights: dict[str, torch.Tensor], target: float, min_saving: float = 0.0, masks: Any = None
) -> list[Factor]:
    """Which matrices to factorize at ``target`` explained variance (exact SVD of each)."""
    check_target(target)
    if not 0.0 <= min_saving < 1.0:
        raise QuantizeError(
            f"quantize.lowrank.min_saving {min_saving} is outside [0, 1). Fix: e.g. 0.1 (10 % fewer numbers)"
        )
    plan = []
    for name, weight in weights.items():
        rows, cols = weight.shape
        values = torch.linalg.svdvals(weight.detach().double())
        energy = float(values.pow(2).sum())
        rank = rank_for(values, energy, target)
        explained = float(values[:rank].pow(2).sum() / energy) if energy > 0 else 1.0
        dense, factored = rows * cols, rank * (rows + cols)
        if masks is not None and name in masks:
            factorized, reason = False, "pruned: stays sparse (its mask is kept)"
        elif factored > (1.0 - min_saving) * dense:
            factorized = False
            saving = 1 - factored / dense
            reason = f"rank {rank} of {min(rows, cols)} saves {saving:.1%} < {min_saving:.0%}: stays dense"
        else:
            factorized, reason = True, f"rank {rank}: {factored:,} numbers for {dense:,}"
        plan.append(Factor(name, (rows, cols), rank, explained, dense, factored, factorized, reason))
    return plan


class LowRankLinear(nn.Module):
    """y = up(down(x)): a ``[out, in]`` Linear as rank-r factors (``down`` r x in, ``up`` out x r)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, rank: int) -> LowRankLinear:
        """The best rank-``rank`` factors of ``linear`` (truncated SVD, the singular values
        split evenly between the two factors so that neither dwarfs the other)."""
        w = linear.weight.detach().double()
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        root = s[:rank].sqrt()
        out = cls(linear.in_features, linear.out_features, rank, linear.bias is not None)
        dtype, device = linear.weight.dtype, linear.weight.device
        out.down.weight.copy_((root[:, None] * vh[:rank]).to(dtype))
        out.up.weight.copy_((u[:, :rank] * root[None]).to(dtype))
        if linear.bias is not None:
            out.up.bias.copy_(linear.bias)
        return out.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def dense_weight(self) -> torch.Tensor:
        return self.up.weight @ self.down.weight


def summarize(plan: list[Factor]) -> dict[str, Any]:
    """What factorizing as ``plan`` says saves, in the plan's numbers (= multiply-adds):
    counts, numbers before and after, and the factorized matrices by module."""
    chosen = [f for f in plan if f.factorized]
    before = sum(f.params_dense for f in plan)
    saved = sum(f.params_dense - f.params_factored for f in chosen)
    by_module: dict[str, int] = {}
    for f in chosen:
        module = f.name.removesuffix(".weight").rsplit(".", 1)[-1]
        by_module[module] = by_module.get(module, 0) + 1
    return {
        "matrices": len(plan),
        "factorized": len(chosen),
        "pruned_kept_sparse": sum("pruned" in f.reason for f in plan),
        "params_before": before,
        "params_after": before - saved,
        "params_saved": saved,
        "saving": saved / max(before, 1),
        "by_module": by_module,
    }


def summary_line(summary: dict[str, Any]) -> str:
    """``summarize``'s figures in one sentence, for a log line."""
    modules = ", ".join(f"{name} {count}" for name, count in sorted(summary["by_module"].items()))
    return (
        f"{summary['factorized']} of {summary['matrices']} matrices factorize at "
        f"{summary.get('explained_variance', '?')} explained variance"
        + (f" ({modules})" if modules else "")
        + f", saving {summary['params_saved']:,} of {summary['params_before']:,} weights "
        f"({100 * summary['saving']:.1f} %); {summary['pruned_kept_sparse']} pruned matrices kept sparse"
    )


def factorize_(bundle: Any, plan: list[Factor]) -> dict[str, Any]:
    """Replaces every matrix ``plan`` marks factorized by its ``LowRankLinear``, in place,
    and returns what that saved (``summarize``)."""
    for factor in plan:
        if not factor.factorized:
            continue
        module_name = factor.name.removesuffix(".weight")
        parent_name, _, attr = module_name.rpartition(".")
        parent = bundle.model.get_submodule(parent_name)
        setattr(parent, attr, LowRankLinear.from_linear(getattr(parent, attr), factor.rank))
    return summarize(plan)


def plan_report(plan: list[Factor]) -> list[dict[str, Any]]:
    """``plan`` as JSON rows (with each matrix's saving)."""
    return [{**asdict(f), "shape": list(f.shape), "saving": f.saving} for f in plan]


# --------------------------------------------------------------------------- correction


@torch.no_grad()
def error_correction(
    original: torch.Tensor, quantized: torch.Tensor, rank: int, input_norms: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B ``[out, rank]``, A ``[rank, in]``) with B A the best rank-``rank`` approximation of
    ``original - quantized``, weighted by ``input_norms`` (per input column) when given."""
    if rank < 1 or rank > min(original.shape):
        raise QuantizeError(
            f"a correction rank of {rank} does not fit a {tuple(original.shape)} matrix. "
            f"Fix: quantize.lowrank.correction_rank between 1 and {min(original.shape)} (0: none)"
        )
    error = original.detach().double() - quantized.detach().double()
    scale = None
    if input_norms is not None:
        scale = input_norms.detach().double().to(error.device).clamp_min(1e-8)
        error = error * scale[None]
    u, s, vh = torch.linalg.svd(error, full_matrices=False)
    root = s[:rank].sqrt()
    b, a = u[:, :rank] * root[None], root[:, None] * vh[:rank]
    if scale is not None:
        a = a / scale[None]
    return b.float(), a.float()


def correction_bits(shapes: dict[str, tuple[int, int]], rank: int, bits: int = 16) -> float:
    """Bits per block-Linear weight that rank-``rank`` corrections in ``bits``-bit floats add."""
    total = sum(r * c for r, c in shapes.values())
    return bits * rank * sum(r + c for r, c in shapes.values()) / max(total, 1)


@torch.no_grad()
def add_factors_(bundle: Any, corrections: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Adds B A to each named block Linear's weight in place: the dense equivalent of the
    model with the adapter loaded (a quantization correction, a pruning scaffold), for
    measuring it; the files keep the base weights and the adapter apart."""
    for name, linear in bundle.adapter.linears(bundle.model).items():
        key = f"{name}.weight"
        if key in corrections:
            b, a = corrections[key]
            weight = linear.weight
            weight.copy_((weight.float() + b.to(weight.device) @ a.to(weight.device)).to(weight.dtype))


def save_adapter(path: Path, corrections: dict[str, tuple[torch.Tensor, torch.Tensor]], base: str = "") -> None:
    """Writes the corrections as a peft LoRA adapter (``adapter_config.json`` and
    ``adapter_model.safetensors``, scaling 1: lora_alpha = r) into the folder ``path``."""
    if not corrections:
        return
    path.mkdir(parents=True, exist_ok=True)
    rank = next(iter(corrections.values()))[0].shape[1]
    tensors = {}
    for name, (b, a) in corrections.items():
        module = name.removesuffix(".weight")
        tensors[f"base_model.model.{module}.lora_A.weight"] = a.contiguous().cpu()
        tensors[f"base_model.model.{module}.lora_B.weight"] = b.contiguous().cpu()
    targets = sorted({name.removesuffix(".weight").rsplit(".", 1)[-1] for name in corrections})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": targets,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    partial = path / "adapter_model.safetensors.partial"
    save_file(tensors, str(partial), metadata={"format": "pt"})
    partial.replace(path / "adapter_model.safetensors")
    write_json_atomic(path / "adapter_config.json", config)


ADAPTER_DIR = "adapter"


def load_adapter(
    path: Path, expected: list[str] | tuple[str, ...] = ()
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The corrections ``save_adapter`` wrote into the folder ``path``: empty if there is
    none and none is ``expected``.

    Raises:
        ModelSourceError: ``expected`` names corrections the folder does not hold (a copy of
            the model that lost its ``adapter/``).
    """
    from safetensors.torch import load_file

    file = path / "adapter_model.safetensors"
    if not file.is_file():
        if expected:
            raise ModelSourceError(
                f"{path} is missing: the model's quant.safetensors says {len(expected)} weights have low-rank "
                f"corrections there ({expected[0]}, ...), and without them it computes something else. "
                "Fix: copy the model folder whole (its adapter/ too), or rerun the quantize stage."
            )
        return {}
    tensors = load_file(str(file))
    out = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            out[f"{module}.weight"] = (tensors[key.replace("lora_A", "lora_B")], a)
    lost = sorted(set(expected) - out.keys())
    if lost:
        raise ModelSourceError(
            f"{file} lacks the corrections of {len(lost)} weights the model's quant.safetensors names "
            f"({lost[0]}, ...). Fix: copy the model folder whole, or rerun the quantize stage."
        )
    return out
