import math
from dataclasses import dataclass, field

from ._compat import DistillationConfig
from .schedules import KL_BUDGET_SCHEDULES


@dataclass
class TRBDistillConfig(DistillationConfig):
    r"""
    Configuration class for the [`TRBDistillTrainer`].

    Extends [`~trl.DistillationConfig`] with the Trust-Region behaviour Blending (TRB) warmup. Every other field is
    the parent's and means the same thing; with `trb_epsilon=0` the trainer is exactly `DistillationTrainer`.

    Parameters:
        > Parameters that control the trust-region rollouts

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
        trb_gather_teacher_for_generation (`bool`, *optional*, defaults to `True`):
            DeepSpeed ZeRO-3 only, the teacher's counterpart of `ds3_gather_for_generation`: gather the teacher's
            parameters (and lift its ZeRO-3 hooks) for the length of each TRB rollout, so that no teacher forward
            needs a collective while ranks finish at different lengths. With `False` the teacher stays sharded and
            is stepped from the student's forward on every rank instead (slower, for teachers too large to gather).
        trb_generation_batch_size (`int`, *optional*):
            Maximum number of sequences per `generate` call during TRB rollouts. The parent generates a whole
            gradient-accumulation cycle at once; with the teacher's KV cache next to the student's, that may not fit.
            `None` generates everything at once, as the parent does.
        trb_memory_preflight (`str`, *optional*, defaults to `"error"`):
            Before training on GPU, estimate the rollout memory (both models' weights as held during the rollout,
            both KV caches, the student's training-state shard) against the device: `"error"` raises if it cannot fit
            and warns above 90%, `"warn"` only warns, `"off"` skips the check.
    """

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
    trb_gather_teacher_for_generation: bool = field(
        default=True,
        metadata={
            "help": "DeepSpeed ZeRO-3 only: gather the teacher's parameters for the length of each TRB rollout, so "
            "no teacher forward needs a collective while ranks finish at different lengths."
        },
    )

    trb_generation_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Maximum number of sequences per generate call during TRB rollouts (the teacher's KV cache sits "
            "next to the student's); None generates the whole generation batch at once, as the parent does."
        },
    )
    trb_memory_preflight: str = field(
        default="error",
        metadata={
            "help": "Estimate TRB rollout memory against the GPU before training: 'error' raises if it cannot fit "
            "(and warns above 90 percent), 'warn' only warns, 'off' skips.",
            "choices": ["error", "warn", "off"],
        },
    )

    def __post_init__(self):
        super().__post_init__()
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
        if self.trb_generation_batch_size is not None and self.trb_generation_batch_size < 1:
            raise ValueError(f"trb_generation_batch_size must be >= 1 or None, got {self.trb_generation_batch_size}.")
        if self.trb_memory_preflight not in ("error", "warn", "off"):
            raise ValueError(
                f"trb_memory_preflight must be 'error', 'warn' or 'off', got {self.trb_memory_preflight!r}."
            )
        if self.trb_epsilon > 0:
            num_beams = (self.generation_kwargs or {}).get("num_beams", 1) or 1
            if num_beams > 1:
                raise ValueError(
                    f"trb_epsilon > 0 does not support beam search (generation_kwargs num_beams={num_beams}): the "
                    "trust-region blend defines a sampling distribution per prefix. Remove num_beams, or set "
                    "trb_epsilon=0."
                )
            if self.temperature <= 0:
                raise ValueError(
                    f"trb_epsilon > 0 needs a sampling temperature > 0, got temperature={self.temperature}."
                )
