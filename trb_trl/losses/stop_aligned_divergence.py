"""TRL's distillation divergence with the two models' stop tokens merged into one event, optionally to Veto's target.

`trl.DistillationTrainer` computes a generalized JSD between student and teacher from their hidden states and
`lm_head`s, tile by tile, without materialising `(tokens, V)` logits. That kernel compares the distributions id by
id, so when an instruct teacher stops on `<|im_end|>` and a Base student on `<|endoftext|>`, the student is taught a
stop token that its generation does not stop on. This module computes the same divergence (same `beta`, temperature,
logit scale and soft-capping conventions, same reduction) after [`StopAlignment`] has merged each model's stop mass
onto the student's stop id, as the TRB paper does. Without an alignment it is TRL's divergence itself.

With `veto_weight > 0` the teacher's (aligned, tempered) distribution is replaced by Veto's target
Q ∝ pi_T * pi_S^veto_weight ([`veto_target_logprobs`], the student term detached) in the forward and in the backward,
so the gradient is that of the divergence to a fixed Q. `veto_weight = 0` runs exactly the code path without Veto.

Memory is O(chunk x V) in both passes: the forward keeps only per-token scalars, and the backward recomputes each
chunk's logits (under ZeRO-3 with the `lm_head` gathered again) and differentiates that chunk alone.
"""

import math
from dataclasses import dataclass

import torch

from ..stop_alignment import StopAlignment
from .drop_in import DivergenceInputs, trl_divergence_drop_in
from .projection import TILE_ELEMENTS, lm_head_backward, row_chunks
from .projection import aligned_logprobs as _aligned_logprobs
from .projection import project as _project
from .projection import transform as _transform
from .veto import veto_target_logprobs


# Elements of one (tokens x vocab) float32 tile (see `projection.TILE_ELEMENTS`); a test shrinks it to force tiles.
_TILE_ELEMENTS = TILE_ELEMENTS


@dataclass(frozen=True)
class DivergenceSpec:
    """How both models' logits are formed and compared (the arguments of TRL's `_chunked_divergence_loss`, plus the
    stop alignment, `None` for none, and Veto's weight, `0` for none)."""

    alignment: StopAlignment | None
    beta: float
    temperature: float = 1.0
    student_logit_scale: float = 1.0
    teacher_logit_scale: float = 1.0
    student_softcap: float | None = None
    teacher_softcap: float | None = None
    veto_weight: float = 0.0


def per_token_divergence(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, beta: float) -> torch.Tensor:
    """TRL's generalized JSD per position, summed over the last dimension.

    `beta = 0` is the forward KL(teacher || student), `beta = 1` the reverse KL(student || teacher), anything between
    the generalized JSD with mixture `(1 - beta) p_S + beta p_T`.
    """
    if beta == 0.0:
        return (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(-1)
    if beta == 1.0:
        return (student_logprobs.exp() * (student_logprobs - teacher_logprobs)).sum(-1)
    log_mixture = torch.logaddexp(student_logprobs + math.log(1 - beta), teacher_logprobs + math.log(beta))
    teacher_term = (teacher_logprobs.exp() * (teacher_logprobs - log_mixture)).sum(-1)
    student_term = (student_logprobs.exp() * (student_logprobs - log_mixture)).sum(-1)
    return beta * teacher_term + (1 - beta) * student_term


def _teacher_logits(hidden, weight, bias, vocab_size: int, spec: "DivergenceSpec") -> torch.Tensor:
    """The teacher's transformed logits over the student's `vocab_size` rows (extra padded rows are cut)."""
    bias = None if bias is None else bias[:vocab_size]
    logits = _project(hidden, weight[:vocab_size], bias)
    return _transform(logits, spec.teacher_logit_scale, spec.teacher_softcap, spec.temperature)


def _target_logprobs(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, spec: "DivergenceSpec"):
    """What the student is compared with: the teacher, or Veto's target built from it and the detached student."""
    if spec.veto_weight == 0:
        return teacher_logprobs
    return veto_target_logprobs(teacher_logprobs, student_logprobs, spec.veto_weight)


def _chunks(num_tokens: int, vocab_size: int):
    return row_chunks(num_tokens, vocab_size, _TILE_ELEMENTS)


class _StopAlignedDivergence(torch.autograd.Function):
    """Per-token stop-aligned divergence and student entropy from hidden states; gradients reach the student only."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, spec):
        from .._compat import maybe_gather_lm_head_ctx

        num_tokens = student_hidden.shape[0]
        divergence = student_hidden.new_zeros(num_tokens, dtype=torch.float32)
        entropy = torch.zeros_like(divergence)
        with maybe_gather_lm_head_ctx(student_weight, student_bias), maybe_gather_lm_head_ctx(teacher_weight):
            vocab = student_weight.shape[0]
            for rows in _chunks(num_tokens, vocab):
                student = _transform(
                    _project(student_hidden[rows], student_weight, student_bias),
                    spec.student_logit_scale,
                    spec.student_softcap,
                    spec.temperature,
                )
                teacher = _teacher_logits(teacher_hidden[rows], teacher_weight, teacher_bias, vocab, spec)
                student_logprobs = _aligned_logprobs(student, spec.alignment)
                teacher_logprobs = _aligned_logprobs(teacher, spec.alignment)
                target_logprobs = _target_logprobs(teacher_logprobs, student_logprobs, spec)
                divergence[rows] = per_token_divergence(student_logprobs, target_logprobs, spec.beta)
                entropy[rows] = -(student_logprobs.exp() * student_logprobs).sum(-1)
        ctx.save_for_backward(
            student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias
        )
        ctx.spec = spec
        ctx.mark_non_differentiable(entropy)
        return divergence, entropy

    @staticmethod
    def backward(ctx, grad_divergence, _grad_entropy):
        from .._compat import maybe_gather_lm_head_ctx

        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias = ctx.saved_tensors
        spec = ctx.spec
        if grad_divergence is None:
            return (None,) * 7

        def chunk_grad_logits(rows, projected):
            with torch.no_grad():
                teacher = _teacher_logits(teacher_hidden[rows], teacher_weight, teacher_bias, vocab, spec)
                teacher_logprobs = _aligned_logprobs(teacher, spec.alignment)
            projected.requires_grad_(True)
            with torch.enable_grad():
                student = _transform(projected, spec.student_logit_scale, spec.student_softcap, spec.temperature)
                student_logprobs = _aligned_logprobs(student, spec.alignment)
                target_logprobs = _target_logprobs(teacher_logprobs, student_logprobs, spec)  # student detached
                divergence = per_token_divergence(student_logprobs, target_logprobs, spec.beta)
                (grad_logits,) = torch.autograd.grad(divergence, projected, grad_divergence[rows].float())
            return grad_logits

        with maybe_gather_lm_head_ctx(student_weight, student_bias), maybe_gather_lm_head_ctx(teacher_weight):
            vocab = student_weight.shape[0]  # the gathered size under ZeRO-3
            grads = lm_head_backward(
                student_hidden,
                student_weight,
                student_bias,
                ctx.needs_input_grad[:3],
                vocab,
                chunk_grad_logits,
                _TILE_ELEMENTS,
            )
        return (
            *grads,
            None,
            None,
            None,
            None,
        )


@trl_divergence_drop_in
def stop_aligned_divergence_loss(
    inputs: DivergenceInputs,
    *,
    alignment: StopAlignment | None = None,
    veto_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop-in for TRL's `_chunked_divergence_loss` (same arguments, same `(loss, entropy_sum, num_valid)` result and
    reduction) that compares the stop-aligned distributions (`alignment=None`: as they are, TRL's divergence), against
    Veto's target when `veto_weight > 0`. See the module docstring."""
    if not (isinstance(veto_weight, int | float) and math.isfinite(veto_weight)) or veto_weight < 0:
        raise ValueError(f"veto_weight must be a finite number >= 0 (0 disables Veto), got {veto_weight}.")
    inputs.gather_heads()
    spec = DivergenceSpec(
        alignment=alignment,
        beta=float(inputs.beta),
        temperature=float(inputs.temperature),
        student_logit_scale=float(inputs.student_logit_scale),
        teacher_logit_scale=float(inputs.teacher_logit_scale),
        student_softcap=inputs.student_final_logit_softcapping,
        teacher_softcap=inputs.teacher_final_logit_softcapping,
        veto_weight=float(veto_weight),
    )
    _, num_valid, student_hidden, teacher_hidden = inputs.valid_rows()
    divergence, entropy = _StopAlignedDivergence.apply(
        student_hidden,
        inputs.student_lm_head_weight,
        inputs.student_lm_head_bias,
        teacher_hidden,
        inputs.teacher_lm_head_weight,
        inputs.teacher_lm_head_bias,
        spec,
    )
    return inputs.reduce(divergence.sum(), num_valid), entropy.sum(), num_valid
