"""`trb-trl eval --compare`: pass@1 curves of several runs, from in-training evaluations and evaluated checkpoints, as
one PNG and a markdown table with the best step by suite mean."""

import json

import pytest

from trb_trl.cli import main as cli_main
from trb_trl.evaluation.compare import collect_curves, compare_runs, curves_figure, markdown_table, run_labels


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def checkpoint_results(math500, aime24, complete=True):
    return {
        "complete": complete,
        "benchmarks": {"math500": {"pass@1": math500}, "aime24": {"pass@1": aime24}},
        "mean": {"pass@1": (math500 + aime24) / 2},
    }


@pytest.fixture
def runs(tmp_path):
    """Run A (`a/run`): MathEvalCallback's math_eval.json at steps 0, 20, 40, evaluated checkpoints 20 and 40 and an
    unfinished evaluation of checkpoint 60. Run B (`b/run`): in-training scores only in the log history of its last
    checkpoint's trainer_state.json, and its final model evaluated in RUN/eval."""
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    evaluations = [
        {"step": step, "benchmarks": {"math500": {"pass@1": m}, "aime24": {"pass@1": q}}, "mean_pass@1": (m + q) / 2}
        for step, m, q in ((0, 0.40, 0.02), (20, 0.50, 0.10), (40, 0.48, 0.08))
    ]
    write_json(a / "math_eval.json", {"evaluations": evaluations})
    write_json(a / "checkpoint-20" / "eval" / "results.json", checkpoint_results(0.52, 0.12))
    write_json(a / "checkpoint-40" / "eval" / "results.json", checkpoint_results(0.55, 0.06))
    write_json(a / "checkpoint-60" / "eval" / "results.json", checkpoint_results(0.9, 0.9, complete=False))
    history = [
        {"step": 1, "loss": 0.3, "learning_rate": 1e-6},
        {"step": 10, "eval_math500/pass@1": 0.30, "eval_aime24/pass@1": 0.00, "eval_math/mean_pass@1": 0.15,
         "eval_math/best_mean_pass@1": 0.15, "eval_math/best_step": 10},
        {"step": 20, "eval_math500/pass@1": 0.46, "eval_aime24/pass@1": 0.04, "eval_math/mean_pass@1": 0.25,
         "eval_math/best_mean_pass@1": 0.25, "eval_math/best_step": 20},
        {"step": 20, "loss": 0.2},
    ]  # fmt: skip
    write_json(b / "checkpoint-10" / "trainer_state.json", {"global_step": 10, "log_history": history[:2]})
    write_json(b / "checkpoint-20" / "trainer_state.json", {"global_step": 20, "log_history": history})
    write_json(b / "eval" / "results.json", checkpoint_results(0.47, 0.05))
    return a, b


def test_curves_from_both_sources(runs, capsys):
    a, b = runs
    curves = {(c.run, c.source): c for c in collect_curves([a, b])}
    assert set(curves) == {
        ("a/run", "training"),
        ("a/run", "checkpoints"),
        ("b/run", "training"),
        ("b/run", "checkpoints"),
    }
    assert curves["a/run", "training"].points[20] == {"math500": 0.50, "aime24": 0.10, "mean": pytest.approx(0.30)}
    assert curves["a/run", "checkpoints"].steps == [20, 40]  # the unfinished checkpoint-60 evaluation is skipped
    assert "checkpoint-60" in capsys.readouterr().err
    assert curves["b/run", "training"].points == {
        10: {"math500": 0.30, "aime24": 0.00, "mean": 0.15},
        20: {"math500": 0.46, "aime24": 0.04, "mean": 0.25},
    }
    assert curves["b/run", "checkpoints"].points == {20: {"math500": 0.47, "aime24": 0.05, "mean": 0.26}}
    assert curves["a/run", "training"].best_step() == 20 and curves["a/run", "checkpoints"].best_step() == 20


def test_table_png_and_json(runs, tmp_path):
    a, b = runs
    data = compare_runs([a, b], tmp_path / "cmp")
    table = (tmp_path / "cmp" / "comparison.md").read_text().splitlines()
    header = "| Run | Source | Best step | Mean (%) | math500 (%) | aime24 (%) | Last step | Last mean (%) |"
    assert table[0] == header
    assert table[2:] == [
        "| a/run | in-training eval | 20 | 30.0 | 50.0 | 10.0 | 40 | 28.0 |",
        "| a/run | checkpoint eval | 20 | 32.0 | 52.0 | 12.0 | 40 | 30.5 |",
        "| b/run | in-training eval | 20 | 25.0 | 46.0 | 4.0 | 20 | 25.0 |",
        "| b/run | checkpoint eval | 20 | 26.0 | 47.0 | 5.0 | 20 | 26.0 |",
    ]
    png = (tmp_path / "cmp" / "pass_at_1.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert json.loads((tmp_path / "cmp" / "comparison.json").read_text()) == json.loads(json.dumps(data))
    assert [c["best_step"] for c in data["curves"]] == [20, 20, 20, 20]


def test_cli_and_labels(runs, tmp_path, capsys):
    a, b = runs
    assert cli_main(["eval", "--compare", str(b), str(a), "--output-dir", str(tmp_path / "out")]) == 0
    assert "| b/run | in-training eval | 20 |" in capsys.readouterr().out
    assert run_labels([tmp_path / "x" / "trb", tmp_path / "y" / "opd"]) == ["trb", "opd"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no evaluations found in .*empty"):
        collect_curves([a, tmp_path / "empty"])


def test_mean_computed_when_not_logged(tmp_path):
    run = tmp_path / "run"
    write_json(
        run / "trainer_state.json",
        {"global_step": 5, "log_history": [{"step": 5, "eval/math500/pass@1": 0.2, "eval/gsm8k/pass@1": 0.6}]},
    )
    (curve,) = collect_curves([run])
    assert curve.points[5] == {"math500": 0.2, "gsm8k": 0.6, "mean": pytest.approx(0.4)}
    assert "| run | in-training eval | 5 | 40.0 | 20.0 | 60.0 | 5 | 40.0 |" in markdown_table([curve])


def _panels(figure):
    return {ax.get_title(): ax for ax in figure.axes if ax.axison}


def _lines(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_figure_axes_say_what_they_plot_in_the_unit_they_name(runs, tmp_path):
    """Every panel: y is pass@1 in percent, labelled so, and the points are the table's percentages (not fractions);
    x is the optimizer step, labelled so, with integer ticks only."""
    a, b = runs
    curves = collect_curves([a, b])
    panels = _panels(curves_figure(curves))
    assert list(panels) == ["suite mean", "math500", "aime24"]
    for ax in panels.values():
        assert ax.get_ylabel() == "pass@1 (%)" and ax.get_xlabel() == "optimizer step"
        ticks = ax.get_xticks()
        assert len(ticks) >= 2 and all(float(tick).is_integer() for tick in ticks), ticks
    training = _lines(panels["math500"])["a/run (in-training eval)"]
    assert list(training.get_xdata()) == [0, 20, 40]
    assert list(training.get_ydata()) == pytest.approx([40.0, 50.0, 48.0])  # 0.40, 0.50, 0.48 as percentages
    checkpoints = _lines(panels["suite mean"])["a/run (checkpoint eval)"]
    assert list(checkpoints.get_ydata()) == pytest.approx([32.0, 30.5])  # the table's "Mean (%)" and "Last mean (%)"
    for ax in panels.values():
        for line in ax.get_lines():
            assert all(0.0 <= value <= 100.0 for value in line.get_ydata())
    assert any(value > 1.0 for ax in panels.values() for line in ax.get_lines() for value in line.get_ydata())


def test_short_runs_get_integer_step_ticks(tmp_path):
    """Evaluations at steps 0, 1 and 2: matplotlib's default locator would put ticks at 0.25-step intervals."""
    run = tmp_path / "short"
    evaluations = [{"step": step, "benchmarks": {"gsm8k": {"pass@1": 0.1 * step}}} for step in (0, 1, 2)]
    write_json(run / "math_eval.json", {"evaluations": evaluations})
    for ax in _panels(curves_figure(collect_curves([run]))).values():
        ticks = [tick for tick in ax.get_xticks() if ax.get_xlim()[0] <= tick <= ax.get_xlim()[1]]
        assert ticks == [0, 1, 2]
        assert list(ax.get_lines()[0].get_ydata()) == pytest.approx([0.0, 10.0, 20.0])
