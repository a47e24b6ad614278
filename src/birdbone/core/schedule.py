"""Decay schedules: the cumulative sparsity each wave reaches, and how many waves a target
takes when no wave may remove more than a capped share of the weights still present.

- ``constant``: every wave removes the same share (the cap) of the weights still present,
  s_k = 1 - (1 - cap)^k, the last wave stopping at the target; the fewest waves.
- ``linear``: equal steps of sparsity, s_k = s * k / N.
- ``cubic``: Zhu & Gupta (2017, "To prune, or not to prune"), s_k = s * (1 - (1 - k/N)^3):
  big steps first, while the model still has redundancy to spare, small steps last.

For ``linear`` and ``cubic`` N is the smallest count whose every wave respects the cap.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cubic")


def _curve(schedule: str, target: float, waves: int, cap: float) -> list[float]:
    if schedule == "constant":
        return [min(target, 1.0 - (1.0 - cap) ** k) if k < waves else target for k in range(1, waves + 1)]
    if schedule == "linear":
        return [target * k / waves for k in range(1, waves + 1)]
    if schedule == "cubic":
        return [target * (1.0 - (1.0 - k / waves) ** 3) for k in range(1, waves + 1)]
    raise ValueError(f"unknown schedule '{schedule}'; known: {', '.join(SCHEDULES)}")


def step_shares(targets: list[float]) -> list[float]:
    """Share of the weights still present that each wave removes."""
    shares, before = [], 0.0
    for target in targets:
        shares.append((target - before) / (1.0 - before) if before < 1 else 0.0)
        before = target
    return shares


def wave_count(schedule: str, target: float, cap: float, limit: int = 1000) -> int:
    """The fewest waves that reach ``target`` with no wave removing more than ``cap`` of
    the weights still present."""
    if not 0 <= target < 1:
        raise ValueError(f"target sparsity {target} is outside [0, 1)")
    if not 0 < cap <= 1:
        raise ValueError(f"per-wave cap {cap} is outside (0, 1]")
    if target == 0:
        return 0
    if schedule == "constant":
        return max(1, math.ceil(math.log(1.0 - target) / math.log(1.0 - cap) - 1e-9)) if cap < 1 else 1
    for waves in range(1, limit + 1):
        if max(step_shares(_curve(schedule, target, waves, cap))) <= cap + 1e-12:
            return waves
    raise ValueError(f"{schedule} schedule needs more than {limit} waves to reach {target} under cap {cap}")


def wave_targets(schedule: str, target: float, cap: float, waves: int | None = None) -> list[float]:
    """Cumulative sparsity after each wave, the last equal to ``target``.

    Raises:
        ValueError: an explicit ``waves`` count whose steps would pass the cap.
    """
    needed = wave_count(schedule, target, cap)
    if waves is None:
        waves = needed
    if waves == 0:
        return []
    targets = _curve(schedule, target, waves, cap)
    worst = max(step_shares(targets))
    if worst > cap + 1e-12:
        raise ValueError(
            f"{waves} waves of the {schedule} schedule to sparsity {target} remove up to {worst:.1%} of the "
            f"remaining weights in one wave, above the cap {cap:.0%}. Fix: at least {needed} waves, or a higher cap"
        )
    targets[-1] = target
    return targets
