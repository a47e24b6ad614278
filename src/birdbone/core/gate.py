"""The stop-loss gate: after each wave, keep it, count a strike, or undo it.

A wave whose validation perplexity is more than ``step_limit`` above the last accepted
state's is a strike (so is a KL above ``kl_limit``, when set). With ``reference:
accepted_or_dense``, the default, the accepted state counts as no better than dense:
healing on the user's own text can take a pruned model below the dense perplexity, and
that in-domain gain is not a margin later waves must keep. ``strikes`` strikes in a row
undo every wave since the last accepted state: at once (``full``), or a share at a time
over the next ``rollback_waves`` waves, the most important weights first (``gradual``);
either way the model ends bit for bit at the accepted state and the decay stops. A kept
wave that takes perplexity past the end-to-end ``budget`` (relative to dense) is undone
and stops the decay too, and so does a wave that
went non-finite (NaN or inf in its weights, its healing loss, or its perplexity or KL),
whatever the limits say: nothing later can be judged against a poisoned model.
``GateState`` is plain data (saved as JSON with each wave), so a
resumed run takes the same decisions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

DECAY, ROLLBACK, STOPPED = "decay", "rollback", "stopped"


@dataclass
class GateState:
    dense_ppl: float
    reference_ppl: float
    reference_kl: float = 0.0
    reference_wave: int = 0  # 0: the dense (or imported) model
    strikes: int = 0
    pending: list[int] = field(default_factory=list)  # waves since the accepted state
    phase: str = DECAY
    rollback_part: int = 0
    rollback_parts: int = 0
    stop_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GateState:
        return cls(**data)


@dataclass
class Verdict:
    """What the gate decided for one wave, and what the wave runner must do about it."""

    decision: str  # kept | strike | reverted | rolling back | stopped
    reason: str
    undo_now: list[int] = field(default_factory=list)  # waves to undo at once (newest first)
    start_rollback: bool = False  # build the delta since the accepted state, restore it in parts


def _stop(state: GateState, wave: int, why: str, reason: str) -> Verdict:
    """Undoes ``wave`` and every wave since the accepted state at once, and stops the decay."""
    undo = sorted([*state.pending, wave], reverse=True)
    state.phase, state.stop_reason, state.pending, state.strikes = STOPPED, why, [], 0
    return Verdict(
        "reverted", f"{reason}; back to the accepted state of wave {state.reference_wave}, decay stopped", undo_now=undo
    )


def check(state: GateState, ppl: float, kl: float | None, config: Any) -> tuple[list[str], float, str]:
    """What is wrong with a wave at ``ppl`` and ``kl`` (nothing: within the step and KL
    limits), its rise over the reference, and what the reference is, in words."""
    reference = state.reference_ppl
    against = f"the accepted {reference:.3f} (wave {state.reference_wave})"
    if config.reference == "accepted_or_dense" and state.dense_ppl > reference:
        reference = state.dense_ppl
        against = f"dense {reference:.3f} (the accepted wave {state.reference_wave} is below it)"
    rise = ppl / reference - 1.0
    problems = []
    if ppl > reference * (1.0 + config.step_limit):
        problems.append(f"perplexity {ppl:.3f} is {rise:+.1%} over {against}, limit {config.step_limit:+.0%}")
    if config.kl_limit is not None and kl is not None and kl > config.kl_limit:
        problems.append(f"KL {kl:.4f} over the limit {config.kl_limit}")
    return problems, rise, against


def give_up(state: GateState, wave: int, reason: str) -> Verdict:
    """The recovery ladder reverted ``wave``: undo the waves since the accepted state, stop."""
    return _stop(state, wave, "recovery", reason)


def judge(state: GateState, wave: int, ppl: float, kl: float | None, config: Any, fault: str | None = None) -> Verdict:
    """Judges a decay wave and updates ``state`` in place.

    Args:
        config: a ``GateConfig`` (step_limit, strikes, budget, kl_limit, rollback, rollback_waves).
        fault: what went non-finite in the wave (weights, healing), found by the caller.
    """
    if state.phase != DECAY:
        raise RuntimeError(f"wave {wave} judged while the gate is in phase {state.phase}")
    if fault is None and not math.isfinite(ppl):
        fault = f"validation perplexity is {ppl}"
    if fault is None and kl is not None and not math.isfinite(kl):
        fault = f"KL to the dense model is {kl}"
    if fault is not None:
        return _stop(state, wave, "non-finite", f"non-finite: {fault}")
    problems, rise, against = check(state, ppl, kl, config)
    if not problems:
        total = ppl / state.dense_ppl - 1.0
        if config.budget is not None and total > config.budget:
            reason = f"perplexity {ppl:.3f} is {total:+.1%} over dense, past the budget {config.budget:+.0%}"
            return _stop(state, wave, "budget", reason)
        state.reference_ppl, state.reference_kl, state.reference_wave = ppl, kl or 0.0, wave
        state.strikes, state.pending = 0, []
        return Verdict("kept", f"perplexity {ppl:.3f} ({rise:+.1%} against {against})")
    state.strikes += 1
    state.pending.append(wave)
    reason = "; ".join(problems)
    if state.strikes < config.strikes:
        return Verdict("strike", f"strike {state.strikes} of {config.strikes}: {reason}")
    undo = sorted(state.pending, reverse=True)
    what = f"waves {', '.join(map(str, sorted(undo)))}" if len(undo) > 1 else f"wave {wave}"
    if config.rollback == "full":
        state.phase, state.stop_reason = STOPPED, "stop-loss"
        state.pending = []
        return Verdict(
            "reverted", f"strike {state.strikes} of {config.strikes}: {reason}; {what} undone", undo_now=undo
        )
    state.phase, state.rollback_part, state.rollback_parts = ROLLBACK, 0, config.rollback_waves
    state.stop_reason = "stop-loss"
    return Verdict(
        "rolling back",
        f"strike {state.strikes} of {config.strikes}: {reason}; {what} to be restored over the next "
        f"{config.rollback_waves} waves, most important weights first",
        start_rollback=True,
    )


def rollback_step(state: GateState) -> tuple[int, int, bool]:
    """The part to restore in this wave: (part, parts, last); advances the state, and
    ends the rollback (the model is then the accepted state again) after the last part."""
    if state.phase != ROLLBACK:
        raise RuntimeError(f"no rollback in progress (phase {state.phase})")
    part, parts = state.rollback_part, state.rollback_parts
    state.rollback_part += 1
    last = state.rollback_part == parts
    if last:
        state.phase, state.pending, state.strikes = STOPPED, [], 0
    return part, parts, last
