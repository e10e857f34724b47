import contextlib
import dataclasses
import functools
import os
import textwrap

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList
from transformers.utils import logging

from ._compat import DistillationTrainer, divergence_function_replaced
from .losses.stop_aligned_divergence import stop_aligned_divergence_loss
from .losses.top_k_divergence import top_k_divergence_loss
from .memory_preflight import (
    RolloutMemoryEstimate,
    RolloutPhase,
    check_rollout_memory,
    count_parameters,
    estimate_rollout_memory,
    speculative_cache_length,
)
from .rollout import (
    SPECULATIVE_METRICS,
    TEACHER_INJECTION_METRICS,
    TRUST_REGION_METRICS,
    RolloutStatistics,
    RolloutTemperatureProcessor,
    SpeculativeBlendingSampler,
    TeacherInjectionProcessor,
    TrustRegionBlendingProcessor,
    output_vocab_size,
)
from .rollout.row_budget import RowBudgetCriteria
from .schedules import active_for, kl_budget, rollout_temperature, veto_weight
from .stop_alignment import StopAlignment, as_id_list, cut_at_stop
from .trb_distill_config import TRBDistillConfig
from .zero3 import gathered_without_hooks


logger = logging.get_logger(__name__)
# The preflight cannot know prompt lengths before data is read; it assumes this many prompt tokens per sequence.
ASSUMED_PROMPT_TOKENS = 1024
# How many beta values each process contributes to the W&B histogram per logged step.
_HISTOGRAM_SAMPLES_PER_PROCESS = 4096


def _put_wandb_runs_under(output_dir: str) -> None:
    """Point W&B's run directory at `output_dir` (the W&B callback reads `WANDB_DIR`), unless the user set it."""
    global _wandb_dir_we_set
    if os.environ.get("WANDB_DIR") not in (None, _wandb_dir_we_set):
        return
    os.makedirs(output_dir, exist_ok=True)
    _wandb_dir_we_set = os.environ["WANDB_DIR"] = os.path.abspath(output_dir)


_wandb_dir_we_set: str | None = None


def _warn_unless_sft_warmed(model, args: TRBDistillConfig) -> None:
    """The trainer runs OPD only; the SFT phase runs before it (`trb-trl train`). Say so when the student given does
    not come from that phase, rather than ignore `sft_warmup_steps` silently."""
    from .sft_warmup import sft_warmup_dir

    name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
    if os.path.abspath(str(name)) != os.path.abspath(sft_warmup_dir(args)):
        logger.warning(
            f"sft_warmup_steps={args.sft_warmup_steps}, but TRBDistillTrainer trains OPD only and this student does not "
            f"come from {sft_warmup_dir(args)}. Run the SFT phase first (`trb-trl train`, or "
            "`trb_trl.sft_warmup.run_sft_warmup`) and pass its checkpoint as `model`, or set sft_warmup_steps=0."
        )


class TRBDistillTrainer(DistillationTrainer):
    r"""
    [`~trl.DistillationTrainer`] with warmup rollout policies: Trust-Region behaviour Blending (TRB) and the baselines
    it is compared with.

    Same constructor and behaviour as the parent, except where rollout prefixes come from during warmup
    (`rollout_policy`) and, with Veto, the loss target:

    - `"trb"`: during the first `trb_warmup_steps` optimizer steps, completions are sampled from
      mu = pi_S^(1-beta) pi_T^beta with the largest beta keeping KL(mu || pi_S) <= epsilon_k
      ([`TrustRegionBlendingProcessor`], the teacher running next to the student inside `generate`); epsilon_k follows
      `trb_schedule`. `"fixed_epsilon"`: the same blend with a constant epsilon for the whole run.
    - `"skd"`: SKD's interleaved teacher injection ([`TeacherInjectionProcessor`]) for `skd_steps` steps or the run.
    - `"temperature"`: rollouts at a temperature rising linearly to `temperature` ([`RolloutTemperatureProcessor`]).
    - `"student"`: the parent's rollouts at every step (vanilla OPD).
    - `veto_beta_start > 0` (any policy): the divergence compares the student with Q proportional to
      pi_T * pi_S^beta_k (student term detached), beta_k decaying linearly to 0.

    Schedules read `state.global_step`, so every micro-batch of one gradient-accumulation cycle shares a value and a
    resumed run continues them. Whenever a policy is inactive at a step, and in evaluation, the parent's rollout runs
    verbatim (including its vLLM path; warmup rollouts use transformers' `generate`). The data pipeline, PEFT, tools,
    logging and saving are the parent's.

    Stop tokens: when the teacher stops on ids the student does not (an instruct teacher's `<|im_end|>`, a Base
    student's `<|endoftext|>`), both the rollout and the loss see one "stop" event: the teacher's stop mass is moved
    onto the student's stop id before blending or injecting, and both models' stop mass is merged the same way before
    the divergence (at every step). When the two share their stop ids and Veto is off, the loss is the parent's.

    Logged per step (rollout statistics reduced over processes once per log): `trb/epsilon`,
    `trb/beta/{mean,min,max}`, `trb/teacher_fraction`, `trb/kl_to_student/{mean,max}`, `trb/kl_to_teacher/mean`,
    `trb/teacher_invalid_fraction`, `trb/rollout_teacher_seconds` and a W&B histogram of beta (TRB, fixed-epsilon);
    `skd/active`, `skd/replacement_rate`, `skd/replacement_probability`, `skd/teacher_invalid_fraction`,
    `skd/rollout_teacher_seconds` (SKD); `rollout/temperature` (temperature warmup); `veto/beta` (Veto). With
    `math_eval_benchmarks` set, a [`~evaluation.MathEvalCallback`] scores the student on math benchmarks every
    `math_eval_steps` steps (`eval/<benchmark>/pass@1`, `eval/math/mean_pass@1`) and keeps the best step.
    """

    _tag_names = ["trl", "trb-distill"]
    _name = "TRB Distill"
    _paper = {
        "title": "Trust-Region Behavior Blending for On-Policy Distillation",
        "id": "2605.31159",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{plyusov2026trust,
                title        = {{Trust-Region Behavior Blending for On-Policy Distillation}},
                author       = {Plyusov and Gorbatovski and Malakhov and Balagansky and Shaposhnikov and Korotyshova and Gavrilov},
                year         = 2026,
                eprint       = {arXiv:2605.31159},
            }"""),
    }

    def __init__(self, model, teacher_model=None, args: TRBDistillConfig | None = None, *pargs, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = TRBDistillConfig(f"{str(name).split('/')[-1]}-TRB-Distillation")
        if not isinstance(args, TRBDistillConfig):
            raise TypeError(f"TRBDistillTrainer needs a TRBDistillConfig, got {type(args).__name__}.")
        report_to_wandb = "wandb" in (args.report_to or [])
        if args.sft_warmup_steps > 0:
            _warn_unless_sft_warmed(model, args)
        if report_to_wandb:
            _put_wandb_runs_under(args.output_dir)
        super().__init__(model, teacher_model, args, *pargs, **kwargs)
        if self.teacher_model is None and (args.needs_teacher_in_rollout or args.veto_beta_start > 0):
            raise ValueError(
                f"rollout_policy={args.rollout_policy!r} with trb_epsilon={args.trb_epsilon} and veto_beta_start="
                f"{args.veto_beta_start} needs a local teacher model; pass `teacher_model`."
            )
        if self._is_vlm and args.needs_teacher_in_rollout:
            raise ValueError(
                f"rollout_policy={args.rollout_policy!r} (trb_epsilon={args.trb_epsilon}) does not support "
                "vision-language models yet: the teacher's forward inside `generate` does not receive the images. "
                "Use rollout_policy='student' (plain on-policy distillation) or 'temperature'."
            )
        if args.rollout_policy == "skd":
            self._check_skd_sampling_settings()
        self._trb_vocab_size = len(self._tokenizer)
        if self.teacher_model is not None:
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            for role, net in (("student", self.accelerator.unwrap_model(self.model)), ("teacher", teacher)):
                if output_vocab_size(net) < self._trb_vocab_size:
                    raise ValueError(
                        f"The tokenizer has {self._trb_vocab_size} tokens but the {role} only scores "
                        f"{output_vocab_size(net)}: student and teacher must share the student's tokenizer."
                    )
            self._trb_teacher_eos_token_ids = as_id_list(teacher.generation_config.eos_token_id)
        # One stop event in rollouts and loss; None when the two models already stop on the same ids.
        self._trb_student_stop_ids = list(self.eos_token_ids)
        self._trb_stop_alignment = (
            StopAlignment.between(self._trb_student_stop_ids, self._trb_teacher_eos_token_ids)
            if self.teacher_model is not None
            else None
        )
        if self._trb_stop_alignment is not None:
            self._stop_rollouts_on_merged_ids(self._trb_stop_alignment)
        self._rollout_statistics = self._make_rollout_statistics(report_to_wandb)
        if args.math_eval_benchmarks:  # in-training evaluation on math benchmarks (docs/evaluation.md)
            from .evaluation.callback import MathEvalCallback

            self.add_callback(MathEvalCallback(self))
        if self.accelerator.device.type == "cuda":  # every trainer and policy: what its rollouts hold
            self._check_rollout_memory()

    def _stop_rollouts_on_merged_ids(self, alignment: StopAlignment) -> None:
        """Make the teacher's stop ids stop every rollout, the parent's included (after warmup, at epsilon 0, in
        evaluation): the loss merges them into the student's stop, so a Base student that writes `<|im_end|>` has
        stopped. `generate` (and vLLM) stop on them; `_generate_single_turn` writes the student's stop id instead."""
        stop_ids = [*self.eos_token_ids, *(i for i in alignment.merged_ids if i not in self.eos_token_ids)]
        self.eos_token_ids = stop_ids  # the parent's completion mask and clipped-ratio metric read it
        self.generation_config.eos_token_id = list(stop_ids)
        self.generation_kwargs["eos_token_id"] = list(stop_ids)
        vllm_kwargs = getattr(getattr(self, "vllm_generation", None), "generation_kwargs", None)
        if isinstance(vllm_kwargs, dict):  # vLLM's SamplingParams stops on these as well
            vllm_kwargs["stop_token_ids"] = sorted({*vllm_kwargs.get("stop_token_ids", []), *alignment.merged_ids})

    def _make_rollout_statistics(self, report_to_wandb: bool) -> RolloutStatistics | None:
        """The per-token statistics of the policy's teacher-guided rollouts (None when it never consults the teacher)."""
        args = self.args
        if args.uses_trust_region:
            metrics, prefix, histogram = TRUST_REGION_METRICS, "trb", (lambda s: s["beta"])
            if args.trb_rollout_engine == "speculative":
                metrics = TRUST_REGION_METRICS + SPECULATIVE_METRICS
        elif args.rollout_policy == "skd":
            metrics, prefix, histogram = TEACHER_INJECTION_METRICS, "skd", None
        else:
            return None
        return RolloutStatistics(
            self.accelerator.device,
            metrics,
            prefix=prefix,
            histogram=histogram,
            histogram_samples=_HISTOGRAM_SAMPLES_PER_PROCESS if report_to_wandb else 0,
            seed=args.seed,
        )

    def _check_skd_sampling_settings(self) -> None:
        """SKD draws the student's token itself with generate's temperature, top-k, top-p and min-p; other sampling
        warpers would be silently ignored, so they are refused."""
        config = self.generation_config
        unsupported = {
            "typical_p": config.typical_p is not None and config.typical_p < 1.0,
            "epsilon_cutoff": bool(config.epsilon_cutoff),
            "eta_cutoff": bool(config.eta_cutoff),
            "top_h": getattr(config, "top_h", None) is not None,
        }
        named = [name for name, used in unsupported.items() if used]
        if named:
            raise ValueError(
                f"rollout_policy='skd' supports the sampling settings temperature, top_k, top_p and min_p; remove "
                f"{named} from generation_kwargs."
            )

    def _check_rollout_memory(self) -> None:
        """Fail (or warn) before training if a rollout of this run cannot fit on the GPU, showing the arithmetic of
        the largest one (every kind of rollout the run makes: [`_rollout_memory_phases`])."""
        if not self._rollout_memory_phases():
            return
        device_bytes = torch.cuda.get_device_properties(self.accelerator.device).total_memory
        estimates = self._rollout_memory_estimates(device_bytes)
        warning = check_rollout_memory(
            max(estimates, key=lambda e: e.total), device_bytes, self.args.trb_memory_preflight
        )
        if warning:
            logger.warning(warning)

    def _rollout_memory_estimates(
        self, device_bytes: int = 0, prompt_tokens: int = ASSUMED_PROMPT_TOKENS
    ) -> list[RolloutMemoryEstimate]:
        """The preflight's estimate of every kind of rollout this run makes (`scripts/gpu_check.py` measures them)."""
        args = self.args
        student = self.accelerator.unwrap_model(self.model)
        teacher = self.accelerator.unwrap_model(self.teacher_model) if self.teacher_model is not None else None
        common = dict(
            student_config=student.config,
            teacher_config=teacher.config if teacher is not None else None,
            student_params=count_parameters(student),
            teacher_params=count_parameters(teacher) if teacher is not None else 0,
            dtype_bytes=next((teacher if teacher is not None else student).parameters()).dtype.itemsize,
            world_size=self.accelerator.num_processes,
            zero_stage=self._dist.zero_stage,
            gather_student=args.ds3_gather_for_generation,
            gather_teacher=args.trb_gather_teacher_for_generation,
            vllm_reserved_fraction=self._vllm_reserved_fraction(),
            device_bytes=device_bytes,
        )
        phases = self._rollout_memory_phases(prompt_tokens)
        return [estimate_rollout_memory(**common, **dataclasses.asdict(phase)) for phase in phases]

    def _rollout_memory_phases(self, prompt_tokens: int = ASSUMED_PROMPT_TOKENS) -> list[RolloutPhase]:
        """The kinds of rollout this run makes with transformers' `generate`, each at its widest: the policy's
        teacher-guided rollout (in chunks of `trb_generation_batch_size`, both models decoding), and the parent's
        student rollout of the whole generation batch unless the teacher guides every step (with vLLM the parent's
        rollout is vLLM's, counted as its reserved memory)."""
        args = self.args
        if args.max_completion_length is None:  # generate's own limit, which the config does not tell
            return []
        generation_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps
        length = prompt_tokens + args.max_completion_length
        phases = []
        if args.needs_teacher_in_rollout:
            cache_length = None
            if args.uses_trust_region and args.trb_rollout_engine == "speculative":
                cache_length = speculative_cache_length(
                    prompt_tokens, args.max_completion_length, args.trb_epsilon, args.trb_draft_length
                )
            chunk = min(generation_batch, args.trb_generation_batch_size or generation_batch)
            phases.append(RolloutPhase("teacher-guided rollout", chunk, length, cache_length=cache_length))
        guides_every_step = (args.uses_trust_region and args.trb_schedule == "constant") or (
            args.rollout_policy == "skd" and args.skd_steps is None
        )
        if not (args.use_vllm or guides_every_step):
            phases.append(RolloutPhase("student rollout", generation_batch, length, teacher_generates=False))
        return phases

    def _vllm_reserved_fraction(self) -> float:
        """Device memory a colocated vLLM engine keeps through the HF warmup rollouts (none while asleep)."""
        args = self.args
        if not args.use_vllm or args.vllm_mode != "colocate" or args.vllm_enable_sleep_mode:
            return 0.0
        return float(args.vllm_gpu_memory_utilization)

    def trb_epsilon_at(self, step: int) -> float:
        """The KL budget epsilon_k of the trust-region rollout made at optimizer step `step`."""
        return kl_budget(self.args.trb_schedule, step, self.args.trb_epsilon, self.args.trb_warmup_steps)

    def rollout_temperature_at(self, step: int) -> float:
        """The sampling temperature of the temperature-warmup rollout made at optimizer step `step`."""
        args = self.args
        return rollout_temperature(
            step, args.temperature_warmup_start, args.temperature, args.temperature_warmup_steps
        )

    def veto_beta_at(self, step: int) -> float:
        """Veto's student weight beta_k in the target pi_T * pi_S^beta_k at optimizer step `step`."""
        args = self.args
        return veto_weight(step, args.veto_beta_start, args.veto_decay_steps or self.state.max_steps)

    def _warmup_processor_factory(self, step: int):
        """This step's rollout policy as `(make_processor(teacher, attention_mask), uses_teacher)`, or None when the
        parent's rollout runs. Logs the policy's schedule value."""
        args = self.args
        metrics = self._metrics["train"]
        if args.rollout_policy in ("trb", "fixed_epsilon"):
            epsilon = self.trb_epsilon_at(step)
            metrics["trb/epsilon"].append(epsilon)
            if epsilon == 0.0:
                return None
            return functools.partial(self._trust_region_processor, epsilon=epsilon), True
        if args.rollout_policy == "skd":
            active = active_for(step, args.skd_steps)
            metrics["skd/active"].append(float(active))
            return (self._teacher_injection_processor, True) if active else None
        if args.rollout_policy == "temperature":
            temperature = self.rollout_temperature_at(step)
            metrics["rollout/temperature"].append(temperature)
            sampling_temperature = self.generation_config.temperature or 1.0
            if temperature == sampling_temperature:
                return None
            return (
                lambda teacher, attention_mask: RolloutTemperatureProcessor(temperature, sampling_temperature)
            ), False
        return None

    def _teacher_guided_kwargs(self, attention_mask) -> dict:
        return {
            "prompt_attention_mask": attention_mask,
            "temperature": self.generation_config.temperature or 1.0,  # what generate samples at
            "vocab_size": self._trb_vocab_size,
            "student_eos_token_id": self._trb_student_stop_ids,
            "teacher_eos_token_id": self._trb_teacher_eos_token_ids,
        }

    def _trust_region_processor(
        self, teacher, attention_mask, *, epsilon: float
    ) -> TrustRegionBlendingProcessor | SpeculativeBlendingSampler:
        kwargs = self._teacher_guided_kwargs(attention_mask)
        if self.args.trb_rollout_engine == "speculative":  # the same law, run by `_warmup_rollout` instead of generate
            kwargs.pop("prompt_attention_mask")
            return SpeculativeBlendingSampler(
                teacher,
                epsilon,
                draft_length=self.args.trb_draft_length,
                adaptive_draft_length=self.args.trb_adaptive_draft_length,
                **kwargs,
            )
        return TrustRegionBlendingProcessor(teacher, epsilon, **kwargs)

    def _teacher_injection_processor(self, teacher, attention_mask) -> TeacherInjectionProcessor:
        config = self.generation_config
        return TeacherInjectionProcessor(
            teacher,
            self.args.skd_top_k,
            teacher_temperature=self.args.skd_teacher_temperature,
            top_k_sampling=config.top_k,
            top_p=config.top_p,
            min_p=config.min_p,
            **self._teacher_guided_kwargs(attention_mask),
        )

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        completion_ids = self._policy_rollout(prompt_ids, images, multimodal_fields, has_tool_images)
        alignment = self._trb_stop_alignment
        if alignment is None:
            return completion_ids
        # A rollout that stopped on a teacher stop id ends on the student's (vLLM, which may not have stopped there,
        # is cut at it), so the loss and the metrics see one stop event.
        return [cut_at_stop(ids, self._trb_student_stop_ids, alignment.merged_ids)[0] for ids in completion_ids]

    def _policy_rollout(self, prompt_ids, images, multimodal_fields, has_tool_images):
        """This step's completions: the warmup policy's rollout, or the parent's when none is active."""
        if not self.model.training:  # evaluation measures the student's own rollouts
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        policy = self._warmup_processor_factory(self.state.global_step)
        budgeted = self._pending_row_budgets is not None and not self.use_vllm  # vLLM: one limit for every row
        if policy is None and not budgeted:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        make_processor, uses_teacher = policy or (None, False)
        # Teacher-guided rollouts, and rollouts of rows with their own budgets (TrOPD continuations, sorted by budget
        # so that each call's rows need about the same length), go in calls of `trb_generation_batch_size` rows.
        chunk = (self.args.trb_generation_batch_size if uses_teacher or budgeted else None) or len(prompt_ids)
        if chunk < len(prompt_ids) and (images is not None or multimodal_fields):
            raise ValueError("trb_generation_batch_size does not support vision-language inputs; unset it.")
        completion_ids = []
        with self._warmup_rollout(make_processor, uses_teacher):
            for start in range(0, len(prompt_ids), chunk):
                completion_ids += super()._generate_single_turn(
                    prompt_ids[start : start + chunk], images, multimodal_fields, has_tool_images
                )
        return completion_ids

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        veto = 0.0
        if self.args.veto_beta_start > 0 and self.model.training:
            veto = self.veto_beta_at(self.state.global_step)
            self._metrics["train"]["veto/beta"].append(veto)
        if self.args.loss_top_k is not None:
            divergence = functools.partial(
                top_k_divergence_loss,
                top_k=self.args.loss_top_k,
                alignment=self._trb_stop_alignment,
                veto_weight=veto,
                estimator=self.args.loss_top_k_estimator,
            )
        elif self._trb_stop_alignment is None and veto == 0.0:
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        else:
            divergence = functools.partial(
                stop_aligned_divergence_loss, alignment=self._trb_stop_alignment, veto_weight=veto
            )
        with divergence_function_replaced(divergence):
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)

    # Per-row budgets of new tokens for the rows of the coming HF rollout `generate` calls, in row order (set by
    # `_row_budgets`); None: `generate`'s own limit only.
    _pending_row_budgets: list[int] | None = None

    @contextlib.contextmanager
    def _row_budgets(self, budgets: list[int]):
        """Within this context, the rollout's HF `generate` calls stop each row once it has generated its budget of new
        tokens (TrOPD: what a teacher prefix leaves of `max_completion_length`). The calls take the budgets in row
        order, as many as they have rows, so a chunked rollout takes them chunk by chunk. A rollout the parent runs in
        vLLM ignores them (one limit for every row)."""
        self._pending_row_budgets = list(budgets)
        try:
            yield
        finally:
            self._pending_row_budgets = None

    def _take_row_budgets(self, num_rows: int) -> list[int] | None:
        """The budgets of the next `num_rows` rows to be generated, or None when no budgets are set."""
        pending = self._pending_row_budgets
        if pending is None:
            return None
        if len(pending) < num_rows:
            raise RuntimeError(f"generate was called for {num_rows} rows but {len(pending)} row budgets are left.")
        self._pending_row_budgets = pending[num_rows:]
        return pending[:num_rows]

    @contextlib.contextmanager
    def _warmup_rollout(self, make_processor, uses_teacher: bool):
        """Run the parent's HF `generate` path with the policy's processor appended to its processors (a fresh one per
        `generate` call), or, for the speculative engine, the engine in place of `generate`. A teacher-guided policy
        gets the teacher gathered for the rollout (ZeRO-3), its cache freed after each call and its per-token
        statistics folded in. Row budgets (`_row_budgets`) stop each row at its own length, on both paths;
        `make_processor=None` applies only them."""
        student = self.accelerator.unwrap_model(self.model_wrapped)
        use_vllm, self.use_vllm = self.use_vllm, False  # the policies run inside transformers' generate
        shadowed = student.__dict__.get("generate")
        original_generate = student.generate
        gather = self.args.trb_gather_teacher_for_generation
        # A teacher left sharded under ZeRO-3 needs collectives in its forward, so it must step wherever the student
        # steps (finished ranks included), not in the logits processor, which `synced_gpus` skips on finished ranks.
        step_with_student = uses_teacher and self._dist.is_zero3 and not gather
        # The speculative engine has no per-step hook: with a sharded model it keeps every rank's rounds in step.
        synced = step_with_student or (self._dist.is_zero3 and not self.args.ds3_gather_for_generation)
        hook_target = student.get_base_model() if hasattr(student, "get_base_model") else student
        teacher_context = (
            gathered_without_hooks(self.teacher_model, self.accelerator, gather=gather)
            if uses_teacher
            else contextlib.nullcontext()
        )
        try:
            with teacher_context as teacher:

                def generate_with_policy(*args, **kwargs):
                    input_ids = args[0] if args else kwargs["input_ids"]
                    budgets = self._take_row_budgets(input_ids.shape[0])
                    processor = make_processor(teacher, kwargs.get("attention_mask")) if make_processor else None
                    if isinstance(processor, SpeculativeBlendingSampler):
                        processor.synced = synced
                        try:
                            sequences = processor.generate(student, *args, row_max_new_tokens=budgets, **kwargs)
                        finally:
                            processor.release()
                        self._rollout_statistics.add(
                            processor.statistics(),
                            teacher_seconds=processor.teacher_seconds,
                            step=self.state.global_step,
                        )
                        return sequences
                    if budgets is not None:  # a local criterion: finished rows, as after a stop token
                        criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
                        criteria.append(RowBudgetCriteria(budgets, input_ids.shape[1]))
                        kwargs["stopping_criteria"] = criteria
                    if processor is None:
                        return original_generate(*args, **kwargs)
                    processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
                    processors.append(processor)
                    if budgets is not None and uses_teacher:
                        processor.stop_rows_at(budgets)
                    if step_with_student:
                        processor.attach_to_student(hook_target)
                    try:
                        sequences = original_generate(*args, logits_processor=processors, **kwargs)
                    finally:
                        if uses_teacher:  # this chunk's teacher KV cache goes now, not at the end of the rollout
                            processor.release()
                    if uses_teacher:
                        self._rollout_statistics.add(
                            processor.statistics(),
                            teacher_seconds=processor.teacher_seconds,
                            step=self.state.global_step,
                        )
                    return sequences

                student.generate = generate_with_policy
                yield
        finally:
            if shadowed is None:
                student.__dict__.pop("generate", None)
            else:
                student.generate = shadowed
            self.use_vllm = use_vllm

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Every process logs at the same steps, so this is where the rollout statistics meet: one gather per log,
        # however many rollouts each process ran since the last one.
        statistics = self._rollout_statistics
        if self.model.training and statistics is not None and statistics.pending:
            metrics, sample = statistics.reduce(self.accelerator.gather)
            for name, value in metrics.items():
                self._metrics["train"][name].append(value)
            invalid = metrics.get(f"{statistics.prefix}/teacher_invalid_fraction", 0.0)
            if invalid > 0 and self.accelerator.is_main_process:
                logger.warning(
                    f"{100 * invalid:.3g}% of rollout tokens had invalid teacher logits (NaN, or no finite mass on the "
                    "allowed tokens) and were drawn from the student. Check the teacher's dtype and weights."
                )
            if sample is not None and sample.numel() and self.accelerator.is_main_process:
                import wandb

                if wandb.run is not None:  # merged into the row the parent's W&B callback commits next
                    wandb.log({"train/trb/beta_histogram": wandb.Histogram(sample.numpy())}, commit=False)
        super().log(logs, start_time)
