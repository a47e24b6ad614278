"""The recovery ladder: what a wave that spiked tries before the gate judges it.

When a wave's validation perplexity (or KL) passes the gate's step limit, the steps of
``DecayConfig.recovery.ladder`` run in order, each measured on the validation split,
until one brings the wave within the limits (see ``config.RecoveryConfig``):

- ``heal``: more LoRA healing steps, masks kept;
- ``regrow``: restore a share of what the wave removed from each block's most sensitive
  MLP cluster (with clusters off: from every Linear), the most useful weights first
  (|W| ||X_j||, ``masks.removal_scores``, the order a gradual rollback restores in);
- ``rollback``: restore a share of everything the wave still has removed, same order;
- ``revert``: restore the wave entirely; the gate then stops the decay (``gate.give_up``).

A restored weight gets its value from before the wave and its mask bit back; what is left
of the wave stays, so the gate's sealed delta is still exact. The ladder's seconds count
against ``budget_s`` over the whole decay; a step that would start past it is skipped.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from birdbone.core.gate import check
from birdbone.core.masks import removal_scores
from birdbone.core.waves import general_left_at, left_at, measure

log = logging.getLogger(__name__)


def needs_recovery(state: Any, config: Any) -> list[str]:
    """The gate's problems with the wave as it stands (empty: nothing to recover)."""
    current = state.current
    if not config.recovery.enabled or current.get("action") != "decay":
        return []
    if not math.isfinite(current["ppl"]) or not math.isfinite(current["kl"] or 0.0):
        return []  # NaN or inf: the gate's emergency stop, not something to heal
    return check(state.gate, current["ppl"], current["kl"], config.gate, current.get("general"))[0]


def restore_(state: Any, fraction: float, only: dict[int, int] | None = None) -> int:
    """Restores ``fraction`` of each Linear's weights this wave removed (and still has
    removed), the most useful first; with ``only`` ({block: cluster}) just that cluster's
    weights in each block's MLP. Returns how many weights came back."""
    profile = state.cluster_profile
    restored = 0
    for name, weight in state.linears().items():
        removed = state.prior[name] & ~state.masks[name]
        if only is not None:
            if profile is None or name not in profile.axes:
                continue
            block, axis = profile.axes[name]
            if block not in only:
                continue
            members = (profile.labels[block] == only[block]).to(removed.device)
            removed = removed & (members[:, None] if axis == 0 else members[None, :])
        index = removed.cpu().reshape(-1).nonzero().squeeze(1)
        count = int(round(fraction * index.numel()))
        if count == 0:
            continue
        before = state.before[name]
        useful = removal_scores(name, before.cpu().reshape(-1)[index], index, state.importance)
        chosen = index[useful.topk(count).indices].to(weight.device)
        mask = state.masks[name].clone().reshape(-1)
        mask[chosen] = True
        state.masks[name] = mask.reshape(weight.shape)
        with torch.no_grad():
            weight.view(-1)[chosen] = before.reshape(-1)[chosen].to(weight.dtype)
        restored += count
    return restored


def revert_(state: Any) -> int:
    """Restores the weights and masks from before the wave; returns the weights restored."""
    restored = 0
    for name, weight in state.linears().items():
        restored += int((state.prior[name] & ~state.masks[name]).sum())
        with torch.no_grad():
            weight.copy_(state.before[name])
    state.masks = state.prior.copy()
    return restored


def _spiking_clusters(state: Any) -> dict[int, int] | None:
    """Each block's MLP cluster whose removal this wave cost the most per weight."""
    sensitivity = (state.current.get("clusters") or {}).get("sensitivity")
    if not sensitivity or state.cluster_profile is None:
        return None
    return {int(block): max(range(len(v)), key=v.__getitem__) for block, v in sensitivity.items()}


def recover(
    state: Any,
    config: Any,
    heal_config: Any,
    waves: int,
    healing: torch.Tensor,
    heal_teacher: dict[str, torch.Tensor] | None,
    validation: torch.Tensor,
    teacher: dict[str, torch.Tensor],
    device: torch.device | str = "cpu",
    general: dict[str, torch.Tensor] | None = None,
) -> Any:
    """Runs the ladder on a wave that spiked, in place; records every step in
    ``state.current['recovery']`` (the wave's row)."""
    from birdbone.core.heal import heal_

    problems = needs_recovery(state, config)
    if not problems:
        return state
    ladder = config.recovery
    steps: list[dict[str, Any]] = []
    log.info("wave %d spiked (%s): recovery ladder %s", state.wave, "; ".join(problems), " -> ".join(ladder.ladder))
    for step in ladder.ladder:
        left = ladder.budget_s - state.recovery_s
        if left <= 0:
            steps.append({"step": step, "outcome": f"skipped: the ladder's budget of {ladder.budget_s:.0f} s is spent"})
            continue
        start = time.perf_counter()
        record: dict[str, Any] = {"step": step}
        if step == "heal":
            _, lr = heal_config.wave_schedule(state.wave, waves)
            report = heal_(
                state.bundle,
                state.masks,
                healing,
                heal_config,
                ladder.heal_steps,
                lr,
                heal_teacher,
                None,
                device,
                desc=f"wave {state.wave} recovery heal",
                seconds=left,
            )
            record.update(heal_steps=report.steps, stopped=report.stopped)
        elif step == "regrow":
            only = _spiking_clusters(state)
            record.update(restored=restore_(state, ladder.regrow_fraction, only), clusters=only)
        elif step == "rollback":
            record["restored"] = restore_(state, ladder.rollback_fraction)
        else:  # revert
            record["restored"] = revert_(state)
            state.current["reverted"] = True
        if step != "revert":
            measure(state, validation, teacher, general, config.batch_size, device, f"wave {state.wave} {step}")
            problems = needs_recovery(state, config)
        seconds = time.perf_counter() - start
        state.recovery_s += seconds
        # a revert is bit-exact: the numbers are those the previous wave left, not measured again
        ppl, kl = left_at(state.rows[-1]) if step == "revert" else (state.current["ppl"], state.current["kl"])
        record.update(
            ppl=ppl,
            kl=kl,
            general=general_left_at(state.rows[-1]) if step == "revert" else state.current.get("general"),
            sparsity=state.masks.overall_sparsity(),
            seconds=round(seconds, 2),
            outcome="reverted" if step == "revert" else ("recovered" if not problems else "; ".join(problems)),
        )
        steps.append(record)
        log.info(
            "wave %d recovery %s: perplexity %.3f, sparsity %.4f, %s (%.0f s)",
            state.wave,
            step,
            record["ppl"],
            record["sparsity"],
            record["outcome"],
            seconds,
        )
        if step == "revert" or not problems:
            break
    state.current["recovery"] = steps
    state.current["seconds_recovery"] = sum(s.get("seconds", 0.0) for s in steps)
    return state
