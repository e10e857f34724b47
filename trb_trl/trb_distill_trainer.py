import contextlib
import functools
import os
import textwrap

import torch
from transformers import LogitsProcessorList
from transformers.utils import logging

from ._compat import DistillationTrainer, divergence_function_replaced
from .logits_processor import TrustRegionBlendingProcessor, output_vocab_size
from .losses.stop_aligned_divergence import stop_aligned_divergence_loss
from .memory_preflight import check_rollout_memory, count_parameters, estimate_rollout_memory
from .rollout_statistics import RolloutStatistics
from .schedules import kl_budget
from .stop_alignment import StopAlignment, as_id_list
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


class TRBDistillTrainer(DistillationTrainer):
    r"""
    [`~trl.DistillationTrainer`] with Trust-Region behaviour Blending (TRB) rollouts.

    Same constructor and behaviour as the parent, except the rollout step: during the first `trb_warmup_steps`
    optimizer steps, completions are sampled from mu = pi_S^(1-beta) pi_T^beta with the largest beta keeping
    KL(mu || pi_S) <= epsilon_k, through a [`TrustRegionBlendingProcessor`] that runs the teacher next to the student
    inside `generate`. epsilon_k follows `trb_schedule` from `state.global_step`, so every micro-batch of one
    gradient-accumulation cycle shares it and a resumed run continues the schedule. When epsilon_k = 0, and in
    evaluation, the parent's rollout runs verbatim (including its vLLM path). The data pipeline, PEFT, tools,
    logging and saving are the parent's.

    Stop tokens: when the teacher stops on ids the student does not (an instruct teacher's `<|im_end|>`, a Base
    student's `<|endoftext|>`), both the rollout and the loss see one "stop" event: the teacher's stop mass is moved
    onto the student's stop id before blending, and both models' stop mass is merged the same way before the
    divergence (at every epsilon, 0 included). When the two share their stop ids, the loss is the parent's, exactly.

    Logged per step (reduced over processes once per log): `trb/epsilon`, `trb/beta/{mean,min,max}`,
    `trb/teacher_fraction`, `trb/kl_to_student/{mean,max}`, `trb/kl_to_teacher/mean`, `trb/teacher_invalid_fraction`,
    `trb/rollout_teacher_seconds`, and a W&B histogram of beta (sampled on every process) when W&B is on.
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
        if report_to_wandb:
            _put_wandb_runs_under(args.output_dir)
        super().__init__(model, teacher_model, args, *pargs, **kwargs)
        if self.teacher_model is None and args.trb_epsilon > 0:
            raise ValueError("trb_epsilon > 0 needs a local teacher model to blend with; pass `teacher_model`.")
        if self._is_vlm and args.trb_epsilon > 0:
            raise ValueError(
                "trb_epsilon > 0 does not support vision-language models yet: the teacher's forward inside `generate` "
                "does not receive the images. Set trb_epsilon=0 (plain on-policy distillation)."
            )
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
        self._trb_stop_alignment = (
            StopAlignment.between(self.eos_token_ids, self._trb_teacher_eos_token_ids)
            if self.teacher_model is not None
            else None
        )
        self._trb_statistics = RolloutStatistics(
            self.accelerator.device,
            histogram_samples=_HISTOGRAM_SAMPLES_PER_PROCESS if report_to_wandb else 0,
            seed=args.seed,
        )
        if args.trb_epsilon > 0 and self.accelerator.device.type == "cuda":
            self._check_rollout_memory()

    def _check_rollout_memory(self) -> None:
        """Fail (or warn) before training if a TRB rollout cannot fit on the GPU, showing the arithmetic."""
        student = self.accelerator.unwrap_model(self.model)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        generation_batch = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        device_bytes = torch.cuda.get_device_properties(self.accelerator.device).total_memory
        estimate = estimate_rollout_memory(
            student_config=student.config,
            teacher_config=teacher.config,
            student_params=count_parameters(student),
            teacher_params=count_parameters(teacher),
            num_sequences=min(generation_batch, self.args.trb_generation_batch_size or generation_batch),
            sequence_length=ASSUMED_PROMPT_TOKENS + self.args.max_completion_length,
            dtype_bytes=next(teacher.parameters()).dtype.itemsize,
            world_size=self.accelerator.num_processes,
            zero_stage=self._dist.zero_stage,
            gather_student=self.args.ds3_gather_for_generation,
            gather_teacher=self.args.trb_gather_teacher_for_generation,
            vllm_reserved_fraction=self._vllm_reserved_fraction(),
            device_bytes=device_bytes,
        )
        warning = check_rollout_memory(estimate, device_bytes, self.args.trb_memory_preflight)
        if warning:
            logger.warning(warning)

    def _vllm_reserved_fraction(self) -> float:
        """Device memory a colocated vLLM engine keeps through the HF warmup rollouts (none while asleep)."""
        args = self.args
        if not args.use_vllm or args.vllm_mode != "colocate" or args.vllm_enable_sleep_mode:
            return 0.0
        return float(args.vllm_gpu_memory_utilization)

    def trb_epsilon_at(self, step: int) -> float:
        """The KL budget epsilon_k of the rollout made at optimizer step `step`."""
        return kl_budget(self.args.trb_schedule, step, self.args.trb_epsilon, self.args.trb_warmup_steps)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        if not self.model.training:  # evaluation measures the student's own rollouts
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        epsilon = self.trb_epsilon_at(self.state.global_step)
        self._metrics["train"]["trb/epsilon"].append(epsilon)
        if epsilon == 0.0:
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, has_tool_images)
        chunk = self.args.trb_generation_batch_size or len(prompt_ids)
        if chunk < len(prompt_ids) and (images is not None or multimodal_fields):
            raise ValueError("trb_generation_batch_size does not support vision-language inputs; unset it.")
        completion_ids = []
        with self._trust_region_rollout(epsilon):
            for start in range(0, len(prompt_ids), chunk):
                completion_ids += super()._generate_single_turn(
                    prompt_ids[start : start + chunk], images, multimodal_fields, has_tool_images
                )
        return completion_ids

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        if self._trb_stop_alignment is None:
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)
        aligned = functools.partial(stop_aligned_divergence_loss, alignment=self._trb_stop_alignment)
        with divergence_function_replaced(aligned):
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)

    @contextlib.contextmanager
    def _trust_region_rollout(self, epsilon: float):
        """Run the parent's HF `generate` path with a `TrustRegionBlendingProcessor` appended to its processors."""
        student = self.accelerator.unwrap_model(self.model_wrapped)
        use_vllm, self.use_vllm = self.use_vllm, False  # the teacher cannot run inside vLLM: HF generate in warmup
        shadowed = student.__dict__.get("generate")
        original_generate = student.generate
        gather = self.args.trb_gather_teacher_for_generation
        # A teacher left sharded under ZeRO-3 needs collectives in its forward, so it must step wherever the student
        # steps (finished ranks included), not in the logits processor, which `synced_gpus` skips on finished ranks.
        step_with_student = self._dist.is_zero3 and not gather
        hook_target = student.get_base_model() if hasattr(student, "get_base_model") else student
        try:
            with gathered_without_hooks(self.teacher_model, self.accelerator, gather=gather) as teacher:

                def generate_with_trust_region(*args, **kwargs):
                    processor = TrustRegionBlendingProcessor(
                        teacher,
                        epsilon,
                        prompt_attention_mask=kwargs.get("attention_mask"),
                        temperature=self.generation_config.temperature or 1.0,  # what generate samples at
                        vocab_size=self._trb_vocab_size,
                        student_eos_token_id=self.eos_token_ids,
                        teacher_eos_token_id=self._trb_teacher_eos_token_ids,
                    )
                    processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
                    processors.append(processor)
                    if step_with_student:
                        processor.attach_to_student(hook_target)
                    try:
                        sequences = original_generate(*args, logits_processor=processors, **kwargs)
                    finally:
                        processor.release()  # this chunk's teacher KV cache goes now, not at the end of the rollout
                    self._trb_statistics.add(
                        processor.statistics(),
                        teacher_seconds=processor.teacher_seconds,
                        step=self.state.global_step,
                    )
                    return sequences

                student.generate = generate_with_trust_region
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
        if self.model.training and self._trb_statistics.pending:
            metrics, beta_sample = self._trb_statistics.reduce(self.accelerator.gather)
            for name, value in metrics.items():
                self._metrics["train"][name].append(value)
            invalid = metrics.get("trb/teacher_invalid_fraction", 0.0)
            if invalid > 0 and self.accelerator.is_main_process:
                logger.warning(
                    f"{100 * invalid:.3g}% of rollout tokens had invalid teacher logits (NaN, or no finite mass on the "
                    "allowed tokens) and were drawn from the student. Check the teacher's dtype and weights."
                )
            if beta_sample is not None and beta_sample.numel() and self.accelerator.is_main_process:
                import wandb

                if wandb.run is not None:  # merged into the row the parent's W&B callback commits next
                    wandb.log({"train/trb/beta_histogram": wandb.Histogram(beta_sample.numpy())}, commit=False)
        super().log(logs, start_time)
