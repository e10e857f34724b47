import os
import textwrap

from transformers.utils import logging

from .schedules import veto_weight
from .trainer_base import ASSUMED_PROMPT_TOKENS, OPDTrainerBase
from .trb_distill_config import TRBDistillConfig


logger = logging.get_logger(__name__)

__all__ = ["ASSUMED_PROMPT_TOKENS", "TRBDistillTrainer"]


def _warn_unless_sft_warmed(model, args: TRBDistillConfig) -> None:
    """The trainer runs OPD only; the SFT phase runs before it (`trb-trl train`). Say so when the student given does
    not come from that phase, rather than ignore `sft_warmup_steps` silently."""
    name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
    if os.path.abspath(str(name)) != os.path.abspath(args.sft_warmup_dir):
        logger.warning(
            f"sft_warmup_steps={args.sft_warmup_steps}, but TRBDistillTrainer trains OPD only and this student does not "
            f"come from {args.sft_warmup_dir}. Run the SFT phase first (`trb-trl train`, or "
            "`trb_trl.sft_warmup.run_sft_warmup`) and pass its checkpoint as `model`, or set sft_warmup_steps=0."
        )


class TRBDistillTrainer(OPDTrainerBase):
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
    logging and saving are the parent's. Both choices are made per step in one place each: the rollout source
    (`rollout/sources.py`) and the divergence (`losses/divergences.py`), run by [`OPDTrainerBase`], which
    [`TrOPDTrainer`] shares.

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
        if not isinstance(args, TRBDistillConfig) or hasattr(args, "tropd_objective"):
            raise TypeError(
                f"TRBDistillTrainer needs a TRBDistillConfig, got {type(args).__name__}"
                + (" (a TrOPD config: use TrOPDTrainer)." if hasattr(args, "tropd_objective") else ".")
            )
        if args.sft_warmup_steps > 0:
            _warn_unless_sft_warmed(model, args)
        super().__init__(model, teacher_model, args, *pargs, **kwargs)

    def veto_beta_at(self, step: int) -> float:
        """Veto's student weight beta_k in the target pi_T * pi_S^beta_k at optimizer step `step`."""
        args = self.args
        return veto_weight(step, args.veto_beta_start, args.veto_decay_steps or self.state.max_steps)
