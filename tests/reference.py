"""Naive float64 references written straight from the definitions, one row at a time."""

import numpy as np
from scipy.optimize import brentq
from scipy.special import logsumexp


def blend_row_reference(student_logits, teacher_logits, epsilon, temperature=1.0):
    """Return (log mu*, beta*, KL(mu*||pi_S), KL(mu*||pi_T)) for one row, in float64.

    beta* = max{b in [0, 1] : KL(mu_b || pi_S) <= eps}, mu_b proportional to pi_S^(1-b) pi_T^b over the tokens the
    student allows (finite logits); the teacher is renormalised over that set. Everything is in log space, so logits
    thousands apart (low temperature) lose nothing.

    Edges, from the definitions:
    - tokens the teacher gives zero mass (`-inf`) have zero mass in every mu_b with b > 0, so f(0+) = -log pi_S(rest)
      can be positive; when it exceeds eps the only feasible blend is the student (beta* = 0), and its KL to the
      teacher (infinite) is reported for the student conditioned on the teacher's support;
    - a teacher that is NaN or `+inf` on an allowed token, or has no finite mass there, is invalid: the row is the
      student with beta* = 0 and both KLs reported as 0.
    """
    zs = np.asarray(student_logits, dtype=np.float64) / temperature
    zt = np.asarray(teacher_logits, dtype=np.float64) / temperature
    allowed = np.isfinite(zs)
    ls = zs[allowed] - logsumexp(zs[allowed])
    full = np.full(zs.shape, -np.inf)

    def result(lm, beta, kl_student, kl_teacher):
        full[allowed] = lm
        return full, beta, kl_student, kl_teacher

    teacher = zt[allowed]
    if np.isnan(teacher).any() or np.isposinf(teacher).any() or not np.isfinite(teacher).any():
        return result(ls, 0.0, 0.0, 0.0)
    lt = teacher - logsumexp(teacher)
    support = np.isfinite(lt)  # mu_b (b > 0) lives here

    def log_mu(b):
        lm = np.full(ls.shape, -np.inf)
        x = (1.0 - b) * ls[support] + b * lt[support]
        lm[support] = x - logsumexp(x)
        return lm

    def kl(lm, other):
        mu = np.exp(lm[support])
        return float(np.sum(mu * (lm[support] - other[support])))

    def kl_to_student(b):  # at b = 0 this is f(0+), the student conditioned on the support
        return kl(log_mu(b), ls)

    if kl_to_student(1.0) <= epsilon:
        beta = 1.0
    elif epsilon <= 0 or kl_to_student(0.0) > epsilon:
        return result(ls, 0.0, 0.0, kl(log_mu(0.0), lt))
    else:
        beta = brentq(lambda b: kl_to_student(b) - epsilon, 0.0, 1.0, xtol=1e-12, rtol=1e-12)
    lm = log_mu(beta)
    return result(lm, beta, kl(lm, ls), kl(lm, lt))


def logprobs_reference(hidden, weight, bias=None, *, scale=1.0, softcap=None, temperature=1.0, alignment=None):
    """float64 torch log pi(v) for every id, from the definition: the softmax of TRL's transformed logits (scale,
    soft-cap, temperature), then each merged stop id's probability added to the canonical id's (merged ids keep none:
    -inf). Differentiable, so autograd through it gives the reference gradients."""
    import torch

    logits = hidden.double() @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    if alignment is None:
        return logprobs
    stop_ids = [alignment.canonical_id, *alignment.merged_ids]
    merged = torch.logsumexp(logprobs[..., stop_ids], dim=-1)
    logprobs = logprobs.clone()
    logprobs[..., list(alignment.merged_ids)] = float("-inf")
    logprobs[..., alignment.canonical_id] = merged
    return logprobs


def problem_logprobs(p, *, temperature=1.0, alignment=None):
    """The float64 student (with gradient, through `leaves` = hs, ws, bs) and teacher log-probs of a loss test
    problem `p` (tests/test_tropd_loss.py `_problem`) at its valid completion tokens: `(leaves, valid, student,
    teacher)`."""
    leaves = [p[name].clone().requires_grad_(True) for name in ("hs", "ws", "bs")]
    valid = p["mask"].reshape(-1) != 0
    student = logprobs_reference(
        leaves[0].reshape(-1, p["hs"].shape[-1])[valid], leaves[1], leaves[2], temperature=temperature,
        alignment=alignment,
    )  # fmt: skip
    teacher = logprobs_reference(
        p["ht"].reshape(-1, p["ht"].shape[-1])[valid], p["wt"], temperature=temperature, alignment=alignment
    )
    return leaves, valid, student, teacher
