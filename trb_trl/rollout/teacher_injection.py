"""SKD's interleaved teacher injection (Xu et al., arXiv 2410.11325, as the TRB paper uses it as a baseline)."""

import torch

from .statistics import TokenMetric
from .teacher_guided import TeacherGuidedProcessor
from .warpers import sampling_warpers


# The `skd/*` metrics, over the tokens of rows that had not finished.
TEACHER_INJECTION_METRICS = (
    TokenMetric("replacement_rate", "mean", lambda s: s["replaced"]),
    TokenMetric("replacement_probability", "mean", lambda s: s["replacement_probability"]),
    TokenMetric("teacher_invalid_fraction", "mean", lambda s: ~s["teacher_valid"]),
)


class TeacherInjectionProcessor(TeacherGuidedProcessor):
    r"""SKD rollouts: the student samples each token; if it is not among the teacher's top-K tokens at that prefix,
    it is replaced by a fresh sample from the teacher at temperature `teacher_temperature` (checked at every token).

    The processor draws the token itself and returns scores that put all mass on it (0 there, `-inf` elsewhere), so
    `generate`'s sampling picks exactly that token whatever its warpers do. The student's draw therefore applies the
    generation settings here (`temperature`, `top_k`, `top_p`, `min_p`, in transformers' order), exactly as
    `generate` would; pass the values given to `generate`. Top-K membership is a property of the teacher's ranking,
    so it does not depend on any temperature; ties at the K-th logit count as members.

    Banned tokens (student scores already at `-inf`) are never drawn, neither by the student nor by the teacher,
    whose distribution is renormalised over the allowed tokens, and are left out of the teacher's top-K ranking. Both
    models' stop mass is moved onto the student's stop id first, as in TRB. A row whose teacher logits are invalid
    (NaN, or no finite mass on the allowed tokens) keeps the student's token and is counted in `teacher_valid`.

    Recorded per token (`statistics()`): `replaced` (the student's token was replaced), `replacement_probability`
    (the student's probability mass outside the teacher's top-K: the expected replacement rate, a smoother curve)
    and `teacher_valid`.

    Args:
        teacher_model (`PreTrainedModel`):
            The teacher, on the same device as the student, sharing its tokenizer.
        top_k (`int`):
            K of the membership test.
        teacher_temperature (`float`, *optional*, defaults to `1.0`):
            Temperature tau_T of the teacher distribution replacements are drawn from.
        top_k_sampling (`int`, *optional*), top_p (`float`, *optional*), min_p (`float`, *optional*):
            The student's sampling truncation, as given to `generate` (`top_k`, `top_p`, `min_p` there).
        **kwargs:
            `prompt_attention_mask`, `temperature`, `vocab_size`, `student_eos_token_id`, `teacher_eos_token_id`, as
            for [`TeacherGuidedProcessor`].
    """

    STATISTICS = {"replaced": torch.bool, "replacement_probability": torch.float32, "teacher_valid": torch.bool}

    def __init__(
        self,
        teacher_model: torch.nn.Module,
        top_k: int,
        *,
        teacher_temperature: float = 1.0,
        top_k_sampling: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        **kwargs,
    ):
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {top_k}.")
        if not teacher_temperature > 0:
            raise ValueError(f"teacher_temperature must be > 0, got {teacher_temperature}.")
        super().__init__(teacher_model, **kwargs)
        self.top_k = top_k
        self.teacher_temperature = float(teacher_temperature)
        # generate's own warpers for do_sample=True, num_beams=1, in its order.
        self._student_warpers = sampling_warpers(self.temperature, top_k_sampling, top_p, min_p)

    @property
    def _teacher_stop_temperature(self) -> float:
        return self.teacher_temperature  # replacements are drawn at tau_T

    def _step(self, scores, teacher_logits):
        allowed = scores > float("-inf")
        student = self._student_warpers(None, scores.float())
        student_probs = torch.softmax(student, dim=-1)
        student_token = torch.multinomial(student_probs, 1).squeeze(1)

        teacher = teacher_logits.masked_fill(~allowed, float("-inf"))
        teacher_valid = ~torch.isnan(teacher).any(-1) & torch.isfinite(teacher).any(-1)
        teacher = torch.where(teacher_valid[:, None], teacher, torch.zeros_like(teacher).masked_fill(~allowed, -1e30))
        kth = teacher.topk(min(self.top_k, teacher.shape[-1]), dim=-1).values[:, -1:]
        in_top_k = teacher >= kth
        member = in_top_k.gather(1, student_token[:, None]).squeeze(1)
        teacher_token = torch.multinomial(torch.softmax(teacher / self.teacher_temperature, dim=-1), 1).squeeze(1)

        replaced = teacher_valid & ~member
        token = torch.where(replaced, teacher_token, student_token)
        records = {
            "replaced": replaced,
            "replacement_probability": (student_probs * ~in_top_k).sum(-1) * teacher_valid,
            "teacher_valid": teacher_valid,
        }
        chosen = torch.full_like(scores, float("-inf")).scatter_(1, token[:, None], 0.0)
        return chosen, records
