"""Exact trust-region blending of a student and a teacher next-token distribution.

For one prefix, with tempered log-probs ``ls = log_softmax(z_S / tau)``, ``lt = log_softmax(z_T / tau)`` and
``r = lt - ls``, the behaviour family is ``log mu_b = ls + b * r - A(b)`` with ``A(b) = logsumexp(ls + b * r)``.
``f(b) = KL(mu_b || pi_S) = b * A'(b) - A(b)`` is increasing (``f'(b) = b * Var_{mu_b}[r] >= 0``), so the largest
``b`` in ``[0, 1]`` with ``f(b) <= epsilon`` is a one-dimensional root-find per row, solved here by a safeguarded
Newton iteration batched over rows, in float32, with no host synchronisation on accelerators.

Every quantity is evaluated in log space. At low temperature, or with peaked logits, the student's log-prob of a token
the teacher favours is hundreds or thousands of nats below zero: ``pi_S`` underflows and ``mu / pi_S`` overflows in
float32, so neither may ever be formed. Such rows also make ``f`` a staircase (a plateau per token that dominates
``mu_b``, sharp steps where the dominant token changes), which the solver's step rules are built around.

Pure tensor code: no transformers imports.
"""

from dataclasses import dataclass

import torch


# Newton targets a budget this much (relatively) below epsilon, so iterates that land a hair past the target are still
# feasible despite float32 rounding in f (1e-5 is too little); beta moves by 1e-4 * f / f', ~5e-5 relative where
# f ~ b^2, more on a plateau of f, where mu hardly changes.
_TARGET_SHRINK = 1.0e-4
_MAX_NEWTON_STEPS = 12
_BETA_TOLERANCE = 1.0e-6
# On CPU the solver stops once every row has converged (a host sync is free there); accelerators always run the fixed
# count. Tests turn this off to exercise the accelerator path on CPU.
_STOP_EARLY_ON_CPU = True
# exp(-87) ~ 1.6e-38 is still a normal float32; anything at or below the threshold (1.2 * exp(-87)) counts as 0.
_EXP_FLOOR = -87.0
_EXP_FLOOR_VALUE = 2.0e-38


@dataclass
class BlendResult:
    """Output of [`trust_region_blend`]. All tensors but `teacher_valid` are float32.

    Args:
        logprobs (`torch.Tensor` of shape `(B, V)`):
            log mu*, normalised over the allowed tokens; `-inf` on tokens the student scores banned, and (when
            beta > 0) on tokens the teacher gives exactly zero mass.
        beta (`torch.Tensor` of shape `(B,)`):
            The blend weight beta* in [0, 1]; 1 means the row samples from the teacher. 0 on invalid-teacher rows.
        kl_to_student (`torch.Tensor` of shape `(B,)`):
            KL(mu* || pi_S), at most epsilon.
        kl_to_teacher (`torch.Tensor` of shape `(B,)`):
            KL(mu* || pi_T). Where mu* is the student (beta 0) and keeps mass on tokens the teacher rules out (e.g. a
            teacher-only stop id), that KL is infinite; the student conditioned on the teacher's support is used
            instead so the metric stays finite. 0 on invalid-teacher rows.
        teacher_valid (`torch.Tensor` of shape `(B,)`, bool):
            False where the teacher logits are NaN or `+inf` on an allowed token, or `-inf` on all of them. Such a row
            is the student (beta 0, both KLs 0), so it must not be counted as teacher-sampled: mask it out of
            statistics and report it.
    """

    logprobs: torch.Tensor
    beta: torch.Tensor
    kl_to_student: torch.Tensor
    kl_to_teacher: torch.Tensor
    teacher_valid: torch.Tensor


def _moments(student_logprobs: torch.Tensor, student_probs: torch.Tensor, log_ratio: torch.Tensor, beta: torch.Tensor):
    """Return (A(b), E_mu[r], Var_mu[r], KL(mu_b || pi_S)) for every row at blend weight ``beta``.

    With x = log(mu / pi_S) = b r - A, the KL is summed as sum_v max(mu, pi_S) g(x), g(x) = phi(x) = x e^x - e^x + 1
    for x <= 0 and g(x) = psi(x) = e^-x phi(x) = x + expm1(-x) for x > 0: the same value as sum mu x (the
    distributions sum to one), but a sum of non-negative terms stationary in x at 0, so there is no cancellation for
    budgets far below 1 / V and a rounding error in A barely moves it. The weight stays in [0, 1] and g in
    [0, max(1, |x|)], so nothing overflows however far ``pi_S`` underflows (mu / pi_S is never formed). Both branches
    come from one expm1(-|x|): g = x + expm1(-|x|) (sign(x) + min(x, 0)), as selecting with masks is several times
    slower on CPU. Transcendental passes: one exp (reused for mu) and one expm1.
    """
    # In-place where possible: at V = 151,936 every temporary is megabytes, and allocation dominates on CPU.
    log_weight = beta[:, None] * log_ratio
    probs = student_logprobs + log_weight
    top = probs.amax(-1, keepdim=True)
    probs.sub_(top)
    if probs.device.type == "cpu":
        # Clamping at -87 keeps exp on its vectorised path (an input that underflows costs ~15x more on CPU, and at
        # low temperature most do); the clamped tokens are then zeroed, as exp would (nearly) have: a floor of e^-87
        # per token would fake a tiny f(b) with a misleading slope wherever the true f is ~0.
        torch.threshold_(probs.clamp_min_(_EXP_FLOOR).exp_(), _EXP_FLOOR_VALUE, 0.0)
    else:
        probs.exp_()
    total = probs.sum(-1, keepdim=True)
    log_partition = top + total.log()
    probs.div_(total)
    log_weight.sub_(log_partition)  # x = b r - A; finite everywhere, also where pi_S = mu = 0
    expm1 = log_weight.abs().neg_().expm1_()
    g = log_weight.clamp_max(0.0).add_(torch.sign(log_weight)).mul_(expm1).add_(log_weight)
    kl = torch.linalg.vecdot(torch.maximum(probs, student_probs), g)
    mean = torch.linalg.vecdot(probs, log_ratio)
    variance = torch.linalg.vecdot(probs, (log_ratio - mean[:, None]).square_())
    return log_partition.squeeze(-1), mean, variance, kl


def _off_finite(x: torch.Tensor, value: float) -> torch.Tensor:
    """0 where ``x`` is finite, ``value`` where it is +-inf or NaN (x * 0 is NaN exactly there)."""
    return torch.nan_to_num(x * 0.0, nan=value)


def _tempered_log_softmax(logits: torch.Tensor, top: torch.Tensor, temperature: float) -> torch.Tensor:
    # Subtracting the row max before dividing keeps (z - max) exact for the tokens that carry mass, so a small
    # temperature does not round their log-probs at the scale of max / tau.
    return torch.log_softmax((logits - top[:, None]) / temperature, dim=-1)


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
            Raw teacher logits over the same vocabulary. A `-inf` on an allowed token is exact zero mass: every
            mu_beta with beta > 0 drops the token, which alone costs -log(1 - p) of the budget (p the student's mass
            there), so a smaller budget leaves the row on the student. A row that is NaN or `+inf` on an allowed
            token, or `-inf` on all of them, is invalid: it returns the student (see `BlendResult.teacher_valid`).
        epsilon (`float` or `torch.Tensor` of shape `(B,)`):
            KL budget, one per row if a tensor. 0 returns pi_S; a budget >= KL(pi_T || pi_S) returns pi_T.
        temperature (`float`, *optional*, defaults to `1.0`):
            Both logits are divided by it before the log-softmax, so mu* blends the tempered distributions.

    Returns:
        [`BlendResult`]

    Cost: about 25 elementwise passes over (B, V) up front and per solver iteration (one exp and one expm1 each). On
    CPU the loop stops once every row has converged (typically 3 to 7 iterations, plus one at beta = 1); accelerators
    run all `_MAX_NEWTON_STEPS + 1` = 13 to avoid a host sync. Staircase-shaped f (peaked rows, low temperature)
    take the most.
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

    inf = float("inf")
    student = student_logits.float()
    student_top = student.amax(-1)
    student_logprobs = _tempered_log_softmax(student, student_top, temperature)
    # Masks are built arithmetically (see `_off_finite`): boolean selects over (B, V) cost several times an
    # elementwise op on CPU.
    banned_shift = _off_finite(student_logprobs, -inf)  # -inf on tokens the student bans, else 0
    # The teacher only competes for tokens the student may emit: renormalise it over the allowed set. NaN becomes
    # +inf first, so a NaN or +inf on an allowed token makes the row's max +inf, while on a banned token it turns into
    # NaN (inf - inf), then -inf, and is ignored. A max of +inf or -inf marks an invalid row; it is solved on the
    # student (all finite) and pinned to beta = 0 below.
    teacher = torch.nan_to_num(teacher_logits.float(), nan=inf, posinf=inf, neginf=-inf)
    teacher = torch.nan_to_num(teacher + banned_shift, nan=-inf, posinf=inf, neginf=-inf)
    teacher_top = teacher.amax(-1)
    teacher_valid = torch.isfinite(teacher_top)
    teacher = torch.where(teacher_valid[:, None], teacher, student)
    teacher_top = torch.where(teacher_valid, teacher_top, student_top)
    teacher_logprobs = _tempered_log_softmax(teacher, teacher_top, temperature)

    # Tokens the teacher rules out have zero mass in every mu_b with b > 0. Blending happens on the teacher's support
    # against the student conditioned on it, pi_c = pi_S(. | support), and KL(mu_b || pi_S) = KL(mu_b || pi_c) + cost
    # with cost = -log pi_S(support): the budget left for the blend is epsilon - cost.
    outside = _off_finite(teacher_logprobs, 1.0)  # 1 off the support (ruled out or banned), else 0
    ruled_out_mass = torch.linalg.vecdot(student_logprobs.exp(), outside)
    conditioned = student_logprobs + _off_finite(teacher_logprobs, -inf)
    log_support_mass = torch.logsumexp(conditioned, dim=-1)
    cost = torch.where(ruled_out_mass < 0.5, -torch.log1p(-ruled_out_mass), -log_support_mass)
    budget = epsilon - cost
    conditioned = conditioned - log_support_mass[:, None]  # == student_logprobs up to rounding when nothing is out
    conditioned_probs = conditioned.exp()
    log_ratio = torch.nan_to_num(teacher_logprobs - conditioned, nan=0.0)  # 0 off the support
    # Centering r by E_c[r] leaves every mu_b unchanged but keeps A(b) ~ b^2 Var / 2 small. r stays finite off the
    # support, where pi_c = mu_b = 0.
    offset = torch.linalg.vecdot(conditioned_probs, log_ratio)
    log_ratio = log_ratio - offset[:, None]
    variance_at_zero = torch.linalg.vecdot(conditioned_probs * log_ratio, log_ratio)

    zero = torch.zeros(batch_size, device=device)
    one = torch.ones(batch_size, device=device)
    log_partition_one, mean_one, _, kl_one = _moments(conditioned, conditioned_probs, log_ratio, one)
    teacher_feasible = teacher_valid & (kl_one <= budget)

    # Safeguarded Newton (rtsafe) inside a bracket [lo, hi] around the root of f(b) = target, on a log scale (see the
    # loop): log f is linear in log b for small b (f ~ b^2 Var / 2) and linear in b where mu gains mass exponentially
    # on a token the student puts far below 0 (a step of the staircase). Where Newton leaves the bracket (on a plateau
    # f is flat, and Var ~ 0) the fallback is the crossing of A's tangents at lo and hi, (f_hi - f_lo) / (m_hi - m_lo)
    # with m = A' = E_mu[r]: A is convex, so it lies inside the bracket, and it is where the token dominating at hi
    # takes over from the one dominating at lo. Bisection is the last resort. Separately, `best` is the largest b seen
    # with f(b) <= budget; its statistics are carried along so the result needs no extra evaluation.
    best = torch.where(teacher_feasible, one, zero)
    best_log_partition = torch.where(teacher_feasible, log_partition_one, 0.0)
    best_mean = torch.where(teacher_feasible, mean_one, 0.0)
    best_kl = torch.where(teacher_feasible, kl_one, 0.0)
    active = teacher_valid & ~teacher_feasible & (budget > 0)
    lo, hi = zero.clone(), one.clone()
    kl_lo, kl_hi, mean_lo, mean_hi = zero.clone(), kl_one, zero.clone(), mean_one

    target = budget.clamp_min(0.0) * (1.0 - _TARGET_SHRINK)
    beta = torch.sqrt(2.0 * target / variance_at_zero.clamp_min(1e-30)).clamp(max=0.5)
    beta = torch.where(active, beta, zero)
    done = ~active
    check_convergence = device.type == "cpu" and _STOP_EARLY_ON_CPU
    converged = False
    for iteration in range(_MAX_NEWTON_STEPS + 1):
        log_partition, mean, variance, kl = _moments(conditioned, conditioned_probs, log_ratio, beta)
        improves = active & (kl <= budget) & (beta > best)
        best = torch.where(improves, beta, best)
        best_log_partition = torch.where(improves, log_partition, best_log_partition)
        best_mean = torch.where(improves, mean, best_mean)
        best_kl = torch.where(improves, kl, best_kl)
        if converged or iteration == _MAX_NEWTON_STEPS:  # the last iterate has been evaluated: done
            break
        # Newton on h(b) = log(f - f_lo) - log(target - f_lo), h'(b) = b Var / (f - f_lo), with f_lo the KL at the
        # bracket's lower end before this step (0 at first: plain log f). On a staircase the target sits above some
        # plateau f_lo of f, and what grows exponentially towards it is the excess over that plateau. A zero excess or
        # Var gives a non-finite proposal, hence a fallback.
        excess = kl - kl_lo
        log_excess = excess.log() - (target - kl_lo).log()
        below = active & (kl <= target)
        above = active & ~(kl <= target)
        lo, kl_lo, mean_lo = (
            torch.where(below, beta, lo),
            torch.where(below, kl, kl_lo),
            torch.where(below, mean, mean_lo),
        )
        hi, kl_hi, mean_hi = (
            torch.where(above, beta, hi),
            torch.where(above, kl, kl_hi),
            torch.where(above, mean, mean_hi),
        )
        newton = beta - log_excess * excess / (beta * variance)
        use_newton = torch.isfinite(newton) & (newton >= lo) & (newton <= hi)
        crossing = (kl_hi - kl_lo) / (mean_hi - mean_lo)
        use_crossing = torch.isfinite(crossing) & (crossing > lo) & (crossing < hi)
        fallback = torch.where(use_crossing, crossing, 0.5 * (lo + hi))
        moving = active & ~done
        new_beta = torch.where(moving, torch.where(use_newton, newton, fallback), beta)
        # Converged: the bracket is closed, or Newton moves a negligible step away from a feasible point. Such a row
        # stays put (its last step is still evaluated): iterating on, as the whole batch does until its slowest row
        # converges, would feed noise-sized differences of f to Newton and fall back to bracket steps.
        tolerance = _BETA_TOLERANCE * (1.0 + 100.0 * new_beta)
        settled = use_newton & ((new_beta - beta).abs() <= tolerance) & (kl <= budget)
        done = done | (moving & (settled | (hi - lo <= tolerance)))
        beta = new_beta
        converged = check_convergence and bool(done.all())

    blended = best > 0
    logprobs = conditioned + (best[:, None] * log_ratio - best_log_partition[:, None])
    logprobs = torch.where(blended[:, None], logprobs, student_logprobs)
    # KL(mu || pi_T) = sum mu (b r~ - A - r~ - c) with r = r~ + c; at b = 0 that is -c = KL(pi_c || pi_T).
    kl_to_teacher = ((best - 1.0) * best_mean - best_log_partition - offset).clamp_min(0.0)
    kl_to_student = torch.where(blended, best_kl + cost, 0.0)
    kl_to_teacher = torch.where(teacher_valid, kl_to_teacher, 0.0)
    return BlendResult(
        logprobs=logprobs,
        beta=best,
        kl_to_student=kl_to_student,
        kl_to_teacher=kl_to_teacher,
        teacher_valid=teacher_valid,
    )
