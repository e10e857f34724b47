"""The paper's hyper-parameter sweeps as recipes: one YAML per grid point, written from a base recipe.

```bash
trb-trl sweep recipes/qwen3_1p7b.yaml --output-dir sweeps/qwen3_1p7b                  # every method: 52 recipes
trb-trl sweep recipes/qwen3_1p7b.yaml --output-dir sweeps/qwen3_1p7b --methods skd,veto
trb-trl train sweeps/qwen3_1p7b/qwen3_1p7b-skd-k15-tauT0.2.yaml                        # one point
trb-trl sweep recipes/deepseek_r1_1p5b_tropd.yaml --output-dir sweeps/ds --methods tropd  # TrOPD's ablation
trb-trl sweep recipes/deepseek_r1_1p5b_tropd.yaml --output-dir sweeps/ds --methods tropd,tropd_baselines  # + baselines
```

The TRB paper (arXiv 2605.31159, Appendix A.2) tunes TRB and each baseline on a small grid and reports the best point
of each; the TrOPD paper (arXiv 2606.01249) ablates its loss and guidance row by row (method `tropd`, 10 points) and
compares with EOPD, REOPOLD and REOPOLD 2Stage (method `tropd_baselines`, 3 points): `--methods tropd,tropd_baselines`
on the DeepSeek recipe writes the paper's whole comparison.
`PAPER_GRIDS` holds those grids; `sweep_points` turns them into `(name, overrides)` pairs, and `write_sweep`
writes one recipe per point. A generated recipe is the base recipe with its method keys (`METHOD_KEYS`) replaced by
the point's and `output_dir` / `run_name` named for the point, so every run of a sweep shares the base's budget, seed
and data (the method keys include the loss: each paper's own, `loss_top_k: 16` and
`loss_top_k_estimator: policy_gradient` for the TRB paper's points). The base is edited line by line, so its other
keys and their comments stay as written.

Standard library and PyYAML only: `trb-trl sweep` imports neither torch nor TRL.
"""

import argparse
import itertools
import re
import sys
import textwrap
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import yaml


PROG = "trb-trl sweep"

# Keys that choose the method and its hyper-parameters. A sweep point sets the ones it needs; the base recipe's others
# are dropped, so a point never inherits another method's setting (e.g. a Veto beta in an SKD run). The rollout's
# resource settings (`gather_teacher_for_generation`, `rollout_generation_batch_size`, `rollout_memory_preflight`) are
# not method keys: they are kept from the base.
METHOD_KEYS = (
    "rollout_policy",
    "trb_epsilon",
    "trb_warmup_steps",
    "trb_schedule",
    "skd_top_k",
    "skd_teacher_temperature",
    "skd_steps",
    "temperature_warmup_start",
    "temperature_warmup_steps",
    "veto_beta_start",
    "veto_decay_steps",
    "sft_warmup_steps",
    "loss_top_k",
    "loss_top_k_estimator",
    "trainer",
    "tropd_objective",
    "tropd_outlier",
    "tropd_outlier_detection",
    "tropd_threshold",
    "tropd_top_k",
    "tropd_jsd_beta",
    "tropd_guidance",
    "tropd_guidance_weight",
    "tropd_prefix_max_length",
    "tropd_prefix_steps",
    "tropd_prefix_sampling",
    "eopd_entropy_threshold",
    "eopd_weight",
    "eopd_top_k",
    "entropy_selection_fraction",
    "entropy_selection_scope",
    "reopold_mixture_weight",
    "reopold_schedule",
    "reopold_switch_step",
)
NAMING_KEYS = ("output_dir", "run_name")

_EPSILONS = (0.001, 0.005, 0.01, 0.02, 0.05)


class SweepMethod(NamedTuple):
    """One method's grid: the keys every point sets, the swept axes `(config key, tag in the name, paper values)`,
    and a sentence for the recipe's comment, formatted with the point's values. A grid that is not a product (the
    rows of an ablation table) lists its `points` as `(tag, keys)` instead of axes."""

    fixed: dict
    axes: tuple[tuple[str, str, tuple], ...]
    summary: str
    points: tuple[tuple[str, dict], ...] = ()
    source: str = "the TRB paper's sweep grid (arXiv 2605.31159, Appendix A.2; trb_trl/sweep.py)"


# The TRB paper trains every method with reverse KL over the student's top-16 tokens (Appendix A), in its reference
# code's policy-gradient form: every point of its grids sets both, so a point is the paper's whatever the base's loss.
_TRB_LOSS = {"loss_top_k": 16, "loss_top_k_estimator": "policy_gradient"}
# TrOPD's settings shared by every row of its ablation (arXiv 2606.01249, §4): k = 64, guidance weight 1e-3; the prefix
# length drawn uniformly up to the annealed maximum is ours (docs/tropd.md).
_TROPD = {
    "trainer": "tropd",
    "rollout_policy": "student",
    "tropd_top_k": 64,
    "tropd_guidance_weight": 0.001,
    "tropd_prefix_sampling": "uniform",
}


def _tropd_row(objective: str, guidance: bool, outlier: str = "fkl", detection: str = "adaptive") -> dict:
    return {
        "tropd_objective": objective,
        "tropd_outlier": outlier,
        "tropd_outlier_detection": detection,
        "tropd_guidance": guidance,
    }


# The baselines' own constants (trb_trl/losses/opd_baselines.py, docs/tropd.md): EOPD's released code (tau 0.8 nats,
# alpha 1, k 16); the top 20% of tokens by student entropy over the micro-batch; REOPOLD's lambda 0.3 (not confirmed:
# REOPOLD's code is not public).
_ENTROPY_20 = {"entropy_selection_fraction": 0.2, "entropy_selection_scope": "batch"}
_EOPD = {"eopd_entropy_threshold": 0.8, "eopd_weight": 1.0, "eopd_top_k": 16}
_REOPOLD = {"reopold_mixture_weight": 0.3, **_ENTROPY_20}


# arXiv 2605.31159, Appendix A.2 (docs/baselines.md): the values the paper sweeps for each method.
PAPER_GRIDS: dict[str, SweepMethod] = {
    "opd": SweepMethod({"rollout_policy": "student", **_TRB_LOSS}, (), "vanilla OPD: student rollouts at every step."),
    "trb": SweepMethod(
        {"rollout_policy": "trb", "trb_schedule": "linear", **_TRB_LOSS},
        (("trb_epsilon", "e", _EPSILONS), ("trb_warmup_steps", "k", (15, 25, 50))),
        "TRB: epsilon_0 = {trb_epsilon} nats/token annealed linearly to 0 over the first K = {trb_warmup_steps} "
        "optimizer steps, then student rollouts.",
    ),
    "fixed_epsilon": SweepMethod(
        {"rollout_policy": "fixed_epsilon", "trb_schedule": "constant", **_TRB_LOSS},
        (("trb_epsilon", "e", _EPSILONS),),
        "fixed-epsilon blending: the TRB blend with epsilon = {trb_epsilon} nats/token at every step.",
    ),
    "skd": SweepMethod(
        {"rollout_policy": "skd", **_TRB_LOSS},
        (("skd_top_k", "k", (15, 25, 50)), ("skd_teacher_temperature", "tauT", (0.2, 0.6, 1.0))),
        "SKD: a sampled student token outside the teacher's top-{skd_top_k} is replaced by a teacher sample at "
        "temperature {skd_teacher_temperature}, checked at every token, for the whole run.",
    ),
    "temperature": SweepMethod(
        {"rollout_policy": "temperature", **_TRB_LOSS},
        (("temperature_warmup_start", "tau", (0.8, 0.9, 0.95)), ("temperature_warmup_steps", "end", (15, 25))),
        "temperature warmup: rollout temperature {temperature_warmup_start} at step 0, rising linearly to "
        "`temperature` at step {temperature_warmup_steps}; the loss keeps `temperature`.",
    ),
    "sft_warmup": SweepMethod(
        {"rollout_policy": "student", **_TRB_LOSS},
        (("sft_warmup_steps", "n", (15, 25, 50)),),
        "SFT warmup: {sft_warmup_steps} supervised steps on teacher responses to the prompts of the first "
        "{sft_warmup_steps} OPD steps, then OPD with student rollouts.",
    ),
    "veto": SweepMethod(
        {"rollout_policy": "student", **_TRB_LOSS},
        (("veto_beta_start", "beta", (0.2, 0.4, 0.6, 0.8)),),
        "Veto: student rollouts; the loss target is pi_T * pi_S^beta (student term detached), beta decaying "
        "linearly from {veto_beta_start} to 0 over the run.",
    ),
    # arXiv 2606.01249, the math ablation table (docs/tropd.md): one point per row. Clip and Mask are the paper's
    # static-threshold rows; "+ guidance" adds the teacher prefixes to a row.
    "tropd": SweepMethod(
        _TROPD,
        (),
        "TrOPD ablation row: tropd_objective={tropd_objective}, tropd_outlier={tropd_outlier}, "
        "tropd_outlier_detection={tropd_outlier_detection}, tropd_guidance={tropd_guidance}; TrOPD's loss, student "
        "rollouts.",
        points=(
            ("opd", _tropd_row("k1", False)),
            ("fkl", _tropd_row("fkl", False)),
            ("jsd", _tropd_row("jsd", False)),
            ("entropy_opd", {**_tropd_row("entropy_top", False), **_ENTROPY_20}),
            ("clip", _tropd_row("trust_region", False, "clip", "threshold")),
            ("mask", _tropd_row("trust_region", False, "mask", "threshold")),
            ("fkl_outlier", _tropd_row("trust_region", False)),
            ("clip_guided", _tropd_row("trust_region", True, "clip", "threshold")),
            ("mask_guided", _tropd_row("trust_region", True, "mask", "threshold")),
            ("tropd", _tropd_row("trust_region", True)),
        ),
        source="the TrOPD paper's ablation (arXiv 2606.01249, Table 1; trb_trl/sweep.py)",
    ),
    # The other loss-side baselines of its main tables (arXiv 2606.01249, Tables 2-3): without guidance, on the same
    # student rollouts and budget as every row above.
    "tropd_baselines": SweepMethod(
        _TROPD,
        (),
        "TrOPD-comparison baseline: tropd_objective={tropd_objective}, tropd_guidance={tropd_guidance}; student "
        "rollouts (trb_trl/losses/opd_baselines.py).",
        points=(
            ("eopd", {**_tropd_row("eopd", False), **_EOPD}),
            ("reopold", {**_tropd_row("reopold", False), **_REOPOLD, "reopold_schedule": "single"}),
            ("reopold_2stage", {**_tropd_row("reopold", False), **_REOPOLD, "reopold_schedule": "two_stage"}),
        ),
        source="the TrOPD paper's baselines (arXiv 2606.01249, Tables 2-3; trb_trl/sweep.py)",
    ),
}


class SweepPoint(NamedTuple):
    """One grid point: its name (`skd-k15-tauT0.2`) and the method keys it sets."""

    name: str
    overrides: dict


def _format_value(value) -> str:
    """`0.2` -> `0.2`, `1.0` -> `1.0` (a float stays visibly a float), `15` -> `15`; text as is."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value).lower()
    text = f"{value:g}"
    return f"{text}.0" if isinstance(value, float) and re.fullmatch(r"-?\d+", text) else text


def method_points(method: str) -> list[SweepPoint]:
    """The paper's grid for `method` (a key of `PAPER_GRIDS`), in grid order."""
    if method not in PAPER_GRIDS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(PAPER_GRIDS)}.")
    grid = PAPER_GRIDS[method]
    if grid.points:
        return [SweepPoint(f"{method}-{tag}", {**grid.fixed, **keys}) for tag, keys in grid.points]
    points = []
    for values in itertools.product(*(axis_values for _, _, axis_values in grid.axes)):
        swept = {key: value for (key, _, _), value in zip(grid.axes, values, strict=True)}
        tags = [f"{tag}{_format_value(value)}" for (_, tag, _), value in zip(grid.axes, values, strict=True)]
        overrides = {"rollout_policy": grid.fixed["rollout_policy"], **swept, **grid.fixed}
        points.append(SweepPoint("-".join([method, *tags]), overrides))
    return points


def sweep_points(methods: list[str] | None = None) -> list[SweepPoint]:
    """Every point of the named methods' grids (all of `PAPER_GRIDS` by default), method by method."""
    return [point for method in (methods or list(PAPER_GRIDS)) for point in method_points(method)]


def parse_methods(text: str) -> list[str]:
    """`"trb,skd"` -> `["trb", "skd"]` (order kept, repeats dropped); `"all"` is every method."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if names == ["all"]:
        return list(PAPER_GRIDS)
    unknown = [name for name in names if name not in PAPER_GRIDS]
    if unknown or not names:
        problem = f"unknown method(s) {', '.join(map(repr, unknown))}" if unknown else "no method given"
        raise ValueError(f"{problem}; choose a comma-separated subset of {', '.join(PAPER_GRIDS)} (or 'all').")
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------------------------------
# Writing recipes

_LINE_LENGTH = 119  # the recipes' comment width
_TOP_LEVEL_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:(.*)$")


def _yaml_line(key: str, value) -> str:
    return yaml.safe_dump({key: value}, default_flow_style=False, sort_keys=False, width=10_000).strip()


def _has_inline_value(rest: str) -> bool:
    return bool(rest.split(" #", 1)[0].strip())


def render_point(base_text: str, point: SweepPoint, *, name: str, base_path: str, recipe_path: str) -> str:
    """The recipe for `point` from the base recipe's text: its method keys (and the comment block right above the
    first of them) replaced by the point's, `output_dir` / `run_name` set from `name`, the leading comment block
    replaced by a generated header; everything else kept line for line. Raises `ValueError` for a base whose method
    or naming keys are not one-line values (they could not be replaced safely)."""
    base = yaml.safe_load(base_text) or {}
    if not isinstance(base, dict):
        raise ValueError(f"{base_path} is not a YAML mapping of recipe keys.")
    parent = PurePosixPath(str(base["output_dir"])).parent if "output_dir" in base else PurePosixPath("outputs")
    naming = {"output_dir": str(parent / name), "run_name": name}

    lines = base_text.splitlines()
    header_end = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    if header_end == len(lines) or not lines[header_end].strip():  # the base's header describes the base: drop it
        lines = lines[header_end:]
        while lines and not lines[0].strip():
            lines.pop(0)
    out: list[str] = []
    method_block_at = None
    seen_naming = set()
    for index, line in enumerate(lines):
        match = _TOP_LEVEL_KEY.match(line)
        key = match.group(1) if match else None
        if key in METHOD_KEYS or key in NAMING_KEYS:
            following = lines[index + 1] if index + 1 < len(lines) else ""
            continued = following[:1] in (" ", "\t", "-") and not following.lstrip().startswith("#")
            if not _has_inline_value(match.group(2)) or continued:
                raise ValueError(f"{base_path}: `{key}` must be a one-line value to be replaced in a sweep.")
        if key in METHOD_KEYS:
            while out and out[-1].startswith("#"):  # the comment above a method key describes the base's method
                out.pop()
            if method_block_at is None:
                method_block_at = len(out)
            continue
        if key in NAMING_KEYS:
            out.append(_yaml_line(key, naming[key]))
            seen_naming.add(key)
            continue
        out.append(line)

    method = name_method(point.name)
    values = {key: _format_value(value) for key, value in point.overrides.items()}
    loss = (
        " Loss: reverse KL over the student's top-16 tokens, the paper's policy-gradient form (loss_top_k, "
        "loss_top_k_estimator)."
        if "loss_top_k" in point.overrides
        else ""
    )
    comment = (
        f"Method, sweep point {point.name}: {PAPER_GRIDS[method].summary.format(**values)}{loss} Method keys not "
        "set here take their defaults; the rollout resource keys (gather_teacher_for_generation, rollout_generation_batch_size) are the base's."
    )
    block = [
        *(f"# {line}" for line in textwrap.wrap(comment, width=_LINE_LENGTH - 2)),
        *(_yaml_line(key, value) for key, value in point.overrides.items()),
    ]
    if method_block_at is None:
        out += ["", *block]
    else:
        out[method_block_at:method_block_at] = block
    missing = [_yaml_line(key, naming[key]) for key in NAMING_KEYS if key not in seen_naming]
    if missing:
        out += ["", "# Run name (generated)", *missing]

    header = [
        f"# Generated by `trb-trl sweep` from {base_path}: regenerate rather than edit.",
        f"# Point {point.name} of {PAPER_GRIDS[method].source}.",
        "# Identical to the base recipe except the method block and output_dir / run_name: same loss, budget, seed and",
        "# data as every other point of the sweep.",
        "#",
        f"#   trb-trl train {recipe_path}",
        "",
    ]
    text = "\n".join(header + out).rstrip("\n") + "\n"

    expected = {key: value for key, value in base.items() if key not in METHOD_KEYS}
    expected.update(point.overrides)
    expected.update(naming)
    if yaml.safe_load(text) != expected:  # a line edit that the YAML does not agree with: never write it
        raise ValueError(f"{base_path}: could not rewrite its method keys line by line for {point.name}.")
    return text


def name_method(point_name: str) -> str:
    """The method a point name belongs to (`"skd-k15-tauT0.2"` -> `"skd"`)."""
    return point_name.split("-", 1)[0]


def write_sweep(
    base_recipe: str | Path, output_dir: str | Path, methods: list[str] | None = None, prefix: str | None = None
) -> list[Path]:
    """Write one recipe per point of the named methods' grids into `output_dir`; return their paths.

    File, `run_name` and `output_dir` leaf are `<prefix>-<point>` (prefix: the base recipe's file stem), e.g.
    `qwen3_1p7b-skd-k15-tauT0.2.yaml`; `output_dir` keeps the base's parent folder (`outputs/`). Existing files of
    the same name are overwritten. Every recipe is rendered before any is written, so a bad base writes nothing.
    """
    base_recipe, output_dir = Path(base_recipe), Path(output_dir)
    if not base_recipe.is_file():
        raise ValueError(f"recipe not found: {base_recipe}")
    base_text = base_recipe.read_text()
    prefix = prefix or base_recipe.stem
    rendered = {}
    for point in sweep_points(methods):
        name = f"{prefix}-{point.name}"
        path = output_dir / f"{name}.yaml"
        rendered[path] = render_point(base_text, point, name=name, base_path=str(base_recipe), recipe_path=str(path))
    output_dir.mkdir(parents=True, exist_ok=True)
    for path, text in rendered.items():
        path.write_text(text)
    return list(rendered)


# ---------------------------------------------------------------------------------------------------------------------
# Command line


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Write the papers' sweep grids (TRB: arXiv 2605.31159, Appendix A.2; TrOPD's ablation: arXiv "
        "2606.01249) as recipes: one YAML per "
        "point, each the base RECIPE with its method keys replaced and output_dir / run_name named for the point. "
        "Points per method: " + ", ".join(f"{method} {len(method_points(method))}" for method in PAPER_GRIDS) + ".",
    )
    parser.add_argument(
        "recipe", metavar="RECIPE", help="Base recipe (e.g. recipes/qwen3_1p7b.yaml); its other keys are kept."
    )
    parser.add_argument("--output-dir", required=True, help="Folder the generated recipes are written to.")
    parser.add_argument(
        "--methods",
        default="all",
        help=f"Comma-separated methods, from {', '.join(PAPER_GRIDS)}, or 'all' (default: %(default)s).",
    )
    parser.add_argument(
        "--prefix", default=None, help="Start of every file and run name (default: the base recipe's file stem)."
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        methods = parse_methods(args.methods)
        paths = write_sweep(args.recipe, args.output_dir, methods, prefix=args.prefix)
    except (ValueError, OSError, yaml.YAMLError) as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    counts = ", ".join(f"{method} {len(method_points(method))}" for method in methods)
    print(f"{len(paths)} recipes in {args.output_dir} ({counts}). Run one with: trb-trl train {paths[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
