"""The TRB paper's loss: the reverse KL over the student's own top-k ids, in the paper's policy-gradient form.

The TRB paper trains every method (TRB and its baselines) with "reverse KL, top-k support 16, source = actor"
(papers.md §1.1, §1.5), not TRL's full-vocabulary divergence. Per token, S = the student's top-k ids (of its aligned,
tempered logits; the choice is not differentiated). [`top_k_divergence_loss`] is a drop-in for TRL's
`_chunked_divergence_loss` (same arguments, same `(loss, entropy_sum, num_valid)` result and reduction; the entropy is
the student's over the full vocabulary, as TRL logs it) with two estimators on that support:

- `"policy_gradient"` (the default, the paper's reference code: thunlp/OPD, strategy `only_stu`, weight mode
  `student_p`). With l_S, l_T the **full-vocabulary** log-softmax values read at S, w = softmax over S of l_S
  (detached) and d_v = l_S(v) - l_T(v):

      value    = sum_{v in S} w_v d_v                                  (the top-k reverse-KL estimate, logged)
      gradient = sum_{v in S} w_v d_v grad l_S(v)                      (w and d detached)

  i.e. the PPO surrogate -sum_v r_v ratio_v with reward r_v = -w_v d_v at ratio 1 (one PPO epoch). l_S is
  differentiated over the full vocabulary, so the gradient also reaches logits outside S, through the normaliser.
  The value is an estimate, not a divergence: it is negative when the teacher holds more of S than the student and
  their shapes on S agree.
- `"renormalized"`: both models' softmax restricted to S and renormalised there (p~_S, p~_T), and TRL's generalized
  JSD with `beta` between them (`beta = 1`: KL(p~_S || p~_T)), differentiated directly. The gradient reaches the
  student's logits on S only.

How they relate, with dbar = sum_v w_v d_v (the estimate): grad KL(p~_S || p~_T) = sum_v w_v (d_v - dbar) grad
l_S(v), so `policy_gradient` = `renormalized` + dbar grad log pi_S(S). The paper's form adds that one term: it moves
student mass out of S when the estimate is positive and into S when it is negative; the renormalised loss is blind to
the mass on S. With `k >= V` (S = every id, w = pi_S), pi_S(S) = 1 and both equal the full-vocabulary reverse KL of
[`stop_aligned_divergence_loss`], value and gradient.

`alignment` merges the stop tokens of both models first (a merged id has zero probability, so it never weighs in S).
Veto (`veto_weight > 0`) replaces the teacher by its target Q ∝ pi_T pi_S^weight (student detached), each estimator
reading Q the way it reads the teacher: `renormalized` renormalises Q over S (computed from the renormalised log-probs
on S), `policy_gradient` reads the full-vocabulary log Q at S (normalised over every id, so the estimate is that of
KL(pi_S || Q), and `k >= V` is the full-vocabulary Veto loss). The latter needs the student's full tile next to the
teacher's: while Veto is on, the no-grad teacher pass re-projects the student.

Memory kept between the passes is O(tokens x k) (TRL's: O(tokens)), with O(tile x V) transient in each pass; the
student's tile is recomputed in the backward, the teacher's is read once.
"""

import math

import torch

from ..stop_alignment import StopAlignment
from .drop_in import DivergenceInputs, trl_divergence_drop_in
from .projection import model_logits, row_chunks
from .stop_aligned_divergence import per_token_divergence
from .token_logprobs import gathered_logprobs, top_k_logprobs
from .veto import veto_target_logprobs


# How the divergence on the student's top-k ids is estimated (see the module docstring).
TOP_K_ESTIMATORS = ("policy_gradient", "renormalized")


@trl_divergence_drop_in
def top_k_divergence_loss(
    inputs: DivergenceInputs,
    *,
    top_k: int,
    alignment: StopAlignment | None = None,
    veto_weight: float = 0.0,
    estimator: str = "policy_gradient",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop-in for TRL's `_chunked_divergence_loss` that compares the two models on the student's top-`top_k` ids
    (the TRB paper: `top_k=16`, reverse KL). `estimator="policy_gradient"` (the paper's form, reverse KL only: `beta`
    must be 1) or `"renormalized"` (TRL's generalized JSD with `beta` between the two distributions renormalised over
    the ids); see the module docstring. `alignment` merges the stop tokens first, as in
    [`stop_aligned_divergence_loss`]; `veto_weight > 0` replaces the teacher by Veto's target
    Q ∝ pi_T * pi_S^weight (student detached)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1 (the TRB paper uses 16), got {top_k!r}.")
    if estimator not in TOP_K_ESTIMATORS:
        raise ValueError(f"estimator must be one of {list(TOP_K_ESTIMATORS)}, got {estimator!r}.")
    beta = inputs.beta
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (1: reverse KL, 0: forward KL), got {beta}.")
    if estimator == "policy_gradient" and float(beta) != 1.0:
        raise ValueError(
            f"estimator='policy_gradient' is the TRB paper's top-k reverse KL, so beta must be 1.0, got {beta}; use "
            "estimator='renormalized' for TRL's generalized JSD (beta < 1) on the top-k support."
        )
    if not (isinstance(veto_weight, int | float) and math.isfinite(veto_weight)) or veto_weight < 0:
        raise ValueError(f"veto_weight must be a finite number >= 0 (0 disables Veto), got {veto_weight}.")
    inputs.gather_heads()
    student_spec, teacher_spec = inputs.logit_specs(alignment)
    vocab_size = inputs.vocab_size
    normalize = "full" if estimator == "policy_gradient" else "subset"

    _, num_valid, student_hidden, teacher_hidden = inputs.valid_rows()
    support, student_logprobs, entropy = top_k_logprobs(
        student_hidden,
        inputs.student_lm_head_weight,
        inputs.student_lm_head_bias,
        student_spec,
        vocab_size=vocab_size,
        k=top_k,
        normalize=normalize,
        return_entropy=True,
    )
    teacher = (teacher_hidden, inputs.teacher_lm_head_weight, inputs.teacher_lm_head_bias)
    if estimator == "renormalized":
        with torch.no_grad():
            target_logprobs = gathered_logprobs(
                *teacher, support, teacher_spec, vocab_size=vocab_size, normalize="subset"
            )
        if veto_weight > 0:  # renormalised over the support, like the teacher
            target_logprobs = veto_target_logprobs(target_logprobs, student_logprobs.detach(), float(veto_weight))
        loss = per_token_divergence(student_logprobs, target_logprobs, float(beta)).sum()
    else:
        if veto_weight > 0:  # normalised over the whole vocabulary, like the teacher
            student = (student_hidden, inputs.student_lm_head_weight, inputs.student_lm_head_bias)
            target_logprobs = _full_veto_target_at(
                (*student, student_spec), (*teacher, teacher_spec), support, vocab_size, float(veto_weight)
            )
        else:
            with torch.no_grad():
                target_logprobs = gathered_logprobs(*teacher, support, teacher_spec, vocab_size=vocab_size)
        loss = _policy_gradient_loss(student_logprobs, target_logprobs)
    return inputs.reduce(loss, num_valid), entropy.sum(), num_valid


def _policy_gradient_loss(student_logprobs: torch.Tensor, target_logprobs: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of the estimate sum_v w_v (l_S(v) - l_T(v)) as the value, with the gradient of the surrogate
    sum_v sg(w_v (l_S(v) - l_T(v))) l_S(v) (the paper's -sum_v r_v ratio_v at ratio 1). `(N, k)` full-vocabulary
    log-probs at the support; the target has no gradient."""
    with torch.no_grad():
        student = student_logprobs.detach()
        weights = torch.softmax(student, dim=-1)
        # -reward. An id without weight (a merged stop id inside a support as large as the vocabulary) adds nothing,
        # whatever its (huge, finite) log-probs.
        coefficients = (weights * (student - target_logprobs)).masked_fill(weights == 0, 0.0)
        estimate = coefficients.sum()
    surrogate = (coefficients * student_logprobs).sum()
    return surrogate - surrogate.detach() + estimate


@torch.no_grad()
def _full_veto_target_at(student, teacher, support: torch.Tensor, vocab_size: int, weight: float) -> torch.Tensor:
    """log Q at the support, Q ∝ pi_T * pi_S^weight normalised over the whole (aligned, tempered) vocabulary: each tile
    projects both models, as [`stop_aligned_divergence_loss`] does, and keeps only the `(tile, k)` values."""
    from .._compat import maybe_gather_lm_head_ctx

    student_hidden, student_weight, student_bias, student_spec = student
    teacher_hidden, teacher_weight, teacher_bias, teacher_spec = teacher
    target = student_hidden.new_zeros(support.shape, dtype=torch.float32)
    with maybe_gather_lm_head_ctx(student_weight, student_bias, teacher_weight, teacher_bias):
        for rows in row_chunks(student_hidden.shape[0], vocab_size):
            teacher_logits = model_logits(teacher_hidden[rows], teacher_weight, teacher_bias, teacher_spec, vocab_size)
            teacher_logprobs = torch.log_softmax(teacher_logits, dim=-1)
            del teacher_logits
            student_logits = model_logits(student_hidden[rows], student_weight, student_bias, student_spec, vocab_size)
            student_logprobs = torch.log_softmax(student_logits, dim=-1)
            del student_logits
            target[rows] = veto_target_logprobs(teacher_logprobs, student_logprobs, weight).gather(-1, support[rows])
    return target
