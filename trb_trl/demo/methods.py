"""The methods `trb-trl demo` compares, at demo scale.

Every method is one `TRBDistillConfig` that differs from the others only in its method fields (`rollout_policy`,
`trb_*`, `skd_*`, `temperature_warmup_*`, `veto_*`, `sft_warmup_steps`); the budget (steps, batch, learning rate,
temperature, seeds, evaluation) is the shared `RunSettings`. The paper's sweep values are scaled to the demo: runs of
tens of steps instead of hundreds, and vocabularies of tens of tokens instead of 151,936. `METHODS` is a registry:
an arm added to it runs with `--methods NAME` like the others.
"""

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RunSettings:
    """The budget every method shares, and each method's demo-scale knobs.

    `warmup_steps` (K) is the warmup length of every method that has one (TRB's anneal, the temperature ramp, the
    SFT warmup's supervised steps), so that the warmups are compared over the same stretch of the run."""

    steps: int
    batch_size: int
    learning_rate: float
    temperature: float
    eval_every: int
    eval_temperature: float
    epsilon: float
    warmup_steps: int
    skd_top_k: int = 1
    skd_teacher_temperature: float = 1.0
    temperature_warmup_start: float = 0.8
    veto_beta_start: float = 0.4


@dataclass(frozen=True)
class DemoMethod:
    """One arm of the comparison: how it is labelled and drawn, its config fields, the per-step metrics of the
    trainer's log that show what it does (recorded in `report.json` and drawn in `report.png`), and the trainer and
    config classes that run it (`"module:Class"`, imported when the arm runs). Every arm so far is a
    `TRBDistillTrainer`; an arm on another trainer names its own classes, and its config gets the shared budget
    (`runner.distillation_config`) plus `fields`."""

    label: str
    color: str
    fields: Callable[[RunSettings], dict]
    describe: Callable[[RunSettings], str]
    metrics: tuple[str, ...] = ()
    trainer: str = "trb_trl.trb_distill_trainer:TRBDistillTrainer"
    config: str = "trb_trl.trb_distill_config:TRBDistillConfig"

    def trainer_class(self) -> type:
        return _load(self.trainer)

    def config_class(self) -> type:
        return _load(self.config)


def _load(path: str) -> type:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


_TROPD_TRAINER, _TROPD_CONFIG = "trb_trl.tropd_trainer:TrOPDTrainer", "trb_trl.tropd_config:TrOPDConfig"


def _tropd_baseline_arm(label: str, color: str, objective: str, description: str, metrics: tuple) -> DemoMethod:
    """An arm of TrOPD's trainer with one of its comparison's objectives, on student rollouts without guidance."""
    return DemoMethod(
        label=label,
        color=color,
        fields=lambda s: {"rollout_policy": "student", "tropd_objective": objective, "tropd_guidance": False},
        describe=lambda s: description,
        metrics=metrics,
        trainer=_TROPD_TRAINER,
        config=_TROPD_CONFIG,
    )


METHODS: dict[str, DemoMethod] = {
    "opd": DemoMethod(
        label="vanilla OPD",
        color="tab:blue",
        fields=lambda s: {"rollout_policy": "student"},
        describe=lambda s: "student rollouts at every step",
    ),
    "trb": DemoMethod(
        label="TRB",
        color="tab:orange",
        fields=lambda s: {"rollout_policy": "trb", "trb_epsilon": s.epsilon, "trb_warmup_steps": s.warmup_steps},
        describe=lambda s: f"trust-region blend, epsilon_0={s.epsilon:g} annealed to 0 over K={s.warmup_steps} steps",
        metrics=("trb/epsilon", "trb/beta/mean"),
    ),
    "fixed_epsilon": DemoMethod(
        label="fixed-ε",
        color="tab:green",
        fields=lambda s: {"rollout_policy": "fixed_epsilon", "trb_epsilon": s.epsilon},
        describe=lambda s: f"trust-region blend, epsilon={s.epsilon:g} for the whole run",
        metrics=("trb/epsilon", "trb/beta/mean"),
    ),
    "skd": DemoMethod(
        label="SKD",
        color="tab:red",
        fields=lambda s: {
            "rollout_policy": "skd",
            "skd_top_k": s.skd_top_k,
            "skd_teacher_temperature": s.skd_teacher_temperature,
        },
        describe=lambda s: (
            f"student tokens outside the teacher's top-{s.skd_top_k} replaced by teacher samples at temperature "
            f"{s.skd_teacher_temperature:g}, for the whole run"
        ),
        metrics=("skd/replacement_rate",),
    ),
    "temperature": DemoMethod(
        label="temperature warmup",
        color="tab:purple",
        fields=lambda s: {
            "rollout_policy": "temperature",
            "temperature_warmup_start": s.temperature_warmup_start,
            "temperature_warmup_steps": s.warmup_steps,
        },
        describe=lambda s: (
            f"rollout temperature {s.temperature_warmup_start:g} rising linearly to {s.temperature:g} at step "
            f"K={s.warmup_steps}"
        ),
        metrics=("rollout/temperature",),
    ),
    "veto": DemoMethod(
        label="Veto",
        color="tab:brown",
        fields=lambda s: {"rollout_policy": "student", "veto_beta_start": s.veto_beta_start},
        describe=lambda s: (
            f"student rollouts; loss target pi_T * pi_S^beta, beta {s.veto_beta_start:g} decaying to 0 over the run"
        ),
        metrics=("veto/beta",),
    ),
    "sft_warmup": DemoMethod(
        label="SFT warmup",
        color="tab:gray",
        fields=lambda s: {"rollout_policy": "student", "sft_warmup_steps": s.warmup_steps},
        describe=lambda s: (
            f"{s.warmup_steps} supervised steps on teacher responses to the prompts of the first {s.warmup_steps} "
            "OPD steps, then student rollouts"
        ),
    ),
    # Not in the default set (the 10-minute budget), nor are the arms after it: `--methods opd,trb,tropd`.
    "tropd": DemoMethod(
        label="TrOPD",
        color="tab:olive",
        fields=lambda s: {"rollout_policy": "student", "tropd_prefix_steps": s.warmup_steps},
        describe=lambda s: (
            "TrOPD's loss (trust-region K1, top-k forward KL on outliers) on student rollouts, teacher prefixes "
            f"cosine-annealed to none over K={s.warmup_steps} steps"
        ),
        metrics=("tropd/prefix_max_length", "tropd/trust_fraction"),
        trainer=_TROPD_TRAINER,
        config=_TROPD_CONFIG,
    ),
    # The loss-side baselines of TrOPD's comparison (docs/tropd.md), on student rollouts without guidance; on request.
    "eopd": _tropd_baseline_arm(
        "EOPD",
        "tab:cyan",
        "eopd",
        "K1 plus a renormalised top-16 forward KL where the teacher's entropy is >= 0.8 nats",
        ("tropd/switched_fraction",),
    ),
    "entropy_opd": _tropd_baseline_arm(
        "Entropy OPD 20%",
        "tab:pink",
        "entropy_top",
        "K1 on the 20% of tokens of highest student entropy",
        ("tropd/selected_fraction",),
    ),
    "reopold": _tropd_baseline_arm(
        "REOPOLD",
        "darkgoldenrod",
        "reopold",
        "K1 with the reward clipped at log(0.3)/0.7, on the 20% of tokens of highest entropy",
        ("tropd/selected_fraction", "tropd/clipped_fraction"),
    ),
}

METHOD_LABELS = {name: method.label for name, method in METHODS.items()}
METHOD_COLORS = {name: method.color for name, method in METHODS.items()}


def parse_methods(text: str) -> list[str]:
    """`"opd,trb"` -> `["opd", "trb"]` (order kept, repeats dropped); `"all"` is every method. A `ValueError` names
    any unknown method and lists the valid ones."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return list(METHODS)
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        problem = f"unknown method{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}" if unknown else ""
        raise ValueError(
            f"{problem or 'no method given'}; choose a comma-separated subset of {', '.join(METHODS)} (or 'all')."
        )
    return list(dict.fromkeys(names))


def methods_argument(text: str) -> list[str]:
    """`parse_methods` for argparse, which prints an `ArgumentTypeError`'s message as the usage error."""
    try:
        return parse_methods(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
