"""The TRB paper's loss: the divergence over the student's own top-k ids, both models renormalised there.

The TRB paper trains every method (TRB and its baselines) with "reverse KL, top-k support 16, source = actor"
(papers.md §1.5), not TRL's full-vocabulary divergence: per token, S = the student's top-k ids (of its aligned,
tempered logits; the choice is not differentiated), p~_S and p~_T = each model's softmax restricted to S, and the
loss is KL(p~_S || p~_T). [`top_k_divergence_loss`] computes TRL's generalized JSD on that support (`beta = 1`: the
paper's reverse KL), as a drop-in for TRL's `_chunked_divergence_loss`: same arguments, same `(loss, entropy_sum,
num_valid)` result and reduction; the entropy is the student's over the full vocabulary, as TRL logs it. With
`veto_weight > 0` the teacher is replaced by Veto's target on the same support, as in `stop_aligned_divergence_loss`.

Memory kept between the passes is O(tokens x k) (TRL's: O(tokens)), with O(tile x V) transient in each pass; the
student's tile is recomputed in the backward, the teacher's is read once. With `k >= V` it is the full-vocabulary
divergence of [`stop_aligned_divergence_loss`].
"""

import math

import torch

from ..stop_alignment import StopAlignment
from .projection import LogitSpec, full_lm_head, reduce_like_trl
from .stop_aligned_divergence import per_token_divergence
from .token_logprobs import gathered_logprobs, top_k_logprobs
from .veto import veto_target_logprobs


def top_k_divergence_loss(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    num_items_in_batch: torch.Tensor | int | None = None,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
    *,
    top_k: int,
    alignment: StopAlignment | None = None,
    veto_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop-in for TRL's `_chunked_divergence_loss` that compares the two models on the student's top-`top_k` ids,
    renormalised (the TRB paper uses `top_k=16`, `beta=1`). `alignment` merges the stop tokens first, as in
    [`stop_aligned_divergence_loss`]; `veto_weight > 0` replaces the teacher by Veto's target Q ∝ pi_T * pi_S^weight
    (student detached) on the same support. The gradient reaches the student's logits on its top-k ids only."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1 (the TRB paper uses 16), got {top_k!r}.")
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (1: reverse KL, 0: forward KL), got {beta}.")
    if not (isinstance(veto_weight, int | float) and math.isfinite(veto_weight)) or veto_weight < 0:
        raise ValueError(f"veto_weight must be a finite number >= 0 (0 disables Veto), got {veto_weight}.")
    student_lm_head_weight, student_lm_head_bias = full_lm_head(
        student_lm_head_weight, student_lm_head_bias, student_hidden_states.dtype
    )
    teacher_lm_head_weight, teacher_lm_head_bias = full_lm_head(
        teacher_lm_head_weight, teacher_lm_head_bias, teacher_hidden_states.dtype
    )
    student_spec = LogitSpec(student_logit_scale, student_final_logit_softcapping, temperature, alignment)
    teacher_spec = LogitSpec(teacher_logit_scale, teacher_final_logit_softcapping, temperature, alignment)
    vocab_size = int(getattr(student_lm_head_weight, "ds_shape", student_lm_head_weight.shape)[0])

    valid = completion_mask.reshape(-1) != 0
    num_valid = valid.sum()
    student_hidden = student_hidden_states.reshape(-1, student_hidden_states.size(-1))[valid]
    teacher_hidden = teacher_hidden_states.reshape(-1, teacher_hidden_states.size(-1))[valid]
    support, student_logprobs, entropy = top_k_logprobs(
        student_hidden,
        student_lm_head_weight,
        student_lm_head_bias,
        student_spec,
        vocab_size=vocab_size,
        k=top_k,
        normalize="subset",
        return_entropy=True,
    )
    with torch.no_grad():
        teacher_logprobs = gathered_logprobs(
            teacher_hidden,
            teacher_lm_head_weight,
            teacher_lm_head_bias,
            support,
            teacher_spec,
            vocab_size=vocab_size,
            normalize="subset",
        )
    if veto_weight > 0:  # renormalised over the support, like the teacher
        teacher_logprobs = veto_target_logprobs(teacher_logprobs, student_logprobs.detach(), float(veto_weight))
    loss = per_token_divergence(student_logprobs, teacher_logprobs, float(beta)).sum()
    loss = reduce_like_trl(loss, num_valid, num_items_in_batch)
    return loss, entropy.sum(), num_valid
