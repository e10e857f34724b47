"""The loss-side baselines of TrOPD's comparison (arXiv 2606.01249, Tables 1-3), per token on student tokens.

Each is sampled-token OPD (the K1 policy-gradient term -R * lp_S(x), R = lp_T(x) - lp_S(x) detached) with a rule for
what is added, clipped or left out. Where the papers leave a detail open, the choice is named here and in
docs/tropd.md, and each constant is a config field.

| objective | per continuation token | trained tokens, normaliser |
|---|---|---|
| `"eopd"` (EOPD, arXiv 2603.07079) | -R lp_S(x) + alpha 1[H_T >= tau] FKL~_k | all; valid tokens (as TRL) |
| `"entropy_top"` (Entropy OPD 20%) | -R lp_S(x) | top `fraction` by student entropy; mean over them |
| `"reopold"` (REOPOLD, arXiv 2603.11137) | -max(R, c_lambda) lp_S(x) | top `fraction` by student entropy (refinement) or R >= c_lambda (exploration); mean over them |

- EOPD, as its released code does: H_T is the teacher's full-vocabulary entropy at the token's prefix (tempered
  logits); FKL~_k = sum_{v in top-k(pi_T)} p~_T(v) (log p~_T(v) - lp_S(v)) with the teacher renormalised over its
  top-k (p~_T) and the student's full-vocabulary log-probs; tau = 0.8 nats, alpha = 1, k = 16. The reverse-KL term
  stays on every token.
- Entropy OPD 20%: the TrOPD paper says only "the top-20% high-entropy tokens"; we take the student's entropy (the
  policy's, as in "Beyond the 80/20 Rule", which the heuristic comes from), per micro-batch by default
  ([`top_fraction_mask`]), and average over the selected tokens as that code does.
- REOPOLD: its code is not public. The reward is clipped from below at c_lambda = log(lambda) / (1 - lambda), the
  bound the mixture reward log((lambda pi_S + (1 - lambda) pi_T) / pi_S) >= max((1 - lambda) R, log lambda) gives
  after dividing by (1 - lambda); entropy-based dynamic sampling keeps the top `fraction` of tokens by student
  entropy; the 2-stage schedule trains first on the tokens that are not clipped (exploration), then switches to
  the entropy rule (refinement). The secondary sources we could read disagree on lambda and on the switch step:
  both are config fields (docs/tropd.md lists the readings).
"""

import math

import torch

from .token_selection import SELECTION_SCOPES, top_fraction_mask


BASELINE_OBJECTIVES = ("eopd", "entropy_top", "reopold")
REOPOLD_STAGES = ("exploration", "refinement")


def renormalized_top_k_forward_kl(teacher_top: torch.Tensor, student_top: torch.Tensor) -> torch.Tensor:
    """EOPD's forward KL: sum_v p~_T(v) (log p~_T(v) - lp_S(v)) over the teacher's top-k ids, p~_T the teacher
    renormalised over them, lp_S the student's full-vocabulary log-probs there (with gradient)."""
    log_renormalized = teacher_top - teacher_top.logsumexp(-1, keepdim=True)
    return (log_renormalized.exp() * (log_renormalized - student_top)).sum(-1)


def reopold_clip_floor(mixture_weight: float) -> float:
    """c_lambda = log(lambda) / (1 - lambda), REOPOLD's floor on the reward R = lp_T(x) - lp_S(x)."""
    return math.log(mixture_weight) / (1.0 - mixture_weight)


def baseline_token_loss(
    student_logprob_sampled: torch.Tensor,
    reward: torch.Tensor,
    *,
    objective: str,
    continuation: torch.Tensor,
    teacher_entropy: torch.Tensor | None = None,
    student_entropy: torch.Tensor | None = None,
    student_logprobs_top: torch.Tensor | None = None,
    teacher_logprobs_top: torch.Tensor | None = None,
    sequence_ids: torch.Tensor | None = None,
    entropy_threshold: float = 0.8,
    forward_kl_weight: float = 1.0,
    selection_fraction: float = 0.2,
    selection_scope: str = "batch",
    mixture_weight: float = 0.3,
    stage: str = "refinement",
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One baseline's per-token loss on continuation tokens (see the module docstring).

    Args:
        student_logprob_sampled (`torch.Tensor`): `(N,)` lp_S(x), with gradient.
        reward (`torch.Tensor`): `(N,)` R = lp_T(x) - lp_S(x), detached.
        continuation (`torch.Tensor`): `(N,)` bool, the student's tokens (not teacher prefix).
        teacher_entropy, student_entropy (`torch.Tensor`): `(N,)` full-vocabulary entropies (EOPD; the others).
        student_logprobs_top, teacher_logprobs_top (`torch.Tensor`): `(N, k)` at the teacher's top-k ids (EOPD).
        sequence_ids (`torch.Tensor`): `(N,)` each token's sequence, for `selection_scope="sequence"`.
        stage (`str`): REOPOLD's stage at this step, `"exploration"` or `"refinement"`.

    Returns:
        `(loss (N,), selected (N,) bool, records)`: the loss before the selection (the caller keeps the selected
        tokens and averages over them when `averages_over_selected(objective)`); records holds detached `(N,)` bools
        `switched` (EOPD's forward-KL tokens) and `clipped` (REOPOLD's tokens below the floor).
    """
    if objective not in BASELINE_OBJECTIVES:
        raise ValueError(f"objective must be one of {list(BASELINE_OBJECTIVES)}, got {objective!r}.")
    lp_s = student_logprob_sampled
    reward = reward.detach()
    none = torch.zeros_like(continuation)
    switched, clipped = none, none
    if objective == "eopd":
        if teacher_entropy is None or student_logprobs_top is None or teacher_logprobs_top is None:
            raise ValueError("objective='eopd' needs the teacher's entropy and both models' top-k log-probs.")
        switched = continuation & (teacher_entropy.detach() >= entropy_threshold)
        forward_kl = renormalized_top_k_forward_kl(teacher_logprobs_top.detach(), student_logprobs_top)
        forward_kl = torch.where(switched, forward_kl, torch.zeros_like(forward_kl))
        return (
            -reward * lp_s + forward_kl_weight * forward_kl,
            continuation,
            {"switched": switched, "clipped": clipped},
        )
    if student_entropy is None:
        raise ValueError(f"objective={objective!r} needs the student's entropy per token.")

    def high_entropy() -> torch.Tensor:
        return top_fraction_mask(
            student_entropy,
            selection_fraction,
            eligible=continuation,
            sequence_ids=sequence_ids,
            scope=selection_scope,
        )

    if objective == "entropy_top":
        return -reward * lp_s, high_entropy(), {"switched": switched, "clipped": clipped}
    if stage not in REOPOLD_STAGES:
        raise ValueError(f"stage must be one of {list(REOPOLD_STAGES)}, got {stage!r}.")
    floor = reopold_clip_floor(mixture_weight)
    clipped = continuation & (reward < floor)
    selected = continuation & ~clipped if stage == "exploration" else high_entropy()
    return -reward.clamp(min=floor) * lp_s, selected, {"switched": switched, "clipped": clipped}


def averages_over_selected(objective: str) -> bool:
    """Whether the objective averages over the tokens it selects (Entropy OPD, REOPOLD: 1 / sum M) rather than over
    every valid token (EOPD, as TRL)."""
    return objective in ("entropy_top", "reopold")


__all__ = [
    "BASELINE_OBJECTIVES",
    "REOPOLD_STAGES",
    "SELECTION_SCOPES",
    "averages_over_selected",
    "baseline_token_loss",
    "renormalized_top_k_forward_kl",
    "reopold_clip_floor",
]
