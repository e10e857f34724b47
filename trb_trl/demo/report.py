"""The demo's report: `report.json` (accuracy curves per method and seed, what each method did per step, the teacher's
entropy on the rollouts, the step-0 probes, the paired comparison with vanilla OPD), `report.png`, and the summary
table printed at the end of `trb-trl demo`."""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

from .methods import METHOD_COLORS, METHOD_LABELS


@dataclass(frozen=True)
class Quantity:
    """What one axis of the report plots: the panel's title and the y-axis label, which ends with its unit in
    parentheses. An axis holds one quantity; every series drawn on it carries the quantity's key as its `gid`."""

    title: str
    ylabel: str


ACCURACY = "accuracy"
# Drawn in its own panel, for every method: the teacher's mean per-token entropy on the rollouts trained on.
TEACHER_ENTROPY = "rollout/teacher_entropy"
PROBE = "continuation_probe"
# Every quantity the report plots. The per-step metrics of the methods (`DemoMethod.metrics`) get one small panel
# each, in this order; a metric missing here gets a panel titled with its name and labelled "(as logged)".
QUANTITIES = {
    ACCURACY: Quantity("Student {metric}\nmean and min-max over seeds", "held-out exact-match accuracy (fraction)"),
    "trb/epsilon": Quantity(r"Trust-region budget $\varepsilon_k$", r"$\varepsilon_k$ (nats per token)"),
    "trb/beta/mean": Quantity(
        "Blend weight $\\beta^*$, mean over tokens\n(0 = student, 1 = teacher)", r"$\beta^*$ (unitless)"
    ),
    "skd/replacement_rate": Quantity("SKD: student tokens replaced\nby the teacher's", "tokens replaced (fraction)"),
    "rollout/temperature": Quantity("Rollout temperature", "temperature (unitless)"),
    "veto/beta": Quantity(r"Veto: $\beta$ of the target $\pi_T \, \pi_S^\beta$", r"$\beta$ (unitless)"),
    "tropd/prefix_max_length": Quantity("TrOPD: longest teacher prefix allowed", "prefix length (tokens)"),
    "tropd/trust_fraction": Quantity("TrOPD: tokens in the trust region", "tokens (fraction)"),
    "tropd/switched_fraction": Quantity(
        "EOPD: tokens given the forward KL\n(teacher entropy >= tau)", "tokens (fraction)"
    ),
    "tropd/selected_fraction": Quantity("Entropy OPD / REOPOLD: tokens trained on", "tokens (fraction)"),
    "tropd/clipped_fraction": Quantity("REOPOLD: rewards clipped at the floor", "tokens (fraction)"),
    TEACHER_ENTROPY: Quantity(
        "Teacher's entropy on the rollouts trained on (paper's Fig. 3)\nmean over seeds",
        "teacher entropy (nats per token)",
    ),
    PROBE: Quantity(
        "Continuation probe at step 0 (paper's Fig. 4)\nthe same {problems} held-out problems in every series",
        "share of the probe's problems (fraction)",
    ),
}
STEP_LABEL = "optimizer step"
WIDTHS = [4, 3]  # of the figure's left (accuracy, teacher entropy) and right (per-step panels, probe) columns
ROLLOUT_STEP_LABEL = "optimizer step k of the rollout"


def quantity(name: str) -> Quantity:
    """The title and y label of a plotted quantity (a metric the report does not know is labelled as logged)."""
    return QUANTITIES.get(name, Quantity(name, f"{name} (as logged)"))


@dataclass
class RunResult:
    """One distillation run: held-out accuracy at `steps`; per logged method metric (e.g. TRB's `trb/epsilon`), its
    value for the rollout made at each optimizer step k = 0, 1, ... (None where it was not logged); wall seconds."""

    steps: list[int]
    accuracy: list[float]
    metrics: dict[str, list[float | None]] = field(default_factory=dict)
    seconds: float = 0.0


def _mean_over_seeds(series: list[list[float | None]]) -> list[float | None]:
    """Step-wise mean over seeds of the values that were logged (None where no seed logged one)."""
    length = max((len(s) for s in series), default=0)
    means = []
    for i in range(length):
        values = [s[i] for s in series if i < len(s) and s[i] is not None and math.isfinite(s[i])]
        means.append(mean(values) if values else None)
    return means


def build_report(
    *,
    task: str,
    teacher_accuracy: float,
    student_initial_accuracy: float,
    seconds: float,
    runs: dict[str, list[RunResult]],
    methods: dict[str, dict] | None = None,
    settings: dict | None = None,
    environment: dict | None = None,
    **extra,
) -> dict:
    """The `report.json` payload. Per method: its label, accuracy per seed at `steps`, each logged method metric per
    rollout step (entry k is the rollout made after k optimizer steps, averaged over seeds), and the wall seconds of
    each seed's run; `methods[name]` (its description and config fields) is merged into that method's entry.
    `settings` (the run's knobs: seeds, steps, eval size, temperature, epsilon, K, ...) and `environment` (library
    versions, machine) are recorded as given, so that a report says how it was made; `extra` adds further top-level
    entries."""
    entries = {}
    for method, results in runs.items():
        steps = results[0].steps
        if any(r.steps != steps for r in results):
            raise ValueError(f"All {method} seeds must be evaluated at the same steps.")
        entry = {
            "label": METHOD_LABELS.get(method, method),
            **(methods or {}).get(method, {}),
            "steps": list(steps),
            "accuracy": [list(r.accuracy) for r in results],
            "seconds": [round(r.seconds, 2) for r in results],
        }
        names = dict.fromkeys(name for r in results for name in r.metrics)
        if names:
            entry["metrics"] = {name: _mean_over_seeds([r.metrics.get(name, []) for r in results]) for name in names}
        entries[method] = entry
    return {
        "task": task,
        "teacher_accuracy": float(teacher_accuracy),
        "student_initial_accuracy": float(student_initial_accuracy),
        "seconds": float(seconds),
        **({"settings": settings} if settings is not None else {}),
        **({"environment": environment} if environment is not None else {}),
        **extra,
        "methods": entries,
    }


def _accuracy_at(entry: dict, step: int) -> list[float]:
    """Per-seed accuracy of the evaluation made at exactly `step` (a `ValueError` if there was none)."""
    index = entry["steps"].index(step)
    return [seed[index] for seed in entry["accuracy"]]


def warmup_checkpoint(steps: list[int], warmup_steps: int | None) -> tuple[int, str] | None:
    """The evaluation step shown for the end of the TRB warmup and its column label: step K itself when it was
    evaluated, else the last evaluation before K (with K=20 and an evaluation every 3 steps, step 18). The label names
    the step whose accuracy the column holds. None when there is no such evaluation strictly between 0 and the end."""
    if warmup_steps is None or warmup_steps <= 0:
        return None
    shown = max(s for s in steps if s <= warmup_steps)
    if shown <= 0 or shown >= steps[-1]:
        return None
    if shown == warmup_steps:
        return shown, f"step {shown} (end of warmup)"
    return shown, f"step {shown} (last eval before K={warmup_steps})"


def summary_table(report: dict, *, warmup_steps: int | None = None, metric: str = "exact-match accuracy") -> str:
    """A plain-text table, one row per method: accuracy at step 0, at the end of the warmup (the last evaluation at or
    before K, labelled with its step), at the end (mean, min-max over seeds), the mean over all evaluations (area
    under the accuracy curve, normalised), and the mean wall seconds of one run. `warmup_steps` defaults to the K
    recorded in the report's settings."""
    if warmup_steps is None:
        warmup_steps = report.get("settings", {}).get("warmup_steps")
    any_entry = next(iter(report["methods"].values()))
    steps = any_entry["steps"]
    if any(entry["steps"] != steps for entry in report["methods"].values()):
        raise ValueError("All methods must be evaluated at the same steps for one table.")
    last = steps[-1]
    columns = ["step 0"]
    checkpoints = [0]
    warmup = warmup_checkpoint(steps, warmup_steps)
    if warmup is not None:
        checkpoints.append(warmup[0])
        columns.append(warmup[1])
    columns += [f"step {last} (final)", "mean over curve"]
    header = ["method", "seeds", *columns, "s/run"]
    rows = []
    for method, entry in report["methods"].items():
        cells = [entry.get("label", METHOD_LABELS.get(method, method)), str(len(entry["accuracy"]))]
        for step in [*checkpoints, last]:
            values = _accuracy_at(entry, step)
            cells.append(f"{mean(values):.3f} [{min(values):.3f}-{max(values):.3f}]")
        curve_means = [mean(seed) for seed in entry["accuracy"]]
        cells.append(f"{mean(curve_means):.3f} [{min(curve_means):.3f}-{max(curve_means):.3f}]")
        cells.append(f"{mean(entry['seconds']):.1f}" if entry.get("seconds") else "-")
        rows.append(cells)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    eval_size = report.get("settings", {}).get("eval_size")
    on = f" on {eval_size} held-out problems" if eval_size else ""
    intro = (
        f"task: {report['task']}\n"
        f"step-0 accuracy{on}: teacher {report['teacher_accuracy']:.3f}, student "
        f"{report['student_initial_accuracy']:.3f}; {report['seconds']:.0f} s in all\n"
        f"held-out {metric}{on}, mean [min-max] over seeds:"
    )
    for entry in report["methods"].values():
        if entry.get("config", {}).get("sft_warmup_steps"):
            lines.append(
                f"({entry.get('label', 'SFT warmup')}: step 0 is the checkpoint after its "
                f"{entry['config']['sft_warmup_steps']} supervised steps, where its OPD run starts.)"
            )
    return intro + "\n" + "\n".join(lines)


def _label(method: str, entry: dict) -> str:
    return entry.get("label", METHOD_LABELS.get(method, method))


def _method_metric_series(report: dict) -> dict[str, list[tuple[str, dict, list[tuple[int, float]]]]]:
    """Per logged method metric (every one but the teacher's entropy, which has its own panel): the (method, entry,
    points) of each method that logged it, points being (rollout step k, mean over seeds). Known quantities first, in
    `QUANTITIES` order."""
    series = {}
    for method, entry in report["methods"].items():
        for name, values in entry.get("metrics", {}).items():
            points = [(k, v) for k, v in enumerate(values) if v is not None]
            if name != TEACHER_ENTROPY and points:
                series.setdefault(name, []).append((method, entry, points))
    order = list(QUANTITIES)
    return dict(sorted(series.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))


def _has_probe(report: dict) -> bool:
    probe = report.get(PROBE)
    return bool(probe and probe.get("lengths") and probe.get("prefixes"))


def _has_teacher_entropy(report: dict) -> bool:
    return any(
        any(v is not None for v in entry.get("metrics", {}).get(TEACHER_ENTROPY, []))
        for entry in report["methods"].values()
    )


def _rollout_steps(report: dict) -> int:
    """How many rollout steps the per-step metrics cover (the run's optimizer steps)."""
    return max(
        (len(values) for entry in report["methods"].values() for values in entry.get("metrics", {}).values()),
        default=0,
    )


def _finish_axis(
    ax, name: str, xlabel: str, *, fontsize: int = 10, last_step: int | None = None, **title_fields
) -> None:
    """The title and y label of quantity `name`, the x label, integer x ticks (over 0..`last_step` if given: every
    per-step panel spans the whole run, also where a metric stops being logged), a grid."""
    from matplotlib.ticker import MaxNLocator

    if last_step is not None:
        pad = max(0.5, 0.03 * last_step)
        ax.set_xlim(-pad, last_step + pad)
    ax.set_title(quantity(name).title.format(**title_fields), fontsize=fontsize)
    ax.set_ylabel(quantity(name).ylabel, fontsize=fontsize - 1)
    ax.set_xlabel(xlabel, fontsize=fontsize - 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def report_figure(report: dict, *, metric: str = "exact-match accuracy"):
    """The report's matplotlib `Figure`. Top left: accuracy against the optimizer step per method (mean line, min-max
    band over seeds, teacher and student start as dashed lines, the warmup shaded). Top right: what each method did
    per step, one small panel per quantity (TRB's and fixed-ε's budget ε_k and mean β*, SKD's replacement rate, the
    rollout temperature, Veto's β, TrOPD's prefix length and trust fraction), in the methods' colours. When the report
    has them, a second row: the teacher's entropy on each method's rollouts over training (Fig. 3 of the paper) and
    the continuation probe (Fig. 4). One quantity per axis, its unit in the y label; integer ticks on every step
    axis."""
    from matplotlib.figure import Figure

    per_step = _method_metric_series(report)
    bottom = [name for name, shown in ((TEACHER_ENTROPY, _has_teacher_entropy), (PROBE, _has_probe)) if shown(report)]
    small_columns = 2 if len(per_step) > 1 else 1
    small_rows = -(-len(per_step) // small_columns)
    top_height = max(5.0, 2.5 * small_rows)
    heights = [top_height, 5.0] if bottom else [top_height]
    fig = Figure(figsize=(16, sum(heights)), layout="constrained")
    rows = fig.subfigures(len(heights), 1, height_ratios=heights, squeeze=False)[:, 0]
    top = rows[0].subfigures(1, 2, width_ratios=WIDTHS, squeeze=False)[0] if per_step else [rows[0]]

    _plot_accuracy(top[0].subplots(), report, metric)
    if per_step:
        top[1].suptitle("What each method does per step (mean over seeds)", fontsize=10)
        grid = top[1].add_gridspec(small_rows, small_columns)
        for index, (name, series) in enumerate(per_step.items()):
            ax = top[1].add_subplot(grid[index // small_columns, index % small_columns])
            for method, entry, points in series:
                ax.plot(
                    *zip(*points), color=METHOD_COLORS.get(method), label=_label(method, entry), linewidth=2, gid=name
                )
            highest = max(value for _, _, points in series for _, value in points)
            ax.set_ylim(0, 1.08 * highest if highest > 0 else 1.0)  # from 0, with room above a flat line at the top
            ax.legend(loc="best", fontsize=7)
            _finish_axis(ax, name, ROLLOUT_STEP_LABEL, fontsize=9, last_step=_rollout_steps(report) - 1)
    if bottom:
        axes = rows[1].subplots(1, 2, width_ratios=WIDTHS, squeeze=False)[0]
        for ax, name in zip(axes, bottom):
            (_plot_teacher_entropy if name == TEACHER_ENTROPY else _plot_continuation_probe)(ax, report)
        for ax in axes[len(bottom) :]:
            ax.remove()
    fig.suptitle(report["task"], fontsize=9)
    return fig


def plot_report(report: dict, path: str | Path, *, metric: str = "exact-match accuracy") -> None:
    """Save [`report_figure`] as a PNG at `path`."""
    report_figure(report, metric=metric).savefig(path, dpi=120)


def _plot_accuracy(ax, report: dict, metric: str) -> None:
    """Held-out accuracy per method against the optimizer step: the mean over seeds and the min-max band, the teacher
    and the student at step 0 as horizontal lines, TRB's (and the other warmups') K shaded."""
    for method, entry in report["methods"].items():
        steps = entry["steps"]
        per_step = list(zip(*entry["accuracy"]))
        color = METHOD_COLORS.get(method)
        seeds = len(entry["accuracy"])
        label = f"{_label(method, entry)} ({seeds} seed{'s' if seeds > 1 else ''}"
        sft_steps = entry.get("config", {}).get("sft_warmup_steps")
        label += f"; step 0 after {sft_steps} SFT steps)" if sft_steps else ")"
        ax.plot(steps, [mean(v) for v in per_step], color=color, label=label, linewidth=2, gid=ACCURACY)
        ax.fill_between(
            steps, [min(v) for v in per_step], [max(v) for v in per_step], color=color, alpha=0.15, gid=ACCURACY
        )
    ax.axhline(report["teacher_accuracy"], color="black", linestyle="--", linewidth=1, label="teacher", gid=ACCURACY)
    ax.axhline(
        report["student_initial_accuracy"],
        color="gray",
        linestyle=":",
        linewidth=1,
        label="student at step 0",
        gid=ACCURACY,
    )
    warmup_steps = report.get("settings", {}).get("warmup_steps")
    if warmup_steps and set(report["methods"]) & {"trb", "temperature", "sft_warmup"}:
        ax.axvspan(0, warmup_steps, color="tab:orange", alpha=0.06, label=f"warmup (K={warmup_steps} steps)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="lower right", fontsize=8)
    _finish_axis(ax, ACCURACY, STEP_LABEL, metric=metric)


def _plot_teacher_entropy(ax, report: dict) -> None:
    """The teacher's mean per-token entropy on the rollouts each method trained on, per step (mean over seeds), with
    the teacher's entropy on its own step-0 rollouts for reference."""
    for method, entry in report["methods"].items():
        values = entry.get("metrics", {}).get(TEACHER_ENTROPY)
        points = [(k, v) for k, v in enumerate(values or []) if v is not None]
        if points:
            ax.plot(
                *zip(*points),
                color=METHOD_COLORS.get(method),
                label=_label(method, entry),
                linewidth=2,
                gid=TEACHER_ENTROPY,
            )
    own = report.get("rollout_diagnostics", {}).get("teacher", {}).get("teacher_entropy")
    if own is not None:
        ax.axhline(
            own, color="black", linestyle="--", linewidth=1, label="on the teacher's own rollouts", gid=TEACHER_ENTROPY
        )
    ax.set_ylim(bottom=0)
    ax.legend(loc="best", fontsize=8)
    _finish_axis(ax, TEACHER_ENTROPY, ROLLOUT_STEP_LABEL, last_step=_rollout_steps(report) - 1)


def _plot_continuation_probe(ax, report: dict) -> None:
    """Fig. 4 at step 0, as fractions of the probe's problems: how many of the student's (vanilla OPD's) and the TRB
    blend's rollouts, truncated after t tokens, the teacher and the student complete correctly, and how many of those
    t-token prefixes are still on track (which bounds what any continuation can complete)."""
    probe = report[PROBE]
    colors = {"student": METHOD_COLORS.get("opd"), "trb": METHOD_COLORS.get("trb")}
    names = {"student": "student (OPD) prefixes", "trb": f"TRB prefixes (ε₀={probe['epsilon']:g})"}
    for source, entry in probe["prefixes"].items():
        color, lengths = colors.get(source), probe["lengths"]
        line = {"color": color, "gid": PROBE}
        ax.plot(lengths, entry["teacher_continues"], marker="o", label=f"{names[source]}: teacher completes", **line)
        ax.plot(
            lengths,
            entry["student_continues"],
            marker="s",
            linestyle="--",
            label=f"{names[source]}: student completes",
            **line,
        )
        ax.plot(
            lengths, entry["on_track"], linestyle=":", linewidth=1, label=f"{names[source]}: still on track", **line
        )
    ax.set_ylim(-0.02, 1.02)
    ax.legend(loc="best", fontsize=7)
    _finish_axis(ax, PROBE, "prefix length t (tokens of the step-0 rollout kept)", problems=probe["problems"])


def write_report_json(report: dict, output_dir: str | Path) -> Path:
    """Write `report.json` into `output_dir` (created if needed); return its path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "report.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    return json_path


def write_report(report: dict, output_dir: str | Path, *, metric: str = "exact-match accuracy") -> tuple[Path, Path]:
    """Write `report.json`, then `report.png`, into `output_dir`; return their paths. The JSON is on disk before the
    plot is attempted, so a failing plot loses nothing."""
    json_path = write_report_json(report, output_dir)
    png_path = json_path.parent / "report.png"
    plot_report(report, png_path, metric=metric)
    return json_path, png_path
