"""What one micro-batch learns: a divergence, chosen from the config and the schedule in one place
([`divergence_at`]) and handed to TRL's loss by the trainer.

| divergence | loss | config |
|---|---|---|
| [`TRLDivergence`] | TRL's own `_chunked_divergence_loss`, verbatim | same stop ids, no Veto, no `loss_top_k` |
| [`StopAlignedDivergence`] | TRL's divergence on the stop-aligned distributions, or against Veto's target | different stop ids, or `veto_beta_start > 0` |
| [`TopKDivergence`] | the TRB paper's top-k reverse KL (`loss_top_k`) | `loss_top_k` |
| [`TrOPDDivergence`] | TrOPD's objective or one of its comparison's baselines | a `TrOPDConfig` |

`drop_in(inputs)` is the function to use in place of TRL's divergence for the micro-batch `inputs` (None: TRL's own),
and `metrics` the schedule values the trainer logs for it (e.g. `veto/beta`).
"""

import dataclasses
import functools
from collections.abc import Callable, Mapping

from ..schedules import veto_weight
from ..stop_alignment import StopAlignment
from .opd_baselines import REOPOLD_STAGES
from .stop_aligned_divergence import stop_aligned_divergence_loss
from .top_k_divergence import top_k_divergence_loss
from .tropd import TrOPDLossSpec, tropd_loss


@dataclasses.dataclass
class Divergence:
    """A divergence (see the module docstring); `metrics` are logged with the step."""

    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)

    name = "trl"

    def drop_in(self, inputs: Mapping) -> Callable | None:
        return None


@dataclasses.dataclass
class TRLDivergence(Divergence):
    """TRL's divergence, verbatim."""


@dataclasses.dataclass
class StopAlignedDivergence(Divergence):
    alignment: StopAlignment | None = None
    veto_weight: float = 0.0

    name = "stop_aligned"

    def drop_in(self, inputs):
        return functools.partial(stop_aligned_divergence_loss, alignment=self.alignment, veto_weight=self.veto_weight)


@dataclasses.dataclass
class TopKDivergence(Divergence):
    top_k: int = 16
    alignment: StopAlignment | None = None
    veto_weight: float = 0.0
    estimator: str = "policy_gradient"

    name = "top_k"

    def drop_in(self, inputs):
        return functools.partial(
            top_k_divergence_loss,
            top_k=self.top_k,
            alignment=self.alignment,
            veto_weight=self.veto_weight,
            estimator=self.estimator,
        )


@dataclasses.dataclass
class TrOPDDivergence(Divergence):
    """TrOPD's per-token objective (and its comparison's baselines). `token_draws(shape, device)` gives the uniform
    draws of the adaptive trust mask; `records` collects the loss's sums and counts over the micro-batches it is used
    for (the trainer reduces them once per log)."""

    spec: TrOPDLossSpec = dataclasses.field(default_factory=TrOPDLossSpec)
    alignment: StopAlignment | None = None
    stage: str = "refinement"
    token_draws: Callable | None = None
    records: dict = dataclasses.field(default_factory=dict)

    name = "tropd"

    def drop_in(self, inputs):
        completion_ids = inputs["completion_ids"]
        draws = self.token_draws(completion_ids.shape, completion_ids.device) if self.token_draws else None
        return functools.partial(
            tropd_loss,
            completion_ids=completion_ids,
            is_prefix=inputs.get("tropd_prefix_mask"),
            trust_draws=draws,
            spec=self.spec,
            alignment=self.alignment,
            records_out=self.records,
            stage=self.stage,
        )


def tropd_loss_spec(args) -> TrOPDLossSpec:
    """A `TrOPDConfig`'s loss settings as a [`TrOPDLossSpec`]."""
    return TrOPDLossSpec(
        objective=args.tropd_objective,
        outlier=args.tropd_outlier,
        outlier_detection=args.tropd_outlier_detection,
        threshold=args.tropd_threshold,
        top_k=args.tropd_top_k,
        jsd_beta=args.tropd_jsd_beta,
        guidance_weight=args.tropd_guidance_weight,
        eopd_entropy_threshold=args.eopd_entropy_threshold,
        eopd_weight=args.eopd_weight,
        eopd_top_k=args.eopd_top_k,
        selection_fraction=args.entropy_selection_fraction,
        selection_scope=args.entropy_selection_scope,
        reopold_mixture_weight=args.reopold_mixture_weight,
    )


def reopold_stage(args, step: int, max_steps: int) -> str:
    """REOPOLD's stage at optimizer step `step`: `"exploration"` before `reopold_switch_step` (default: half the run)
    with `reopold_schedule="two_stage"`, `"refinement"` otherwise."""
    if getattr(args, "reopold_schedule", "single") != "two_stage":
        return REOPOLD_STAGES[1]
    switch = args.reopold_switch_step or (max_steps or args.max_steps) // 2
    return REOPOLD_STAGES[0] if step < switch else REOPOLD_STAGES[1]


def divergence_at(
    args,
    step: int,
    *,
    training: bool,
    max_steps: int,
    alignment: StopAlignment | None,
    token_draws: Callable | None = None,
    spec: TrOPDLossSpec | None = None,
) -> Divergence:
    """The divergence of a micro-batch at optimizer step `step` (`training=False`: an evaluation loss, without the
    training schedules), from the config: TrOPD's objective for a config that has one, else the TRB trainer's
    (`loss_top_k`, Veto, stop alignment). `spec`: a TrOPD config's spec, when the caller already built it."""
    if hasattr(args, "tropd_objective"):
        stage = reopold_stage(args, step, max_steps)
        metrics = (
            {"reopold/exploration": float(stage == "exploration")} if args.reopold_schedule == "two_stage" else {}
        )
        return TrOPDDivergence(
            metrics if training else {},
            spec=spec or tropd_loss_spec(args),
            alignment=alignment,
            stage=stage,
            token_draws=token_draws,
        )
    veto, metrics = 0.0, {}
    if args.veto_beta_start > 0 and training:
        veto = veto_weight(step, args.veto_beta_start, args.veto_decay_steps or max_steps)
        metrics = {"veto/beta": veto}
    if args.loss_top_k is not None:
        return TopKDivergence(
            metrics, top_k=args.loss_top_k, alignment=alignment, veto_weight=veto, estimator=args.loss_top_k_estimator
        )
    if alignment is None and veto == 0.0:
        return TRLDivergence(metrics)
    return StopAlignedDivergence(metrics, alignment=alignment, veto_weight=veto)
