"""The stop-loss gate: after each wave, keep it, count a strike, or undo it.

A wave whose validation perplexity is more than ``step_limit`` above the last accepted
state's is a strike (so is a KL above ``kl_limit``, when set), and so is a wave whose
perplexity on the general split (text the dense model wrote, which no stage trains on) is
more than ``general.step_limit`` above the accepted state's, or whose KL to dense there
passes ``general.kl_limit``: a wave that helps in-domain and hurts general text is a strike. With ``reference:
accepted_or_dense``, the default, the accepted state counts as no better than dense:
healing on the user's own text can take a pruned model below the dense perplexity, and
that in-domain gain is not a margin later waves must keep. ``strikes`` strikes in a row
undo every wave since the last accepted state: at once (``full``), or a share at a time
over the next ``rollback_waves`` waves, the most important weights first (``gradual``);
either way the model ends bit for bit at the accepted state and the decay stops. A wave
that takes perplexity past the end-to-end ``budget`` (relative to dense), or general
perplexity past ``general.budget``, is undone with every wave since the accepted state and
stops the decay too, within its step limits or not (a strike past the budget would
otherwise stand when it is the last wave), and so does a wave that
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
    # the general split's perplexity of dense and of the accepted state (None: no general split)
    dense_general_ppl: float | None = None
    reference_general: dict[str, float] | None = None  # ppl, kl, top1
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


def _reference(state: GateState, accepted: float, dense: float, config: Any, wave: int) -> tuple[float, str]:
    """The perplexity a wave's step is measured from, and what it is, in words."""
    if config.reference == "accepted_or_dense" and dense > accepted:
        return dense, f"dense {dense:.3f} (the accepted wave {wave} is below it)"
    return accepted, f"the accepted {accepted:.3f} (wave {wave})"


def check(
    state: GateState, ppl: float, kl: float | None, config: Any, general: dict[str, float] | None = None
) -> tuple[list[str], float, str]:
    """What is wrong with a wave at ``ppl`` and ``kl`` on the validation split and at
    ``general`` (``ppl``, ``kl``) on the general split (nothing: within every limit), its
    in-domain rise over the reference, and what the reference is, in words."""
    reference, against = _reference(state, state.reference_ppl, state.dense_ppl, config, state.reference_wave)
    rise = ppl / reference - 1.0
    problems = []
    if ppl > reference * (1.0 + config.step_limit):
        problems.append(f"perplexity {ppl:.3f} is {rise:+.1%} over {against}, limit {config.step_limit:+.0%}")
    if config.kl_limit is not None and kl is not None and kl > config.kl_limit:
        problems.append(f"KL {kl:.4f} over the limit {config.kl_limit}")
    limits = config.general
    if general is not None and state.dense_general_ppl is not None:
        accepted = (state.reference_general or {}).get("ppl", state.dense_general_ppl)
        base, what = _reference(state, accepted, state.dense_general_ppl, config, state.reference_wave)
        step = general["ppl"] / base - 1.0
        if limits.step_limit is not None and general["ppl"] > base * (1.0 + limits.step_limit):
            problems.append(
                f"general perplexity {general['ppl']:.3f} is {step:+.1%} over {what}, limit {limits.step_limit:+.0%}"
            )
        if limits.kl_limit is not None and general["kl"] > limits.kl_limit:
            problems.append(f"general KL {general['kl']:.4f} over the limit {limits.kl_limit}")
    return problems, rise, against


def _past_budget(state: GateState, ppl: float, general: dict[str, float] | None, config: Any) -> str | None:
    """Why a wave ends the decay, within its step limits or not: past an end-to-end budget."""
    total = ppl / state.dense_ppl - 1.0
    if config.budget is not None and total > config.budget:
        return f"perplexity {ppl:.3f} is {total:+.1%} over dense, past the budget {config.budget:+.0%}"
    if general is not None and state.dense_general_ppl is not None and config.general.budget is not None:
        total = general["ppl"] / state.dense_general_ppl - 1.0
        if total > config.general.budget:
            return (
                f"general perplexity {general['ppl']:.3f} is {total:+.1%} over dense, "
                f"past the budget {config.general.budget:+.0%}"
            )
    return None


def give_up(state: GateState, wave: int, reason: str) -> Verdict:
    """The recovery ladder reverted ``wave``: undo the waves since the accepted state, stop."""
    return _stop(state, wave, "recovery", reason)


def judge(
    state: GateState,
    wave: int,
    ppl: float,
    kl: float | None,
    config: Any,
    fault: str | None = None,
    general: dict[str, float] | None = None,
) -> Verdict:
    """Judges a decay wave and updates ``state`` in place.

    Args:
        config: a ``GateConfig`` (step_limit, strikes, budget, kl_limit, general, rollback, rollback_waves).
        fault: what went non-finite in the wave (weights, healing), found by the caller.
        general: the wave's ``ppl`` and ``kl`` on the general split (None: not measured).
    """
    if state.phase != DECAY:
        raise RuntimeError(f"wave {wave} judged while the gate is in phase {state.phase}")
    if fault is None and not math.isfinite(ppl):
        fault = f"validation perplexity is {ppl}"
    if fault is None and kl is not None and not math.isfinite(kl):
        fault = f"KL to the dense model is {kl}"
    for key in ("ppl", "kl"):
        if fault is None and general is not None and not math.isfinite(general[key]):
            fault = f"general {'perplexity' if key == 'ppl' else 'KL to the dense model'} is {general[key]}"
    if fault is not None:
        return _stop(state, wave, "non-finite", f"non-finite: {fault}")
    past = _past_budget(state, ppl, general, config)
    if past is not None:  # a strike too: no later wave could bring it back within the budget
        return _stop(state, wave, "budget", past)
    problems, rise, against = check(state, ppl, kl, config, general)
    if not problems:
        state.reference_ppl, state.reference_kl, state.reference_wave = ppl, kl or 0.0, wave
        if general is not None:
            state.reference_general = dict(general)
        state.strikes, state.pending = 0, []
        reason = f"perplexity {ppl:.3f} ({rise:+.1%} against {against})"
        if general is not None and state.dense_general_ppl is not None:
            total = general["ppl"] / state.dense_general_ppl - 1.0
            reason += f", general {general['ppl']:.3f} ({total:+.1%} against dense)"
        return Verdict("kept", reason)
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
