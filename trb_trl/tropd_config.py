from dataclasses import dataclass, field

from .losses.token_selection import SELECTION_SCOPES
from .rollout.teacher_prefix import PREFIX_SAMPLING
from .trb_distill_config import ROLLOUT_POLICIES, TRBDistillConfig, _is_finite


TROPD_OBJECTIVES = ("trust_region", "k1", "fkl", "jsd", "eopd", "entropy_top", "reopold")
REOPOLD_SCHEDULES = ("single", "two_stage")
TROPD_OUTLIERS = ("fkl", "mask", "clip")
TROPD_OUTLIER_DETECTIONS = ("adaptive", "threshold")


@dataclass
class TrOPDConfig(TRBDistillConfig):
    r"""
    Configuration class for the [`TrOPDTrainer`].

    Extends [`TRBDistillConfig`] with TrOPD (Trust Region On-Policy Distillation, arXiv 2606.01249): the per-token
    signal on student tokens is the K1 reward log pi_T(x) - log pi_S(x) inside an adaptive trust region, outliers get a
    top-k forward KL, and early training is guided by teacher prefixes. The rollout policies of the parent config
    still choose where the student's tokens come from during warmup: `rollout_policy="trb"` is "TRB warmup + TrOPD
    loss". The default here is `"student"` (the paper's on-policy rollouts), and `trb_epsilon` defaults to the parent's
    0.02 only with a trust-region policy (`"trb"`, `"fixed_epsilon"`), 0 otherwise; `trb_epsilon > 0` with another
    policy is an error (set `rollout_policy="trb"`). TRL's `beta`, `loss_top_k` and `loss_top_k_estimator` do not
    apply (the loss is TrOPD's).

    Parameters:
        > Parameters that choose the per-token objective on student tokens

        tropd_objective (`str`, *optional*, defaults to `"trust_region"`):
            `"trust_region"`: TrOPD; trusted tokens get the K1 policy-gradient term, outliers are handled by
            `tropd_outlier`. `"k1"`: every token gets the K1 term (vanilla OPD, the paper's "OPD" row). `"fkl"`:
            every token gets the top-k forward KL (the paper's "FKL alone", which collapses). `"jsd"`: the paper's
            JSD baseline (top-k forward KL to the mixture plus K1 to the mixture on the sampled token, weight
            `tropd_jsd_beta`). The loss-side baselines of the paper's comparison (docs/tropd.md): `"eopd"` (EOPD,
            arXiv 2603.07079: K1 plus a renormalised top-k forward KL where the teacher's entropy is high),
            `"entropy_top"` (Entropy OPD 20%: K1 on the highest-entropy tokens only) and `"reopold"` (REOPOLD, arXiv
            2603.11137: K1 with the reward clipped from below, on high-entropy tokens).
        tropd_outlier (`str`, *optional*, defaults to `"fkl"`):
            What an outlier token gets (`"trust_region"` only): `"fkl"` the top-k forward KL
            sum_{v in top-k(pi_T)} pi_T(v) log(pi_T(v) / pi_S(v)) (TrOPD's choice), `"mask"` no gradient, `"clip"` the
            K1 term with its reward clipped from below at `tropd_threshold` (REOPOLD).
        tropd_outlier_detection (`str`, *optional*, defaults to `"adaptive"`):
            `"adaptive"`: a token is trusted with probability min(1, pi_T(x) / pi_S(x)) (a detached Bernoulli draw,
            TrOPD's adaptive trust region). `"threshold"`: a token is an outlier when its reward is below
            `tropd_threshold` (the static rule of the paper's Clip and Mask rows).
        tropd_threshold (`float`, *optional*, defaults to `-5.0`):
            tau, in nats of log(pi_T / pi_S): the clip level of `"clip"` and the cut of `"threshold"` detection. The
            paper does not give its value; -5 flags tokens the teacher finds ~150x less likely than the student.
        tropd_top_k (`int`, *optional*, defaults to `64`):
            k of the teacher's top-k support of the forward KL (paper: 64). Memory is O(tokens x k).
        tropd_jsd_beta (`float`, *optional*, defaults to `0.5`):
            Mixture weight of the `"jsd"` objective, pi_M = beta pi_T + (1 - beta) pi_S (paper: 0.5).

        > Parameters of the loss-side baselines (`tropd_objective` `"eopd"`, `"entropy_top"`, `"reopold"`)

        eopd_entropy_threshold (`float`, *optional*, defaults to `0.8`):
            EOPD's tau in nats: the forward-KL term is added on tokens where the teacher's full-vocabulary entropy is
            >= tau (EOPD's released code: 0.8).
        eopd_weight (`float`, *optional*, defaults to `1.0`):
            EOPD's alpha, the weight of the forward-KL term (EOPD: 1.0).
        eopd_top_k (`int`, *optional*, defaults to `16`):
            EOPD's k: the forward KL runs over the teacher's top-k ids, the teacher renormalised over them (EOPD: 16).
        entropy_selection_fraction (`float`, *optional*, defaults to `0.2`):
            The fraction of continuation tokens, those of highest student entropy, that `"entropy_top"` and REOPOLD's
            refinement stage train on (Entropy OPD 20%: 0.2); the loss is the mean over them.
        entropy_selection_scope (`str`, *optional*, defaults to `"batch"`):
            Where the top fraction is taken: `"batch"` (over the micro-batch's tokens, as the "80/20" code the
            heuristic comes from) or `"sequence"` (within each sequence). The TrOPD paper does not say.
        reopold_mixture_weight (`float`, *optional*, defaults to `0.3`):
            REOPOLD's lambda in (0, 1): the reward is clipped from below at log(lambda) / (1 - lambda) (-1.72 at
            0.3). REOPOLD's code is not public; the sources we read disagree on lambda (docs/tropd.md).
        reopold_schedule (`str`, *optional*, defaults to `"single"`):
            `"single"`: REOPOLD (clipping and entropy-based token sampling throughout). `"two_stage"`: REOPOLD 2Stage,
            exploration (train on the tokens whose reward is above the floor) until `reopold_switch_step`, then
            refinement (the entropy rule).
        reopold_switch_step (`int`, *optional*):
            Optimizer step at which `"two_stage"` switches to refinement; `None`: half the run (`max_steps // 2`).

        > Parameters that control the off-policy guidance (teacher prefixes)

        tropd_guidance (`bool`, *optional*, defaults to `True`):
            Start training trajectories with a teacher-generated prefix of length l, continued by the student; prefix
            tokens get `tropd_guidance_weight` x the student's NLL of the teacher's token, continuation tokens the
            objective above. `False` trains fully on-policy (the paper's rows without guidance).
        tropd_guidance_weight (`float`, *optional*, defaults to `0.001`):
            beta of the prefix imitation term (paper: 1e-3).
        tropd_prefix_max_length (`int`, *optional*):
            Longest prefix at step 0, at most `max_completion_length` (the prefix is part of the completion); `None`
            uses `max_completion_length` (the paper: the maximum sequence length, so early samples may be whole
            teacher responses). The student continues each prefix of length l for at most `max_completion_length - l`
            tokens.
        tropd_prefix_steps (`int`, *optional*):
            Step at which the longest prefix reaches 0 (cosine anneal); `None` anneals over the whole run, as the
            paper does: `max_steps`, or with an epoch-based config (`num_train_epochs`, no `max_steps`) the total
            optimizer steps the trainer derives from it when training starts.
        tropd_prefix_sampling (`str`, *optional*, defaults to `"uniform"`):
            How each sample's prefix length is drawn from the current maximum l_max (the paper does not say):
            `"uniform"` on {0, ..., l_max}, or `"max"` (always l_max).
    """

    trb_epsilon: float | None = field(
        default=None,
        metadata={
            "help": "TRB's initial per-token KL budget, with rollout_policy 'trb' or 'fixed_epsilon' only; None: "
            "0.02 with those policies, 0 otherwise."
        },
    )
    rollout_policy: str = field(
        default="student",
        metadata={
            "help": "Where student tokens come from during warmup: 'student' (on-policy, TrOPD's setting), or a "
            "warmup policy of TRBDistillConfig ('trb' for TRB warmup + TrOPD loss).",
            "choices": list(ROLLOUT_POLICIES),
        },
    )
    tropd_objective: str = field(
        default="trust_region",
        metadata={
            "help": "Per-token objective on student tokens: 'trust_region' (TrOPD), 'k1' (vanilla OPD), 'fkl' (top-k "
            "forward KL everywhere) or 'jsd' (the paper's JSD baseline).",
            "choices": list(TROPD_OBJECTIVES),
        },
    )
    tropd_outlier: str = field(
        default="fkl",
        metadata={
            "help": "Outlier tokens get: 'fkl' (top-k forward KL, TrOPD), 'mask' (no gradient) or 'clip' (K1 with the "
            "reward clipped at tropd_threshold).",
            "choices": list(TROPD_OUTLIERS),
        },
    )
    tropd_outlier_detection: str = field(
        default="adaptive",
        metadata={
            "help": "Outliers: 'adaptive' (trusted with probability min(1, pi_T/pi_S)) or 'threshold' (reward below "
            "tropd_threshold).",
            "choices": list(TROPD_OUTLIER_DETECTIONS),
        },
    )
    tropd_threshold: float = field(
        default=-5.0,
        metadata={"help": "tau in nats of log(pi_T/pi_S): clip level and threshold-detection cut (not in the paper)."},
    )
    tropd_top_k: int = field(
        default=64, metadata={"help": "k of the teacher's top-k support of the forward KL (paper: 64)."}
    )
    tropd_jsd_beta: float = field(
        default=0.5, metadata={"help": "Mixture weight of the 'jsd' objective (paper: 0.5)."}
    )
    eopd_entropy_threshold: float = field(
        default=0.8, metadata={"help": "EOPD's tau: forward KL added where the teacher's entropy >= tau nats (0.8)."}
    )
    eopd_weight: float = field(default=1.0, metadata={"help": "EOPD's alpha, the forward-KL weight (EOPD: 1.0)."})
    eopd_top_k: int = field(
        default=16, metadata={"help": "EOPD's k: the teacher's top-k ids, renormalised, of its forward KL (16)."}
    )
    entropy_selection_fraction: float = field(
        default=0.2,
        metadata={"help": "Fraction of highest-student-entropy tokens 'entropy_top' and REOPOLD train on (0.2)."},
    )
    entropy_selection_scope: str = field(
        default="batch",
        metadata={
            "help": "Top fraction over the micro-batch ('batch') or within each sequence ('sequence').",
            "choices": list(SELECTION_SCOPES),
        },
    )
    reopold_mixture_weight: float = field(
        default=0.3, metadata={"help": "REOPOLD's lambda in (0, 1): reward floor log(lambda) / (1 - lambda)."}
    )
    reopold_schedule: str = field(
        default="single",
        metadata={
            "help": "'single' (REOPOLD) or 'two_stage' (REOPOLD 2Stage: exploration, then refinement).",
            "choices": list(REOPOLD_SCHEDULES),
        },
    )
    reopold_switch_step: int | None = field(
        default=None,
        metadata={"help": "Step at which 'two_stage' switches to refinement; None: half the run (max_steps // 2)."},
    )
    tropd_guidance: bool = field(
        default=True,
        metadata={"help": "Off-policy guidance: teacher prefixes continued by the student, annealed to none."},
    )
    tropd_guidance_weight: float = field(
        default=1e-3, metadata={"help": "Weight of the student's NLL of teacher prefix tokens (paper: 1e-3)."}
    )
    tropd_prefix_max_length: int | None = field(
        default=None,
        metadata={"help": "Longest teacher prefix at step 0; None uses max_completion_length."},
    )
    tropd_prefix_steps: int | None = field(
        default=None,
        metadata={"help": "Step at which the cosine-annealed longest prefix reaches 0; None anneals over max_steps."},
    )
    tropd_prefix_sampling: str = field(
        default="uniform",
        metadata={
            "help": "Per-sample prefix length: 'uniform' on {0..l_max} or 'max' (always l_max); not in the paper.",
            "choices": list(PREFIX_SAMPLING),
        },
    )

    def __post_init__(self):
        trust_region = self.rollout_policy in ("trb", "fixed_epsilon")
        if self.trb_epsilon is None:
            self.trb_epsilon = TRBDistillConfig.__dataclass_fields__["trb_epsilon"].default if trust_region else 0.0
        elif _is_finite(self.trb_epsilon) and self.trb_epsilon > 0 and not trust_region:
            raise ValueError(
                f"trb_epsilon={self.trb_epsilon} is TRB's KL budget, but rollout_policy={self.rollout_policy!r} "
                "(TrOPDConfig's default is 'student') never blends with the teacher, so this run would have no TRB "
                "warmup. Set `rollout_policy: trb` for TRB warmup + TrOPD loss (or 'fixed_epsilon'), or remove "
                "trb_epsilon for TrOPD's own rollouts."
            )
        super().__post_init__()
        choices = {
            "tropd_objective": TROPD_OBJECTIVES,
            "tropd_outlier": TROPD_OUTLIERS,
            "tropd_outlier_detection": TROPD_OUTLIER_DETECTIONS,
            "tropd_prefix_sampling": PREFIX_SAMPLING,
            "entropy_selection_scope": SELECTION_SCOPES,
            "reopold_schedule": REOPOLD_SCHEDULES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}.")
        if not _is_finite(self.tropd_threshold) or self.tropd_threshold >= 0:
            raise ValueError(
                f"tropd_threshold must be a finite number < 0 (nats of log(pi_T/pi_S)), got {self.tropd_threshold}."
            )
        if not isinstance(self.tropd_top_k, int) or self.tropd_top_k < 1:
            raise ValueError(f"tropd_top_k must be an integer >= 1 (the teacher's top-k), got {self.tropd_top_k}.")
        if not (_is_finite(self.tropd_jsd_beta) and 0 < self.tropd_jsd_beta < 1):
            raise ValueError(f"tropd_jsd_beta must be in (0, 1), got {self.tropd_jsd_beta}.")
        if not (_is_finite(self.tropd_guidance_weight) and self.tropd_guidance_weight >= 0):
            raise ValueError(f"tropd_guidance_weight must be a finite number >= 0, got {self.tropd_guidance_weight}.")
        for name in ("eopd_entropy_threshold", "eopd_weight"):
            if not (_is_finite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}.")
        if not isinstance(self.eopd_top_k, int) or self.eopd_top_k < 1:
            raise ValueError(f"eopd_top_k must be an integer >= 1 (EOPD uses 16), got {self.eopd_top_k}.")
        if not (_is_finite(self.entropy_selection_fraction) and 0 < self.entropy_selection_fraction <= 1):
            raise ValueError(f"entropy_selection_fraction must be in (0, 1], got {self.entropy_selection_fraction}.")
        if not (_is_finite(self.reopold_mixture_weight) and 0 < self.reopold_mixture_weight < 1):
            raise ValueError(f"reopold_mixture_weight must be in (0, 1), got {self.reopold_mixture_weight}.")
        if self.reopold_schedule == "two_stage" and self.tropd_objective != "reopold":
            raise ValueError(
                f"reopold_schedule='two_stage' is REOPOLD's schedule, but tropd_objective={self.tropd_objective!r}; "
                "set tropd_objective='reopold' (REOPOLD 2Stage), or reopold_schedule='single'."
            )
        if self.reopold_switch_step is not None and self.reopold_schedule != "two_stage":
            raise ValueError(
                f"reopold_switch_step={self.reopold_switch_step} only applies with reopold_schedule='two_stage'; "
                "set that, or remove reopold_switch_step."
            )
        for name in ("tropd_prefix_max_length", "tropd_prefix_steps", "reopold_switch_step"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value}.")
        if self.tropd_guidance and self.max_completion_length is None:
            raise ValueError(
                "tropd_guidance continues each teacher prefix within max_completion_length; set max_completion_length "
                "(or tropd_guidance=False)."
            )
        if self.tropd_guidance and (self.tropd_prefix_max_length or 0) > self.max_completion_length:
            raise ValueError(
                f"tropd_prefix_max_length={self.tropd_prefix_max_length} exceeds max_completion_length="
                f"{self.max_completion_length}: a teacher prefix is part of the completion. Lower it, or leave it "
                "unset (None uses max_completion_length)."
            )
        if self.loss_top_k is not None:
            raise ValueError(
                "loss_top_k selects the TRB paper's divergence; TrOPDTrainer trains with TrOPD's objective "
                "(tropd_objective, tropd_top_k). Unset loss_top_k, or use TRBDistillConfig."
            )
        if self.veto_beta_start > 0:
            raise ValueError(
                "veto_beta_start > 0 changes the divergence's target; TrOPD does not use it. Set it to 0."
            )
        if self.sft_warmup_steps > 0:
            raise ValueError(
                "sft_warmup_steps > 0 is TRBDistillConfig's SFT-warmup baseline; TrOPD's guidance replaces it. Set it "
                "to 0."
            )

    @property
    def prefix_max_length(self) -> int:
        """Longest teacher prefix at step 0."""
        return self.tropd_prefix_max_length or self.max_completion_length

    @property
    def prefix_anneal_steps(self) -> int | None:
        """Step at which the longest teacher prefix reaches 0; None when it is the run's length and that comes from
        `num_train_epochs` (the trainer reads it from `state.max_steps` when training starts)."""
        return self.tropd_prefix_steps or (self.max_steps if self.max_steps > 0 else None)
