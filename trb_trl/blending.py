"""Exact trust-region blending of a student and a teacher next-token distribution.

For one prefix, with tempered log-probs ``ls = log_softmax(z_S / tau)``, ``lt = log_softmax(z_T / tau)`` and
``r = lt - ls``, the behaviour family is ``log mu_b = ls + b * r - A(b)`` with ``A(b) = logsumexp(ls + b * r)``.
``f(b) = KL(mu_b || pi_S) = b * A'(b) - A(b)`` is increasing (``f'(b) = b * Var_{mu_b}[r] >= 0``), so the largest
``b`` in ``[0, 1]`` with ``f(b) <= epsilon`` is a one-dimensional root-find per row. This module solves it with a
safeguarded Newton iteration on ``sqrt(f)`` (nearly linear in ``b`` because ``f ~ b^2 Var / 2`` for small ``b``),
batched over rows, in float32, with no host synchronisation on accelerators.

Pure tensor code: no transformers imports.
"""

from dataclasses import dataclass

import torch


# Teacher log-probs below this are treated as this value. It keeps ``r`` finite where the teacher gives (numerically)
# zero mass to a token the student allows, so ``0 * r`` is never NaN; exp(-1e4) underflows to 0 in float32 anyway.
TEACHER_LOGPROB_FLOOR = -1.0e4
# Newton targets a budget this much (relatively) below epsilon, so iterates that land a hair past the target are still
# feasible; the effect on beta is ~5e-5 relative.
_TARGET_SHRINK = 1.0e-4
_MAX_NEWTON_STEPS = 8
_BETA_TOLERANCE = 1.0e-6


@dataclass
class BlendResult:
    """Output of [`trust_region_blend`]. All tensors are float32.

    Args:
        logprobs (`torch.Tensor` of shape `(B, V)`):
            log mu*, normalised over the allowed tokens; `-inf` on tokens the student scores banned.
        beta (`torch.Tensor` of shape `(B,)`):
            The blend weight beta* in [0, 1]; 1 means the row samples from the teacher.
        kl_to_student (`torch.Tensor` of shape `(B,)`):
            KL(mu* || pi_S), at most epsilon.
        kl_to_teacher (`torch.Tensor` of shape `(B,)`):
            KL(mu* || pi_T).
    """

    logprobs: torch.Tensor
    beta: torch.Tensor
    kl_to_student: torch.Tensor
    kl_to_teacher: torch.Tensor


def _moments(student_logprobs: torch.Tensor, student_probs: torch.Tensor, log_ratio: torch.Tensor, beta: torch.Tensor):
    """Return (A(b), E_mu[r], Var_mu[r], KL(mu_b || pi_S)) for every row at blend weight ``beta``.

    The KL is summed as sum_v pi_S(v) phi(log(mu/pi_S)(v)) with phi(x) = x e^x - e^x + 1: the same value as
    sum mu log(mu / pi_S) (both distributions sum to one), but a sum of non-negative terms with no cancellation, so
    it stays accurate in float32 for budgets far below 1 / V.
    """
    logits = student_logprobs + beta[:, None] * log_ratio
    log_partition = torch.logsumexp(logits, dim=-1)
    log_weight = beta[:, None] * log_ratio - log_partition[:, None]  # log(mu / pi_S), finite everywhere
    weight_minus_one = torch.expm1(log_weight)
    probs = student_probs * (weight_minus_one + 1.0)
    mean = (probs * log_ratio).sum(-1)
    variance = (probs * (log_ratio - mean[:, None]).square()).sum(-1)
    # phi(x) = x + (x - 1) expm1(x)
    kl = (student_probs * (log_weight + (log_weight - 1.0) * weight_minus_one)).sum(-1)
    return log_partition, mean, variance, kl


def trust_region_blend(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    epsilon: float | torch.Tensor,
    *,
    temperature: float = 1.0,
) -> BlendResult:
    """Blend student and teacher into mu* = argmin_mu KL(mu || pi_T) subject to KL(mu || pi_S) <= epsilon.

    mu* is pi_S^(1-beta*) pi_T^beta* (renormalised) with beta* = max{beta in [0, 1] : KL(mu_beta || pi_S) <= epsilon}.

    Args:
        student_logits (`torch.Tensor` of shape `(B, V)`):
            Raw student logits, any float dtype. Entries at `-inf` (tokens banned by earlier logits processors) keep
            zero mass in mu*, and the teacher is renormalised over the remaining tokens.
        teacher_logits (`torch.Tensor` of shape `(B, V)`):
            Raw teacher logits over the same vocabulary.
        epsilon (`float` or `torch.Tensor` of shape `(B,)`):
            KL budget, one per row if a tensor. 0 returns pi_S; a budget >= KL(pi_T || pi_S) returns pi_T.
        temperature (`float`, *optional*, defaults to `1.0`):
            Both logits are divided by it before the log-softmax, so mu* blends the tempered distributions.

    Returns:
        [`BlendResult`]
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"student_logits and teacher_logits must both be (batch, vocab); got {tuple(student_logits.shape)} and "
            f"{tuple(teacher_logits.shape)}."
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    batch_size = student_logits.shape[0]
    device = student_logits.device
    if isinstance(epsilon, torch.Tensor):
        epsilon = epsilon.to(device=device, dtype=torch.float32).expand(batch_size).clamp_min(0.0)
    else:
        if not epsilon >= 0:  # also rejects NaN
            raise ValueError(f"epsilon must be >= 0, got {epsilon}.")
        epsilon = torch.full((batch_size,), float(epsilon), device=device, dtype=torch.float32)

    student = student_logits.float() / temperature
    allowed = student > float("-inf")
    student_logprobs = torch.log_softmax(student, dim=-1)
    student_probs = torch.exp(student_logprobs)
    # The teacher only competes for tokens the student may emit: renormalise it over the allowed set.
    teacher = torch.where(allowed, teacher_logits.float() / temperature, float("-inf"))
    teacher_logprobs = torch.log_softmax(teacher, dim=-1)
    # A row where the teacher has no finite mass on the allowed set (degenerate) falls back to the student.
    teacher_ok = torch.isfinite(teacher_logprobs).any(-1, keepdim=True)
    teacher_logprobs = torch.where(teacher_ok, teacher_logprobs.clamp_min(TEACHER_LOGPROB_FLOOR), student_logprobs)
    log_ratio = torch.where(allowed, teacher_logprobs - student_logprobs, 0.0)
    # Centering r by E_S[r] leaves every mu_b unchanged but keeps A(b) ~ b^2 Var / 2 small, avoiding cancellation in
    # f = b A' - A for tiny budgets.
    zero = torch.zeros(batch_size, device=device)
    _, offset, variance_at_zero, _ = _moments(student_logprobs, student_probs, log_ratio, zero)
    log_ratio = torch.where(allowed, log_ratio - offset[:, None], 0.0)

    one = torch.ones(batch_size, device=device)
    log_partition_one, mean_one, _, kl_one = _moments(student_logprobs, student_probs, log_ratio, one)
    teacher_feasible = kl_one <= epsilon

    # Safeguarded Newton (rtsafe) on h(b) = sqrt(f(b)) - sqrt(target) inside the bracket [lo, hi] around the target's
    # root. Separately, `best` is the largest b seen with f(b) <= epsilon; its statistics are carried along so the
    # result needs no extra evaluation.
    best = torch.where(teacher_feasible, one, zero)
    best_log_partition = torch.where(teacher_feasible, log_partition_one, 0.0)
    best_mean = torch.where(teacher_feasible, mean_one, 0.0)
    best_kl = torch.where(teacher_feasible, kl_one, 0.0)
    active = ~teacher_feasible & (epsilon > 0)
    lo, hi = zero.clone(), one.clone()

    target = epsilon * (1.0 - _TARGET_SHRINK)
    sqrt_target = target.sqrt()
    beta = torch.sqrt(2.0 * target / variance_at_zero.clamp_min(1e-30)).clamp(max=0.5)
    beta = torch.where(active, beta, zero)
    check_convergence = device.type == "cpu"  # a host sync is free on CPU; on accelerators run a fixed count
    converged = False
    for iteration in range(_MAX_NEWTON_STEPS + 1):
        log_partition, mean, variance, kl = _moments(student_logprobs, student_probs, log_ratio, beta)
        improves = active & (kl <= epsilon) & (beta > best)
        best = torch.where(improves, beta, best)
        best_log_partition = torch.where(improves, log_partition, best_log_partition)
        best_mean = torch.where(improves, mean, best_mean)
        best_kl = torch.where(improves, kl, best_kl)
        if converged or iteration == _MAX_NEWTON_STEPS:  # the last iterate has been evaluated: done
            break
        below = kl <= target
        lo = torch.where(active & below, beta, lo)
        hi = torch.where(active & ~below, beta, hi)
        # h'(b) = b Var / (2 sqrt f)
        sqrt_kl = kl.sqrt()
        slope = beta * variance / (2.0 * sqrt_kl.clamp_min(1e-30))
        proposal = beta - (sqrt_kl - sqrt_target) / slope.clamp_min(1e-30)
        inside = torch.isfinite(proposal) & (proposal >= lo) & (proposal <= hi)
        new_beta = torch.where(active, torch.where(inside, proposal, 0.5 * (lo + hi)), beta)
        step = (new_beta - beta).abs()
        beta = new_beta
        converged = check_convergence and not bool((step > _BETA_TOLERANCE * (1.0 + 100.0 * beta)).any())

    logprobs = student_logprobs + best[:, None] * log_ratio - best_log_partition[:, None]
    # KL(mu || pi_T) = sum mu (b r~ - A - r~ - c) with r = r~ + c.
    kl_to_teacher = ((best - 1.0) * best_mean - best_log_partition - offset).clamp_min(0.0)
    return BlendResult(logprobs=logprobs, beta=best, kl_to_student=best_kl, kl_to_teacher=kl_to_teacher)
