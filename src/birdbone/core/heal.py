"""Healing: LoRA adapters trained on the healing split, merged into the weights with the
masks re-applied, so the sparsity after healing is exactly the sparsity before.

The base weights are frozen while the adapters train (``peft``), so a healing that goes
wrong (a NaN loss) is undone by dropping the adapters. The merge is ours, not peft's:
``W <- (W + s * B A) * M`` on the full-precision weights, whatever the adapters trained
against (a 4-bit copy under QLoRA). Significance gating (``SignificanceGate``) picks the
samples worth a backward pass.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from birdbone.core import evaluate
from birdbone.core.masks import MaskSet, zero_masked_
from birdbone.core.progress import bar
from birdbone.core.quantize import rtn
from birdbone.errors import HealError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- checks


def target_linears(bundle: Any, targets: list[str]) -> dict[str, nn.Linear]:
    """The block Linears whose local name is in ``targets`` (e.g. ``q_proj``), by full name.

    Raises:
        HealError: a target that matches no Linear of any block.
    """
    linears = bundle.adapter.linears(bundle.model)
    known = sorted({name.rsplit(".", 1)[-1] for name in linears})
    missing = [t for t in targets if t not in known]
    if missing:
        raise HealError(
            f"heal.targets {missing} match no Linear of the model's blocks; they are named {known}. "
            f"Fix: heal.targets: a subset of {known}"
        )
    return {name: linear for name, linear in linears.items() if name.rsplit(".", 1)[-1] in targets}


def check_heal(bundle: Any, config: Any) -> dict[str, nn.Linear]:
    """Raises before any compute when the LoRA settings cannot fit the model."""
    linears = target_linears(bundle, config.targets)
    for name, linear in linears.items():
        width = min(linear.in_features, linear.out_features)
        if config.rank > width:
            raise HealError(
                f"heal.rank {config.rank} is larger than {name} ({linear.out_features} x {linear.in_features}) "
                f"allows: a rank above {width} adds nothing. Fix: heal.rank <= {width}"
            )
    if config.quantize == "nf4" and not torch.cuda.is_available():
        raise HealError("heal.quantize: nf4 (QLoRA) needs CUDA. Fix: heal.quantize: none")
    return linears


# --------------------------------------------------------------------------- gating


class SignificanceGate:
    """Scores samples and decides which to train on, holding the trained share near a
    target rate with a PI controller on the threshold.

    Each component (per-sample loss, predictive entropy, novelty = 1 - the highest cosine
    similarity of the sample's mean hidden state to the recent trained ones) is z-scored
    against its running mean and deviation; the weighted mean goes through a logistic to
    a significance in (0, 1). A sample trains when its significance passes the threshold;
    after each batch the threshold moves by ``kp * error + ki * sum(error)``, with error the
    batch's trained share minus the target (too many trained: the threshold rises).
    """

    def __init__(self, config: Any):
        self.config = config
        self.threshold = 0.5
        self.integral = 0.0
        self.moments: dict[str, tuple[float, float, int]] = {}
        self.memory: deque[torch.Tensor] = deque(maxlen=config.memory)
        self.seen = 0
        self.trained = 0

    def _z(self, name: str, values: torch.Tensor) -> torch.Tensor:
        mean, var, count = self.moments.get(name, (0.0, 0.0, 0))
        for v in values.tolist():  # Welford, so the first batch already has a scale
            count += 1
            delta = v - mean
            mean += delta / count
            var += delta * (v - mean)
        self.moments[name] = (mean, var, count)
        std = math.sqrt(var / max(count - 1, 1)) or 1.0
        return (values - mean) / std

    def significance(self, loss: torch.Tensor, entropy: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        if self.memory:
            recent = torch.stack(list(self.memory)).to(embedding.device, embedding.dtype)
            novelty = 1.0 - nn.functional.cosine_similarity(embedding[:, None], recent[None], dim=-1).max(1).values
        else:
            novelty = torch.ones(embedding.shape[0], device=embedding.device)
        parts = {"loss": loss, "entropy": entropy, "novelty": novelty}
        weights = self.config.weights
        total = sum(weights.values())
        score = sum(weights.get(k, 0.0) * self._z(k, v.float().cpu()) for k, v in parts.items()) / total
        return torch.sigmoid(score)

    def select(self, significance: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        chosen = significance > self.threshold
        rate = float(chosen.float().mean())
        error = rate - self.config.target_rate
        self.integral += error
        self.threshold = min(max(self.threshold + self.config.kp * error + self.config.ki * self.integral, 0.0), 1.0)
        for e in embedding[chosen.to(embedding.device)]:
            self.memory.append(e.float().cpu())
        self.seen += int(significance.numel())
        self.trained += int(chosen.sum())
        return chosen


# --------------------------------------------------------------------------- healing


@dataclass
class HealReport:
    """What one healing did: its schedule, the curve, samples seen and trained, time."""

    steps: int
    lr: float
    seconds: float = 0.0
    train_seconds: float = 0.0  # the optimizer steps alone (no curve points)
    samples_seen: int = 0
    samples_trained: int = 0
    tokens_trained: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)
    stopped: str | None = None  # why healing stopped early and was undone
    merged: bool = False

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


def healing_view(blocks: torch.Tensor, config: Any) -> torch.Tensor:
    """The healing blocks as healing trains on them: the first ``pool_blocks``, cropped to
    ``block_length`` tokens (what the distillation teacher must be computed on)."""
    blocks = blocks[: config.pool_blocks] if config.pool_blocks else blocks
    return blocks[:, : config.block_length] if config.block_length else blocks


def _sample_order(count: int, seed: int) -> torch.Tensor:
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))


class _Samples:
    """Healing blocks in a seeded order, cycled, cropped to ``length`` tokens; process
    ``rank`` of ``world`` (data parallel) gets every ``world``-th of them."""

    def __init__(self, blocks: torch.Tensor, length: int | None, seed: int, rank: int = 0, world: int = 1):
        self.blocks = blocks[:, :length] if length else blocks
        self.order = _sample_order(blocks.shape[0], seed)
        self.position = 0
        self.epoch = 0
        self.seed = seed
        self.rank, self.world = rank, world

    def take(self, count: int) -> torch.Tensor:
        """Indices of this process's next ``count`` blocks."""
        return self._take(count * self.world)[self.rank :: self.world]

    def _take(self, count: int) -> torch.Tensor:
        out = []
        for _ in range(count):
            if self.position == len(self.order):
                self.epoch += 1
                self.order = _sample_order(len(self.order), self.seed + 1000 * self.epoch)
                self.position = 0
            out.append(int(self.order[self.position]))
            self.position += 1
        return torch.tensor(out)


def _everywhere(flag: bool, accelerator: Any) -> bool:
    """``flag`` on every process (so all stop together)."""
    if accelerator is None or accelerator.num_processes == 1:
        return flag
    return bool(
        accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), "sum") == accelerator.num_processes
    )


def _smallest(value: int, accelerator: Any) -> int:
    if accelerator is None or accelerator.num_processes == 1:
        return value
    gathered = accelerator.gather(torch.tensor([value], device=accelerator.device))
    return int(gathered.min())


def _inject(model: nn.Module, names: list[str], config: Any) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=names, bias="none"
    )
    return get_peft_model(model, lora)


def _lr_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warmup over ``warmup`` of the steps, then linear decay to 10 %."""
    ramp = max(int(round(warmup * steps)), 1)
    if step < ramp:
        return (step + 1) / ramp
    return 1.0 - 0.9 * (step - ramp) / max(steps - ramp, 1)


@torch.no_grad()
def _curve_ppl(model: nn.Module, blocks: torch.Tensor | None, batch_size: int, device: Any) -> float | None:
    if blocks is None or not blocks.shape[0]:
        return None
    model.eval()
    ppl = evaluate.perplexity(model, blocks, batch_size, device, "heal curve")["ppl"]
    model.train()
    return ppl


def heal_(
    bundle: Any,
    masks: MaskSet | None,
    blocks: torch.Tensor,
    config: Any,
    steps: int | None = None,
    lr: float | None = None,
    teacher: dict[str, torch.Tensor] | nn.Module | None = None,
    validation: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    desc: str = "heal",
    seconds: float | None = None,
    accelerator: Any = None,
    fake_quant: dict[str, Any] | None = None,
    confine: dict[str, torch.Tensor] | None = None,
) -> HealReport:
    """Trains LoRA adapters on ``blocks`` (the healing split) and merges them into
    ``bundle.model`` with ``masks`` re-applied; in place.

    Args:
        config: the ``HealConfig`` (targets, rank, alpha, batch, distillation, gating).
        steps, lr: this healing's optimizer steps and peak learning rate (default: the
            config's ``steps`` and ``lr``; waves pass their tapered values).
        blocks: the healing split; the first ``config.pool_blocks`` are used.
        teacher: the dense model's ``evaluate.teacher_topk`` on those blocks cropped to
            ``config.block_length`` (``healing_view``), for distillation (``config.distill > 0``);
            or the dense model itself, run on each batch for the KL over the whole vocabulary
            (``evaluate.full_kl``: one more forward pass a step, no cache).
        validation: blocks the healing curve is measured on every ``config.eval_every``
            steps (the model with its adapters, before the merge).
        seconds: a wall-time budget instead of a step count: after two steps the step
            count becomes what fits (at most ``steps``), and the learning-rate schedule
            follows it (curve points are not counted against it).
        accelerator: an ``accelerate.Accelerator`` (``accelerate launch``: data parallel
            over its processes, each on its own samples, gradients averaged); None: this
            process alone.
        fake_quant: full weight name -> ``quantize.Grid`` (None: not quantized): train
            against the merged weights rounded to these grids, with a straight-through
            gradient (``_FakeQuant``); the curve is measured on the rounded weights too.
        confine: full Linear name -> 0/1 mask broadcast over its weight ((out, 1): rows,
            (1, in): columns), e.g. a ``cluster_decay.Bundle``'s: only these Linears are
            adapted, and only where the mask is 1 (the rest of the weights are untouched).

    Returns:
        A ``HealReport``. A non-finite loss or adapter stops the healing, leaves the
        weights exactly as they were, and says why in ``stopped``.
    """
    steps = config.steps if steps is None else steps
    lr = config.lr if lr is None else lr
    blocks = blocks[: config.pool_blocks] if config.pool_blocks else blocks
    report = HealReport(steps=steps, lr=lr)
    if steps <= 0 or blocks.shape[0] == 0:
        return report
    linears = check_heal(bundle, config)
    if confine is not None:
        linears = {name: linear for name, linear in linears.items() if name in confine}
        if not linears:
            raise HealError(
                f"bundle healing adapts the MLP Linears {sorted(confine)[:3]}..., but heal.targets "
                f"{config.targets} holds none of them. Fix: add the MLP Linears to heal.targets, or "
                "heal.bundles.enabled: false"
            )
    if config.distill > 0 and teacher is None:
        raise HealError("heal.distill > 0 needs the dense teacher's logits on the healing blocks")
    length = config.block_length
    live = isinstance(teacher, nn.Module)
    if live:
        teacher.to(device).eval().requires_grad_(False)
    if (
        teacher is not None
        and not live
        and tuple(teacher["index"].shape[:2])
        != (
            blocks.shape[0],
            (min(length, blocks.shape[1]) if length else blocks.shape[1]) - 1,
        )
    ):
        raise HealError("the teacher logits were cached for other healing blocks. Fix: rerun the teacher cache")
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    model = bundle.model
    was_training = model.training
    if fake_quant is not None and config.quantize == "nf4":
        raise HealError("fake-quant healing needs full-precision base weights. Fix: heal.quantize: none")
    # QLoRA trains against a 4-bit copy; the merge still goes into the full-precision weights
    train_model = quantized_copy(model, sorted(linears), device) if config.quantize == "nf4" else model
    peft_model = _inject(train_model, sorted(linears), config)
    confined = _confine_(peft_model, linears, confine) if confine is not None else []
    simulated = _FakeQuant(peft_model, linears, fake_quant, masks) if fake_quant is not None else None
    if simulated is not None:
        simulated.refresh()
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    samples = _Samples(blocks, length, config.seed, rank, world)
    gate = SignificanceGate(config.gating) if config.gating.enabled else None
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    forward = peft_model
    if accelerator is not None:
        forward, optimizer = accelerator.prepare(peft_model, optimizer)
    plan = {"steps": steps}  # the schedule's length; a time budget shortens it after two steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, plan["steps"], config.warmup))
    autocast = torch.autocast(
        torch.device(device).type, dtype=torch.bfloat16, enabled=config.compute_dtype == "bfloat16"
    )
    peft_model.train()
    if config.gradient_checkpointing:  # activations recomputed in the backward pass: less memory, more time
        train_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    curve_blocks = validation[: config.curve_blocks] if validation is not None else None
    first = _curve_ppl(peft_model, curve_blocks, config.batch_size, device) if config.eval_every else None
    if first is not None:
        report.curve.append({"step": 0, "val_ppl": first})
    progress = bar(range(steps), desc=desc, unit="step", leave=False)
    train_seconds = 0.0
    try:
        for step in progress:
            if step >= plan["steps"]:
                break
            step_start = time.perf_counter()
            index = _next_batch(forward, samples, gate, config, autocast, device)
            ids = samples.blocks[index].to(device)
            with autocast:
                logits = forward(input_ids=ids, use_cache=False).logits[:, :-1].float()
            targets = ids[:, 1:]
            ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            loss = config.ce_weight * ce
            kl = None
            if config.distill > 0 and live:
                with torch.no_grad(), autocast:
                    target = teacher(input_ids=ids, use_cache=False).logits[:, :-1]
                kl = evaluate.full_kl(target, logits).mean()
                loss = loss + config.distill * kl
            elif config.distill > 0 and teacher is not None:
                logprob, top = (teacher[key][index].to(device) for key in ("logprob", "index"))
                kl = evaluate.topk_kl(logprob, top, logits).mean()
                loss = loss + config.distill * kl
            if not _everywhere(bool(torch.isfinite(loss)), accelerator):
                report.stopped = f"non-finite loss ({float(loss)}) at step {step + 1} with lr {lr:g}"
                break
            optimizer.zero_grad(set_to_none=True)
            if accelerator is not None:
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            else:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            if simulated is not None:
                simulated.refresh()
            report.tokens_trained += targets.numel()
            report.samples_trained += int(index.numel())
            train_seconds += time.perf_counter() - step_start
            if seconds is not None and step >= 1:  # re-estimated each step from the mean so far
                fits = max(step + 1, min(steps, int(seconds / (train_seconds / (step + 1)))))
                plan["steps"] = _smallest(fits, accelerator)  # every process stops at the same step
                report.steps = plan["steps"]
                progress.total = plan["steps"]
                progress.refresh()
            point = {
                "step": step + 1,
                "loss": float(loss.detach()),
                "ce": float(ce.detach()),
                "lr": scheduler.get_last_lr()[0],
            }
            if kl is not None:
                point["kl"] = float(kl.detach())
            if config.eval_every and ((step + 1) % config.eval_every == 0 or step + 1 == plan["steps"]):
                point["val_ppl"] = _curve_ppl(peft_model, curve_blocks, config.batch_size, device)
            report.curve.append(point)
            progress.set_postfix(loss=f"{point['loss']:.3f}")
        if simulated is not None:
            simulated.restore()  # the merge is into the original weights
        if report.stopped is None and not all(bool(torch.isfinite(p).all()) for p in params):
            report.stopped = "non-finite adapter weights after training"
        deltas = {} if report.stopped else _deltas(peft_model, linears)
        if confine is not None:  # zero outside already (``_confine_``); exactly zero, whatever the optimizer
            deltas = {name: d * confine[name].to(d.dtype) for name, d in deltas.items()}
        broken = [
            name
            for name, d in deltas.items()
            if not bool(torch.isfinite(linears[name].weight.float() + d.to(linears[name].weight.device)).all())
        ]
        if broken:
            report.stopped = f"non-finite weights after merging into {broken[0]} (learning rate {lr:g} too high?)"
    finally:
        for handle in confined:
            handle.remove()
        if simulated is not None:
            simulated.restore()
        if config.gradient_checkpointing:
            train_model.gradient_checkpointing_disable()
        if train_model is model:
            peft_model.unload()  # the original Linears back, their weights untouched
        else:
            del peft_model, train_model  # the 4-bit copy goes; the model was never touched
            torch.cuda.empty_cache()
        model.train(was_training)
    if report.stopped:
        log.warning("%s stopped and undone: %s", desc, report.stopped)
    else:
        _merge_(linears, deltas, masks)
        report.merged = True
    report.samples_seen = gate.seen if gate is not None else report.samples_trained
    report.train_seconds = train_seconds
    report.seconds = time.perf_counter() - start
    return report


def _next_batch(
    model: nn.Module, samples: _Samples, gate: SignificanceGate | None, config: Any, autocast: Any, device: Any
) -> torch.Tensor:
    """The next batch's block indices: the next ``batch_size`` blocks, or with gating the
    first ``batch_size`` that pass it (scored a batch at a time without gradients)."""
    if gate is None:
        return samples.take(config.batch_size)
    chosen: list[int] = []
    tries = 0
    while len(chosen) < config.batch_size:
        candidates = samples.take(config.batch_size)
        ids = samples.blocks[candidates].to(device)
        with torch.no_grad(), autocast:
            out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
        logits = out.logits[:, :-1].float()
        loss = nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(1)
        logp = torch.log_softmax(logits, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1).mean(1)
        embedding = out.hidden_states[-1].float().mean(1)
        keep = gate.select(gate.significance(loss, entropy, embedding), embedding)
        chosen.extend(candidates[keep.cpu()].tolist())
        tries += 1
        if tries >= 16 and not chosen:  # the controller will lower the threshold; never stall
            chosen.extend(candidates[:1].tolist())
    return torch.tensor(chosen[: config.batch_size])


def quantized_copy(model: nn.Module, names: list[str], device: torch.device | str) -> nn.Module:
    """A copy of ``model`` on ``device`` whose Linears ``names`` hold NF4 4-bit weights
    (bitsandbytes, double quantization, bfloat16 compute), the rest in bfloat16: the frozen
    base QLoRA trains its adapters against."""
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    if torch.device(device).type != "cuda":
        raise HealError("heal.quantize: nf4 (QLoRA) runs on CUDA only. Fix: run.device: cuda, or heal.quantize: none")
    copy_ = copy.deepcopy(model).to(torch.bfloat16)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = copy_.get_submodule(parent_name)
        linear = getattr(parent, attr)
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=torch.bfloat16,
            quant_type="nf4",
            compress_statistics=True,
        )
        quantized.weight = bnb.nn.Params4bit(
            linear.weight.data.float().cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True
        )
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        setattr(parent, attr, quantized)
    copy_ = copy_.to(device)  # Params4bit quantizes as it moves to the GPU
    return prepare_model_for_kbit_training(copy_, use_gradient_checkpointing=False)


def _lora_layers(peft_model: nn.Module, linears: dict[str, nn.Linear]) -> dict[str, nn.Module]:
    """peft's LoRA layer wrapping each adapted Linear, by the Linear's full name."""
    modules = dict(peft_model.named_modules())
    return {
        name: next(m for n, m in modules.items() if n.endswith(name) and hasattr(m, "get_delta_weight"))
        for name in linears
    }


def _confine_(peft_model: nn.Module, linears: dict[str, nn.Linear], confine: dict[str, torch.Tensor]) -> list[Any]:
    """Confines each adapter's update s B A to its mask: B's rows outside a row mask, or A's
    columns outside a column mask, are zeroed and their gradients masked, so they stay zero.
    Returns the gradient hooks' handles (removed after training)."""
    handles = []
    for name, layer in _lora_layers(peft_model, linears).items():
        mask = confine[name]
        factor = layer.lora_B["default"].weight if mask.shape[1] == 1 else layer.lora_A["default"].weight
        keep = mask.to(factor.device, factor.dtype)
        with torch.no_grad():
            factor.mul_(keep)
        handles.append(factor.register_hook(lambda grad, keep=keep: grad * keep))
    return handles


@torch.no_grad()
def _deltas(peft_model: nn.Module, linears: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """s * B A of every adapted Linear, by the Linear's full name."""
    return {
        name: layer.get_delta_weight("default").detach().float().cpu()
        for name, layer in _lora_layers(peft_model, linears).items()
    }


class _FakeQuant:
    """The quantize stage simulated while the adapters train (quantization-aware healing).

    ``refresh`` sets each adapted Linear's frozen base weight to Q(M (W + s B A)) - s B A,
    so that with the adapter's own term the layer computes x Q(M (W + s B A))^T: the
    merged, masked weight rounded to its grid, as the quantize stage will store it. The
    base weight carries no gradient, so the adapters' gradient passes through the rounding
    unchanged (the straight-through estimator). ``restore`` puts the original weights back
    (before the merge, which is always into them).
    """

    def __init__(self, peft_model: nn.Module, linears: dict[str, nn.Linear], grids: dict[str, Any], masks: Any):
        self.layers = _lora_layers(peft_model, linears)
        self.linears = linears
        self.grids = {name: grids.get(f"{name}.weight") for name in linears}
        self.masks = masks
        self.originals = {name: linear.weight.detach().clone() for name, linear in linears.items()}

    @torch.no_grad()
    def refresh(self) -> None:
        for name, layer in self.layers.items():
            grid = self.grids[name]
            if grid is None:
                continue
            weight = self.linears[name].weight
            delta = layer.get_delta_weight("default").float()
            merged = self.originals[name].float() + delta
            key = f"{name}.weight"
            keep = self.masks[key] if self.masks is not None and key in self.masks else None
            quantized, _ = rtn(merged, grid, keep)
            weight.copy_((quantized - delta).to(weight.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        for name, original in self.originals.items():
            self.linears[name].weight.copy_(original)


@torch.no_grad()
def _merge_(linears: dict[str, nn.Linear], deltas: dict[str, torch.Tensor], masks: MaskSet | None) -> None:
    """W <- (W + delta) * M, in the weights' dtype; without masks, W + delta."""
    for name, linear in linears.items():
        weight = linear.weight
        merged = weight.float() + deltas[name].to(weight.device)
        key = f"{name}.weight"
        if masks is not None and key in masks:
            zero_masked_(merged, masks[key])
        weight.copy_(merged.to(weight.dtype))
