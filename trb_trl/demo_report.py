"""The demo's report: `report.json` (accuracy curves per method and seed, the TRB warmup), `report.png`, and the
summary table printed at the end of `trb-trl demo`."""

import json
from dataclasses import dataclass
from pathlib import Path
from statistics import mean


METHOD_LABELS = {"opd": "vanilla OPD", "trb": "TRB"}
METHOD_COLORS = {"opd": "tab:blue", "trb": "tab:orange"}


@dataclass
class RunResult:
    """One distillation run: held-out accuracy at `steps`, and (TRB) epsilon and mean beta per warmup step."""

    steps: list[int]
    accuracy: list[float]
    epsilon: list[float]
    beta_mean: list[float]


def _mean_over_seeds(series: list[list[float]]) -> list[float]:
    length = min((len(s) for s in series), default=0)
    return [mean(s[i] for s in series) for i in range(length)]


def build_report(
    *,
    task: str,
    teacher_accuracy: float,
    student_initial_accuracy: float,
    seconds: float,
    runs: dict[str, list[RunResult]],
    settings: dict | None = None,
    environment: dict | None = None,
    **extra,
) -> dict:
    """The `report.json` payload. Accuracy lists are per seed; TRB's epsilon and beta_mean are per warmup step
    (entry k is the rollout made after k optimizer steps), averaged over seeds. `settings` (the run's knobs: seeds,
    steps, eval size, temperature, epsilon, K, ...) and `environment` (library versions, machine) are recorded as
    given, so that a report says how it was made; `extra` adds further top-level entries."""
    methods = {}
    for method, results in runs.items():
        steps = results[0].steps
        if any(r.steps != steps for r in results):
            raise ValueError(f"All {method} seeds must be evaluated at the same steps.")
        entry = {"steps": list(steps), "accuracy": [list(r.accuracy) for r in results]}
        if method == "trb":
            entry["epsilon"] = _mean_over_seeds([r.epsilon for r in results])
            entry["beta_mean"] = _mean_over_seeds([r.beta_mean for r in results])
        methods[method] = entry
    return {
        "task": task,
        "teacher_accuracy": float(teacher_accuracy),
        "student_initial_accuracy": float(student_initial_accuracy),
        "seconds": float(seconds),
        **({"settings": settings} if settings is not None else {}),
        **({"environment": environment} if environment is not None else {}),
        **extra,
        "methods": methods,
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
    """A plain-text table: accuracy at step 0, at the end of the TRB warmup (the last evaluation at or before K,
    labelled with its step), at the end (mean, min-max over seeds), and the mean over all evaluations (area under the
    accuracy curve, normalised). `warmup_steps` defaults to the K recorded in the report's settings."""
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
    header = ["method", "seeds", *columns]
    rows = []
    for method, entry in report["methods"].items():
        cells = [METHOD_LABELS.get(method, method), str(len(entry["accuracy"]))]
        for step in [*checkpoints, last]:
            values = _accuracy_at(entry, step)
            cells.append(f"{mean(values):.3f} [{min(values):.3f}-{max(values):.3f}]")
        curve_means = [mean(seed) for seed in entry["accuracy"]]
        cells.append(f"{mean(curve_means):.3f} [{min(curve_means):.3f}-{max(curve_means):.3f}]")
        rows.append(cells)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    intro = (
        f"task: {report['task']}\n"
        f"teacher accuracy {report['teacher_accuracy']:.3f}, student initial accuracy "
        f"{report['student_initial_accuracy']:.3f}, {report['seconds']:.0f} s in all\n"
        f"held-out {metric}, mean [min-max] over seeds:"
    )
    return intro + "\n" + "\n".join(lines)


def plot_report(report: dict, path: str | Path, *, metric: str = "exact-match accuracy") -> None:
    """Two panels: accuracy vs step per method (mean line, min-max band over seeds, teacher and student start as
    dashed lines), and TRB's epsilon and mean beta over the warmup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for method, entry in report["methods"].items():
        steps = entry["steps"]
        per_step = list(zip(*entry["accuracy"]))
        color = METHOD_COLORS.get(method)
        seeds = len(entry["accuracy"])
        label = f"{METHOD_LABELS.get(method, method)} ({seeds} seed{'s' if seeds > 1 else ''})"
        left.plot(steps, [mean(v) for v in per_step], color=color, label=label, linewidth=2)
        left.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], color=color, alpha=0.2)
    left.axhline(report["teacher_accuracy"], color="black", linestyle="--", linewidth=1, label="teacher")
    left.axhline(
        report["student_initial_accuracy"], color="gray", linestyle=":", linewidth=1, label="student at step 0"
    )
    trb = report["methods"].get("trb")
    if trb and trb.get("epsilon"):
        left.axvspan(0, len(trb["epsilon"]), color="tab:orange", alpha=0.06, label="TRB warmup")
    left.set_xlabel("optimizer step")
    left.set_ylabel("held-out exact-match accuracy")
    left.set_ylim(-0.02, 1.02)
    left.set_title(f"Student {metric}\nmean and min-max over seeds", fontsize=10)
    left.legend(loc="lower right", fontsize=8)
    left.grid(alpha=0.3)

    if trb and trb.get("epsilon"):
        warmup = range(len(trb["epsilon"]))
        right.plot(warmup, trb["epsilon"], color="tab:red", label="budget ε_k", linewidth=2)
        right.set_xlabel("optimizer step k of the rollout")
        right.xaxis.set_major_locator(MaxNLocator(integer=True))
        right.set_ylabel("ε_k (nats per token)", color="tab:red")
        right.set_ylim(bottom=0)
        twin = right.twinx()
        twin.plot(range(len(trb["beta_mean"])), trb["beta_mean"], color="tab:green", label="mean β*", linewidth=2)
        twin.set_ylabel("mean β* over rollout tokens", color="tab:green")
        twin.set_ylim(0, 1.02)
        handles = right.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        right.legend(handles=handles, loc="upper right", fontsize=8)
        right.set_title("TRB warmup: KL budget and blend weight\n(mean over seeds)", fontsize=10)
        right.grid(alpha=0.3)
    else:
        right.axis("off")
    fig.suptitle(report["task"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
