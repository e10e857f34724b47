"""Where one optimizer step's prefixes come from: a rollout source, chosen from the config and the schedule in one
place ([`rollout_source_at`]) and run by the trainer.

| source | what a rollout is | config |
|---|---|---|
| [`StudentRollout`] | the parent's rollout, verbatim (vLLM included) | `rollout_policy: student`, or a warmup that is over |
| [`TrustRegionRollout`] | mu = pi_S^(1-beta) pi_T^beta within KL epsilon (processor or speculative engine) | `trb`, `fixed_epsilon` |
| [`TeacherInjectionRollout`] | SKD: a student token outside the teacher's top-k replaced by a teacher sample | `skd` |
| [`TemperatureRollout`] | the student at a rising temperature | `temperature` |
| [`TeacherPrefixRollout`] | a teacher prefix of length l, continued by another source | TrOPD's `tropd_guidance` |

A source also carries the schedule values the trainer logs for it (`metrics`, e.g. `trb/epsilon`), so a step whose
warmup is over still logs where its schedule stands.
"""

import dataclasses
from collections.abc import Mapping

from ..schedules import active_for, cosine_prefix_length, kl_budget, rollout_temperature
from .speculative import SpeculativeBlendingSampler
from .teacher_injection import TeacherInjectionProcessor
from .temperature import RolloutTemperatureProcessor
from .trust_region import TrustRegionBlendingProcessor


@dataclasses.dataclass(frozen=True)
class GuidedRolloutSettings:
    """What the trainer knows that every teacher-guided processor needs: the shared vocabulary, both models' stop
    ids, and `generate`'s sampling settings."""

    vocab_size: int
    student_stop_ids: tuple[int, ...]
    teacher_stop_ids: tuple[int, ...]
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def processor_kwargs(self, attention_mask) -> dict:
        return {
            "prompt_attention_mask": attention_mask,
            "temperature": self.temperature,
            "vocab_size": self.vocab_size,
            "student_eos_token_id": list(self.student_stop_ids),
            "teacher_eos_token_id": list(self.teacher_stop_ids),
        }


@dataclasses.dataclass(frozen=True)
class RolloutSource:
    """A rollout source. `uses_teacher`: the teacher decodes next to the student inside `generate` (gathered for the
    rollout under ZeRO-3). `processor(...)` is what `generate` gets appended for one call (None: nothing)."""

    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)

    name = "student"
    uses_teacher = False

    def processor(self, teacher, attention_mask, settings: GuidedRolloutSettings):
        return None

    # False only where the rollout is the parent's, verbatim.
    changes_rollout = True


@dataclasses.dataclass(frozen=True)
class StudentRollout(RolloutSource):
    """The parent's rollout (vanilla OPD; any warmup once it is over)."""

    changes_rollout = False


@dataclasses.dataclass(frozen=True)
class TrustRegionRollout(RolloutSource):
    """TRB and fixed-epsilon: the blend within KL `epsilon` of the student, by the processor inside `generate` or by
    the speculative engine in its place."""

    epsilon: float = 0.0
    engine: str = "processor"
    draft_length: int = 8
    adaptive_draft_length: bool = False

    name = "trust_region"
    uses_teacher = True

    def processor(self, teacher, attention_mask, settings):
        kwargs = settings.processor_kwargs(attention_mask)
        if self.engine == "speculative":  # the same law, run by the trainer's rollout instead of generate
            kwargs.pop("prompt_attention_mask")
            return SpeculativeBlendingSampler(
                teacher,
                self.epsilon,
                draft_length=self.draft_length,
                adaptive_draft_length=self.adaptive_draft_length,
                **kwargs,
            )
        return TrustRegionBlendingProcessor(teacher, self.epsilon, **kwargs)


@dataclasses.dataclass(frozen=True)
class TeacherInjectionRollout(RolloutSource):
    """SKD's interleaved teacher injection."""

    top_k: int = 1
    teacher_temperature: float = 1.0

    name = "skd"
    uses_teacher = True

    def processor(self, teacher, attention_mask, settings):
        return TeacherInjectionProcessor(
            teacher,
            self.top_k,
            teacher_temperature=self.teacher_temperature,
            top_k_sampling=settings.top_k,
            top_p=settings.top_p,
            min_p=settings.min_p,
            **settings.processor_kwargs(attention_mask),
        )


@dataclasses.dataclass(frozen=True)
class TemperatureRollout(RolloutSource):
    """Temperature warmup: the student sampled at `temperature` instead of `generate`'s."""

    temperature: float = 1.0
    sampling_temperature: float = 1.0

    name = "temperature"

    def processor(self, teacher, attention_mask, settings):
        return RolloutTemperatureProcessor(self.temperature, self.sampling_temperature)


@dataclasses.dataclass(frozen=True)
class TeacherPrefixRollout(RolloutSource):
    """TrOPD's guidance: each row starts with a teacher prefix of a length drawn up to `max_length` (`sampling`),
    continued by `continuation` within what the prefix leaves of the completion budget."""

    continuation: RolloutSource = dataclasses.field(default_factory=StudentRollout)
    max_length: int = 0
    sampling: str = "uniform"

    name = "teacher_prefix"


def rollout_source_at(args, step: int, *, max_steps: int, sampling_temperature: float) -> RolloutSource:
    """The rollout source of optimizer step `step`, from the config (`rollout_policy` and its schedule; TrOPD's
    guidance when the config has it) and the run's length `max_steps` (schedules that anneal over the run)."""
    source = _warmup_source_at(args, step, sampling_temperature)
    if not getattr(args, "tropd_guidance", False):
        return source
    anneal_steps = args.prefix_anneal_steps or max_steps or 0
    max_length = cosine_prefix_length(step, args.prefix_max_length, anneal_steps)
    metrics = {**source.metrics, "tropd/prefix_max_length": max_length}
    if max_length == 0:
        return dataclasses.replace(source, metrics=metrics)
    return TeacherPrefixRollout(
        metrics=metrics, continuation=source, max_length=max_length, sampling=args.tropd_prefix_sampling
    )


def _warmup_source_at(args, step: int, sampling_temperature: float) -> RolloutSource:
    policy = args.rollout_policy
    if policy in ("trb", "fixed_epsilon"):
        epsilon = kl_budget(args.trb_schedule, step, args.trb_epsilon, args.trb_warmup_steps)
        metrics = {"trb/epsilon": epsilon}
        if epsilon == 0.0:
            return StudentRollout(metrics)
        return TrustRegionRollout(
            metrics,
            epsilon=epsilon,
            engine=args.trb_rollout_engine,
            draft_length=args.trb_draft_length,
            adaptive_draft_length=args.trb_adaptive_draft_length,
        )
    if policy == "skd":
        active = active_for(step, args.skd_steps)
        metrics = {"skd/active": float(active)}
        if not active:
            return StudentRollout(metrics)
        return TeacherInjectionRollout(metrics, top_k=args.skd_top_k, teacher_temperature=args.skd_teacher_temperature)
    if policy == "temperature":
        temperature = rollout_temperature(
            step, args.temperature_warmup_start, args.temperature, args.temperature_warmup_steps
        )
        metrics = {"rollout/temperature": temperature}
        if temperature == sampling_temperature:
            return StudentRollout(metrics)
        return TemperatureRollout(metrics, temperature=temperature, sampling_temperature=sampling_temperature)
    return StudentRollout()
