"""TrOPD's per-token objective (arXiv 2606.01249): K1 inside an adaptive trust region, outliers handled apart, and
teacher-prefix guidance.

On a token x the student sampled, OPD's K1 estimator uses the reward R = log pi_T(x) - log pi_S(x) (detached) in the
policy-gradient loss -R * log pi_S(x). When pi_T(x) is tiny, R is hugely negative and dominates the gradient. TrOPD
trusts each token with probability min(1, pi_T(x) / pi_S(x)) (a detached Bernoulli draw, as in speculative
decoding's acceptance test) and gives the tokens it does not trust (outliers) a different loss. Tokens of a
teacher-generated prefix get a small teacher-NLL term instead. Per token (papers.md §2.2-2.5):

| region | loss |
|---|---|
| trusted continuation token | -R * lp_S(x) (K1) |
| outlier, `outlier="fkl"` (TrOPD) | sum_{v in top-k(pi_T)} pi_T(v) (lp_T(v) - lp_S(v)) (raw teacher probs, full-vocab student log-probs) |
| outlier, `outlier="mask"` | 0 |
| outlier, `outlier="clip"` | -max(R, threshold) * lp_S(x) |
| teacher-prefix token | guidance_weight * (-lp_S(x)) |

`outlier_detection="adaptive"` draws the trust mask (trusted iff draw < min(1, exp(R))); `"threshold"` calls a token an
outlier iff R < threshold (the paper's static Mask/Clip baselines). The other objectives of the paper's ablation:
`"k1"` (plain OPD: every continuation token trusted), `"fkl"` (top-k forward KL on every continuation token: the
paper's collapsing "FKL alone") and `"jsd"`; and the loss-side baselines of its comparison, `"eopd"`,
`"entropy_top"` (Entropy OPD 20%) and `"reopold"` ([`opd_baselines`](opd_baselines.py)), which keep the guidance and
the prefix rule. Choices where the paper is silent: R is log pi_T - log pi_S (the paper
writes the ratio both ways up), so `threshold` must be <= 0; masked outliers still count in the token normaliser;
prefix tokens are never in the trust/outlier statistics; a sampled teacher-only stop id counts as the student's stop
id (after stop alignment they are one event).

Two layers: [`tropd_token_loss`] on gathered per-token log-probs (pure), and [`tropd_loss`], a drop-in for TRL's
`_chunked_divergence_loss` that gathers them from hidden states with memory O(tokens x k).
"""

import math
from dataclasses import dataclass

import torch

from ..stop_alignment import StopAlignment
from .drop_in import DivergenceInputs, trl_divergence_drop_in
from .opd_baselines import BASELINE_OBJECTIVES, REOPOLD_STAGES, averages_over_selected, baseline_token_loss
from .projection import aligned_ids
from .token_logprobs import gathered_logprobs, teacher_top_k
from .token_selection import SELECTION_SCOPES


OBJECTIVES = ("trust_region", "k1", "fkl", "jsd", *BASELINE_OBJECTIVES)
OUTLIER_STRATEGIES = ("fkl", "mask", "clip")
OUTLIER_DETECTIONS = ("adaptive", "threshold")


@dataclass(frozen=True)
class TrOPDLossSpec:
    """What TrOPD learns on each token (the models' logit conventions and stop alignment come with the call).

    Args:
        objective (`str`): `"trust_region"` (TrOPD), `"k1"` (plain OPD), `"fkl"` (top-k forward KL on every
            continuation token), `"jsd"` (the paper's JSD baseline), or a baseline of its comparison: `"eopd"`,
            `"entropy_top"` (Entropy OPD 20%), `"reopold"`.
        outlier (`str`): with `"trust_region"`, the loss of an outlier token: `"fkl"` (TrOPD), `"mask"` or `"clip"`.
        outlier_detection (`str`): with `"trust_region"`, `"adaptive"` (Bernoulli min(1, pi_T/pi_S), needs trust
            draws) or `"threshold"` (outlier iff R < `threshold`).
        threshold (`float`): tau, a floor on R = log pi_T(x) - log pi_S(x) (<= 0); used by `"threshold"` detection
            and `"clip"`. The paper does not give it.
        top_k (`int`): size of the teacher's top-k support of the forward KL (the paper: 64).
        jsd_beta (`float`): the JSD mixture weight of the teacher, in (0, 1) (the paper: 0.5).
        guidance_weight (`float`): weight of the teacher-prefix NLL (the paper: 1e-3); `0` trains nothing on prefixes.
        eopd_entropy_threshold (`float`): EOPD's tau, in nats: the forward-KL term is added where the teacher's
            entropy is >= tau (EOPD's code: 0.8).
        eopd_weight (`float`): EOPD's alpha, the weight of that term (EOPD: 1.0).
        eopd_top_k (`int`): EOPD's k, the teacher's top-k support, renormalised (EOPD: 16).
        selection_fraction (`float`): the fraction of continuation tokens of highest student entropy that
            `"entropy_top"` and REOPOLD's refinement stage train on (0.2).
        selection_scope (`str`): `"batch"` (the top fraction of the micro-batch's tokens) or `"sequence"` (of each
            sequence's).
        reopold_mixture_weight (`float`): REOPOLD's lambda in (0, 1); the reward floor is log(lambda) / (1 - lambda).
    """

    objective: str = "trust_region"
    outlier: str = "fkl"
    outlier_detection: str = "adaptive"
    threshold: float = -5.0
    top_k: int = 64
    jsd_beta: float = 0.5
    guidance_weight: float = 1e-3
    eopd_entropy_threshold: float = 0.8
    eopd_weight: float = 1.0
    eopd_top_k: int = 16
    selection_fraction: float = 0.2
    selection_scope: str = "batch"
    reopold_mixture_weight: float = 0.3

    def __post_init__(self):
        for name, allowed in (
            ("objective", OBJECTIVES),
            ("outlier", OUTLIER_STRATEGIES),
            ("outlier_detection", OUTLIER_DETECTIONS),
            ("selection_scope", SELECTION_SCOPES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}.")
        if not (_is_number(self.threshold) and math.isfinite(self.threshold)) or self.threshold > 0:
            raise ValueError(
                f"threshold must be a finite log-ratio floor <= 0 on R = log pi_T(x) - log pi_S(x) (e.g. -5.0), got "
                f"{self.threshold!r}."
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be an int >= 1 (the paper uses 64), got {self.top_k!r}.")
        if not (_is_number(self.jsd_beta) and 0 < self.jsd_beta < 1):
            raise ValueError(
                f"jsd_beta must be in (0, 1) (the paper uses 0.5; for 1, plain K1, use objective='k1'), got "
                f"{self.jsd_beta!r}."
            )
        if not (_is_number(self.guidance_weight) and math.isfinite(self.guidance_weight)) or self.guidance_weight < 0:
            raise ValueError(
                f"guidance_weight must be a finite number >= 0 (the paper: 1e-3), got {self.guidance_weight!r}."
            )
        for name in ("eopd_entropy_threshold", "eopd_weight"):
            value = getattr(self, name)
            if not (_is_number(value) and math.isfinite(value)) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0 (EOPD: tau 0.8, alpha 1), got {value!r}.")
        if isinstance(self.eopd_top_k, bool) or not isinstance(self.eopd_top_k, int) or self.eopd_top_k < 1:
            raise ValueError(f"eopd_top_k must be an int >= 1 (EOPD uses 16), got {self.eopd_top_k!r}.")
        if not (_is_number(self.selection_fraction) and 0 < self.selection_fraction <= 1):
            raise ValueError(f"selection_fraction must be in (0, 1] (e.g. 0.2), got {self.selection_fraction!r}.")
        if not (_is_number(self.reopold_mixture_weight) and 0 < self.reopold_mixture_weight < 1):
            raise ValueError(
                f"reopold_mixture_weight must be in (0, 1) (lambda of REOPOLD's mixture), got "
                f"{self.reopold_mixture_weight!r}."
            )

    @property
    def needs_top_k(self) -> bool:
        """Whether the loss reads the teacher's top-k (forward KL or JSD terms)."""
        return self.objective in ("fkl", "jsd", "eopd") or (self.objective == "trust_region" and self.outlier == "fkl")

    @property
    def top_k_width(self) -> int:
        """How many of the teacher's top ids the loss reads (EOPD has its own k)."""
        return self.eopd_top_k if self.objective == "eopd" else self.top_k

    @property
    def needs_teacher_entropy(self) -> bool:
        """Whether the loss reads the teacher's full-vocabulary entropy (EOPD's switch)."""
        return self.objective == "eopd"

    @property
    def needs_trust_draws(self) -> bool:
        """Whether the loss draws the adaptive trust mask (the caller passes the uniform draws)."""
        return self.objective == "trust_region" and self.outlier_detection == "adaptive"


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _top_k_forward_kl(teacher_top: torch.Tensor, student_top: torch.Tensor) -> torch.Tensor:
    """sum_v pi_T(v) (lp_T(v) - lp_S(v)) over the given ids, raw (not renormalised) teacher probabilities."""
    return (teacher_top.exp() * (teacher_top - student_top)).sum(-1)


def _jsd(lp_s, lp_t, student_top, teacher_top, beta: float) -> torch.Tensor:
    """beta * top-k FKL to the mixture M = beta pi_T + (1 - beta) pi_S (gradient through pi_S inside M) plus
    (1 - beta) * K1 with reward log pi_M(x) - log pi_S(x) on the sampled token."""
    log_beta, log_rest = math.log(beta), math.log1p(-beta)
    log_mixture_top = torch.logaddexp(teacher_top + log_beta, student_top + log_rest)
    forward = (teacher_top.exp() * (teacher_top - log_mixture_top)).sum(-1)
    reward = (torch.logaddexp(lp_t + log_beta, lp_s.detach() + log_rest) - lp_s.detach()).detach()
    return beta * forward + (1 - beta) * (-reward * lp_s)


def tropd_token_loss(
    student_logprob_sampled: torch.Tensor,
    teacher_logprob_sampled: torch.Tensor,
    student_logprobs_top: torch.Tensor | None,
    teacher_logprobs_top: torch.Tensor | None,
    *,
    trust_draws: torch.Tensor | None,
    is_prefix: torch.Tensor | None,
    spec: TrOPDLossSpec,
    teacher_entropy: torch.Tensor | None = None,
    student_entropy: torch.Tensor | None = None,
    sequence_ids: torch.Tensor | None = None,
    stage: str = "refinement",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TrOPD's loss per token from gathered log-probs (see the module docstring).

    Args:
        student_logprob_sampled (`torch.Tensor`): `(N,)` student log-prob of each token, with gradient.
        teacher_logprob_sampled (`torch.Tensor`): `(N,)` teacher log-prob of each token (detached here).
        student_logprobs_top (`torch.Tensor` or `None`): `(N, k)` student full-vocabulary log-probs at the teacher's
            top-k ids, with gradient; needed when `spec.needs_top_k`.
        teacher_logprobs_top (`torch.Tensor` or `None`): `(N, k)` teacher full-vocabulary log-probs at its top-k ids.
        trust_draws (`torch.Tensor` or `None`): `(N,)` uniform draws in [0, 1); needed when `spec.needs_trust_draws`.
        is_prefix (`torch.Tensor` or `None`): `(N,)` bool, `True` on teacher-prefix tokens; `None`: no prefix.
        spec ([`TrOPDLossSpec`]): the objective.
        teacher_entropy, student_entropy (`torch.Tensor`, *optional*): `(N,)` full-vocabulary entropies, for the
            baselines that read them (`"eopd"`: the teacher's; `"entropy_top"`, `"reopold"`: the student's).
        sequence_ids (`torch.Tensor`, *optional*): `(N,)` the sequence of each token (`selection_scope="sequence"`).
        stage (`str`): REOPOLD's stage at this step, `"exploration"` or `"refinement"`.

    Returns:
        `(loss (N,), records)`: records holds detached `(N,)` tensors `trusted`, `outlier` (bool: which branch each
        continuation token took; `"k1"` trusts every one, `"fkl"` treats every one as an outlier, the others
        neither), `selected` (the continuation tokens trained on), `switched` (EOPD: forward KL added), `clipped`
        (REOPOLD: reward below the floor), `reward` (R), `trust_probability` (min(1, exp(R))) and `is_prefix`. An
        objective that averages over the tokens it selects has its continuation losses scaled by
        continuation / selected tokens, so that TRL's token normaliser turns their sum into that mean.
    """
    if not isinstance(spec, TrOPDLossSpec):
        raise ValueError(f"spec must be a TrOPDLossSpec, got {type(spec)}.")
    lp_s = student_logprob_sampled
    if lp_s.dim() != 1 or teacher_logprob_sampled.shape != lp_s.shape:
        raise ValueError(
            "student_logprob_sampled and teacher_logprob_sampled must both be (N,), got "
            f"{tuple(lp_s.shape)} and {tuple(teacher_logprob_sampled.shape)}."
        )
    num_tokens = lp_s.shape[0]
    if stage not in REOPOLD_STAGES:
        raise ValueError(f"stage must be one of {list(REOPOLD_STAGES)}, got {stage!r}.")
    if spec.needs_top_k:
        if student_logprobs_top is None or teacher_logprobs_top is None:
            raise ValueError(f"objective={spec.objective!r} (outlier={spec.outlier!r}) needs the top-k log-probs.")
        if student_logprobs_top.dim() != 2 or student_logprobs_top.shape[0] != num_tokens:
            raise ValueError(
                f"the top-k log-probs must be (N={num_tokens}, k), got {tuple(student_logprobs_top.shape)}."
            )
        if teacher_logprobs_top.shape != student_logprobs_top.shape:
            raise ValueError(
                f"student and teacher top-k log-probs differ in shape: {tuple(student_logprobs_top.shape)} vs "
                f"{tuple(teacher_logprobs_top.shape)}."
            )
        teacher_logprobs_top = teacher_logprobs_top.detach()
    if spec.needs_trust_draws and (trust_draws is None or trust_draws.shape != lp_s.shape):
        got = None if trust_draws is None else tuple(trust_draws.shape)
        raise ValueError(
            f"outlier_detection='adaptive' needs trust_draws, uniform in [0, 1) of shape (N={num_tokens},), got {got}."
        )
    if is_prefix is None:
        is_prefix = torch.zeros_like(lp_s, dtype=torch.bool)
    elif is_prefix.shape != lp_s.shape:
        raise ValueError(f"is_prefix must be (N={num_tokens},), got {tuple(is_prefix.shape)}.")
    is_prefix = is_prefix.bool()
    continuation = ~is_prefix

    lp_t = teacher_logprob_sampled.detach().float()
    reward = lp_t - lp_s.detach()
    trust_probability = reward.clamp(max=0).exp()  # min(1, pi_T / pi_S) without overflow
    policy_gradient = -reward * lp_s
    none = torch.zeros_like(continuation)
    selected, switched, clipped = continuation, none, none
    if spec.objective in BASELINE_OBJECTIVES:
        trusted, outlier = none, none
        per_token, selected, flags = baseline_token_loss(
            lp_s,
            reward,
            objective=spec.objective,
            continuation=continuation,
            teacher_entropy=teacher_entropy,
            student_entropy=student_entropy,
            student_logprobs_top=student_logprobs_top,
            teacher_logprobs_top=teacher_logprobs_top,
            sequence_ids=sequence_ids,
            entropy_threshold=spec.eopd_entropy_threshold,
            forward_kl_weight=spec.eopd_weight,
            selection_fraction=spec.selection_fraction,
            selection_scope=spec.selection_scope,
            mixture_weight=spec.reopold_mixture_weight,
            stage=stage,
        )
        switched, clipped = flags["switched"], flags["clipped"]
        if averages_over_selected(spec.objective):
            scale = continuation.sum().clamp(min=1) / selected.sum().clamp(min=1)
            per_token = torch.where(selected, per_token * scale.to(per_token.dtype), torch.zeros_like(per_token))
    elif spec.objective == "k1":
        trusted, outlier, per_token = continuation, none, policy_gradient
    elif spec.objective == "fkl":
        trusted, outlier = none, continuation
        per_token = _top_k_forward_kl(teacher_logprobs_top, student_logprobs_top)
    elif spec.objective == "jsd":
        trusted, outlier = none, none
        per_token = _jsd(lp_s, lp_t, student_logprobs_top, teacher_logprobs_top, spec.jsd_beta)
    else:
        if spec.outlier_detection == "adaptive":
            trusted = continuation & (trust_draws.detach().to(trust_probability.dtype) < trust_probability)
        else:
            trusted = continuation & (reward >= spec.threshold)
        outlier = continuation & ~trusted
        if spec.outlier == "fkl":
            outlier_loss = _top_k_forward_kl(teacher_logprobs_top, student_logprobs_top)
        elif spec.outlier == "mask":
            outlier_loss = torch.zeros_like(policy_gradient)
        else:
            outlier_loss = -reward.clamp(min=spec.threshold) * lp_s
        per_token = torch.where(trusted, policy_gradient, outlier_loss)
    per_token = torch.where(is_prefix, spec.guidance_weight * -lp_s, per_token)
    records = {
        "trusted": trusted,
        "outlier": outlier,
        "selected": selected,
        "switched": switched,
        "clipped": clipped,
        "reward": reward,
        "trust_probability": trust_probability,
        "is_prefix": is_prefix,
    }
    return per_token, records


def _accumulate(records_out: dict, records: dict[str, torch.Tensor]):
    """Add this call's sums and counts to `records_out` (one dict can collect a whole optimizer step)."""
    prefix, trusted, outlier = records["is_prefix"], records["trusted"], records["outlier"]
    continuation, reward = ~prefix, records["reward"]
    sums = {
        "prefix_tokens": prefix.sum(),
        "continuation_tokens": continuation.sum(),
        "trusted_tokens": trusted.sum(),
        "outlier_tokens": outlier.sum(),
        "selected_tokens": records["selected"].sum(),
        "switched_tokens": records["switched"].sum(),
        "clipped_tokens": records["clipped"].sum(),
        "reward_sum_prefix": reward[prefix].sum(),
        "reward_sum_continuation": reward[continuation].sum(),
        "reward_sum_trusted": reward[trusted].sum(),
        "reward_sum_outlier": reward[outlier].sum(),
        "trust_probability_sum": records["trust_probability"][continuation].sum(),
    }
    for key, value in sums.items():
        value = value.detach().float()
        records_out[key] = records_out[key] + value if key in records_out else value


@trl_divergence_drop_in
def tropd_loss(
    inputs: DivergenceInputs,
    *,
    completion_ids: torch.Tensor,
    trust_draws: torch.Tensor | None = None,
    is_prefix: torch.Tensor | None = None,
    spec: TrOPDLossSpec,
    alignment: StopAlignment | None = None,
    records_out: dict | None = None,
    stage: str = "refinement",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop-in for TRL's `_chunked_divergence_loss` computing TrOPD's loss (`beta` is accepted and ignored: `spec`
    chooses the objective).

    Args:
        completion_ids (`torch.Tensor`): `(B, C)` the completion tokens (aligned with `completion_mask`).
        trust_draws (`torch.Tensor`, *optional*): `(B, C)` uniform draws in [0, 1) for the adaptive trust mask.
        is_prefix (`torch.Tensor`, *optional*): `(B, C)` bool, `True` on teacher-prefix tokens.
        spec ([`TrOPDLossSpec`]): the objective.
        alignment ([`StopAlignment`], *optional*): merge the stop tokens in both models (and in `completion_ids`).
        records_out (`dict`, *optional*): receives (adds to) detached sums and counts over the valid tokens:
            `prefix_tokens`, `continuation_tokens`, `trusted_tokens`, `outlier_tokens`, `selected_tokens`,
            `switched_tokens`, `clipped_tokens`, `reward_sum_{prefix,continuation,trusted,outlier}` and
            `trust_probability_sum` (over continuation tokens).
        stage (`str`): REOPOLD's stage at this step (`"exploration"` or `"refinement"`).

    Returns `(loss, entropy_sum, num_valid)` reduced as TRL's; the entropy is the student's full-vocabulary one.
    """
    if not isinstance(spec, TrOPDLossSpec):
        raise ValueError(f"spec must be a TrOPDLossSpec, got {type(spec)}.")
    completion_mask = inputs.completion_mask
    shape = tuple(completion_mask.shape)
    for name, tensor in (("completion_ids", completion_ids), ("trust_draws", trust_draws), ("is_prefix", is_prefix)):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have the completion mask's shape {shape}, got {tuple(tensor.shape)}.")
    if spec.needs_trust_draws and trust_draws is None:
        raise ValueError(
            "outlier_detection='adaptive' needs trust_draws (uniform in [0, 1), one per completion token)."
        )
    inputs.gather_heads()
    student_spec, teacher_spec = inputs.logit_specs(alignment)
    vocab_size = inputs.vocab_size

    valid, num_valid, student_hidden, teacher_hidden = inputs.valid_rows()
    sampled = aligned_ids(completion_ids.reshape(-1)[valid].long().to(student_hidden.device), alignment)
    rows = torch.arange(shape[0], device=completion_mask.device)[:, None].expand(shape)
    flat = {"sequence_ids": rows.reshape(-1)[valid].to(student_hidden.device)}
    for name, tensor in (("trust_draws", trust_draws), ("is_prefix", is_prefix)):
        flat[name] = None if tensor is None else tensor.reshape(-1)[valid].to(student_hidden.device)

    top_ids, teacher_top, teacher_sampled, *teacher_entropy = teacher_top_k(
        teacher_hidden,
        inputs.teacher_lm_head_weight,
        inputs.teacher_lm_head_bias,
        teacher_spec,
        vocab_size=vocab_size,
        k=spec.top_k_width if spec.needs_top_k else 0,
        extra_ids=sampled[:, None],
        return_entropy=spec.needs_teacher_entropy,
    )
    student, entropy = gathered_logprobs(
        student_hidden,
        inputs.student_lm_head_weight,
        inputs.student_lm_head_bias,
        torch.cat([sampled[:, None], top_ids], dim=1),
        student_spec,
        vocab_size=vocab_size,
        normalize="full",
        return_entropy=True,
    )
    per_token, records = tropd_token_loss(
        student[:, 0],
        teacher_sampled[:, 0],
        student[:, 1:] if spec.needs_top_k else None,
        teacher_top if spec.needs_top_k else None,
        trust_draws=flat["trust_draws"],
        is_prefix=flat["is_prefix"],
        spec=spec,
        teacher_entropy=teacher_entropy[0] if teacher_entropy else None,
        student_entropy=entropy,
        sequence_ids=flat["sequence_ids"],
        stage=stage,
    )
    if records_out is not None:
        _accumulate(records_out, records)
    return inputs.reduce(per_token.sum(), num_valid), entropy.sum(), num_valid
