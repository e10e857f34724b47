import dataclasses
import textwrap

import torch

from .losses.divergences import reopold_stage
from .memory_preflight import RolloutPhase
from .schedules import cosine_prefix_length
from .trainer_base import ASSUMED_PROMPT_TOKENS, OPDTrainerBase
from .tropd_config import TrOPDConfig


# Token counts summed over a logging window: float64 (exact far past float32's 2**24), float32 where the device has
# no float64 (MPS).
_SUM_DTYPE = {False: torch.float64, True: torch.float32}
# The sums and counts `tropd_loss` reports, summed over micro-batches and then over processes once per log, in this
# order: every `tropd/*` fraction and mean is a ratio of totals, so each token weighs the same.
_RECORD_NAMES = (
    "trusted_tokens",
    "outlier_tokens",
    "continuation_tokens",
    "prefix_tokens",
    "reward_sum_trusted",
    "reward_sum_outlier",
    "selected_tokens",
    "switched_tokens",
    "clipped_tokens",
)
# The baselines' token fractions (of continuation tokens), each logged only where its objective has it.
_BASELINE_FRACTIONS = {
    "eopd": ("switched",),
    "entropy_top": ("selected",),
    "reopold": ("selected", "clipped"),
}


class TrOPDTrainer(OPDTrainerBase):
    r"""
    TrOPD's loss and off-policy guidance (Trust Region On-Policy Distillation, arXiv 2606.01249), on the base
    [`TRBDistillTrainer`] shares ([`OPDTrainerBase`]): the same rollout sources (so a warmup `rollout_policy` such as
    TRB shapes the student's tokens), with TrOPD's divergence and teacher-prefix source chosen from its config.

    What differs from [`TRBDistillTrainer`]:

    - The loss. On student tokens x the reward R = log pi_T(x) - log pi_S(x) drives a K1 policy-gradient term inside
      an adaptive trust region: x is trusted with probability min(1, pi_T(x) / pi_S(x)) (a detached draw per token
      and step); an outlier gets the teacher's top-k forward KL instead (`tropd_outlier`). `tropd_objective` selects
      the paper's ablation rows (vanilla K1, FKL alone, JSD; `tropd_outlier` and `tropd_outlier_detection` its Clip
      and Mask rows). Memory is O(tokens x k) on the teacher side; the student is projected chunk by chunk as in TRL.
    - The rollouts, while guidance is on: each trajectory is a teacher prefix of length l, drawn per sample up to a
      maximum that is cosine-annealed from `tropd_prefix_max_length` to 0 over `tropd_prefix_steps` (default: the
      run's optimizer steps, `state.max_steps`), continued by the student for at most `max_completion_length - l`
      tokens (through the parent's rollout, so a warmup `rollout_policy` such as TRB shapes the continuation).
      Prefix tokens get `tropd_guidance_weight` x the student's NLL of the teacher's token.
    - The loss-side baselines of the paper's comparison are objectives of this trainer (`tropd_objective` `"eopd"`,
      `"entropy_top"`, `"reopold"`), with the same rollouts, guidance and stop alignment.

    Stop tokens are aligned as in the parent (a teacher `<|im_end|>` in a prefix becomes the student's stop id, and
    the loss merges both models' stop mass). Logged per step: `tropd/trust_fraction`, `tropd/outlier_fraction`,
    `tropd/reward/trusted`, `tropd/reward/outlier` (mean reward of each region), `tropd/prefix_fraction` (share of
    trained tokens that are teacher prefix), all over the tokens of every micro-batch and process since the last log,
    and `tropd/prefix_max_length`, besides the parent's metrics (`grad_norm`). The baselines add
    `tropd/switched_fraction` (EOPD: tokens given the forward KL), `tropd/selected_fraction` (Entropy OPD, REOPOLD:
    tokens trained on), `tropd/clipped_fraction` (REOPOLD: rewards below the floor) and `reopold/exploration` (1 in
    REOPOLD 2Stage's first stage).
    """

    _tag_names = ["trl", "tropd", "trb-distill"]
    _name = "TrOPD"
    _paper = {
        "title": "TrOPD: Trust Region On-Policy Distillation",
        "id": "2606.01249",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{xing2026tropd,
                title        = {{TrOPD: Trust Region On-Policy Distillation}},
                author       = {Xing and Wang and Gao and Li and Tang},
                year         = 2026,
                eprint       = {arXiv:2606.01249},
            }"""),
    }

    def __init__(self, model, teacher_model=None, args: TrOPDConfig | None = None, *pargs, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = TrOPDConfig(f"{str(name).split('/')[-1]}-TrOPD", max_steps=200)
        if not isinstance(args, TrOPDConfig):
            raise TypeError(f"TrOPDTrainer needs a TrOPDConfig, got {type(args).__name__}.")
        super().__init__(model, teacher_model, args, *pargs, **kwargs)
        if self.teacher_model is None:
            raise ValueError("TrOPD's loss reads the teacher's log-probs; pass a local `teacher_model`.")
        if args.tropd_guidance and (self.tools or self._is_vlm):
            raise ValueError(
                "tropd_guidance does not support tool calling or vision-language models yet (a teacher prefix would "
                "have to carry tool turns or images); set tropd_guidance=False."
            )
        # Per mode ("train", "eval"): this process's sums of `_RECORD_NAMES` since the last log.
        self._tropd_sums: dict[str, torch.Tensor] = {}

    @property
    def prefix_anneal_steps(self) -> int:
        """T, the step at which the longest teacher prefix reaches 0: `tropd_prefix_steps`, else the run's length in
        optimizer steps (`state.max_steps`, which TRL's `Trainer` derives from `num_train_epochs` when `max_steps` is
        unset; before training starts, `max_steps`, or 0 (no prefixes) when the run is epoch-based)."""
        return self.args.prefix_anneal_steps or self.state.max_steps or 0

    def prefix_max_length_at(self, step: int) -> int:
        """The longest teacher prefix of the rollouts made at optimizer step `step` (0 without guidance)."""
        if not self.args.tropd_guidance:
            return 0
        return cosine_prefix_length(step, self.args.prefix_max_length, self.prefix_anneal_steps)

    def reopold_stage_at(self, step: int) -> str:
        """REOPOLD's stage at optimizer step `step`: `"exploration"` before `reopold_switch_step` (default: half the
        run) with `reopold_schedule="two_stage"`, `"refinement"` otherwise."""
        return reopold_stage(self.args, step, self.state.max_steps)

    @property
    def _tropd_records(self) -> dict | None:
        """The sums and counts the last micro-batch's loss reported (None before the first)."""
        return self._last_divergence.records if self._last_divergence is not None else None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._last_divergence = None
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Outside the wrapped forward, once per micro-batch: this process's sums, with no collective (`log` reduces).
        records = self._tropd_records or {}
        device = self.accelerator.device
        local = torch.stack(
            [
                torch.as_tensor(records.get(name, 0.0), dtype=_SUM_DTYPE[device.type == "mps"], device=device)
                for name in _RECORD_NAMES
            ]
        )
        mode = "train" if self.model.training else "eval"
        self._tropd_sums[mode] = self._tropd_sums[mode] + local if mode in self._tropd_sums else local
        return result

    def _log_tropd_metrics(self, mode: str) -> None:
        """Sum this process's records since the last log over processes (one gather) and log each ratio of totals.
        Every process computes the same number of losses between logs, so every process reaches the gather."""
        local = self._tropd_sums.pop(mode)
        totals = dict(zip(_RECORD_NAMES, self.accelerator.gather(local[None]).sum(0).tolist(), strict=True))
        metrics = self._metrics[mode]
        continuation, prefix = totals["continuation_tokens"], totals["prefix_tokens"]
        baseline = self.args.tropd_objective in _BASELINE_FRACTIONS  # no trust region: its own fractions instead
        if continuation > 0 and not baseline:
            metrics["tropd/trust_fraction"].append(totals["trusted_tokens"] / continuation)
            metrics["tropd/outlier_fraction"].append(totals["outlier_tokens"] / continuation)
        if totals["trusted_tokens"] > 0:
            metrics["tropd/reward/trusted"].append(totals["reward_sum_trusted"] / totals["trusted_tokens"])
        if totals["outlier_tokens"] > 0:
            metrics["tropd/reward/outlier"].append(totals["reward_sum_outlier"] / totals["outlier_tokens"])
        if continuation + prefix > 0:
            metrics["tropd/prefix_fraction"].append(prefix / (continuation + prefix))
        if continuation > 0:
            for name in _BASELINE_FRACTIONS.get(self.args.tropd_objective, ()):
                metrics[f"tropd/{name}_fraction"].append(totals[f"{name}_tokens"] / continuation)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        if mode in self._tropd_sums:
            self._log_tropd_metrics(mode)
        super().log(logs, start_time)

    def _rollout_memory_phases(self, prompt_tokens: int = ASSUMED_PROMPT_TOKENS) -> list[RolloutPhase]:
        """The parent's phases, plus guidance's: the teacher sampling prefixes of up to `prefix_max_length` tokens (in
        chunks of `rollout_generation_batch_size`), and every HF rollout continuing them, in calls of the same size. Each
        continuation row stops at its own remaining budget and the rows are sorted by budget, but a call is left-padded
        to its longest prompt + prefix and runs until its largest budget is spent: in the worst case (a call holding
        both a full-length and an empty prefix) it spans prompt + l_max + max_completion_length columns with uniform
        prefix lengths; with `"max"` (every continued prefix has length l_max) prompt + max_completion_length."""
        phases = super()._rollout_memory_phases(prompt_tokens)
        args = self.args
        if not args.tropd_guidance:
            return phases
        prefix = args.prefix_max_length
        extra = prefix if args.tropd_prefix_sampling == "uniform" else 0
        continuations = [
            dataclasses.replace(
                phase,
                phase=f"{phase.phase} continuing teacher prefixes",
                sequence_length=phase.sequence_length + extra,
                cache_length=phase.cache_length + extra if phase.cache_length else None,
            )
            for phase in phases
        ]
        generation_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
        chunk = min(generation_batch, args.rollout_generation_batch_size or generation_batch)
        # Continuations go in calls of `chunk` rows (sorted by budget); the width is still bounded by the worst call.
        continuations = [
            dataclasses.replace(phase, num_sequences=min(phase.num_sequences, chunk)) for phase in continuations
        ]
        prefixes = RolloutPhase("TrOPD teacher-prefix rollout", chunk, prompt_tokens + prefix, student_generates=False)
        return [prefixes, *continuations]
