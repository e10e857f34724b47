import math
import os
import warnings
from dataclasses import dataclass, field

from ._compat import HAS_ACTIVATION_CHECKPOINTING, DistillationConfig, resolve_checkpointing_spelling
from .losses.top_k_divergence import TOP_K_ESTIMATORS
from .schedules import KL_BUDGET_SCHEDULES


# Where rollout prefixes come from during warmup; after it, every policy hands back to the parent's rollout.
ROLLOUT_POLICIES = ("trb", "fixed_epsilon", "skd", "temperature", "student")
# How trust-region rollouts are sampled: the logits processor (reference) or the speculative engine (same law).
ROLLOUT_ENGINES = ("processor", "speculative")
# Shared rollout knobs renamed from their TRB-only names: old -> new. The old names still work, with a FutureWarning.
RENAMED_FIELDS = {
    "trb_gather_teacher_for_generation": "gather_teacher_for_generation",
    "trb_generation_batch_size": "rollout_generation_batch_size",
    "trb_memory_preflight": "rollout_memory_preflight",
}
# Where the SFT-warmup phase saves the warmed-up student, under `output_dir`.
SFT_WARMUP_SUBDIR = "sft_warmup"
# The paper's system prompt (the Qwen3 recipes' `system_prompt`), which in-training evaluation prompts carry.
PAPER_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class TRBDistillConfig(DistillationConfig):
    r"""
    Configuration class for the [`TRBDistillTrainer`].

    Extends [`~trl.DistillationConfig`] with the Trust-Region behaviour Blending (TRB) warmup. Every other field is
    the parent's and means the same thing; with `trb_epsilon=0` the trainer is exactly `DistillationTrainer`.

    Parameters:
        > Parameters that choose the rollout policy (where warmup prefixes come from)

        rollout_policy (`str`, *optional*, defaults to `"trb"`):
            `"trb"`: trust-region blending with epsilon annealed by `trb_schedule` (the paper's method).
            `"fixed_epsilon"`: the same blend with a constant epsilon for the whole run (the paper's fixed-epsilon
            baseline; `trb_schedule` is set to `"constant"`). `"skd"`: interleaved teacher injection (SKD, the
            `skd_*` fields). `"temperature"`: temperature warmup (the `temperature_warmup_*` fields). `"student"`:
            plain student sampling at every step (vanilla OPD; the parent's rollout verbatim).

        > Parameters of every teacher-guided rollout (any policy that runs the teacher, and TrOPD's teacher prefixes)

        gather_teacher_for_generation (`bool`, *optional*, defaults to `True`):
            DeepSpeed ZeRO-3 only, the teacher's counterpart of `ds3_gather_for_generation`: gather the teacher's
            parameters (and lift its ZeRO-3 hooks) for the length of each teacher-guided rollout (TRB, fixed-epsilon,
            SKD, teacher prefixes), so that no teacher forward needs a collective while ranks finish at different
            lengths. With `False` the teacher stays sharded and is stepped from the student's forward on every rank
            instead (slower, for teachers too large to gather). Formerly `trb_gather_teacher_for_generation`.
        rollout_generation_batch_size (`int`, *optional*):
            Maximum number of sequences per `generate` call in teacher-guided rollouts. The parent generates a whole
            gradient-accumulation cycle at once; with the teacher's KV cache next to the student's, that may not fit.
            `None` generates everything at once, as the parent does. Formerly `trb_generation_batch_size`.
        rollout_memory_preflight (`str`, *optional*, defaults to `"error"`):
            Before training on GPU, estimate the memory of each kind of rollout the run makes (the models' weights
            as held during it, the KV caches of the models that decode, the student's training-state shard) against
            the device, whatever the trainer and policy: `"error"` raises if the largest cannot fit and warns above
            90%, `"warn"` only warns, `"off"` skips the check. Formerly `trb_memory_preflight`.
        trb_gather_teacher_for_generation (`bool`, *optional*):
            Deprecated spelling of `gather_teacher_for_generation`; still works, with a `FutureWarning`.
        trb_generation_batch_size (`int`, *optional*):
            Deprecated spelling of `rollout_generation_batch_size`; still works, with a `FutureWarning`.
        trb_memory_preflight (`str`, *optional*):
            Deprecated spelling of `rollout_memory_preflight`; still works, with a `FutureWarning`.

        > Parameters that control the trust-region rollouts (`"trb"`, `"fixed_epsilon"`)

        trb_epsilon (`float`, *optional*, defaults to `0.02`):
            Initial per-token KL budget epsilon_0 (nats): rollout tokens are drawn from the blend
            mu = pi_S^(1-beta) pi_T^beta with the largest beta keeping KL(mu || pi_S) <= epsilon. `0` disables TRB.
        trb_warmup_steps (`int`, *optional*, defaults to `50`):
            Number K of optimizer steps over which the `"linear"` schedule anneals epsilon to 0. From step K on,
            rollouts are the parent's plain student sampling and cost exactly what the parent costs.
        trb_schedule (`str`, *optional*, defaults to `"linear"`):
            KL-budget schedule over optimizer steps k: `"linear"` (the paper's warmup,
            epsilon_k = epsilon_0 (1 - k/K) for k < K, then 0) or `"constant"` (the fixed-epsilon baseline,
            epsilon_k = epsilon_0 at every step).
        trb_rollout_engine (`str`, *optional*, defaults to `"processor"`):
            How trust-region rollouts are sampled. `"processor"`: a logits processor inside `generate`, the teacher
            decoding one token per step next to the student (the reference). `"speculative"`: the same distribution,
            exactly, by speculative sampling: the student drafts `trb_draft_length` tokens, the teacher scores the
            block in one forward and each draft is accepted with probability min(1, mu*/pi_S) (docs/performance.md;
            HF `generate` settings limited to sampling/greedy, temperature, top-k/top-p/min-p and token bans).
        trb_draft_length (`int`, *optional*, defaults to `8`):
            `"speculative"` only: gamma, the number of student tokens drafted per teacher forward. At acceptance
            alpha (>= 1 - sqrt(epsilon / 2)) a round emits (1 - alpha^(gamma + 1)) / (1 - alpha) tokens per sequence
            for gamma + 1 student forwards and one teacher forward; rejected drafts stay (masked) in both KV caches.
        trb_adaptive_draft_length (`bool`, *optional*, defaults to `False`):
            `"speculative"` only: choose gamma (at most `trb_draft_length`) every round to maximise expected tokens
            per unit of cost, from the acceptance measured during the rollout and the teacher/student parameter
            ratio (the cost ratio of memory-bound decoding). Larger gamma as epsilon anneals and acceptance rises;
            still exact, and deterministic given the seed.

        > Parameters that control SKD's interleaved teacher injection (`"skd"`)

        skd_top_k (`int`, *optional*, defaults to `25`):
            K of the membership test: a token the student samples is kept if it is among the teacher's top-K tokens
            at that prefix, and otherwise replaced by a fresh teacher sample. The paper sweeps 15, 25 and 50.
        skd_teacher_temperature (`float`, *optional*, defaults to `1.0`):
            Temperature tau_T of the teacher distribution a replacement is drawn from. The paper sweeps 0.2, 0.6
            and 1.0.
        skd_steps (`int`, *optional*):
            Number of optimizer steps with teacher injection; `None` injects for the whole run (the paper's setting).

        > Parameters that control the temperature warmup (`"temperature"`)

        temperature_warmup_start (`float`, *optional*, defaults to `0.9`):
            Rollout temperature tau_0 at step 0; it rises linearly to `temperature` at `temperature_warmup_steps` and
            stays there. The paper sweeps 0.8, 0.9 and 0.95 (ending at 1.0). The loss keeps `temperature`.
        temperature_warmup_steps (`int`, *optional*, defaults to `25`):
            Optimizer step at which the rollout temperature reaches `temperature` (the paper: 15 or 25).

        > Parameters that control the Veto target (loss side, combines with any rollout policy)

        veto_beta_start (`float`, *optional*, defaults to `0.0`):
            Veto (arXiv 2601.07155): the loss compares the student with Q proportional to pi_T * pi_S^beta (target
            logits z_T + beta z_S, the student term detached) instead of pi_T, with beta decaying linearly from
            this value to 0. `0` disables Veto. The paper sweeps 0.2, 0.4, 0.6 and 0.8.
        veto_decay_steps (`int`, *optional*):
            Optimizer step at which beta reaches 0; `None` decays over the whole run (`max_steps`).

        > Parameters that control the SFT warmup (a supervised phase before on-policy distillation)

        sft_warmup_steps (`int`, *optional*, defaults to `0`):
            Before OPD, train the student with supervised fine-tuning for this many optimizer steps on teacher
            responses to exactly the prompts of the first `sft_warmup_steps` OPD steps (one teacher response in
            place of each of their rollouts, so as many sequences per step as OPD), then run OPD from the result.
            `0` disables it. The paper uses 15, 25 and 50 with the OPD learning rate. Run by `trb-trl train`.

        > Parameters for several teachers (multi-teacher OPD, MOPD; docs/multi_teacher.md)

        teacher_models (`dict[str, str]` or `str`, *optional*):
            Several teachers, `{name: model id or path}` (a JSON string on the command line). Each training row is
            scored and guided by the teacher its `teacher_id` column names (rows without one: `default_teacher`),
            in every rollout source and every loss, never an average. Replaces `teacher_model_name_or_path`. All
            teachers share the student's tokenizer (vocabulary sizes are checked); their stop ids may differ.
        teacher_models_init_kwargs (`dict[str, dict]` or `str`, *optional*):
            Per-teacher keyword arguments of `from_pretrained`, `{name: {...}}`, merged over
            `teacher_model_init_kwargs` (which every teacher gets).
        default_teacher (`str`, *optional*):
            The teacher of rows without a `teacher_id`; `None`: the first of `teacher_models`.
        teacher_offload (`bool`, *optional*, defaults to `False`):
            Keep the teachers in CPU memory and move to the accelerator only those a rollout or a loss needs, one at a
            time where the work allows (a loss) and together where it does not (a rollout that blends rows of several
            teachers in one decoding step). Trades host-device copies for device memory; not with DeepSpeed (its own
            parameter offload does this for ZeRO-3).

        > Parameters that control the loss

        loss_top_k (`int`, *optional*):
            Compare the two models on the student's top-k tokens only (the TRB paper trains every method with reverse
            KL over the student's top-16 support, "source = actor"), estimated as `loss_top_k_estimator` says; the
            stop alignment and Veto's target apply as in the full-vocabulary loss. The loss keeps k values per token
            instead of comparing two (tokens x V) tiles (memory and time: docs/performance.md). `None` (the default)
            keeps TRL's full-vocabulary divergence.
        loss_top_k_estimator (`str`, *optional*, defaults to `"policy_gradient"`):
            With `loss_top_k` only. `"policy_gradient"`: the paper's reference code; per token the value (logged as
            the loss) is the top-k reverse-KL estimate sum_{v in S} w_v (log pi_S(v) - log pi_T(v)) with
            full-vocabulary log-probs and w = pi_S renormalised over S (detached), and the gradient is
            sum_{v in S} w_v (log pi_S(v) - log pi_T(v)) grad log pi_S(v), reaching logits outside S through the
            normaliser; reverse KL only (`beta=1.0`). `"renormalized"`: both distributions renormalised over S and
            TRL's generalized JSD with `beta` between them, differentiated directly (gradient on S only).
            docs/baselines.md compares the two.

        > Parameters that control in-training math evaluation

        math_eval_benchmarks (`list[str]`, *optional*):
            Benchmarks scored on the current student during training by [`MathEvalCallback`]: registry names
            (`"gsm8k"`, `"math500"`, `"olympiadbench"`, `"amc"`, `"aime24"`, `"aime25"`), a paper suite (`"qwen3_1p7b"`,
            `"qwen3_0p6b"`) or local JSONL/parquet files with `problem` and `answer` columns. Comma-separated items are
            split; an unknown name is an error here. `None` turns in-training evaluation off. The scores are a cheap
            curve to pick checkpoints by; `trb-trl eval` on the saved checkpoints gives the final numbers.
        math_eval_steps (`int`, *optional*, defaults to `20`):
            Evaluate every this many optimizer steps (the paper evaluates every 20 and reports the checkpoint with the
            best suite mean), and at the last step.
        math_eval_on_start (`bool`, *optional*, defaults to `True`):
            Also evaluate the initial student at step 0 (not on a resumed run), the origin of every curve.
        math_eval_num_samples (`int`, *optional*, defaults to `4`):
            Completions per problem; pass@1 is the mean fraction correct. The paper's final numbers use 32 (GSM8K),
            64 (MATH500, OlympiadBench) and 512 (AMC, AIME).
        math_eval_max_problems (`int`, *optional*, defaults to `100`):
            Score only the first this many problems of each benchmark (the same ones at every evaluation). `None`
            scores all of them.
        math_eval_max_new_tokens (`int`, *optional*):
            Maximum completion length of an evaluation sample. `None` uses `max_completion_length`, so evaluation
            sees the budget training optimised (the paper evaluates with 8192).
        math_eval_temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature of evaluation samples (the paper's protocol: 1.0, top-p 1.0).
        math_eval_batch_size (`int`, *optional*):
            Sequences per `generate` call on each process. `None` uses `per_device_train_batch_size *
            gradient_accumulation_steps`, the number of sequences each process already generates per optimizer step.
        math_eval_system_prompt (`str`, *optional*, defaults to the paper's prompt):
            System message of evaluation prompts; keep it the training prompts' system message (`trb-trl train`'s
            `system_prompt`) so evaluation measures what training optimised. `None` renders the problem alone.
        math_eval_allow_code_execution (`bool`, *optional*, defaults to `False`):
            Allow code benchmarks (`"livecodebench_v6"`, local code files) among `math_eval_benchmarks`: grading them
            runs the programs the student writes on this machine. Without it, a code benchmark is an error before
            training starts.
    """

    # Dict-valued fields that may come as JSON strings (the command line); parsed in `__post_init__` as TRL's are.
    _VALID_DICT_FIELDS = DistillationConfig._VALID_DICT_FIELDS + ["teacher_models", "teacher_models_init_kwargs"]

    trb_epsilon: float = field(
        default=0.02,
        metadata={
            "help": "Initial per-token KL budget epsilon_0 (nats) of the trust-region behaviour policy: rollout "
            "tokens are drawn from mu = pi_S^(1-beta) pi_T^beta with the largest beta keeping KL(mu||pi_S) <= "
            "epsilon. 0 disables TRB."
        },
    )
    trb_warmup_steps: int = field(
        default=50,
        metadata={
            "help": "Number K of optimizer steps over which the 'linear' schedule anneals epsilon to 0; afterwards "
            "rollouts are plain student sampling."
        },
    )
    trb_schedule: str = field(
        default="linear",
        metadata={
            "help": "KL-budget schedule: 'linear' (epsilon_0 (1 - k/K) for k < K, then 0; the paper's warmup) or "
            "'constant' (epsilon_0 at every step; the fixed-epsilon baseline).",
            "choices": sorted(KL_BUDGET_SCHEDULES),
        },
    )
    gather_teacher_for_generation: bool = field(
        default=True,
        metadata={
            "help": "DeepSpeed ZeRO-3 only: gather the teacher's parameters for each teacher-guided rollout, so "
            "no teacher forward needs a collective while ranks finish at different lengths."
        },
    )
    rollout_generation_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Maximum number of sequences per generate call in teacher-guided rollouts (the teacher's KV "
            "cache sits next to the student's); None generates the whole generation batch at once, as the parent does."
        },
    )
    rollout_memory_preflight: str = field(
        default="error",
        metadata={
            "help": "Estimate the memory of each kind of rollout against the GPU before training: 'error' raises "
            "if one cannot fit (and warns above 90 percent), 'warn' only warns, 'off' skips.",
            "choices": ["error", "warn", "off"],
        },
    )
    trb_gather_teacher_for_generation: bool | None = field(
        default=None, metadata={"help": "Deprecated: use gather_teacher_for_generation."}
    )
    trb_generation_batch_size: int | None = field(
        default=None, metadata={"help": "Deprecated: use rollout_generation_batch_size."}
    )
    trb_memory_preflight: str | None = field(
        default=None, metadata={"help": "Deprecated: use rollout_memory_preflight."}
    )
    trb_rollout_engine: str = field(
        default="processor",
        metadata={
            "help": "How trust-region rollouts are sampled: 'processor' (a logits processor in generate, the teacher "
            "one token per step; the reference) or 'speculative' (the same distribution exactly: the student drafts "
            "trb_draft_length tokens, the teacher verifies each block in one forward).",
            "choices": list(ROLLOUT_ENGINES),
        },
    )
    trb_draft_length: int = field(
        default=8,
        metadata={
            "help": "Speculative engine: student tokens drafted per teacher forward (gamma); the largest gamma with "
            "trb_adaptive_draft_length."
        },
    )
    trb_adaptive_draft_length: bool = field(
        default=False,
        metadata={
            "help": "Speculative engine: choose gamma <= trb_draft_length each round from the measured acceptance "
            "and the teacher/student parameter ratio (expected tokens per unit of memory-bound cost)."
        },
    )

    rollout_policy: str = field(
        default="trb",
        metadata={
            "help": "Where warmup prefixes come from: 'trb' (annealed trust-region blend), 'fixed_epsilon' (the "
            "blend with a constant epsilon), 'skd' (interleaved teacher injection), 'temperature' (temperature "
            "warmup) or 'student' (vanilla OPD).",
            "choices": list(ROLLOUT_POLICIES),
        },
    )
    skd_top_k: int = field(
        default=25,
        metadata={
            "help": "SKD: keep a student token if it is among the teacher's top-K at that prefix, else replace it "
            "with a teacher sample (paper sweep: 15, 25, 50)."
        },
    )
    skd_teacher_temperature: float = field(
        default=1.0,
        metadata={"help": "SKD: temperature of the teacher distribution replacements are drawn from (0.2, 0.6, 1.0)."},
    )
    skd_steps: int | None = field(
        default=None,
        metadata={"help": "SKD: number of optimizer steps with teacher injection; None for the whole run."},
    )
    temperature_warmup_start: float = field(
        default=0.9,
        metadata={
            "help": "Temperature warmup: rollout temperature at step 0, rising linearly to `temperature` (paper: "
            "0.8, 0.9, 0.95)."
        },
    )
    temperature_warmup_steps: int = field(
        default=25,
        metadata={"help": "Temperature warmup: the step at which the rollout temperature reaches `temperature`."},
    )
    veto_beta_start: float = field(
        default=0.0,
        metadata={
            "help": "Veto: initial weight beta of the target pi_T * pi_S^beta (student term detached), decaying "
            "linearly to 0; 0 disables Veto (paper: 0.2, 0.4, 0.6, 0.8)."
        },
    )
    veto_decay_steps: int | None = field(
        default=None,
        metadata={"help": "Veto: the step at which beta reaches 0; None decays over the whole run (max_steps)."},
    )
    sft_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "SFT warmup: supervised steps on teacher responses to the prompts of the first N OPD steps, "
            "run before OPD by `trb-trl train`; 0 disables it (paper: 15, 25, 50)."
        },
    )
    loss_top_k: int | None = field(
        default=None,
        metadata={
            "help": "Divergence over the student's top-k tokens (the TRB paper: reverse KL, k=16), estimated as "
            "loss_top_k_estimator says; None keeps TRL's full-vocabulary divergence."
        },
    )
    loss_top_k_estimator: str = field(
        default="policy_gradient",
        metadata={
            "help": "With loss_top_k: 'policy_gradient' (the TRB paper's form: full-vocabulary log-probs on the "
            "student's top-k, weights renormalised there and detached; reverse KL, beta=1) or 'renormalized' (both "
            "distributions renormalised over the top-k, TRL's generalized JSD with beta).",
            "choices": list(TOP_K_ESTIMATORS),
        },
    )
    teacher_models: dict[str, str] | str | None = field(
        default=None,
        metadata={
            "help": "Several teachers, {name: model id or path} (JSON on the command line); each row's teacher_id "
            "column picks its teacher. Replaces teacher_model_name_or_path."
        },
    )
    teacher_models_init_kwargs: dict[str, dict] | str | None = field(
        default=None,
        metadata={"help": "Per-teacher from_pretrained kwargs, {name: {...}}, merged over teacher_model_init_kwargs."},
    )
    default_teacher: str | None = field(
        default=None, metadata={"help": "Teacher of rows without a teacher_id; None: the first of teacher_models."}
    )
    teacher_offload: bool = field(
        default=False,
        metadata={
            "help": "Keep the teachers in CPU memory and move to the accelerator only those a rollout or loss needs "
            "(not with DeepSpeed)."
        },
    )
    math_eval_benchmarks: list[str] | None = field(
        default=None,
        metadata={
            "help": "In-training evaluation: benchmark names (gsm8k, math500, olympiadbench, amc, aime24, aime25), a "
            "paper suite (qwen3_1p7b, qwen3_0p6b) or local JSONL/parquet files with problem/answer columns; None "
            "turns it off."
        },
    )
    math_eval_steps: int = field(
        default=20,
        metadata={"help": "In-training evaluation every this many optimizer steps, and at the last step (paper: 20)."},
    )
    math_eval_on_start: bool = field(
        default=True,
        metadata={"help": "In-training evaluation: also score the initial student at step 0 (not when resuming)."},
    )
    math_eval_num_samples: int = field(
        default=4,
        metadata={"help": "In-training evaluation: completions per problem (pass@1 = mean fraction correct)."},
    )
    math_eval_max_problems: int | None = field(
        default=100,
        metadata={"help": "In-training evaluation: the first N problems of each benchmark; None scores all of them."},
    )
    math_eval_max_new_tokens: int | None = field(
        default=None,
        metadata={"help": "In-training evaluation: maximum completion length; None uses max_completion_length."},
    )
    math_eval_temperature: float = field(
        default=1.0,
        metadata={"help": "In-training evaluation: sampling temperature (the paper's protocol: 1.0, top-p 1.0)."},
    )
    math_eval_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "In-training evaluation: sequences per generate call on each process; None uses "
            "per_device_train_batch_size * gradient_accumulation_steps."
        },
    )
    math_eval_system_prompt: str | None = field(
        default=PAPER_SYSTEM_PROMPT,
        metadata={
            "help": "In-training evaluation: system message of the prompts; keep it the training prompts' system "
            "message. None renders the problem alone."
        },
    )
    math_eval_allow_code_execution: bool = field(
        default=False,
        metadata={
            "help": "In-training evaluation: allow code benchmarks (livecodebench_v6, local code files), whose grading "
            "runs the programs the student writes on this machine; without it they are an error."
        },
    )
    if not HAS_ACTIVATION_CHECKPOINTING:  # the new spelling on a transformers that only knows the old one
        activation_checkpointing: bool | None = field(
            default=None, metadata={"help": "Alias of `gradient_checkpointing` (its name in newer transformers)."}
        )
        activation_checkpointing_kwargs: dict | None = field(
            default=None,
            metadata={"help": "Alias of `gradient_checkpointing_kwargs` (its name in newer transformers)."},
        )

    @property
    def sft_warmup_dir(self) -> str:
        """Where the SFT-warmup phase saves the warmed-up student (and its trainer state): `<output_dir>/sft_warmup`."""
        return os.path.join(self.output_dir, SFT_WARMUP_SUBDIR)

    @property
    def uses_trust_region(self) -> bool:
        """Whether rollouts blend with the teacher at some step (the trust-region policies with epsilon > 0)."""
        return self.rollout_policy in ("trb", "fixed_epsilon") and self.trb_epsilon > 0

    @property
    def needs_teacher_in_rollout(self) -> bool:
        """Whether some warmup rollout runs the teacher next to the student."""
        return self.uses_trust_region or self.rollout_policy == "skd"

    def __post_init__(self):
        resolve_checkpointing_spelling(self)  # either spelling, no deprecation warning, on any transformers
        self._resolve_renamed_fields()
        super().__post_init__()
        if self.rollout_policy not in ROLLOUT_POLICIES:
            raise ValueError(f"rollout_policy must be one of {list(ROLLOUT_POLICIES)}, got {self.rollout_policy!r}.")
        if self.rollout_policy == "fixed_epsilon":
            self.trb_schedule = "constant"
        if not (isinstance(self.trb_epsilon, int | float) and math.isfinite(self.trb_epsilon)) or self.trb_epsilon < 0:
            raise ValueError(
                f"trb_epsilon must be a finite number >= 0 (a per-token KL budget in nats), got {self.trb_epsilon}. "
                "The paper uses values between 0.001 and 0.05; 0 disables TRB."
            )
        if not isinstance(self.trb_warmup_steps, int) or self.trb_warmup_steps < 1:
            raise ValueError(
                f"trb_warmup_steps must be an integer >= 1 (optimizer steps of warmup), got {self.trb_warmup_steps}."
            )
        if self.trb_schedule not in KL_BUDGET_SCHEDULES:
            raise ValueError(f"trb_schedule must be one of {sorted(KL_BUDGET_SCHEDULES)}, got {self.trb_schedule!r}.")
        if self.rollout_generation_batch_size is not None and self.rollout_generation_batch_size < 1:
            raise ValueError(
                f"rollout_generation_batch_size must be >= 1 or None, got {self.rollout_generation_batch_size}."
            )
        if self.rollout_memory_preflight not in ("error", "warn", "off"):
            raise ValueError(
                f"rollout_memory_preflight must be 'error', 'warn' or 'off', got {self.rollout_memory_preflight!r}."
            )
        self._check_policy_fields()
        self._check_rollout_engine_fields()
        self._check_math_eval_fields()
        self._check_teacher_fields()
        if self.uses_trust_region or self.rollout_policy in ("skd", "temperature"):
            active = "trb_epsilon > 0" if self.uses_trust_region else f"rollout_policy={self.rollout_policy!r}"
            num_beams = (self.generation_kwargs or {}).get("num_beams", 1) or 1
            if num_beams > 1:
                raise ValueError(
                    f"{active} does not support beam search (generation_kwargs num_beams={num_beams}): the warmup "
                    "policy defines a sampling distribution per prefix. Remove num_beams, or set "
                    "rollout_policy='student'."
                )
            if self.temperature <= 0:
                raise ValueError(f"{active} needs a sampling temperature > 0, got temperature={self.temperature}.")

    @property
    def teacher_names(self) -> list[str]:
        """The teachers' names, in `teacher_models` order ([] with a single `teacher_model`)."""
        return list(self.teacher_models or {})

    @property
    def routing_teacher(self) -> str | None:
        """The teacher of rows without a `teacher_id` (None with a single teacher)."""
        return self.default_teacher or (self.teacher_names[0] if self.teacher_models else None)

    def _check_teacher_fields(self) -> None:
        """Several teachers: names, the default, their init kwargs, and what they cannot be combined with yet."""
        if self.teacher_models is None:  # teachers may still come as the trainer's `teacher_models` argument
            return
        if not isinstance(self.teacher_models, dict) or not self.teacher_models:
            raise ValueError(
                f"teacher_models must be a non-empty mapping {{name: model id or path}}, got {self.teacher_models!r}."
            )
        for name, source in self.teacher_models.items():
            if not isinstance(name, str) or not name.strip() or "/" in name:
                raise ValueError(f"teacher_models names must be non-empty strings without '/', got {name!r}.")
            if not isinstance(source, str) or not source:
                raise ValueError(f"teacher_models[{name!r}] must be a model id or path, got {source!r}.")
        if self.teacher_model_name_or_path is not None:
            raise ValueError(
                "teacher_model_name_or_path and teacher_models are both set; name every teacher in teacher_models "
                "(a single teacher there is the same as teacher_model_name_or_path)."
            )
        if self.default_teacher is not None and self.default_teacher not in self.teacher_models:
            raise ValueError(
                f"default_teacher={self.default_teacher!r} is not one of teacher_models ({self.teacher_names})."
            )
        extra = self.teacher_models_init_kwargs or {}
        if not isinstance(extra, dict) or any(not isinstance(value, dict) for value in extra.values()):
            raise ValueError(f"teacher_models_init_kwargs must be {{name: {{...}}}}, got {extra!r}.")
        unknown = sorted(set(extra) - set(self.teacher_models))
        if unknown:
            raise ValueError(f"teacher_models_init_kwargs names {unknown}, which are not in teacher_models.")
        if self.sft_warmup_steps > 0:
            raise ValueError(
                "teacher_models with sft_warmup_steps > 0 is not supported yet (the SFT phase samples one teacher's "
                "responses); set sft_warmup_steps=0."
            )
        if self.uses_trust_region and self.trb_rollout_engine == "speculative":
            raise ValueError(
                "teacher_models with trb_rollout_engine='speculative' is not supported yet (the engine verifies with "
                "one teacher); use trb_rollout_engine='processor'."
            )

    def _resolve_renamed_fields(self) -> None:
        """The old `trb_*` spellings of the shared rollout knobs set the new fields, with a `FutureWarning`; both
        spellings with different values is an error."""
        for old, new in RENAMED_FIELDS.items():
            value = getattr(self, old)
            if value is None:
                continue
            default = type(self).__dataclass_fields__[new].default
            if getattr(self, new) != default and getattr(self, new) != value:
                raise ValueError(
                    f"{old}={value!r} and {new}={getattr(self, new)!r} both set: {old} is the old name of {new}; "
                    f"keep only {new}."
                )
            warnings.warn(f"{old} is deprecated; use {new} (same meaning).", FutureWarning, stacklevel=4)
            setattr(self, new, value)
            setattr(self, old, None)

    def _check_policy_fields(self) -> None:
        """One clear error per invalid SKD, temperature-warmup, Veto or SFT-warmup value."""
        if not isinstance(self.skd_top_k, int) or self.skd_top_k < 1:
            raise ValueError(f"skd_top_k must be an integer >= 1 (the teacher's top-K set), got {self.skd_top_k}.")
        if not (_is_finite(self.skd_teacher_temperature) and self.skd_teacher_temperature > 0):
            raise ValueError(f"skd_teacher_temperature must be > 0, got {self.skd_teacher_temperature}.")
        if self.skd_steps is not None and (not isinstance(self.skd_steps, int) or self.skd_steps < 1):
            raise ValueError(f"skd_steps must be an integer >= 1 or None (the whole run), got {self.skd_steps}.")
        if not (_is_finite(self.temperature_warmup_start) and self.temperature_warmup_start > 0):
            raise ValueError(f"temperature_warmup_start must be > 0, got {self.temperature_warmup_start}.")
        if not isinstance(self.temperature_warmup_steps, int) or self.temperature_warmup_steps < 1:
            raise ValueError(f"temperature_warmup_steps must be an integer >= 1, got {self.temperature_warmup_steps}.")
        if not (_is_finite(self.veto_beta_start) and self.veto_beta_start >= 0):
            raise ValueError(
                f"veto_beta_start must be a finite number >= 0 (0 disables Veto), got {self.veto_beta_start}."
            )
        if self.veto_decay_steps is not None and (
            not isinstance(self.veto_decay_steps, int) or self.veto_decay_steps < 1
        ):
            raise ValueError(
                f"veto_decay_steps must be an integer >= 1 or None (the whole run), got {self.veto_decay_steps}."
            )
        if self.veto_beta_start > 0 and self.veto_decay_steps is None and self.max_steps <= 0:
            raise ValueError(
                "veto_beta_start > 0 decays over the whole run, which needs max_steps > 0; set max_steps or "
                "veto_decay_steps."
            )
        if self.loss_top_k is not None and (not isinstance(self.loss_top_k, int) or self.loss_top_k < 1):
            raise ValueError(
                f"loss_top_k must be an integer >= 1 (the student's top-k support) or None, got {self.loss_top_k}."
            )
        if self.loss_top_k_estimator not in TOP_K_ESTIMATORS:
            raise ValueError(
                f"loss_top_k_estimator must be one of {list(TOP_K_ESTIMATORS)}, got {self.loss_top_k_estimator!r}."
            )
        if self.loss_top_k is not None and self.loss_top_k_estimator == "policy_gradient" and self.beta != 1.0:
            raise ValueError(
                f"loss_top_k_estimator='policy_gradient' is the TRB paper's top-k reverse KL, so it needs beta=1.0 "
                f"(got beta={self.beta}); set loss_top_k_estimator='renormalized' for TRL's generalized JSD on the "
                "top-k support."
            )
        if not isinstance(self.sft_warmup_steps, int) or self.sft_warmup_steps < 0:
            raise ValueError(f"sft_warmup_steps must be an integer >= 0 (0 disables it), got {self.sft_warmup_steps}.")

    def _check_rollout_engine_fields(self) -> None:
        """The speculative engine samples the trust-region blend with HF models only, with plain sampling."""
        if self.trb_rollout_engine not in ROLLOUT_ENGINES:
            raise ValueError(
                f"trb_rollout_engine must be one of {list(ROLLOUT_ENGINES)}, got {self.trb_rollout_engine!r}."
            )
        if not isinstance(self.trb_draft_length, int) or self.trb_draft_length < 1:
            raise ValueError(
                f"trb_draft_length must be an integer >= 1 (tokens drafted per round), got {self.trb_draft_length}."
            )
        if self.trb_rollout_engine != "speculative":
            return
        if not self.uses_trust_region:
            raise ValueError(
                "trb_rollout_engine='speculative' samples the trust-region blend, so it needs rollout_policy 'trb' or "
                f"'fixed_epsilon' with trb_epsilon > 0 (got rollout_policy={self.rollout_policy!r}, trb_epsilon="
                f"{self.trb_epsilon}). Use trb_rollout_engine='processor'."
            )
        if self.use_vllm:
            raise ValueError(
                "trb_rollout_engine='speculative' drafts with the HF student, not with vLLM; set use_vllm=False or "
                "use trb_rollout_engine='processor'."
            )
        generation_kwargs = self.generation_kwargs or {}
        num_beams = generation_kwargs.get("num_beams", 1) or 1
        if num_beams > 1:
            raise ValueError(
                f"trb_rollout_engine='speculative' samples (or decodes greedily); it does not support beam search "
                f"(generation_kwargs num_beams={num_beams})."
            )
        repetition_penalty = generation_kwargs.get("repetition_penalty", self.repetition_penalty)
        if repetition_penalty not in (None, 1.0):
            raise ValueError(
                f"trb_rollout_engine='speculative' does not support repetition_penalty={repetition_penalty} (a logits "
                "processor it does not reproduce); set it to 1.0 or use trb_rollout_engine='processor'."
            )

    def _check_math_eval_fields(self) -> None:
        """One clear error per invalid in-training evaluation value; benchmark names are resolved here, so a typo fails
        before any model is loaded."""
        if not isinstance(self.math_eval_steps, int) or self.math_eval_steps < 1:
            raise ValueError(f"math_eval_steps must be an integer >= 1 (optimizer steps), got {self.math_eval_steps}.")
        if not isinstance(self.math_eval_num_samples, int) or self.math_eval_num_samples < 1:
            raise ValueError(f"math_eval_num_samples must be an integer >= 1, got {self.math_eval_num_samples}.")
        for name in ("math_eval_max_problems", "math_eval_max_new_tokens", "math_eval_batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value}.")
        if not (_is_finite(self.math_eval_temperature) and self.math_eval_temperature > 0):
            raise ValueError(f"math_eval_temperature must be > 0, got {self.math_eval_temperature}.")
        if self.math_eval_benchmarks is None:
            return
        items = (
            [self.math_eval_benchmarks] if isinstance(self.math_eval_benchmarks, str) else self.math_eval_benchmarks
        )
        text = ",".join(str(item).strip() for item in items if str(item).strip())
        if not text:
            raise ValueError("math_eval_benchmarks is empty; name at least one benchmark, or leave it unset (None).")
        from .evaluation.benchmarks import parse_benchmarks, registry_kind
        from .evaluation.graders import require_code_execution

        try:
            self.math_eval_benchmarks = parse_benchmarks(text)
            require_code_execution(
                [(name, registry_kind(name)) for name in self.math_eval_benchmarks],
                self.math_eval_allow_code_execution,
                flag="math_eval_allow_code_execution=True",
            )
        except ValueError as error:
            raise ValueError(f"math_eval_benchmarks: {error}") from None


def _is_finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
