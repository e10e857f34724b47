"""TRL's divergence signature, written once: the arguments `DistillationTrainer._compute_loss` passes to its
`_chunked_divergence_loss`, as one object, and the decorator that turns a loss of that object into a drop-in.

Every loss the trainers can learn with ([`stop_aligned_divergence_loss`], [`top_k_divergence_loss`],
[`tropd_loss`]) is written as `loss(inputs: DivergenceInputs, *, options...)` and decorated with
[`trl_divergence_drop_in`]: callers (TRL, through `_compat.divergence_function_replaced`, and the tests) pass TRL's
arguments by position or name, then the loss's own options by keyword. The steps every loss starts with (the heads
gathered once, the valid rows, the two models' logit conventions, TRL's reduction) are methods here.
"""

import dataclasses
import functools
import inspect

import torch

from .projection import LogitSpec, full_lm_head, reduce_like_trl


@dataclasses.dataclass
class DivergenceInputs:
    """The arguments of TRL's `_chunked_divergence_loss`, in its order and with its defaults."""

    student_hidden_states: torch.Tensor
    teacher_hidden_states: torch.Tensor
    student_lm_head_weight: torch.Tensor
    teacher_lm_head_weight: torch.Tensor
    completion_mask: torch.Tensor
    beta: float
    num_items_in_batch: torch.Tensor | int | None = None
    student_lm_head_bias: torch.Tensor | None = None
    teacher_lm_head_bias: torch.Tensor | None = None
    student_logit_scale: float = 1.0
    teacher_logit_scale: float = 1.0
    student_final_logit_softcapping: float | None = None
    teacher_final_logit_softcapping: float | None = None
    temperature: float = 1.0

    def gather_heads(self) -> None:
        """Gather each `lm_head` once (FSDP2 shards it; TRL does the same), in the hidden states' dtype."""
        self.student_lm_head_weight, self.student_lm_head_bias = full_lm_head(
            self.student_lm_head_weight, self.student_lm_head_bias, self.student_hidden_states.dtype
        )
        self.teacher_lm_head_weight, self.teacher_lm_head_bias = full_lm_head(
            self.teacher_lm_head_weight, self.teacher_lm_head_bias, self.teacher_hidden_states.dtype
        )

    def valid_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(valid (B*C,) bool, num_valid, student_hidden (N, H_S), teacher_hidden (N, H_T))`: the completion tokens
        the mask keeps, flattened."""
        valid = self.completion_mask.reshape(-1) != 0
        student = self.student_hidden_states.reshape(-1, self.student_hidden_states.size(-1))[valid]
        teacher = self.teacher_hidden_states.reshape(-1, self.teacher_hidden_states.size(-1))[valid]
        return valid, valid.sum(), student, teacher

    def logit_specs(self, alignment=None) -> tuple[LogitSpec, LogitSpec]:
        """The student's and the teacher's logit conventions (scale, soft-capping, temperature, stop alignment)."""
        student = LogitSpec(
            self.student_logit_scale, self.student_final_logit_softcapping, self.temperature, alignment
        )
        teacher = LogitSpec(
            self.teacher_logit_scale, self.teacher_final_logit_softcapping, self.temperature, alignment
        )
        return student, teacher

    @property
    def vocab_size(self) -> int:
        """The student head's rows (its full shape under ZeRO-3, where the local weight is empty)."""
        return int(getattr(self.student_lm_head_weight, "ds_shape", self.student_lm_head_weight.shape)[0])

    def reduce(self, loss_sum: torch.Tensor, num_valid: torch.Tensor) -> torch.Tensor:
        """TRL's reduction of a summed per-token loss."""
        return reduce_like_trl(loss_sum, num_valid, self.num_items_in_batch)


TRL_DIVERGENCE_PARAMETERS = tuple(field.name for field in dataclasses.fields(DivergenceInputs))


def _trl_parameters() -> list[inspect.Parameter]:
    parameters = []
    for field in dataclasses.fields(DivergenceInputs):
        default = inspect.Parameter.empty if field.default is dataclasses.MISSING else field.default
        parameters.append(inspect.Parameter(field.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default))
    return parameters


def trl_divergence_drop_in(loss):
    """Make `loss(inputs: DivergenceInputs, *, options...)` callable as TRL's `_chunked_divergence_loss`: TRL's
    parameters (by position or name, with TRL's defaults), then the loss's keyword-only options. The result's
    signature says so (`inspect.signature`)."""
    options = list(inspect.signature(loss).parameters.values())[1:]
    if any(option.kind is not inspect.Parameter.KEYWORD_ONLY for option in options):
        raise TypeError(f"{loss.__name__}'s options after `inputs` must be keyword-only.")
    signature = inspect.Signature(
        [*_trl_parameters(), *options], return_annotation=inspect.signature(loss).return_annotation
    )

    @functools.wraps(loss)
    def drop_in(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        inputs = DivergenceInputs(**{name: arguments[name] for name in TRL_DIVERGENCE_PARAMETERS})
        return loss(inputs, **{option.name: arguments[option.name] for option in options})

    drop_in.__signature__ = signature
    return drop_in
