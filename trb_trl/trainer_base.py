"""The trainer TRB and TrOPD share: TRL's `DistillationTrainer` with two seams, where this step's prefixes come from
(a rollout source, `rollout/sources.py`) and what each micro-batch learns (a divergence, `losses/divergences.py`),
both chosen from the config and the schedule.

TRL's hooks are touched in exactly one place each: `generate` on the student instance ([`_warmup_rollout`], for the
sources that change the rollout) and TRL's `_chunked_divergence_loss` ([`_compute_loss`], for the divergences that
are not TRL's own). Whatever the config, evaluation runs the parent's rollout, and a source or divergence that is
TRL's own leaves the parent's path verbatim (its vLLM path included).
"""

import contextlib
import dataclasses
import random

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList
from transformers.utils import logging

from ._compat import DistillationTrainer, create_model_from_path, divergence_function_replaced, prepare_deepspeed
from .losses.divergences import Divergence, divergence_at
from .memory_preflight import (
    RolloutMemoryEstimate,
    RolloutPhase,
    check_rollout_memory,
    count_parameters,
    estimate_rollout_memory,
    speculative_cache_length,
)
from .report_to import put_wandb_runs_under
from .rollout import (
    SPECULATIVE_METRICS,
    TEACHER_INJECTION_METRICS,
    TRUST_REGION_METRICS,
    RolloutStatistics,
    SpeculativeBlendingSampler,
    output_vocab_size,
)
from .rollout.routed import RoutedProcessor
from .rollout.row_budget import RowBudgetCriteria
from .rollout.sources import GuidedRolloutSettings, RolloutSource, TeacherPrefixRollout, rollout_source_at
from .rollout.teacher_prefix import draw_prefix_lengths, generate_teacher_prefixes, teacher_generation_config
from .schedules import kl_budget, rollout_temperature
from .stop_alignment import StopAlignment, as_id_list, cut_at_stop
from .teachers import TEACHER_ID_COLUMN, TeacherSet, check_dataset_teacher_ids, slice_rows, teacher_load_kwargs
from .trb_distill_config import TRBDistillConfig
from .zero3 import gathered_without_hooks


logger = logging.get_logger(__name__)
# The preflight cannot know prompt lengths before data is read; it assumes this many prompt tokens per sequence.
ASSUMED_PROMPT_TOKENS = 1024
# How many beta values each process contributes to the W&B histogram per logged step.
_HISTOGRAM_SAMPLES_PER_PROCESS = 4096
# Per teacher, the sums each process keeps between logs (several teachers), in this order.
_TEACHER_SUMS = ("rows", "tokens", "loss_sum")


class OPDTrainerBase(DistillationTrainer):
    """[`~trl.DistillationTrainer`] with a rollout source and a divergence chosen per step from the config (see the
    module docstring). Subclasses name the method ([`TRBDistillTrainer`], [`TrOPDTrainer`]); this class holds what
    they share: the teacher checks, one stop event for rollouts and loss, the two seams, row budgets, the rollout
    statistics and the memory preflight."""

    def __init__(
        self, model, teacher_model=None, args: TRBDistillConfig | None = None, *pargs, teacher_models=None, **kwargs
    ):
        report_to_wandb = "wandb" in (args.report_to or [])
        if report_to_wandb:
            put_wandb_runs_under(args.output_dir)
        teacher_sources = teacher_models if teacher_models is not None else args.teacher_models
        default_teacher = None
        if teacher_sources:
            if teacher_model is not None:
                raise ValueError("Pass either teacher_model or teacher_models (several teachers), not both.")
            names = list(teacher_sources)
            default_teacher = args.default_teacher or names[0]
            if default_teacher not in names:
                raise ValueError(f"default_teacher={default_teacher!r} is not one of the teachers {names}.")
            # An unknown teacher_id fails here, before any model loads.
            train_dataset = kwargs.get("train_dataset", pargs[1] if len(pargs) > 1 else None)
            check_dataset_teacher_ids(train_dataset, names, default_teacher)
        else:
            for name in ("teacher_models_init_kwargs", "default_teacher", "teacher_offload"):
                if getattr(args, name):
                    raise ValueError(
                        f"{name} applies to several teachers, but no teacher_models were given (config or trainer "
                        f"argument); set teacher_models, or remove {name}."
                    )
        super().__init__(model, teacher_model, args, *pargs, **kwargs)
        self.teacher_set: TeacherSet | None = None
        if teacher_sources:
            self.teacher_set = self._load_teachers(teacher_sources, default_teacher)
            self.teacher_model = self.teacher_set.models[default_teacher]
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
        self._vocab_size = len(self._tokenizer)
        self._teacher_stop_ids: list[int] = []
        # One stop event in rollouts and loss; None when the two models already stop on the same ids.
        self._student_stop_ids = list(self.eos_token_ids)
        self._stop_alignment = None
        teachers = self.teacher_set.models if self.teacher_set is not None else {"teacher": self.teacher_model}
        for name, model_of_teacher in teachers.items():
            if model_of_teacher is None:
                continue
            teacher = self.accelerator.unwrap_model(model_of_teacher)
            for role, net in (("student", self.accelerator.unwrap_model(self.model)), (name, teacher)):
                if output_vocab_size(net) < self._vocab_size:
                    raise ValueError(
                        f"The tokenizer has {self._vocab_size} tokens but the {role} only scores "
                        f"{output_vocab_size(net)}: student and teachers must share the student's tokenizer."
                    )
            stop_ids = as_id_list(teacher.generation_config.eos_token_id)
            alignment = StopAlignment.between(self._student_stop_ids, stop_ids)
            if self.teacher_set is not None:
                self.teacher_set.stop_ids[name] = stop_ids
                self.teacher_set.alignments[name] = alignment
            if model_of_teacher is self.teacher_model:
                self._teacher_stop_ids, self._stop_alignment = stop_ids, alignment
            if alignment is not None:  # every teacher's stop ids end every rollout
                self._stop_rollouts_on_merged_ids(alignment)
        self._rollout_statistics = self._make_rollout_statistics(report_to_wandb)
        self._teacher_statistics = self._make_teacher_statistics()
        self._row_teachers: list[int] | None = None
        self._pending_row_teachers: list[int] | None = None
        # Per mode ("train", "eval"): this process's per-teacher `_TEACHER_SUMS` since the last log.
        self._teacher_sums: dict[str, torch.Tensor] = {}
        self._prefix_lengths: list[int] | None = None
        self._last_divergence: Divergence | None = None
        if args.math_eval_benchmarks:  # in-training evaluation on benchmarks (docs/evaluation.md)
            from .evaluation.callback import MathEvalCallback

            self.add_callback(MathEvalCallback(self))
        if self.accelerator.device.type == "cuda":  # every trainer and policy: what its rollouts hold
            self._check_rollout_memory()

    # -----------------------------------------------------------------------------------------------------------------
    # Several teachers

    def _load_teachers(self, sources: dict, default: str) -> TeacherSet:
        """Load (from a model id or path) and prepare every teacher as TRL prepares its one teacher."""
        args = self.args
        if self.tools or self._is_vlm:
            raise ValueError("teacher_models does not support tool calling or vision-language models yet.")
        if args.teacher_offload and self.is_deepspeed_enabled:
            raise ValueError(
                "teacher_offload moves whole teachers between CPU and GPU, which DeepSpeed's engines do not allow; "
                "use ZeRO-3 parameter offload for the teachers instead, or set teacher_offload=False."
            )
        if self._dist.is_zero3 and not args.gather_teacher_for_generation:
            raise ValueError(
                "teacher_models under ZeRO-3 needs gather_teacher_for_generation=True: several teachers cannot be "
                "stepped from the student's forward."
            )
        student_vocab = self.model.config.get_text_config().vocab_size
        models = {}
        for name, source in sources.items():
            teacher = (
                create_model_from_path(source, **teacher_load_kwargs(args, name))
                if isinstance(source, str)
                else source
            )
            teacher_vocab = teacher.config.get_text_config().vocab_size
            if teacher_vocab != student_vocab:
                raise ValueError(
                    f"Teacher {name!r} has vocab_size {teacher_vocab} but the student has {student_vocab}: every teacher "
                    "must share the student's vocabulary."
                )
            if self.is_deepspeed_enabled:
                models[name] = prepare_deepspeed(teacher, self.accelerator)
            else:
                models[name] = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        teacher_set = TeacherSet(
            models,
            stop_ids={},
            alignments={},
            default=default,
            compute_device=self.accelerator.device,
            offload_device=torch.device("cpu") if args.teacher_offload else None,
        )
        teacher_set.offload_all()
        return teacher_set

    def _make_teacher_statistics(self) -> dict[str, RolloutStatistics]:
        """Per teacher, the rollout statistics of its rows, logged as `<metric>/<teacher>` (several teachers)."""
        if self.teacher_set is None or self._rollout_statistics is None:
            return {}
        overall = self._rollout_statistics
        return {
            name: RolloutStatistics(self.accelerator.device, overall.metrics, prefix=overall.prefix, suffix=f"/{name}")
            for name in self.teacher_set.names
        }

    def _gathered_teachers(self, names: list[str]):
        """The named teachers ready for a rollout: on the device (offload) and, under ZeRO-3, gathered. Every process
        gathers every teacher (a collective), whatever rows it has."""
        stack = contextlib.ExitStack()
        teacher_set = self.teacher_set
        gathered = {}
        stack.enter_context(teacher_set.resident(names))
        gather = self.args.gather_teacher_for_generation
        for name in teacher_set.names if self._dist.is_zero3 else names:
            context = gathered_without_hooks(teacher_set.models[name], self.accelerator, gather=gather)
            gathered[name] = stack.enter_context(context)
        return stack, {name: gathered[name] for name in names}

    def _take_row_teachers(self, num_rows: int) -> list[int] | None:
        """The teachers of the next `num_rows` rows to be generated (several teachers), in row order."""
        pending = self._pending_row_teachers
        if pending is None:
            return None
        if len(pending) < num_rows:
            raise RuntimeError(f"generate was called for {num_rows} rows but {len(pending)} row teachers are left.")
        self._pending_row_teachers = pending[num_rows:]
        return pending[:num_rows]

    # -----------------------------------------------------------------------------------------------------------------
    # Stop tokens, statistics and settings

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

    def _guided_rollout_settings(self) -> GuidedRolloutSettings:
        config = self.generation_config
        return GuidedRolloutSettings(
            vocab_size=self._vocab_size,
            student_stop_ids=tuple(self._student_stop_ids),
            teacher_stop_ids=tuple(self._teacher_stop_ids),
            temperature=config.temperature or 1.0,  # what generate samples at
            top_k=config.top_k,
            top_p=config.top_p,
            min_p=config.min_p,
        )

    # -----------------------------------------------------------------------------------------------------------------
    # Memory preflight

    def _check_rollout_memory(self) -> None:
        """Fail (or warn) before training if a rollout of this run cannot fit on the GPU, showing the arithmetic of
        the largest one (every kind of rollout the run makes: [`_rollout_memory_phases`])."""
        if not self._rollout_memory_phases():
            return
        device_bytes = torch.cuda.get_device_properties(self.accelerator.device).total_memory
        estimates = self._rollout_memory_estimates(device_bytes)
        warning = check_rollout_memory(
            max(estimates, key=lambda e: e.total), device_bytes, self.args.rollout_memory_preflight
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
        teacher_params = count_parameters(teacher) if teacher is not None else 0
        if self.teacher_set is not None:
            # Several teachers: a rollout may blend rows of every teacher in one decoding step, so all of them are
            # held at once (with or without offload); each row's KV cache is its own teacher's, bounded by the
            # largest teacher's.
            unwrapped = [self.accelerator.unwrap_model(model) for model in self.teacher_set.models.values()]
            teacher_params = sum(count_parameters(model) for model in unwrapped)
            teacher = max(unwrapped, key=count_parameters)
        common = dict(
            student_config=student.config,
            teacher_config=teacher.config if teacher is not None else None,
            student_params=count_parameters(student),
            teacher_params=teacher_params,
            dtype_bytes=next((teacher if teacher is not None else student).parameters()).dtype.itemsize,
            world_size=self.accelerator.num_processes,
            zero_stage=self._dist.zero_stage,
            gather_student=args.ds3_gather_for_generation,
            gather_teacher=args.gather_teacher_for_generation,
            vllm_reserved_fraction=self._vllm_reserved_fraction(),
            device_bytes=device_bytes,
        )
        phases = self._rollout_memory_phases(prompt_tokens)
        return [estimate_rollout_memory(**common, **dataclasses.asdict(phase)) for phase in phases]

    def _rollout_memory_phases(self, prompt_tokens: int = ASSUMED_PROMPT_TOKENS) -> list[RolloutPhase]:
        """The kinds of rollout this run makes with transformers' `generate`, each at its widest: the policy's
        teacher-guided rollout (in chunks of `rollout_generation_batch_size`, both models decoding), and the parent's
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
            chunk = min(generation_batch, args.rollout_generation_batch_size or generation_batch)
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

    # -----------------------------------------------------------------------------------------------------------------
    # Schedules

    def trb_epsilon_at(self, step: int) -> float:
        """The KL budget epsilon_k of the trust-region rollout made at optimizer step `step`."""
        return kl_budget(self.args.trb_schedule, step, self.args.trb_epsilon, self.args.trb_warmup_steps)

    def rollout_temperature_at(self, step: int) -> float:
        """The sampling temperature of the temperature-warmup rollout made at optimizer step `step`."""
        args = self.args
        return rollout_temperature(
            step, args.temperature_warmup_start, args.temperature, args.temperature_warmup_steps
        )

    # -----------------------------------------------------------------------------------------------------------------
    # Seam 1: where this step's prefixes come from

    def rollout_source_at(self, step: int) -> RolloutSource:
        """The rollout source of optimizer step `step` ([`~rollout.sources.rollout_source_at`])."""
        return rollout_source_at(
            self.args,
            step,
            max_steps=self.state.max_steps,
            sampling_temperature=self.generation_config.temperature or 1.0,
        )

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        completion_ids = self._policy_rollout(prompt_ids, images, multimodal_fields, has_tool_images)
        alignment = self._stop_alignment
        if alignment is None:
            return completion_ids
        # A rollout that stopped on a teacher stop id ends on the student's (vLLM, which may not have stopped there,
        # is cut at it), so the loss and the metrics see one stop event.
        return [cut_at_stop(ids, self._student_stop_ids, alignment.merged_ids)[0] for ids in completion_ids]

    def _policy_rollout(self, prompt_ids, images, multimodal_fields, has_tool_images):
        """This step's completions, from its rollout source (the parent's rollout in evaluation)."""
        if not self.model.training:  # evaluation measures the student's own rollouts
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        source = self.rollout_source_at(self.state.global_step)
        for name, value in source.metrics.items():
            self._metrics["train"][name].append(value)
        row_teachers = self._row_teachers
        if row_teachers is not None and len(row_teachers) != len(prompt_ids):
            raise RuntimeError(f"{len(prompt_ids)} rows to roll out but {len(row_teachers)} row teachers.")
        return self._rollout(source, prompt_ids, images, multimodal_fields, has_tool_images, row_teachers)

    def _rollout(
        self, source: RolloutSource, prompt_ids, images, multimodal_fields, has_tool_images, row_teachers=None
    ):
        """Completions of `prompt_ids` from `source` (`row_teachers`: each row's teacher index, several teachers)."""
        if isinstance(source, TeacherPrefixRollout):
            return self._teacher_prefixed_rollout(
                source, prompt_ids, images, multimodal_fields, has_tool_images, row_teachers
            )
        budgeted = self._pending_row_budgets is not None and not self.use_vllm  # vLLM: one limit for every row
        if not source.changes_rollout and not budgeted:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        # Teacher-guided rollouts, and rollouts of rows with their own budgets (teacher-prefix continuations, sorted
        # by budget so that each call's rows need about the same length), go in calls of
        # `rollout_generation_batch_size` rows.
        batch = self.args.rollout_generation_batch_size
        chunk = (batch if source.uses_teacher or budgeted else None) or len(prompt_ids)
        if chunk < len(prompt_ids) and (images is not None or multimodal_fields):
            raise ValueError("rollout_generation_batch_size does not support vision-language inputs; unset it.")
        completion_ids = []
        routed = row_teachers is not None and source.uses_teacher
        self._pending_row_teachers = list(row_teachers) if routed else None
        with self._warmup_rollout(source if source.changes_rollout else None, row_teachers if routed else None):
            for start in range(0, len(prompt_ids), chunk):
                completion_ids += super()._generate_single_turn(
                    prompt_ids[start : start + chunk], images, multimodal_fields, has_tool_images
                )
        return completion_ids

    def _teacher_prefixed_rollout(
        self, source: TeacherPrefixRollout, prompt_ids, images, multimodal_fields, tools, row_teachers=None
    ):
        """Each row: a teacher prefix (from the row's teacher) of a length drawn up to `source.max_length`, continued
        by `source.continuation` within what the prefix leaves of `max_completion_length`."""
        step = self.state.global_step
        # A string seed is hashed deterministically: the same draws on a rerun or a resumed run.
        rng = random.Random(f"tropd-prefix-{self.args.seed}-{step}-{self.accelerator.process_index}")
        lengths = draw_prefix_lengths(source.max_length, len(prompt_ids), source.sampling, rng)
        prefixes, ended = self._teacher_prefixes(prompt_ids, lengths, row_teachers)
        # Every row is continued (also those whose prefix already stopped), so that every process runs the same
        # rollout calls; each row stops once it has generated what its prefix leaves of the completion budget (0 for a
        # finished row, whose continuation is dropped), and the call ends once every row has.
        budget = self.args.max_completion_length
        budgets = [
            0 if stopped else max(budget - len(prefix), 0) for prefix, stopped in zip(prefixes, ended, strict=True)
        ]
        # Rows sorted by budget, so that each call of `rollout_generation_batch_size` rows holds prefixes of about one
        # length: its KV cache spans about prompt + max_completion_length columns and it stops at its rows' budgets,
        # instead of every call spanning prompt + l_max + max_completion_length (uniform prefix lengths).
        order = sorted(range(len(budgets)), key=budgets.__getitem__)
        with self._row_budgets([budgets[row] for row in order]):
            sorted_continuations = self._rollout(
                source.continuation,
                [[*prompt_ids[row], *prefixes[row]] for row in order],
                images,
                multimodal_fields,
                tools,
                [row_teachers[row] for row in order] if row_teachers is not None else None,
            )
        continuations = [None] * len(order)
        for position, row in enumerate(order):
            continuations[row] = sorted_continuations[position]
        # The cut still applies where the budget could not be passed down (a continuation generated by vLLM).
        completions = [
            list(prefix) if stopped else [*prefix, *continuation[:row_budget]]
            for prefix, stopped, continuation, row_budget in zip(prefixes, ended, continuations, budgets, strict=True)
        ]
        self._prefix_lengths = [len(prefix) for prefix in prefixes]
        return completions

    def _teacher_prefixes(self, prompt_ids: list[list[int]], lengths: list[int], row_teachers=None):
        """Sample each prompt's teacher prefix with the rollout's sampling settings, `rollout_generation_batch_size`
        sequences per `generate` call (the teacher gathered under ZeRO-3, or sharded and synced across processes).
        With several teachers, each row's prefix comes from its own teacher (the teachers gathered together)."""
        if row_teachers is None:
            gather = self.args.gather_teacher_for_generation
            with gathered_without_hooks(self.teacher_model, self.accelerator, gather=gather) as teacher:
                return self._prefixes_from(teacher, self._teacher_stop_ids, prompt_ids, lengths)
        names = self.teacher_set.names
        present = [names[index] for index in sorted(set(row_teachers))]
        prefixes, ended = [None] * len(prompt_ids), [None] * len(prompt_ids)
        stack, teachers = self._gathered_teachers(present)
        with stack:
            for name in present:
                rows = [row for row, index in enumerate(row_teachers) if names[index] == name]
                group_prefixes, group_ended = self._prefixes_from(
                    teachers[name],
                    self.teacher_set.stop_ids[name],
                    [prompt_ids[row] for row in rows],
                    [lengths[row] for row in rows],
                )
                for row, prefix, stopped in zip(rows, group_prefixes, group_ended, strict=True):
                    prefixes[row], ended[row] = prefix, stopped
        return prefixes, ended

    def _prefixes_from(self, teacher, teacher_stop_ids: list[int], prompt_ids: list[list[int]], lengths: list[int]):
        """Prefixes of `lengths` tokens sampled from `teacher` (unwrapped, gathered or sharded) for `prompt_ids`."""
        gather = self.args.gather_teacher_for_generation
        chunk = self.args.rollout_generation_batch_size or len(prompt_ids)
        config = teacher_generation_config(
            self.generation_config,
            max_new_tokens=max(1, *lengths),
            stop_ids=[*teacher_stop_ids, *self._student_stop_ids],
            pad_token_id=self._tokenizer.pad_token_id,
            suppress_tokens=list(range(self._vocab_size, output_vocab_size(teacher))),
        )
        prefixes, ended = [], []
        for start in range(0, len(prompt_ids), chunk):  # the same number of calls on every process
            chunk_prefixes, chunk_ended = generate_teacher_prefixes(
                teacher,
                prompt_ids[start : start + chunk],
                lengths[start : start + chunk],
                config,
                student_stop_ids=self._student_stop_ids,
                teacher_stop_ids=teacher_stop_ids,
                synced_gpus=self._dist.is_zero3 and not gather,
            )
            prefixes += chunk_prefixes
            ended += chunk_ended
        return prefixes, ended

    def _generate_and_score_completions(self, inputs):
        self._prefix_lengths = None
        self._row_teachers = None
        if self.teacher_set is not None:  # each row's teacher, for the rollout and (in `output`) the loss
            self._row_teachers = self.teacher_set.indices(row.get(TEACHER_ID_COLUMN) for row in inputs)
        output = super()._generate_and_score_completions(inputs)
        if self._row_teachers is not None:
            output["teacher_index"] = torch.tensor(self._row_teachers, device=output["completion_ids"].device)
        if self._prefix_lengths is not None or hasattr(self.args, "tropd_guidance"):  # a config that can guide
            completion_ids = output["completion_ids"]
            lengths = self._prefix_lengths or [0] * completion_ids.size(0)
            positions = torch.arange(completion_ids.size(1), device=completion_ids.device)
            lengths = torch.tensor(lengths, device=completion_ids.device)
            # Which completion tokens are teacher prefix; shuffled and split with the rest of the batch.
            output["tropd_prefix_mask"] = positions.unsqueeze(0) < lengths.unsqueeze(1)
        return output

    # Per-row budgets of new tokens for the rows of the coming HF rollout `generate` calls, in row order (set by
    # `_row_budgets`); None: `generate`'s own limit only.
    _pending_row_budgets: list[int] | None = None

    @contextlib.contextmanager
    def _row_budgets(self, budgets: list[int]):
        """Within this context, the rollout's HF `generate` calls stop each row once it has generated its budget of new
        tokens (a teacher prefix's continuation: what it leaves of `max_completion_length`). The calls take the
        budgets in row order, as many as they have rows, so a chunked rollout takes them chunk by chunk. A rollout the
        parent runs in vLLM ignores them (one limit for every row)."""
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
    def _warmup_rollout(self, source: RolloutSource | None, row_teachers: list[int] | None = None):
        """Run the parent's HF `generate` path with the source's processor appended to its processors (a fresh one per
        `generate` call), or, for the speculative engine, the engine in place of `generate`. A teacher-guided source
        gets the teacher gathered for the rollout (ZeRO-3), its cache freed after each call and its per-token
        statistics folded in. Row budgets (`_row_budgets`) stop each row at its own length, on both paths;
        `source=None` applies only them. With `row_teachers` (several teachers), each row is guided by its own teacher
        ([`RoutedProcessor`]), the teachers' rows stepped together."""
        student = self.accelerator.unwrap_model(self.model_wrapped)
        use_vllm, self.use_vllm = self.use_vllm, False  # the sources run inside transformers' generate
        shadowed = student.__dict__.get("generate")
        original_generate = student.generate
        uses_teacher = source is not None and source.uses_teacher
        gather = self.args.gather_teacher_for_generation
        # A teacher left sharded under ZeRO-3 needs collectives in its forward, so it must step wherever the student
        # steps (finished ranks included), not in the logits processor, which `synced_gpus` skips on finished ranks.
        step_with_student = uses_teacher and self._dist.is_zero3 and not gather
        # The speculative engine has no per-step hook: with a sharded model it keeps every rank's rounds in step.
        synced = step_with_student or (self._dist.is_zero3 and not self.args.ds3_gather_for_generation)
        hook_target = student.get_base_model() if hasattr(student, "get_base_model") else student
        settings = self._guided_rollout_settings()
        teachers = None
        if uses_teacher and row_teachers is not None:
            names = self.teacher_set.names
            # Entered here; the ExitStack, used as the context below, releases them.
            teacher_context, teachers = self._gathered_teachers([names[index] for index in sorted(set(row_teachers))])
        elif uses_teacher:
            teacher_context = gathered_without_hooks(self.teacher_model, self.accelerator, gather=gather)
        else:
            teacher_context = contextlib.nullcontext()
        try:
            with teacher_context as teacher:

                def generate_with_policy(*args, **kwargs):
                    input_ids = args[0] if args else kwargs["input_ids"]
                    budgets = self._take_row_budgets(input_ids.shape[0])
                    if teachers is not None:
                        processor = self._routed_processor(
                            source, teachers, self._take_row_teachers(input_ids.shape[0]), kwargs, settings
                        )
                    else:
                        processor = (
                            source.processor(teacher, kwargs.get("attention_mask"), settings) if source else None
                        )
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
                        self._add_rollout_statistics(processor)
                    return sequences

                student.generate = generate_with_policy
                yield
        finally:
            if shadowed is None:
                student.__dict__.pop("generate", None)
            else:
                student.generate = shadowed
            self.use_vllm = use_vllm

    def _routed_processor(self, source, teachers: dict, row_teachers: list[int], kwargs: dict, settings):
        """One processor per teacher with rows in this `generate` call, over its rows ([`RoutedProcessor`])."""
        names = self.teacher_set.names
        attention_mask = kwargs.get("attention_mask")
        processors, rows = {}, {}
        for name in teachers:
            index = names.index(name)
            selected = [row for row, teacher in enumerate(row_teachers) if teacher == index]
            if not selected:
                continue
            rows[name] = torch.tensor(selected, dtype=torch.long)
            mask = attention_mask[rows[name].to(attention_mask.device)] if attention_mask is not None else None
            own = dataclasses.replace(settings, teacher_stop_ids=tuple(self.teacher_set.stop_ids[name]))
            processors[name] = source.processor(teachers[name], mask, own)
        return RoutedProcessor(processors, rows)

    def _add_rollout_statistics(self, processor) -> None:
        """Fold one `generate` call's per-token statistics in (and each teacher's, several teachers)."""
        step = self.state.global_step
        self._rollout_statistics.add(processor.statistics(), teacher_seconds=processor.teacher_seconds, step=step)
        if isinstance(processor, RoutedProcessor):
            for name, statistics in processor.statistics_by_teacher().items():
                seconds = processor.processors[name].teacher_seconds
                self._teacher_statistics[name].add(statistics, teacher_seconds=seconds, step=step)

    # -----------------------------------------------------------------------------------------------------------------
    # Seam 2: what each micro-batch learns

    def divergence_at(self, step: int) -> Divergence:
        """The divergence of a micro-batch at optimizer step `step` ([`~losses.divergences.divergence_at`])."""
        return divergence_at(
            self.args,
            step,
            training=self.model.training,
            max_steps=self.state.max_steps,
            alignment=self._stop_alignment,
            token_draws=self._token_draws,
        )

    def _token_draws(self, shape, device) -> torch.Tensor:
        """Uniform draws for a loss that samples per token (TrOPD's trust mask): a fresh, reproducible stream per
        process and micro-step."""
        seed = hash((self.args.seed, self.state.global_step, self._step, self.accelerator.process_index)) % 2**63
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(shape, generator=generator).to(device)

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        if self.teacher_set is not None and "teacher_index" in inputs:
            return self._routed_loss(unwrapped_student, inputs, num_items_in_batch)
        divergence = self.divergence_at(self.state.global_step)
        self._log_divergence(divergence)
        return self._loss_with(divergence, unwrapped_student, inputs, num_items_in_batch)

    def _log_divergence(self, divergence: Divergence) -> None:
        self._last_divergence = divergence
        mode = "train" if self.model.training else "eval"
        for name, value in divergence.metrics.items():
            self._metrics[mode][name].append(value)

    def _loss_with(self, divergence: Divergence, unwrapped_student, inputs, num_items_in_batch):
        """TRL's loss on `inputs`, with `divergence` in place of TRL's (the one place TRL's divergence is replaced)."""
        loss = divergence.drop_in(inputs)
        if loss is None:
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        with divergence_function_replaced(loss):
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)

    def _routed_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """Several teachers: each teacher's rows against that teacher (TRL's loss once per teacher, in `teacher_models`
        order), summed. The sums are exact: every part is divided by the same `num_items_in_batch`. Under ZeRO-3 a
        teacher with no row here still runs once, on a stand-in row whose loss is multiplied by 0, so every process
        runs the same forwards (each gathers parameters) whatever its rows."""
        teacher_set, step = self.teacher_set, self.state.global_step
        index = inputs["teacher_index"]
        num_rows = index.shape[0]
        if num_items_in_batch is None:  # evaluation: TRL divides by this batch's tokens; the parts must share it
            mask = (
                inputs["completion_mask"] * inputs["tool_mask"] if "tool_mask" in inputs else inputs["completion_mask"]
            )
            num_items_in_batch = mask.sum().clamp(min=1)
        shared_records: dict = {}
        total, entropy_sum, num_valid = 0.0, 0.0, 0
        sums = torch.zeros(len(teacher_set.names), len(_TEACHER_SUMS), dtype=torch.float64)
        default_teacher = self.teacher_model
        for position, name in enumerate(teacher_set.names):
            rows = (index == position).nonzero().flatten()
            stand_in = rows.numel() == 0
            if stand_in and not self._dist.is_zero3:
                continue
            part = slice_rows(inputs, rows if not stand_in else index.new_zeros(1), num_rows)
            divergence = divergence_at(
                self.args,
                step,
                training=self.model.training,
                max_steps=self.state.max_steps,
                alignment=teacher_set.alignments[name],
                token_draws=self._token_draws,
            )
            if hasattr(divergence, "records"):  # one record of the micro-batch (a stand-in's is dropped)
                divergence.records = {} if stand_in else shared_records
            with teacher_set.resident([name]):
                self.teacher_model = teacher_set.models[name]
                try:
                    loss, entropy, valid = self._loss_with(divergence, unwrapped_student, part, num_items_in_batch)
                finally:
                    self.teacher_model = default_teacher
            if stand_in:
                total = total + 0.0 * loss
                continue
            self._log_divergence(divergence)
            total, entropy_sum, num_valid = total + loss, entropy_sum + entropy, num_valid + valid
            per_token_sum = loss.detach().double().cpu() * float(num_items_in_batch)  # undo TRL's division
            sums[position] = torch.tensor(
                [float(rows.numel()), float(valid), float(per_token_sum)], dtype=torch.float64
            )
        mode = "train" if self.model.training else "eval"
        self._teacher_sums[mode] = self._teacher_sums[mode] + sums if mode in self._teacher_sums else sums
        return total, entropy_sum, num_valid

    # -----------------------------------------------------------------------------------------------------------------
    # Logging

    def _log_teacher_sums(self, mode: str) -> None:
        """Several teachers: each teacher's rows and mean per-token loss since the last log, over processes (one
        gather; every process computes the same number of losses between logs, so every process reaches it)."""
        local = self._teacher_sums.pop(mode).to(self.accelerator.device, torch.float32)
        totals = self.accelerator.gather(local[None]).sum(0).tolist()
        metrics = self._metrics[mode]
        for name, (rows, tokens, loss_sum) in zip(self.teacher_set.names, totals, strict=True):
            metrics[f"mopd/{name}/rows"].append(rows)
            if tokens > 0:
                metrics[f"mopd/{name}/loss"].append(loss_sum / tokens)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Every process logs at the same steps, so this is where the rollout statistics meet: one gather per log,
        # however many rollouts each process ran since the last one.
        statistics = self._rollout_statistics
        mode = "train" if self.model.training else "eval"
        if mode in self._teacher_sums:
            self._log_teacher_sums(mode)
        if self.model.training and statistics is not None and statistics.pending:
            metrics, sample = statistics.reduce(self.accelerator.gather)
            # Each teacher's share too, on every process (one with no row of a teacher contributes zeros).
            for teacher_statistics in self._teacher_statistics.values():
                metrics.update(teacher_statistics.reduce(self.accelerator.gather)[0])
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
