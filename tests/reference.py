"""Naive float64 references written straight from the definitions, one row at a time."""

import numpy as np
from scipy.optimize import brentq
from scipy.special import logsumexp


def blend_row_reference(student_logits, teacher_logits, epsilon, temperature=1.0):
    """Return (log mu*, beta*, KL(mu*||pi_S), KL(mu*||pi_T)) for one row, in float64.

    beta* = max{b in [0, 1] : KL(mu_b || pi_S) <= eps}, mu_b proportional to pi_S^(1-b) pi_T^b over the tokens the
    student allows (finite logits); the teacher is renormalised over that set.
    """
    zs = np.asarray(student_logits, dtype=np.float64) / temperature
    zt = np.asarray(teacher_logits, dtype=np.float64) / temperature
    allowed = np.isfinite(zs)
    ls = zs[allowed] - logsumexp(zs[allowed])
    lt = zt[allowed] - logsumexp(zt[allowed])

    def log_mu(b):
        x = (1.0 - b) * ls + b * lt
        return x - logsumexp(x)

    def kl_to_student(b):
        lm = log_mu(b)
        return float(np.sum(np.exp(lm) * (lm - ls)))

    if kl_to_student(1.0) <= epsilon:
        beta = 1.0
    elif epsilon <= 0:
        beta = 0.0
    else:
        beta = brentq(lambda b: kl_to_student(b) - epsilon, 0.0, 1.0, xtol=1e-12, rtol=1e-12)
    lm = log_mu(beta)
    full = np.full(zs.shape, -np.inf)
    full[allowed] = lm
    mu = np.exp(lm)
    return full, beta, float(np.sum(mu * (lm - ls))), float(np.sum(mu * (lm - lt)))
