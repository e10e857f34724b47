"""Warmup schedules: each knob a rollout policy or a loss anneals, as a pure function of the optimizer step."""

import math
from collections.abc import Callable


def linear_anneal(step: int, epsilon: float, warmup_steps: int) -> float:
    """TRB's warmup: epsilon * (1 - step / warmup_steps) for step < warmup_steps, then exactly 0."""
    if step >= warmup_steps:
        return 0.0
    return epsilon * (1.0 - step / warmup_steps)


def constant(step: int, epsilon: float, warmup_steps: int) -> float:
    """The fixed-epsilon baseline: the same budget at every step (warmup_steps is ignored)."""
    return epsilon


KL_BUDGET_SCHEDULES: dict[str, Callable[[int, float, int], float]] = {"linear": linear_anneal, "constant": constant}


def kl_budget(schedule: str, step: int, epsilon: float, warmup_steps: int) -> float:
    """Budget for the rollout made at optimizer step `step` under the named schedule."""
    if schedule not in KL_BUDGET_SCHEDULES:
        raise ValueError(f"Unknown KL-budget schedule {schedule!r}; choose one of {sorted(KL_BUDGET_SCHEDULES)}.")
    return KL_BUDGET_SCHEDULES[schedule](step, epsilon, warmup_steps)


def rollout_temperature(step: int, start: float, end: float, warmup_steps: int) -> float:
    """Temperature warmup: linear from `start` at step 0 to `end` at `warmup_steps`, then exactly `end`."""
    if step >= warmup_steps:
        return float(end)
    return start + (end - start) * step / warmup_steps


def veto_weight(step: int, start: float, decay_steps: int) -> float:
    """Veto's student weight beta in the target pi_T * pi_S^beta: linear from `start` to exactly 0 at `decay_steps`."""
    return linear_anneal(step, start, decay_steps)


def active_for(step: int, steps: int | None) -> bool:
    """Whether a policy limited to its first `steps` optimizer steps (None: the whole run) acts at `step`."""
    return steps is None or step < steps


def cosine_prefix_length(step: int, max_length: int, anneal_steps: int) -> int:
    """TrOPD's guidance: the longest teacher prefix at `step`, max_length * (1 + cos(pi * step / anneal_steps)) / 2
    rounded down, from `max_length` at step 0 to exactly 0 from `anneal_steps` on (training ends fully on-policy)."""
    if step >= anneal_steps:
        return 0
    return int(math.floor(max_length * 0.5 * (1.0 + math.cos(math.pi * step / anneal_steps)) + 1e-9))
