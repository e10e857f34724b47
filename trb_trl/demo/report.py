"""The demo's report: `report.json` (accuracy curves per method and seed, what each method did per step, the teacher's
entropy on the rollouts, the step-0 probes, the paired comparison with vanilla OPD), `report.png`, and the summary
table printed at the end of `trb-trl demo`."""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

from .methods import METHOD_COLORS, METHOD_LABELS


# How the per-step metrics of the methods are named in the plot's legend.
METRIC_LABELS = {
    "trb/epsilon": "budget ε_k (nats)",
    "trb/beta/mean": "mean β*",
    "skd/replacement_rate": "replacement rate",
    "rollout/temperature": "rollout temperature",
    "veto/beta": "Veto β",
}
# Drawn in its own panel, for every method: the teacher's mean per-token entropy on the rollouts trained on.
TEACHER_ENTROPY = "rollout/teacher_entropy"


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
    intro = (
        f"task: {report['task']}\n"
        f"teacher accuracy {report['teacher_accuracy']:.3f}, student initial accuracy "
        f"{report['student_initial_accuracy']:.3f}, {report['seconds']:.0f} s in all\n"
        f"held-out {metric}, mean [min-max] over seeds:"
    )
    for entry in report["methods"].values():
        if entry.get("config", {}).get("sft_warmup_steps"):
            lines.append(
                f"({entry.get('label', 'SFT warmup')}: step 0 is the checkpoint after its "
                f"{entry['config']['sft_warmup_steps']} supervised steps, where its OPD run starts.)"
            )
    return intro + "\n" + "\n".join(lines)


def plot_report(report: dict, path: str | Path, *, metric: str = "exact-match accuracy") -> None:
    """Accuracy vs step per method (mean line, min-max band over seeds, teacher and student start as dashed lines, the
    warmup shaded) and what each method did per step (TRB's and fixed-ε's budget and mean β*, SKD's replacement rate,
    the rollout temperature, Veto's β), in the method's colour; when the report has them, a second row with the
    teacher's entropy on each method's rollouts over training (Fig. 3 of the paper) and the continuation probe
    (Fig. 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    probes = any(TEACHER_ENTROPY in entry.get("metrics", {}) for entry in report["methods"].values()) or (
        "continuation_probe" in report
    )
    rows = 2 if probes else 1
    fig, axes = plt.subplots(rows, 2, figsize=(13, 5 * rows), gridspec_kw={"width_ratios": [3, 2]}, squeeze=False)
    left, right = axes[0]
    for method, entry in report["methods"].items():
        steps = entry["steps"]
        per_step = list(zip(*entry["accuracy"]))
        color = METHOD_COLORS.get(method)
        seeds = len(entry["accuracy"])
        label = f"{entry.get('label', METHOD_LABELS.get(method, method))} ({seeds} seed{'s' if seeds > 1 else ''}"
        sft_steps = entry.get("config", {}).get("sft_warmup_steps")
        label += f"; step 0 after {sft_steps} SFT steps)" if sft_steps else ")"
        left.plot(steps, [mean(v) for v in per_step], color=color, label=label, linewidth=2)
        left.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], color=color, alpha=0.15)
    left.axhline(report["teacher_accuracy"], color="black", linestyle="--", linewidth=1, label="teacher")
    left.axhline(
        report["student_initial_accuracy"], color="gray", linestyle=":", linewidth=1, label="student at step 0"
    )
    warmup_steps = report.get("settings", {}).get("warmup_steps")
    if warmup_steps and set(report["methods"]) & {"trb", "temperature", "sft_warmup"}:
        left.axvspan(0, warmup_steps, color="tab:orange", alpha=0.06, label=f"warmup (K={warmup_steps} steps)")
    left.set_xlabel("optimizer step")
    left.set_ylabel("held-out exact-match accuracy")
    left.set_ylim(-0.02, 1.02)
    left.set_title(f"Student {metric}\nmean and min-max over seeds", fontsize=10)
    left.legend(loc="lower right", fontsize=8)
    left.grid(alpha=0.3)

    styles = ["-", "--", ":", "-."]
    drawn = False
    for method, entry in report["methods"].items():
        method_metrics = {name: values for name, values in entry.get("metrics", {}).items() if name != TEACHER_ENTROPY}
        for index, (name, values) in enumerate(method_metrics.items()):
            points = [(k, v) for k, v in enumerate(values) if v is not None]
            if not points:
                continue
            label = f"{entry.get('label', METHOD_LABELS.get(method, method))}: {METRIC_LABELS.get(name, name)}"
            right.plot(
                *zip(*points),
                color=METHOD_COLORS.get(method),
                linestyle=styles[index % len(styles)],
                label=label,
                linewidth=2,
            )
            drawn = True
    if drawn:
        right.set_xlabel("optimizer step k of the rollout")
        right.xaxis.set_major_locator(MaxNLocator(integer=True))
        right.set_ylim(bottom=0)
        right.legend(loc="best", fontsize=8)
        right.set_title("What each method does per step\n(mean over seeds)", fontsize=10)
        right.grid(alpha=0.3)
    else:
        right.axis("off")
    if probes:
        _plot_teacher_entropy(axes[1][0], report)
        _plot_continuation_probe(axes[1][1], report)
    fig.suptitle(report["task"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_teacher_entropy(ax, report: dict) -> None:
    """The teacher's mean per-token entropy on the rollouts each method trained on, per step (mean over seeds), with
    the teacher's entropy on its own step-0 rollouts for reference."""
    from matplotlib.ticker import MaxNLocator

    for method, entry in report["methods"].items():
        values = entry.get("metrics", {}).get(TEACHER_ENTROPY)
        points = [(k, v) for k, v in enumerate(values or []) if v is not None]
        if points:
            label = entry.get("label", METHOD_LABELS.get(method, method))
            ax.plot(*zip(*points), color=METHOD_COLORS.get(method), label=label, linewidth=2)
    own = report.get("rollout_diagnostics", {}).get("teacher", {}).get("teacher_entropy")
    if own is not None:
        ax.axhline(own, color="black", linestyle="--", linewidth=1, label="on the teacher's own rollouts")
    ax.set_xlabel("optimizer step k of the rollout")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("teacher entropy (nats per token)")
    ax.set_ylim(bottom=0)
    ax.set_title("Teacher's entropy on the rollouts trained on (paper's Fig. 3)\nmean over seeds", fontsize=10)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)


def _plot_continuation_probe(ax, report: dict) -> None:
    """Fig. 4 at step 0: success of the teacher's and the student's continuations of the student's (vanilla OPD's)
    and the TRB blend's rollouts truncated after t tokens, and the fraction of those prefixes still on track."""
    probe = report.get("continuation_probe")
    if not probe or not probe.get("lengths") or not probe.get("prefixes"):
        ax.axis("off")
        return
    colors = {"student": METHOD_COLORS.get("opd"), "trb": METHOD_COLORS.get("trb")}
    names = {"student": "student (OPD) prefixes", "trb": f"TRB prefixes (ε₀={probe['epsilon']:g})"}
    for source, entry in probe["prefixes"].items():
        color = colors.get(source)
        ax.plot(
            probe["lengths"],
            entry["teacher_continues"],
            color=color,
            marker="o",
            label=f"{names[source]}, teacher continues",
        )
        ax.plot(
            probe["lengths"],
            entry["student_continues"],
            color=color,
            marker="s",
            linestyle="--",
            label=f"{names[source]}, student continues",
        )
        ax.plot(
            probe["lengths"],
            entry["on_track"],
            color=color,
            linestyle=":",
            linewidth=1,
            label=f"{names[source]}: prefix on track",
        )
    ax.set_xlabel("prefix length t (tokens of the step-0 rollout kept)")
    ax.set_ylabel("exact-match accuracy of the continuation")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"Continuation probe at step 0 (paper's Fig. 4), {probe['problems']} held-out problems", fontsize=10)
    ax.legend(loc="best", fontsize=7)
    ax.grid(alpha=0.3)


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
