import contextlib
import textwrap

import torch
from transformers import LogitsProcessorList
from transformers.utils import logging

from ._compat import DistillationTrainer
from .logits_processor import TrustRegionBlendingProcessor, _as_id_list, output_vocab_size
from .memory_preflight import check_rollout_memory, count_parameters, estimate_rollout_memory
from .schedules import kl_budget
from .trb_distill_config import TRBDistillConfig
from .zero3 import gathered_without_hooks


logger = logging.get_logger(__name__)
# The preflight cannot know prompt lengths before data is read; it assumes this many prompt tokens per sequence.
ASSUMED_PROMPT_TOKENS = 1024
# How many beta values each process contributes to the W&B histogram per rollout.
_HISTOGRAM_SAMPLES_PER_PROCESS = 4096


class TRBDistillTrainer(DistillationTrainer):
    r"""
    [`~trl.DistillationTrainer`] with Trust-Region behaviour Blending (TRB) rollouts.

    Same constructor and behaviour as the parent, except the rollout step: during the first `trb_warmup_steps`
    optimizer steps, completions are sampled from mu = pi_S^(1-beta) pi_T^beta with the largest beta keeping
    KL(mu || pi_S) <= epsilon_k, through a [`TrustRegionBlendingProcessor`] that runs the teacher next to the student
    inside `generate`. epsilon_k follows `trb_schedule` from `state.global_step`, so every micro-batch of one
    gradient-accumulation cycle shares it and a resumed run continues the schedule. When epsilon_k = 0, and in
    evaluation, the parent's rollout runs verbatim (including its vLLM path). The loss, data pipeline, PEFT, tools,
    logging and saving are the parent's.

    Logged per step (averaged over processes): `trb/epsilon`, `trb/beta/{mean,min,max}`, `trb/teacher_fraction`,
    `trb/kl_to_student/{mean,max}`, `trb/kl_to_teacher/mean`, `trb/rollout_teacher_seconds`, and a W&B histogram of
    beta when W&B is on.
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
        super().__init__(model, teacher_model, args, *pargs, **kwargs)
        if self.teacher_model is None and args.trb_epsilon > 0:
            raise ValueError("trb_epsilon > 0 needs a local teacher model to blend with; pass `teacher_model`.")
        self._trb_vocab_size = len(self._tokenizer)
        if self.teacher_model is not None:
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            for role, net in (("student", self.accelerator.unwrap_model(self.model)), ("teacher", teacher)):
                if output_vocab_size(net) < self._trb_vocab_size:
                    raise ValueError(
                        f"The tokenizer has {self._trb_vocab_size} tokens but the {role} only scores "
                        f"{output_vocab_size(net)}: student and teacher must share the student's tokenizer."
                    )
            self._trb_teacher_eos_token_ids = _as_id_list(teacher.generation_config.eos_token_id)
        self._trb_processors: list[TrustRegionBlendingProcessor] = []
        self._trb_beta_samples: list[torch.Tensor] = []
        if args.trb_epsilon > 0 and self.accelerator.device.type == "cuda":
            self._check_rollout_memory()

    def _check_rollout_memory(self) -> None:
        """Fail (or warn) before training if a TRB rollout cannot fit on the GPU, showing the arithmetic."""
        student = self.accelerator.unwrap_model(self.model)
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        generation_batch = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
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
        )
        device_bytes = torch.cuda.get_device_properties(self.accelerator.device).total_memory
        warning = check_rollout_memory(estimate, device_bytes, self.args.trb_memory_preflight)
        if warning:
            logger.warning(warning)

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
        self._log_rollout_statistics()
        return completion_ids

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
                    self._trb_processors.append(processor)
                    processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
                    processors.append(processor)
                    if step_with_student:
                        processor.attach_to_student(hook_target)
                    try:
                        return original_generate(*args, logits_processor=processors, **kwargs)
                    finally:
                        processor.detach()

                student.generate = generate_with_trust_region
                yield
        finally:
            if shadowed is None:
                student.__dict__.pop("generate", None)
            else:
                student.generate = shadowed
            self.use_vllm = use_vllm

    def _log_rollout_statistics(self) -> None:
        """Reduce this rollout's per-token statistics over processes into the parent's metric store."""
        processors, self._trb_processors = self._trb_processors, []
        device = self.accelerator.device
        stats = [p.statistics() for p in processors]
        beta = torch.cat([s["beta"] for s in stats]).to(device)
        kl_student = torch.cat([s["kl_to_student"] for s in stats]).to(device)
        kl_teacher = torch.cat([s["kl_to_teacher"] for s in stats]).to(device)
        teacher_seconds = sum(p.teacher_seconds for p in processors)
        count = beta.numel()
        inf = torch.tensor(float("inf"), device=device)
        local = torch.stack(
            [
                torch.tensor(float(count), device=device),
                beta.sum(),
                beta.min() if count else inf,
                beta.max() if count else -inf,
                (beta >= 1.0).float().sum(),
                kl_student.sum(),
                kl_student.max() if count else -inf,
                kl_teacher.sum(),
                torch.tensor(teacher_seconds, device=device),
            ]
        )
        gathered = self.accelerator.gather(local[None]).view(-1, local.numel())
        total = gathered[:, 0].sum().item()
        metrics = self._metrics["train"]
        metrics["trb/rollout_teacher_seconds"].append(gathered[:, 8].mean().item())
        if total == 0:
            return
        metrics["trb/beta/mean"].append(gathered[:, 1].sum().item() / total)
        metrics["trb/beta/min"].append(gathered[:, 2].min().item())
        metrics["trb/beta/max"].append(gathered[:, 3].max().item())
        metrics["trb/teacher_fraction"].append(gathered[:, 4].sum().item() / total)
        metrics["trb/kl_to_student/mean"].append(gathered[:, 5].sum().item() / total)
        metrics["trb/kl_to_student/max"].append(gathered[:, 6].max().item())
        metrics["trb/kl_to_teacher/mean"].append(gathered[:, 7].sum().item() / total)
        if self._wandb_enabled() and count:
            keep = torch.randperm(count, device=beta.device)[:_HISTOGRAM_SAMPLES_PER_PROCESS]
            self._trb_beta_samples.append(beta[keep].cpu())

    def _wandb_enabled(self) -> bool:
        return bool(self.args.report_to) and "wandb" in self.args.report_to and self.accelerator.is_main_process

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._trb_beta_samples:
            import wandb

            samples, self._trb_beta_samples = torch.cat(self._trb_beta_samples), []
            if wandb.run is not None:
                # Merged into the row the parent's W&B callback commits next.
                wandb.log({"train/trb/beta_histogram": wandb.Histogram(samples.numpy())}, commit=False)
        super().log(logs, start_time)
