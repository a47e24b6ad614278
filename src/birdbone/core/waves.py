"""Decay waves: prune a capped share, judge the result, keep it or undo it.

One wave is six steps over a ``WaveState``, each a plain function the Kedro wave pipeline
wraps as a node: ``decay`` (prune to this wave's target, keeping what earlier waves removed,
each MLP cluster its own share with ``decay.clusters``; or restore the next share of a
gradual rollback), ``heal`` (LoRA, masks kept) and regrowth (their own modules),
``evaluate`` (validation perplexity and KL to the dense model's cached top-k logits),
``recover`` (the recovery ladder of a wave that spiked, ``core.recovery``), and ``gate``
(seals the wave's ``WaveDelta``, everything it changed, then the stop-loss in
``core.gate``; undoes waves from their deltas when it says so). Waves after the schedule
ends, or after the gate stopped the decay, pass the state through
unchanged and say so in the table.

States are chained by id: ``id_k = H(id_{k-1}, recipe, k)``; a wave directory whose id
matches is a finished wave, which is how a killed run resumes without redoing it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from birdbone.core import evaluate
from birdbone.core.gate import DECAY, ROLLBACK, STOPPED, GateState, give_up, judge, rollback_step
from birdbone.core.io import sha256_json, write_json_atomic
from birdbone.core.masks import DeltaHistory, MaskSet, WaveDelta
from birdbone.core.prune import prune_
from birdbone.core.prune.owl import block_sparsities, outlier_ratios
from birdbone.core.prune.patterns import NMRamp, describe
from birdbone.core.prune.structured import compact_param_count, mask_structure_, unit_ids
from birdbone.core.prune.structured import wave_pattern as structured_wave_pattern
from birdbone.core.walk import autocast_dtype

log = logging.getLogger(__name__)


@dataclass
class WaveState:
    """Everything a wave hands to the next (saved whole in ``models/waves/wave_<k>``)."""

    bundle: Any  # ModelBundle
    masks: MaskSet
    gate: GateState
    wave: int = 0
    state_id: str = ""
    pending: DeltaHistory = field(default_factory=DeltaHistory)  # deltas since the accepted state
    rollback: WaveDelta | None = None  # the delta a gradual rollback is restoring
    rows: list[dict[str, Any]] = field(default_factory=list)  # the wave table so far
    owl_final: list[float] | None = None  # OWL block sparsities at the final target
    # per-Linear input-column norms (the profile's) that order removed weights for a rollback;
    # set by ``decay`` for the ``gate`` of the same wave, not saved
    importance: dict[str, torch.Tensor] | None = None
    current: dict[str, Any] = field(default_factory=dict)  # this wave's row, being filled in
    # the block weights before this wave's decay, until ``gate`` seals the wave's delta
    # (pruning, healing and regrowth together); not saved
    before: dict[str, torch.Tensor] | None = None
    # the masks of the accepted state: what an undo returns to, exactly (weight deltas
    # cannot tell a weight that was already zero when masked, nor a regrown one)
    accepted: MaskSet | None = None
    # cluster-aware decay: each block's cluster sensitivities measured by the last wave that
    # pruned ({"sensitivity": {block: [...]}}, saved); the profile's clusters (not saved)
    clusters: dict[str, Any] = field(default_factory=dict)
    cluster_profile: Any = None
    # the masks before this wave's decay, until ``gate`` (the recovery ladder restores to them)
    prior: MaskSet | None = None
    recovery_s: float = 0.0  # seconds the recovery ladder has spent over the decay (saved)

    def __post_init__(self) -> None:
        if self.accepted is None:
            self.accepted = self.masks.copy()

    def linears(self) -> dict[str, torch.Tensor]:
        """Every decoder-block Linear weight by parameter name."""
        return _linears(self.bundle)


def chain_id(parent: str, recipe_hash: str, wave: int) -> str:
    return sha256_json({"parent": parent, "recipe": recipe_hash, "wave": wave})[:16]


def start(bundle: Any, dense: dict[str, Any], origin_id: str) -> WaveState:
    """The state before the first wave: the dense model, no masks removed, the gate's
    reference at the dense perplexity (and at its general perplexity, given ``dense['general']``).
    ``origin_id`` names the model and text it came from."""
    masks = MaskSet({name: torch.ones_like(w, dtype=torch.bool) for name, w in _linears(bundle).items()})
    general = dense.get("general")
    gate = GateState(
        dense_ppl=dense["ppl"],
        reference_ppl=dense["ppl"],
        dense_general_ppl=general["ppl"] if general else None,
        reference_general=dict(general) if general else None,
    )
    row = _row(0, "start", "dense model", 0.0, masks, dense["ppl"], 0.0, bundle, general)
    return WaveState(bundle, masks, gate, 0, origin_id, rows=[row])


def _linears(bundle: Any) -> dict[str, torch.Tensor]:
    return {f"{n}.weight": m.weight for n, m in bundle.adapter.linears(bundle.model).items()}


def _row(
    wave: int,
    decision: str,
    reason: str,
    target: float | None,
    masks: MaskSet,
    ppl: float,
    kl: float,
    bundle: Any,
    general: dict[str, float] | None = None,
) -> dict[str, Any]:
    return {
        "wave": wave,
        "target_sparsity": None if target is None else round(target, 6),
        "sparsity": masks.overall_sparsity(),
        "ppl": ppl,
        "kl": kl,
        "general": general,  # ppl, kl, top1 on the general split (None: no general split)
        "params": compact_param_count(bundle, masks),  # once the masked units are removed
        "nonzero_linear_weights": sum(masks.kept(n) for n in masks),
        "decision": decision,
        "reason": reason,
    }


def wave_pattern(config: Any, wave: int, targets: list[float], bundle: Any = None) -> Any:
    """The pattern wave ``wave`` prunes to: the target so far; for an N:M target, an N:M
    ramp until the last wave, which reaches N:M exactly; for a structured target, the
    whole units that share of it comes to on ``bundle``'s shapes."""
    target = targets[wave - 1]
    if config.structured:
        return structured_wave_pattern(config.pattern, bundle, target / config.target, wave == len(targets))
    if config.pattern.kind == "nm":
        if wave == len(targets):
            return config.pattern
        return NMRamp(n=config.pattern.n, m=config.pattern.m, sparsity=target)
    return config.pattern.model_copy(update={"sparsity": target})


def decay(
    state: WaveState,
    wave: int,
    config: Any,
    calibration: torch.Tensor,
    importance: dict[str, torch.Tensor] | None,
    device: torch.device | str = "cpu",
    cluster_profile: Any = None,
) -> WaveState:
    """Wave ``wave``'s pruning (or its share of a rollback, or nothing), in place.

    Args:
        config: the ``DecayConfig``.
        importance: per-Linear input-column norms from the profile (``<name>.weight`` ->
            vector), ordering removed weights for a gradual rollback; None: by |W|.
        cluster_profile: a ``cluster_decay.ClusterProfile`` when ``config.clusters`` is on.
    """
    targets = config.wave_targets()
    state.wave = wave
    state.importance = importance
    state.cluster_profile = cluster_profile
    start_time = time.perf_counter()
    target = wave_target(config, wave, targets, state.masks.overall_sparsity())
    state.current = {"wave": wave, "target_sparsity": target}
    if state.gate.phase == ROLLBACK:
        assert state.rollback is not None
        part, parts, last = rollback_step(state.gate)
        state.masks.keep_(state.rollback.part_index(part, parts))
        restored = state.rollback.restore_(state.bundle.model, part, parts)
        state.current.update(action="rollback", part=part + 1, parts=parts, restored=restored, last=last)
        if last:
            state.rollback = None
            assert state.accepted is not None
            state.masks = state.accepted.copy()
        log.info("wave %d: restored part %d of %d (%d weights)", wave, part + 1, parts, restored)
    elif state.gate.phase == STOPPED or target is None:
        why = f"decay stopped ({state.gate.stop_reason})" if state.gate.phase == STOPPED else "schedule complete"
        if state.gate.pending:  # strikes short of the count: not reverted, not accepted either
            waves_ = ", ".join(map(str, state.gate.pending))
            why += (
                f"; wave {waves_} stays with {state.gate.strikes} strike(s) of {config.gate.strikes} "
                "(the stop-loss reverts only after that many in a row)"
            )
        state.current.update(action="skip", reason=why)
    else:
        assert target is not None
        before = {name: w.detach().clone() for name, w in state.linears().items()}
        if wave <= len(targets) and target == targets[wave - 1]:
            pattern = wave_pattern(config, wave, targets, state.bundle)
        else:  # capped after a recovery restored weights, or catching up after the schedule
            pattern = config.pattern.model_copy(update={"sparsity": target})
        dtype = autocast_dtype(config.compute_dtype)
        if config.structured:
            state.current.update(target_sparsity=None, target_units=describe(pattern))
            masks, report = mask_structure_(
                state.bundle, pattern, calibration, config.batch_size, device, dtype, config.method, state.masks
            )
        else:
            ratios = _layer_ratios(config, state, target, calibration, device)
            quotas = _cluster_quotas(
                config, state, ratios or [target] * len(state.bundle.adapter.blocks(state.bundle.model))
            )
            masks, report = prune_(
                state.bundle,
                config.method,
                pattern,
                calibration,
                config.batch_size,
                device,
                {"sparsegpt": config.sparsegpt, "gradient": config.gradient}.get(config.method),
                dtype,
                layer_ratios=ratios,
                prior=state.masks,
                cluster_quotas=quotas,
            )
        removed = sum(state.masks.kept(n) for n in state.masks) - sum(masks.kept(n) for n in masks)
        # the wave's delta is sealed after healing, in ``gate``
        state.before, state.prior, state.masks = before, state.masks, masks
        state.current.update(action="decay", removed=removed, prune_report=_brief(report))
        if state.cluster_profile is not None and config.clusters.enabled:
            _measure_clusters(state, config)
        log.info(
            "wave %d: %s to %.4f sparsity (%d weights removed)", wave, config.method, masks.overall_sparsity(), removed
        )
    state.current["seconds_decay"] = time.perf_counter() - start_time
    return state


def heal(
    state: WaveState,
    config: Any,
    waves: int,
    healing: torch.Tensor,
    teacher: dict[str, torch.Tensor] | None,
    validation: torch.Tensor | None,
    device: torch.device | str = "cpu",
) -> WaveState:
    """Heals a wave that pruned (LoRA, masks kept), with the taper's steps and learning
    rate for this wave of ``waves``; other waves pass. A healing that blows up is undone
    and the wave is judged as pruned."""
    from birdbone.core.heal import heal_

    if not config.enabled or state.current.get("action") != "decay":
        return state
    steps, lr = config.wave_schedule(state.wave, waves)
    if config.bundles.enabled:
        report = _heal_bundles(state, config, steps, lr, healing, teacher, validation, device)
    else:
        report = heal_(
            state.bundle,
            state.masks,
            healing,
            config,
            steps,
            lr,
            teacher,
            validation,
            device,
            desc=f"wave {state.wave} heal",
        ).to_json()
    state.current["heal"] = report
    state.current["seconds_heal"] = report["seconds"]
    log.info(
        "wave %d: healed %d steps (lr %.2g) in %.0f s%s",
        state.wave,
        report["steps"],
        lr,
        report["seconds"],
        f"; stopped and undone: {report['stopped']}" if report["stopped"] else "",
    )
    return state


def _heal_bundles(
    state: WaveState,
    config: Any,
    steps: int,
    lr: float,
    healing: torch.Tensor,
    teacher: dict[str, torch.Tensor] | None,
    validation: torch.Tensor | None,
    device: torch.device | str,
) -> dict[str, Any]:
    """``heal.bundles``: the wave's steps shared among its most pruned clusters, healed one
    bundle at a time with LoRA confined to their channels; one report for them all (steps,
    seconds and samples summed, the curves end to end, the first stop) with each bundle's
    clusters and outcome under ``bundles``."""
    from birdbone.core import cluster_decay
    from birdbone.core.heal import HealReport, heal_
    from birdbone.errors import HealError

    if state.cluster_profile is None:
        raise HealError("heal.bundles needs the profile's clusters. Fix: profile.clusters.enabled: true")
    chosen = cluster_decay.bundles(state.cluster_profile, state.prior, state.masks, config.bundles.count)
    total = HealReport(steps=0, lr=lr)
    done = []
    for j, bundle in enumerate(chosen):
        share = steps // len(chosen) + (1 if j < steps % len(chosen) else 0)
        report = heal_(
            state.bundle,
            state.masks,
            healing,
            config.model_copy(update={"seed": config.seed + j}),  # each bundle on its own samples
            share,
            lr,
            teacher,
            validation,
            device,
            desc=f"wave {state.wave} heal bundle {j + 1}/{len(chosen)}",
            confine=bundle.confine,
        )
        offset = total.steps
        total.curve += [{**p, "step": p["step"] + offset} for p in report.curve if p["step"] > 0 or j == 0]
        total.steps += report.steps
        for key in ("seconds", "train_seconds", "samples_seen", "samples_trained", "tokens_trained"):
            setattr(total, key, getattr(total, key) + getattr(report, key))
        total.stopped = total.stopped or report.stopped
        total.merged = total.merged or report.merged
        done.append(
            {
                "clusters": {str(i): c for i, c in bundle.clusters.items()},
                "removed": sum(bundle.removed.values()),
                "steps": report.steps,
                "merged": report.merged,
                "stopped": report.stopped,
            }
        )
    log.info(
        "wave %d: healed %d bundle(s) one at a time: %s",
        state.wave,
        len(done),
        "; ".join(f"{b['steps']} steps on {b['removed']} removed weights" for b in done),
    )
    return {**total.to_json(), "bundles": done}


def regrow(state: WaveState, config: Any, healing: torch.Tensor, device: torch.device | str = "cpu") -> WaveState:
    """RigL after a wave's healing: swaps ``config.fraction`` of each Linear's pruned
    connections for its weakest active ones, density exactly constant; other waves pass."""
    from birdbone.core.regrow import regrow_

    if not config.enabled or state.current.get("action") != "decay":
        return state
    masks, report = regrow_(state.bundle, state.masks, healing[: config.blocks], config.fraction, device)
    state.masks = masks
    state.current["regrow"] = {k: v for k, v in report.items() if k != "layers"}
    state.current["seconds_regrow"] = report["seconds"]
    log.info("wave %d: regrew %d connections (as many dropped)", state.wave, report["swapped"])
    return state


def wave_target(config: Any, wave: int, targets: list[float], sparsity: float) -> float | None:
    """What wave ``wave`` prunes to (None: nothing, the schedule is done): the schedule's
    target. With the recovery ladder, which can restore weights, a wave never removes more
    than the cap of what is left, and waves after the schedule catch up to the final target."""
    if not config.recovery.enabled or config.structured or config.pattern.kind != "unstructured":
        return targets[wave - 1] if wave <= len(targets) else None
    scheduled = targets[wave - 1] if wave <= len(targets) else config.target
    if sparsity >= config.target - 5e-3 and wave > len(targets):  # reached, up to per-row rounding
        return None
    return max(sparsity, min(scheduled, 1.0 - (1.0 - sparsity) * (1.0 - config.cap)))


def _cluster_quotas(config: Any, state: WaveState, block_targets: list[float]) -> dict[str, Any] | None:
    """Each MLP Linear's per-cluster sparsities for this wave (``cluster_decay.plan``), and
    the factors behind them in the wave's row; None with clusters off."""
    from birdbone.core import cluster_decay

    if state.cluster_profile is None or not config.clusters.enabled:
        return None
    sensitivity = {int(k): v for k, v in state.clusters.get("sensitivity", {}).items()} or None
    quotas, factors = cluster_decay.plan(
        state.cluster_profile, state.masks, config.clusters, block_targets, sensitivity
    )
    values = [v for f in factors.values() for v in f]
    state.current["clusters"] = {"factors": {str(i): f for i, f in factors.items()}}
    log.info(
        "wave %d: cluster shares x%.2f to x%.2f of each MLP layer's (%s)",
        state.wave,
        min(values),
        max(values),
        "usage and the last wave's sensitivity" if sensitivity else "usage; no wave measured yet",
    )
    return quotas


def _measure_clusters(state: WaveState, config: Any) -> None:
    """Prices what this wave removed from each cluster, for the next wave's factors."""
    from birdbone.core import cluster_decay

    assert state.before is not None and state.prior is not None
    sensitivity = cluster_decay.measure(state.cluster_profile, state.before, state.prior, state.masks)
    spikes = cluster_decay.spiked(sensitivity, config.clusters.spike)
    state.clusters["sensitivity"] = {str(i): v for i, v in sensitivity.items()}
    record = state.current.setdefault("clusters", {})
    record.update(sensitivity=state.clusters["sensitivity"], spiked={str(i): c for i, c in spikes.items()})
    log.info(
        "wave %d: cluster sensitivity per removed weight x%.2f to x%.2f of the block's mean; %d cluster(s) spiked "
        "(over x%.2f)%s",
        state.wave,
        min(min(v) for v in sensitivity.values()),
        max(max(v) for v in sensitivity.values()),
        sum(len(c) for c in spikes.values()),
        config.clusters.spike,
        "" if state.cluster_profile.gradients else " [priced by |W| ||X||: the profile has no gradients]",
    )


def _layer_ratios(
    config: Any, state: WaveState, target: float, calibration: torch.Tensor, device: Any
) -> list[float] | None:
    """OWL block sparsities at the final target, computed once on the dense model (wave 1)
    and scaled to each wave's target, so every block only ever gains sparsity."""
    if config.layer_ratios != "owl":
        return None
    if state.owl_final is None:
        dtype = autocast_dtype(config.compute_dtype)
        ratios = outlier_ratios(state.bundle, calibration, config.owl.threshold, config.batch_size, device, dtype)
        state.owl_final = block_sparsities(ratios, config.target, config.owl.spread)
    return [s * target / config.target for s in state.owl_final]


def _brief(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k in ("method", "pattern", "sparsity", "seconds", "block_sparsity")}


def left_at(row: dict[str, Any]) -> tuple[float, float | None]:
    """Validation perplexity and KL of the model as ``row``'s wave left it: the wave's own
    numbers, or after an undo the accepted state's (``state_ppl``, ``state_kl``)."""
    return row.get("state_ppl", row["ppl"]), row.get("state_kl", row.get("kl"))


def general_left_at(row: dict[str, Any]) -> dict[str, float] | None:
    """The general split's numbers of the model as ``row``'s wave left it (see ``left_at``)."""
    return row.get("state_general", row.get("general"))


def measure(
    state: WaveState,
    validation: torch.Tensor,
    teacher: dict[str, torch.Tensor],
    general: dict[str, torch.Tensor] | None,
    batch_size: int,
    device: Any,
    desc: str,
) -> None:
    """The model as it stands, into ``state.current``: validation perplexity and KL to the
    dense model, and ``general`` (perplexity, KL and top-1 agreement on the general split)."""
    model = state.bundle.model
    measured = evaluate.quality(model, validation, teacher, batch_size, device, desc=desc)
    state.current.update(
        ppl=measured["ppl"],
        kl=measured["kl"],
        general=evaluate.general_quality(model, general, batch_size, device, f"{desc} (general)"),
    )


def evaluate_state(
    state: WaveState,
    validation: torch.Tensor,
    teacher: dict[str, torch.Tensor],
    batch_size: int,
    device: Any,
    general: dict[str, torch.Tensor] | None = None,
) -> WaveState:
    """Validation perplexity and KL to the dense model, and the same with top-1 agreement on
    the general split, unless this wave changed nothing."""
    if state.current.get("action") == "skip":
        ppl, kl = left_at(state.rows[-1])
        state.current.update(ppl=ppl, kl=kl, general=general_left_at(state.rows[-1]), seconds_evaluate=0.0)
        return state
    start_time = time.perf_counter()
    measure(state, validation, teacher, general, batch_size, device, f"wave {state.wave}")
    state.current["seconds_evaluate"] = time.perf_counter() - start_time
    return state


def back_at_dense(state: WaveState) -> bool:
    """Whether the waves left the model as dense, bit for bit: the gate's accepted state is
    wave 0 (undoing restores it exactly), nothing is pending or being rolled back, and no
    weight is masked."""
    gate = state.gate
    return (
        gate.reference_wave == 0
        and not gate.pending
        and gate.phase != ROLLBACK
        and all(state.masks.kept(n) == state.masks.numel(n) for n in state.masks)
    )


def seal(state: WaveState) -> WaveDelta:
    """Records what this wave changed, from the weights before its decay to now (after
    healing and regrowth), as the wave's delta: undoing it restores the weights exactly."""
    assert state.before is not None, "seal() needs a wave that decayed"
    now = {n: w.detach() for n, w in state.linears().items()}
    delta = WaveDelta.between(state.before, now, state.importance)
    state.before = state.prior = None
    state.pending.record(state.wave, delta)
    return delta


def non_finite(state: WaveState) -> str | None:
    """What went NaN or inf in this wave, if anything: its healing (which undid itself) or
    the weights now (the first parameter that holds any)."""
    from birdbone.core import modeling

    stopped = (state.current.get("heal") or {}).get("stopped") or ""
    if stopped.startswith("non-finite"):
        return f"healing: {stopped}"
    for name, bad in modeling.non_finite_params(state.bundle.model).items():
        return f"{bad} NaN/inf weight(s) in {name} after the wave's pruning, healing and regrowth"
    return None


def gate(state: WaveState, config: Any, recipe_hash: str) -> WaveState:
    """Applies the stop-loss to this wave's numbers; undoes waves when it says so; appends
    the wave's row (with the decision and its reason) and chains the state id."""
    current, wave = state.current, state.wave
    ppl, kl = current["ppl"], current["kl"]
    action = current["action"]
    if action == "skip":
        decision, reason = "skipped", current["reason"]
    elif action == "rollback":
        share = f"part {current['part']} of {current['parts']} restored ({current['restored']} weights)"
        if current["last"]:
            decision, reason = "reverted", f"{share}; back at the accepted state of wave {state.gate.reference_wave}"
        else:
            decision, reason = "rolling back", share
    else:
        seal(state)
        fault = non_finite(state)
        ladder = [step["step"] for step in current.get("recovery", []) if "ppl" in step]
        if current.get("reverted") and fault is None:
            tried = ", ".join(ladder[:-1]) or "nothing before it"
            verdict = give_up(state.gate, wave, f"recovery ladder reverted the wave (tried: {tried})")
        else:
            verdict = judge(state.gate, wave, ppl, kl, config.gate, fault=fault, general=current.get("general"))
        decision, reason = verdict.decision, verdict.reason
        if ladder and not current.get("reverted"):
            reason = f"after recovery ({', '.join(ladder)}): {reason}"
        assert state.accepted is not None
        if verdict.undo_now:
            state.pending.undo_(state.bundle.model, min(verdict.undo_now))
            state.masks = state.accepted.copy()
        elif verdict.start_rollback:
            first = min(state.gate.pending)
            state.rollback = state.pending.since(state.bundle.model, first, state.importance)
            if config.structured:  # restore whole channels, heads or blocks, the most used first
                state.rollback.group_units_(unit_ids(config.pattern, state.bundle), state.importance)
            state.pending = DeltaHistory()
        elif decision == "kept":
            state.pending = DeltaHistory()  # accepted: nothing left to undo
            state.accepted = state.masks.copy()
    target = current["target_sparsity"] if action == "decay" else None
    row = _row(wave, decision, reason, target, state.masks, ppl, kl, state.bundle, current.get("general"))
    row.update(
        seconds={k.removeprefix("seconds_"): round(v, 2) for k, v in current.items() if k.startswith("seconds_")},
        phase=state.gate.phase,
    )
    for key in ("target_units", "heal", "regrow", "clusters", "recovery"):
        if action == "decay" and key in current:
            row[key] = current[key]
    if decision == "reverted" and action == "decay":
        # the model is back at the accepted state
        row.update(state_ppl=state.gate.reference_ppl, state_kl=state.gate.reference_kl)
        if state.gate.reference_general is not None:
            row["state_general"] = state.gate.reference_general
    state.rows.append(row)
    state.state_id = chain_id(state.state_id, recipe_hash, wave)
    log.info("wave %d: %s (%s)", wave, decision, reason)
    return state


# --------------------------------------------------------------------------- on disk

STATE_FILE = "wave.json"


_WAVE_FILES = ("masks.safetensors", "masks_accepted.safetensors", "rollback.safetensors", STATE_FILE)


def save_state(state: WaveState, directory: Path, model_from: Path | None = None) -> None:
    """Writes the state into ``directory`` (a fresh one; callers make it atomic): the model
    as a loadable model directory, the masks, the pending deltas and ``wave.json``. With
    ``model_from`` (a directory holding exactly this model: the baseline, or a wave this
    one left as it was) the model's files are hard links to those, which costs no space."""
    from birdbone.core import modeling

    if model_from is not None:
        for item in Path(model_from).iterdir():
            if item.is_file() and item.name not in _WAVE_FILES and not item.name.startswith("delta_wave_"):
                try:
                    os.link(item, directory / item.name)
                except OSError:  # another file system: copy
                    shutil.copy2(item, directory / item.name)
    else:
        modeling.save_model(state.bundle, directory)
    state.masks.save(directory / "masks.safetensors")
    assert state.accepted is not None
    state.accepted.save(directory / "masks_accepted.safetensors")
    for wave, delta in state.pending.waves.items():
        delta.save(directory / f"delta_wave_{wave}.safetensors")
    if state.rollback is not None:
        state.rollback.save(directory / "rollback.safetensors")
    write_json_atomic(
        directory / STATE_FILE,
        {
            "state_id": state.state_id,
            "wave": state.wave,
            "gate": state.gate.to_json(),
            "pending": sorted(state.pending.waves),
            "rollback": state.rollback is not None,
            "owl_final": state.owl_final,
            "clusters": state.clusters,
            "recovery_s": state.recovery_s,
            "rows": state.rows,
        },
    )


def read_state_info(directory: Path) -> dict[str, Any] | None:
    """``wave.json`` of a finished wave directory, or None if there is none."""
    path = Path(directory) / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def load_state(directory: Path, dtype: torch.dtype = torch.float32) -> WaveState:
    from birdbone.core import modeling

    directory = Path(directory)
    info = read_state_info(directory)
    if info is None:
        raise FileNotFoundError(f"{directory} holds no finished wave ({STATE_FILE} missing)")
    bundle = modeling.load_model_dir(directory, dtype)
    pending = DeltaHistory({w: WaveDelta.load(directory / f"delta_wave_{w}.safetensors") for w in info["pending"]})
    rollback = WaveDelta.load(directory / "rollback.safetensors") if info["rollback"] else None
    return WaveState(
        bundle,
        MaskSet.load(directory / "masks.safetensors"),
        GateState.from_json(info["gate"]),
        info["wave"],
        info["state_id"],
        pending,
        rollback,
        info["rows"],
        info["owl_final"],
        accepted=MaskSet.load(directory / "masks_accepted.safetensors"),
        clusters=info.get("clusters", {}),
        recovery_s=info.get("recovery_s", 0.0),
    )


__all__ = [
    "DECAY",
    "WaveState",
    "chain_id",
    "decay",
    "evaluate_state",
    "gate",
    "load_state",
    "read_state_info",
    "save_state",
    "start",
    "wave_pattern",
]
