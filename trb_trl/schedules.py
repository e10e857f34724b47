"""KL-budget schedules: the per-token budget epsilon as a pure function of the optimizer step."""

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
