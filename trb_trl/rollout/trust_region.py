"""TRB and the fixed-epsilon baseline: sample each token from the trust-region blend of the student and a teacher."""

import torch

from .blending import trust_region_blend
from .statistics import TokenMetric
from .teacher_guided import TeacherGuidedProcessor


# The `trb/*` metrics, over the tokens of rows that had not finished.
TRUST_REGION_METRICS = (
    TokenMetric("beta/mean", "mean", lambda s: s["beta"]),
    TokenMetric("beta/min", "min", lambda s: s["beta"]),
    TokenMetric("beta/max", "max", lambda s: s["beta"]),
    TokenMetric("teacher_fraction", "mean", lambda s: s["beta"] >= 1.0),
    TokenMetric("kl_to_student/mean", "mean", lambda s: s["kl_to_student"]),
    TokenMetric("kl_to_student/max", "max", lambda s: s["kl_to_student"]),
    TokenMetric("kl_to_teacher/mean", "mean", lambda s: s["kl_to_teacher"]),
    TokenMetric("teacher_invalid_fraction", "mean", lambda s: ~s["teacher_valid"]),
)


def check_epsilon(epsilon: float | torch.Tensor) -> None:
    """A KL budget is a float >= 0 or one per row, a `(batch_size,)` tensor."""
    if isinstance(epsilon, torch.Tensor):
        if epsilon.dim() > 1:
            raise ValueError(f"epsilon must be a float or a (batch_size,) tensor, got shape {tuple(epsilon.shape)}.")
    elif not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}.")


def blend_summary(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    """Aggregates of per-token blend records (`beta`, `kl_to_student`, `kl_to_teacher`, `teacher_valid`)."""
    beta = stats["beta"]
    if beta.numel() == 0:
        return {"num_tokens": 0}
    return {
        "beta/mean": beta.mean().item(),
        "beta/min": beta.min().item(),
        "beta/max": beta.max().item(),
        "teacher_fraction": (beta >= 1.0).float().mean().item(),
        "kl_to_student/mean": stats["kl_to_student"].mean().item(),
        "kl_to_student/max": stats["kl_to_student"].max().item(),
        "kl_to_teacher/mean": stats["kl_to_teacher"].mean().item(),
        "teacher_invalid_fraction": (~stats["teacher_valid"]).float().mean().item(),
        "num_tokens": int(beta.numel()),
    }


class TrustRegionBlendingProcessor(TeacherGuidedProcessor):
    r"""Samples each token from mu* proportional to pi_S^(1-beta*) pi_T^beta*, the trust-region blend of the student
    (the model being generated from) and a teacher, with beta* the largest weight keeping KL(mu* || pi_S) <= epsilon.

    The teacher runs incrementally next to the student with its own KV cache: the first call feeds the prompt, each
    later call only the newly sampled token, with positions taken from `prompt_attention_mask` (left padding)
    extended by ones, exactly as `generate` does for the student. Use one instance per `generate` call; call
    `release()` when it returns to free the teacher's cache (the statistics stay).

    Temperature: transformers applies its temperature, top-k and top-p warpers *after* custom processors. This
    processor blends the distributions tempered by `temperature` and returns `temperature * log mu*`, so after the
    temperature warper of `generate(do_sample=True, temperature=temperature)` tokens are drawn from exactly mu*; top-k
    and top-p then truncate mu* as they would truncate pi_S, and greedy decoding takes argmax mu*. Pass the same
    temperature here and to `generate`.

    Banned tokens (scores already at `-inf`, e.g. from `min_new_tokens` or `suppress_tokens`) keep zero mass; the
    teacher is renormalised over the allowed tokens. Rows of the student scores beyond `vocab_size` (padded lm_head
    rows) are set to `-inf`.

    Args:
        teacher_model (`PreTrainedModel`):
            The teacher, on the same device as the student, sharing its tokenizer.
        epsilon (`float` or `torch.Tensor` of shape `(batch_size,)`):
            KL budget per token. `0` returns the scores untouched and never calls the teacher.
        prompt_attention_mask, temperature, vocab_size, student_eos_token_id, teacher_eos_token_id:
            As for [`TeacherGuidedProcessor`]. The teacher's mass on stop ids the student does not use is moved onto
            the student's canonical stop id before blending ([`StopAlignment`]), so that a Base student
            (`<|endoftext|>`) and an instruct teacher (`<|im_end|>`) agree on "stop".

    Sequences must extend the previous step's by one token: beam search, which reorders its beams, is rejected at
    the first reordering. Rows expanded by `num_return_sequences` are matched to their prompt's mask.

    Example:

    ```python
    >>> processor = TrustRegionBlendingProcessor(
    ...     teacher, epsilon=0.02, prompt_attention_mask=inputs["attention_mask"], temperature=0.7,
    ...     vocab_size=len(tokenizer), student_eos_token_id=tokenizer.eos_token_id,
    ... )
    >>> out = student.generate(**inputs, do_sample=True, temperature=0.7, logits_processor=[processor])
    >>> processor.summary()["beta/mean"]
    ```
    """

    STATISTICS = {
        "beta": torch.float32,
        "kl_to_student": torch.float32,
        "kl_to_teacher": torch.float32,
        "teacher_valid": torch.bool,
    }

    def __init__(
        self,
        teacher_model: torch.nn.Module,
        epsilon: float | torch.Tensor,
        *,
        prompt_attention_mask: torch.Tensor | None = None,
        temperature: float = 1.0,
        vocab_size: int | None = None,
        student_eos_token_id: int | list[int] | None = None,
        teacher_eos_token_id: int | list[int] | None = None,
    ):
        check_epsilon(epsilon)
        super().__init__(
            teacher_model,
            prompt_attention_mask=prompt_attention_mask,
            temperature=temperature,
            vocab_size=vocab_size,
            student_eos_token_id=student_eos_token_id,
            teacher_eos_token_id=teacher_eos_token_id,
        )
        self.epsilon = epsilon

    @property
    def is_active(self) -> bool:
        """False when epsilon is the float 0: the processor is then the identity and never calls the teacher."""
        return isinstance(self.epsilon, torch.Tensor) or self.epsilon > 0

    def _step(self, scores, teacher_logits):
        epsilon = self.epsilon
        if isinstance(epsilon, torch.Tensor):
            epsilon = epsilon.to(scores.device)
        blend = trust_region_blend(scores, teacher_logits, epsilon, temperature=self.temperature)
        records = {
            "beta": blend.beta,
            "kl_to_student": blend.kl_to_student,
            "kl_to_teacher": blend.kl_to_teacher,
            "teacher_valid": blend.teacher_valid,
        }
        # generate's temperature warper divides by `temperature` next, so tokens are drawn from exactly mu*.
        return blend.logprobs * self.temperature, records

    def summary(self) -> dict[str, float]:
        """Aggregates for logging: beta mean/min/max, the fraction of tokens drawn from the teacher (beta* = 1),
        KL(mu||pi_S) mean/max, KL(mu||pi_T) mean, the fraction of tokens whose teacher logits were invalid (NaN or
        no finite mass; those tokens were drawn from the student), the number of blended tokens and the teacher
        time."""
        return {**blend_summary(self.statistics()), "teacher_seconds": self.teacher_seconds}
