"""Several training runs side by side: pass@1 (%) against the optimizer step in one PNG, and a markdown table.

A run directory (a trainer's `output_dir`) has up to two kinds of evaluations, each read as one curve:

- in-training (`MathEvalCallback`): `RUN/math_eval.json` (`evaluations: [{step, benchmarks: {name: {pass@1}},
  mean_pass@1}]`), or, without it, the `trainer_state.json` log history (of `RUN/`, else of its latest
  `checkpoint-*`), rows with `eval_<benchmark>/pass@1` and `eval_math/mean_pass@1` (also accepted with `eval/`);
- checkpoint evaluations (`trb-trl eval RUN/checkpoint-STEP`, whose default output directory is
  `RUN/checkpoint-STEP/eval`): every complete `RUN/checkpoint-*/eval/results.json`, at the checkpoint's step, plus
  `RUN/eval/results.json` (the final model) at the run's last step when the trainer state says which.

Runs are labelled by directory name (with the parent's name where two runs share one). For each curve the table
gives the best step by the suite mean, as the paper selects its checkpoint, the scores there, and the last step's.
"""

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .runner import RESULTS_FILE


IN_TRAINING_FILE = "math_eval.json"  # written by MathEvalCallback
CHECKPOINT_EVAL_DIR = "eval"  # RUN/checkpoint-STEP/eval/results.json
MEAN = "mean"
_BENCHMARK_KEY = re.compile(r"^eval[_/](?P<name>[^/]+)/pass@1$")
_MEAN_KEYS = ("eval_math/mean_pass@1", "eval/math/mean_pass@1")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
SOURCES = {"training": "in-training eval", "checkpoints": "checkpoint eval"}


@dataclass
class Curve:
    """pass@1 per step of one run from one source: `points[step][benchmark or "mean"]`."""

    run: str
    source: str  # "training" or "checkpoints"
    points: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def steps(self) -> list[int]:
        return sorted(self.points)

    def best_step(self) -> int | None:
        """The step with the highest suite mean (the earliest on a tie)."""
        scored = [step for step in self.steps if self.points[step].get(MEAN) is not None]
        return max(scored, key=lambda step: (self.points[step][MEAN], -step)) if scored else None


def _mean(scores: dict[str, float]) -> float | None:
    return sum(scores.values()) / len(scores) if scores else None


def _checkpoint_steps(run_dir: Path) -> dict[int, Path]:
    steps = {}
    for path in run_dir.glob("checkpoint-*"):
        match = _CHECKPOINT.match(path.name)
        if match and path.is_dir():
            steps[int(match.group(1))] = path
    return steps


def _trainer_state(run_dir: Path) -> dict | None:
    """The run's trainer state with the most history: `RUN/trainer_state.json` or the latest checkpoint's."""
    candidates = [run_dir / "trainer_state.json"]
    candidates += [path / "trainer_state.json" for _, path in sorted(_checkpoint_steps(run_dir).items())]
    states = [json.loads(path.read_text()) for path in candidates if path.is_file()]
    return max(states, key=lambda state: state.get("global_step", 0), default=None)


def training_curve(run_dir: Path, label: str) -> Curve | None:
    """The in-training evaluations of a run, or None if it has none."""
    curve = Curve(label, "training")
    path = run_dir / IN_TRAINING_FILE
    if path.is_file():
        for evaluation in json.loads(path.read_text()).get("evaluations", []):
            scores = {name: s["pass@1"] for name, s in evaluation.get("benchmarks", {}).items()}
            mean = evaluation.get("mean_pass@1", _mean(scores))
            curve.points[int(evaluation["step"])] = {**scores, MEAN: mean}
        return curve if curve.points else None
    state = _trainer_state(run_dir)
    for row in (state or {}).get("log_history", []):
        scores = {}
        for key, value in row.items():
            match = _BENCHMARK_KEY.match(key)
            if match:
                scores[match.group("name")] = value
        if scores and "step" in row:
            mean = next((row[key] for key in _MEAN_KEYS if key in row), _mean(scores))
            curve.points[int(row["step"])] = {**scores, MEAN: mean}
    return curve if curve.points else None


def _results_scores(path: Path) -> dict[str, float] | None:
    results = json.loads(path.read_text())
    if not results.get("complete"):
        print(f"warning: skipping {path}: the evaluation is incomplete (resume it to finish)", file=sys.stderr)
        return None
    scores = {name: s["pass@1"] for name, s in results["benchmarks"].items()}
    return {**scores, MEAN: results.get("mean", {}).get("pass@1", _mean(scores))}


def checkpoint_curve(run_dir: Path, label: str) -> Curve | None:
    """The `trb-trl eval` results of a run's checkpoints (and of its final model), or None if it has none."""
    curve = Curve(label, "checkpoints")
    for step, path in sorted(_checkpoint_steps(run_dir).items()):
        results = path / CHECKPOINT_EVAL_DIR / RESULTS_FILE
        if results.is_file() and (scores := _results_scores(results)) is not None:
            curve.points[step] = scores
    final = run_dir / CHECKPOINT_EVAL_DIR / RESULTS_FILE
    if final.is_file():
        state = _trainer_state(run_dir)
        step = state.get("global_step") if state else None
        if step is None:
            print(
                f"warning: skipping {final}: no trainer_state.json says at which step the model was saved",
                file=sys.stderr,
            )
        elif step not in curve.points and (scores := _results_scores(final)) is not None:
            curve.points[int(step)] = scores
    return curve if curve.points else None


def run_labels(run_dirs: list[Path]) -> list[str]:
    """Directory names, with as many parent names as it takes to tell runs apart."""
    resolved = [path.resolve() for path in run_dirs]
    for depth in range(1, max(len(path.parts) for path in resolved) + 1):
        labels = ["/".join(path.parts[-depth:]) for path in resolved]
        if len(set(labels)) == len(labels):
            return labels
    return [str(path) for path in run_dirs]


def collect_curves(run_dirs: list[str | Path]) -> list[Curve]:
    """Every curve of every run; `ValueError` for a run directory without any evaluation."""
    run_dirs = [Path(path) for path in run_dirs]
    curves = []
    for run_dir, label in zip(run_dirs, run_labels(run_dirs)):
        if not run_dir.is_dir():
            raise ValueError(f"run directory {run_dir} does not exist.")
        found = [curve for curve in (training_curve(run_dir, label), checkpoint_curve(run_dir, label)) if curve]
        if not found:
            raise ValueError(
                f"no evaluations found in {run_dir}: expected in-training evaluations ({IN_TRAINING_FILE}, or "
                "eval_<benchmark>/pass@1 in trainer_state.json) or evaluated checkpoints "
                f"(checkpoint-STEP/{CHECKPOINT_EVAL_DIR}/{RESULTS_FILE}, from `trb-trl eval RUN/checkpoint-STEP`)."
            )
        curves.extend(found)
    return curves


def benchmark_names(curves: list[Curve]) -> list[str]:
    """The benchmarks of all curves, in order of first appearance."""
    names = {}
    for curve in curves:
        for step in curve.steps:
            names.update(dict.fromkeys(name for name in curve.points[step] if name != MEAN))
    return list(names)


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


# The unit of every pass@1 figure this module shows: the results store fractions, the table and the plot percentages
# (as the papers print them).
PASS_AT_1_LABEL = "pass@1 (%)"
STEP_LABEL = "optimizer step"


def markdown_table(curves: list[Curve]) -> str:
    """One row per curve: the best step by suite mean with its scores, then the last step and its mean; every score
    is pass@1 in percent, as the header says."""
    names = benchmark_names(curves)
    header = [
        "Run",
        "Source",
        "Best step",
        "Mean (%)",
        *(f"{name} (%)" for name in names),
        "Last step",
        "Last mean (%)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for curve in curves:
        best, last = curve.best_step(), curve.steps[-1]
        at_best = curve.points.get(best, {})
        row = [
            curve.run,
            SOURCES[curve.source],
            "–" if best is None else str(best),
            _percent(at_best.get(MEAN)),
            *(_percent(at_best.get(name)) for name in names),
            str(last),
            _percent(curve.points[last].get(MEAN)),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def curves_figure(curves: list[Curve]):
    """The comparison as a matplotlib `Figure`: pass@1 in percent against the optimizer step (integer ticks), the
    suite mean, then one panel per benchmark; one colour per run, solid lines for in-training evaluations and dashed
    lines with dots for checkpoint evaluations."""
    try:
        import matplotlib
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ValueError('plotting runs needs matplotlib: pip install "trb-trl[demo]"') from None

    panels = [MEAN, *benchmark_names(curves)]
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(5 * columns, 3.6 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    runs = list(dict.fromkeys(curve.run for curve in curves))
    colors = {run: matplotlib.colormaps["tab10"](index % 10) for index, run in enumerate(runs)}
    for ax, panel in zip(axes.flat, panels):
        for curve in curves:
            steps = [step for step in curve.steps if curve.points[step].get(panel) is not None]
            if not steps:
                continue
            style = (
                {"linestyle": "-", "marker": "."} if curve.source == "training" else {"linestyle": "--", "marker": "o"}
            )
            ax.plot(
                steps,
                [100 * curve.points[step][panel] for step in steps],
                color=colors[curve.run],
                label=f"{curve.run} ({SOURCES[curve.source]})",
                **style,
            )
        ax.set_title("suite mean" if panel == MEAN else panel)
        ax.set_xlabel(STEP_LABEL)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(PASS_AT_1_LABEL)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), frameon=False)
    figure.tight_layout(rect=(0, 0.06 * -(-len(labels) // 3) / rows, 1, 1))
    return figure


def plot_curves(curves: list[Curve], path: Path) -> None:
    """Save [`curves_figure`] as a PNG at `path`."""
    curves_figure(curves).savefig(path, dpi=120)


PLOT_FILE = "pass_at_1.png"
TABLE_FILE = "comparison.md"
DATA_FILE = "comparison.json"


def compare_runs(run_dirs: list[str | Path], output_dir: str | Path, *, stream=None) -> dict:
    """Write `OUTPUT_DIR/pass_at_1.png`, `comparison.md` and `comparison.json` (every curve's points) for
    `run_dirs`; print the table. Returns what comparison.json holds."""
    curves = collect_curves(run_dirs)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(curves)
    (output_dir / TABLE_FILE).write_text(table)
    data = {
        "runs": [str(path) for path in run_dirs],
        "curves": [
            {
                "run": curve.run,
                "source": curve.source,
                "best_step": curve.best_step(),
                "points": [{"step": step, **curve.points[step]} for step in curve.steps],
            }
            for curve in curves
        ],
    }
    (output_dir / DATA_FILE).write_text(json.dumps(data, indent=2) + "\n")
    plot_curves(curves, output_dir / PLOT_FILE)
    print(table, file=stream)
    print(f"wrote {output_dir / PLOT_FILE}, {output_dir / TABLE_FILE} and {output_dir / DATA_FILE}", file=stream)
    return data
