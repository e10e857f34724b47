import json
import math
import random
import re
import sys
from dataclasses import asdict, replace

import pytest
import torch

from trb_trl.demo import runner
from trb_trl.demo.methods import METHODS, RunSettings, parse_methods
from trb_trl.demo.models import exact_match_accuracy, heldout_accuracy
from trb_trl.demo.report import (
    QUANTITIES,
    RunResult,
    build_report,
    report_figure,
    summary_table,
    warmup_checkpoint,
)
from trb_trl.demo.tasks import TASKS
from trb_trl.demo.tasks.addition import (
    AdditionProblem,
    build_task_tokenizer,
    completion_length,
    extract_answer,
    is_correct,
    make_splits,
)
from trb_trl.sweep import METHOD_KEYS


REPORT_KEYS = {"task", "teacher_accuracy", "student_initial_accuracy", "seconds", "methods"}
# What `trb-trl demo` adds: how the report was made.
RUN_REPORT_KEYS = REPORT_KEYS | {
    "settings",
    "environment",
    "metric",
    "models_seconds",
    "models_cached",
    "step0_rollout_accuracy",
    "rollout_diagnostics",
    "continuation_probe",
    "paired_with_opd",
}


def _pairs(problems):
    return {(p.a, p.b) for p in problems}


def test_worked_solution_spells_out_columns_and_carries():
    problem = AdditionProblem(347, 589, 3)
    assert problem.prompt == "3 4 7 + 5 8 9 ="
    assert problem.solution == "6 c1 3 c1 9 c0 | 9 3 6"
    assert AdditionProblem(999, 1, 3).solution == "0 c1 0 c1 0 c1 | 1 0 0 0"
    # The longest completion (a final carry) plus the stop token fits the rollout budget exactly.
    tokenizer = build_task_tokenizer()
    ids = tokenizer(AdditionProblem(999, 999, 3).solution)["input_ids"]
    assert len(ids) + 1 == completion_length(3)
    # Every symbol is in the vocabulary (unknown words would map to the stop token, which is also `unk`).
    assert tokenizer.unk_token_id not in tokenizer(problem.prompt + " " + problem.solution)["input_ids"]
    assert tokenizer.decode(tokenizer(problem.solution)["input_ids"]) == problem.solution


def test_sloppy_solutions_forget_carries_consistently():
    problem = AdditionProblem(347, 589, 3)
    always = problem.worked_solution(random.Random(0), drop_carry_probability=1.0)
    assert always == "6 c0 2 c0 8 c0 | 8 2 6"  # 7+9 -> 6 (carry dropped), 4+8 -> 2 (dropped), 3+5 -> 8
    assert problem.worked_solution(random.Random(0), drop_carry_probability=0.0) == problem.solution
    assert not is_correct(problem, always)


def test_exact_match_scores_known_correct_and_wrong_completions():
    problem = AdditionProblem(347, 589, 3)
    assert extract_answer(problem.solution) == "936"
    assert is_correct(problem, problem.solution)
    assert is_correct(problem, "garbage | 9 3 6")  # only the final answer is checked
    assert not is_correct(problem, problem.solution, stopped=False)  # truncated: never stopped
    assert not is_correct(problem, "6 c1 3 c1 9 c0 | 9 3 7")
    assert not is_correct(problem, "6 c1 3 c1 9 c0 | 9 3 6 c1")  # trailing non-digit
    assert not is_correct(problem, "6 c1 3 c1 9 c0 9 3 6")  # no answer mark
    assert not is_correct(problem, "6 c1 3 c1 9 c0 |")
    assert is_correct(problem, "| 1 2 | 9 3 6")  # the last mark counts
    problems = [problem, AdditionProblem(100, 200, 3)]
    assert exact_match_accuracy(problems, [problem.solution, "0 c0 0 c0 3 c0 | 3 0 1"], [True, True]) == 0.5
    with pytest.raises(ValueError):
        exact_match_accuracy(problems, [problem.solution], [True])


def test_splits_are_disjoint_and_the_eval_pool_does_not_move():
    splits = make_splits(3, num_train=2000, num_dev=100, num_eval=300, seed=0)
    train, dev, held_out = _pairs(splits.train), _pairs(splits.dev), _pairs(splits.eval)
    assert len(train) == 2000 and len(dev) == 100 and len(held_out) == 300
    assert not train & held_out and not dev & held_out and not train & dev
    assert all(100 <= p.a <= 999 and 100 <= p.b <= 999 for p in splits.train + splits.eval)
    bigger = make_splits(3, num_train=5000, num_dev=100, num_eval=300, seed=0)
    assert bigger.eval == splits.eval  # drawn first: a larger training pool leaves the held-out set unchanged
    with pytest.raises(ValueError):
        make_splits(1, num_train=80, num_dev=1, num_eval=1)


@pytest.mark.parametrize("task", ["addition", "machine"])
def test_demo_trains_only_on_prompts_it_never_evaluates(task):
    splits = TASKS[task].splits()
    assert len(splits.eval) == TASKS[task].eval_pool
    train_prompts = {p.prompt for p in splits.train}
    assert not train_prompts & {p.prompt for p in splits.eval}
    assert not train_prompts & {p.prompt for p in splits.dev}


class _ScriptedModel(torch.nn.Module):
    """Stands in for a causal LM: `generate` appends scripted completions (token ids) to the prompts."""

    def __init__(self, completions: list[list[int]]):
        super().__init__()
        self.completions = completions
        self.register_buffer("anchor", torch.zeros(1))

    @property
    def device(self):
        return self.anchor.device

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, **kwargs):
        rows = []
        for prompt, completion in zip(input_ids.tolist(), self.completions[: len(input_ids)]):
            completion = (completion + [pad_token_id] * max_new_tokens)[:max_new_tokens]
            rows.append(prompt + completion)
        self.completions = self.completions[len(input_ids) :]
        return torch.tensor(rows)


def test_heldout_accuracy_decodes_generations_and_checks_them():
    tokenizer = build_task_tokenizer()
    eos = tokenizer.eos_token_id
    problems = [AdditionProblem(347, 589, 3), AdditionProblem(100, 200, 3), AdditionProblem(999, 999, 3)]

    def ids(text):
        return tokenizer(text)["input_ids"]

    completions = [
        ids(problems[0].solution) + [eos],  # right
        ids("0 c0 0 c0 3 c0 | 3 0 1") + [eos],  # wrong answer
        ids("c0 " + problems[2].solution),  # the right answer, but it fills the budget and never stops: wrong
    ]
    assert len(completions[2]) == completion_length(3)
    model = _ScriptedModel(completions).train()
    assert heldout_accuracy(model, tokenizer, problems, batch_size=2) == pytest.approx(1 / 3)
    assert model.training  # restored after evaluation


def _fake_run(num_evals: int, warmup: int, start: float, beta: float = 0.5, seconds: float = 2.0) -> RunResult:
    steps = list(range(0, 3 * num_evals, 3))
    return RunResult(
        steps=steps,
        accuracy=[min(1.0, start + 0.1 * i) for i in range(num_evals)],
        metrics={
            "trb/epsilon": [0.2 * (1 - k / warmup) for k in range(warmup)],
            "trb/beta/mean": [beta] * (warmup - 1) + [None],  # not logged at the last step
        },
        seconds=seconds,
    )


def test_report_has_the_documented_structure():
    runs = {
        "opd": [_fake_run(5, 4, 0.3), _fake_run(5, 4, 0.35)],
        "trb": [_fake_run(5, 4, 0.3, beta=0.4, seconds=3.0), _fake_run(5, 4, 0.3, beta=0.6, seconds=5.0)],
    }
    runs["opd"][0].metrics = runs["opd"][1].metrics = {}
    described = {"trb": {"description": "blend", "config": {"rollout_policy": "trb"}}}
    report = build_report(
        task="t", teacher_accuracy=0.97, student_initial_accuracy=0.3, seconds=1.0, runs=runs, methods=described
    )
    assert set(report) == REPORT_KEYS
    assert set(report["methods"]["opd"]) == {"label", "steps", "accuracy", "seconds"}
    trb = report["methods"]["trb"]
    assert set(trb) == {"label", "description", "config", "steps", "accuracy", "seconds", "metrics"}
    assert trb["label"] == "TRB" and trb["config"] == {"rollout_policy": "trb"} and trb["seconds"] == [3.0, 5.0]
    assert trb["metrics"]["trb/epsilon"] == pytest.approx([0.2, 0.15, 0.1, 0.05])
    assert trb["metrics"]["trb/beta/mean"][:3] == pytest.approx([0.5] * 3)  # mean over seeds
    assert trb["metrics"]["trb/beta/mean"][3] is None  # no seed logged it
    table = summary_table(report, warmup_steps=6)
    assert "vanilla OPD" in table and "TRB" in table and "end of warmup" in table
    assert table.splitlines()[3].split()[-1] == "s/run"
    assert next(line for line in table.splitlines() if line.startswith("TRB")).split()[-1] == "4.0"
    with pytest.raises(ValueError):
        build_report(
            task="t",
            teacher_accuracy=1.0,
            student_initial_accuracy=0.0,
            seconds=0.0,
            runs={"opd": [_fake_run(5, 4, 0.3), _fake_run(4, 4, 0.3)]},
        )


def test_cli_dispatches_demo_help(capsys):
    from trb_trl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    assert "trb-trl demo" in capsys.readouterr().out


def _is_fraction(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys):
    """`trb-trl demo --quick` on a cold cache: pretrains both models, runs OPD and TRB, writes the report; a second
    run reuses the cached models."""
    output_dir, cache_dir = tmp_path / "out", tmp_path / "cache"
    argv = ["--task", "addition", "--quick", "--output-dir", str(output_dir), "--cache-dir", str(cache_dir)]
    assert runner.main(argv) == 0
    printed = capsys.readouterr().out
    assert "teacher: trained and cached" in printed and "vanilla OPD" in printed

    report = json.loads((output_dir / "report.json").read_text())
    assert (output_dir / "report.png").stat().st_size > 10_000
    assert set(report) == RUN_REPORT_KEYS
    assert report["settings"]["steps"] == 30 and report["settings"]["seeds"] == [0]
    assert report["settings"]["eval_size"] == 256 and report["settings"]["warmup_steps"] == 10
    assert isinstance(report["task"], str) and report["seconds"] > 0
    assert _is_fraction(report["teacher_accuracy"]) and _is_fraction(report["student_initial_accuracy"])
    assert report["teacher_accuracy"] >= 0.9
    assert report["student_initial_accuracy"] <= 0.5 * report["teacher_accuracy"]
    assert set(report["methods"]) == {"opd", "trb"}
    for method, entry in report["methods"].items():
        steps = entry["steps"]
        assert steps[0] == 0 and steps[-1] == 30 and steps == sorted(set(steps))
        assert len(entry["accuracy"]) == 1  # --quick: one seed
        for curve in entry["accuracy"]:
            assert len(curve) == len(steps) and all(_is_fraction(a) for a in curve)
            assert curve[0] == report["student_initial_accuracy"]  # same checkpoint, same evaluation
            assert curve[-1] >= curve[0] + 0.2, f"{method} did not learn: {curve}"
    epsilon, beta = (report["methods"]["trb"]["metrics"][name] for name in ("trb/epsilon", "trb/beta/mean"))
    assert len(epsilon) == len(beta) == 30  # one entry per rollout step
    assert epsilon[:10] == pytest.approx([0.2 * (1 - k / 10) for k in range(10)])  # K = 30 / 3 warmup steps
    assert epsilon[10:] == [0.0] * 20  # then plain student rollouts: no blend, no beta
    assert all(0.0 < b <= 1.0 for b in beta[:10]) and beta[10:] == [None] * 20

    # Second run: the teacher and student come from the cache; every other method, 2 steps each, end to end.
    others = [name for name in METHODS if name not in ("opd", "trb")]
    rerun = ["--task", "addition", "--quick", "--steps", "2", "--warmup-steps", "1", "--eval-size", "16"]
    rerun += ["--methods", ",".join(others)]
    from transformers.testing_utils import CaptureLogger

    from trb_trl.trb_distill_trainer import logger as trainer_logger

    with CaptureLogger(trainer_logger) as trainer_warnings:
        assert runner.main([*rerun, "--output-dir", str(tmp_path / "again"), "--cache-dir", str(cache_dir)]) == 0
    assert "trains OPD only" not in trainer_warnings.out  # the SFT arm ran its phase 1: no missing-phase warning
    printed = capsys.readouterr().out
    assert "teacher: loaded from" in printed and "student: loaded from" in printed
    report = json.loads((tmp_path / "again" / "report.json").read_text())
    assert list(report["methods"]) == others
    for name in others:
        entry = report["methods"][name]
        assert entry["label"] in printed and entry["config"] == METHODS[name].fields(_settings(steps=2, warmup=1))
        assert set(entry["metrics"]) == {*METHODS[name].metrics, runner.TEACHER_ENTROPY}, name
        assert len(entry["metrics"][runner.TEACHER_ENTROPY]) == 2  # the teacher's entropy on each rollout
    assert report["methods"]["fixed_epsilon"]["metrics"]["trb/epsilon"] == [0.2, 0.2]  # no anneal


def _table_columns(table: str) -> list[str]:
    header = next(line for line in table.splitlines() if line.startswith("method"))
    return [cell.strip() for cell in header.split("  ") if cell.strip()]


def test_summary_column_is_labelled_with_the_step_it_shows():
    """K = 20 with an evaluation every 3 steps: the 'end of warmup' column holds step 18's accuracy, and says so."""
    steps = list(range(0, 61, 3))
    accuracy = [step / 100 for step in steps]  # accuracy encodes the step it was measured at
    entry = {"steps": steps, "accuracy": [accuracy]}
    report = {
        "task": "t",
        "teacher_accuracy": 1.0,
        "student_initial_accuracy": 0.0,
        "seconds": 1.0,
        "methods": {"opd": entry, "trb": entry},
    }
    table = summary_table(report, warmup_steps=20)
    columns = _table_columns(table)
    assert "step 18 (last eval before K=20)" in columns and not any("step 20" in c for c in columns)
    row = next(line for line in table.splitlines() if line.startswith("TRB"))
    assert "0.180 [0.180-0.180]" in row and "0.600 [0.600-0.600]" in row
    # K evaluated exactly: "end of warmup"; K recorded in the report's settings is the default.
    assert "step 21 (end of warmup)" in _table_columns(summary_table(report, warmup_steps=21))
    assert "step 18 (last eval before K=20)" in _table_columns(
        summary_table({**report, "settings": {"warmup_steps": 20}})
    )
    # No column when the last evaluation at or before K is step 0 or the final step.
    assert warmup_checkpoint(steps, 2) is None and warmup_checkpoint(steps, 60) is None
    assert warmup_checkpoint(steps, None) is None
    assert warmup_checkpoint([0, 5, 10], 7) == (5, "step 5 (last eval before K=7)")


# ---------------------------------------------------------------------------------------------------------------
# report.png: one quantity per axis, labelled with its unit; integer ticks on every step axis.

UNITS = {"fraction", "unitless", "nats per token", "tokens"}
STEPS = 12


def _full_report() -> dict:
    """Every method with its per-step metrics (each a recognisable function of k), the teacher's entropy on the
    rollouts and the continuation probe: every panel the figure can draw."""
    per_method = {
        "opd": {},
        "trb": {"trb/epsilon": lambda k: 0.2 * max(0.0, 1 - k / 4), "trb/beta/mean": lambda k: 0.8 if k < 4 else None},
        "fixed_epsilon": {"trb/epsilon": lambda k: 0.2, "trb/beta/mean": lambda k: min(1.0, 0.7 + 0.05 * k)},
        "skd": {"skd/replacement_rate": lambda k: 0.08 / (1 + k)},
        "temperature": {"rollout/temperature": lambda k: min(1.0, 0.8 + 0.05 * k)},
        "veto": {"veto/beta": lambda k: 0.4 * (1 - k / STEPS)},
        "sft_warmup": {},
        "tropd": {"tropd/prefix_max_length": lambda k: max(0, 8 - 2 * k), "tropd/trust_fraction": lambda k: 0.9},
        "eopd": {"tropd/switched_fraction": lambda k: 0.2},
        "entropy_opd": {"tropd/selected_fraction": lambda k: 0.2},
        "reopold": {"tropd/selected_fraction": lambda k: 0.2, "tropd/clipped_fraction": lambda k: 0.05},
    }
    runs = {}
    for method, metrics in per_method.items():
        values = {name: [f(k) for k in range(STEPS)] for name, f in metrics.items()}
        values["rollout/teacher_entropy"] = [0.1 / (1 + k) for k in range(STEPS)]
        runs[method] = [
            RunResult(steps=[0, 4, 8, 12], accuracy=[0.1, 0.5 + s, 0.7 + s, 0.8], metrics=values) for s in (0, 0.05)
        ]
    probe = {"lengths": [4, 8, 12], "problems": 256, "epsilon": 0.2, "prefixes": {}}
    for source in ("student", "trb"):
        probe["prefixes"][source] = {
            "teacher_continues": [0.7, 0.5, 0.3],
            "student_continues": [0.1, 0.1, 0.1],
            "on_track": [0.71, 0.5, 0.31],
        }
    return build_report(
        task="t",
        teacher_accuracy=0.97,
        student_initial_accuracy=0.1,
        seconds=1.0,
        runs=runs,
        settings={"warmup_steps": 4},
        rollout_diagnostics={"teacher": {"teacher_entropy": 0.006}},
        continuation_probe=probe,
    )


def _series(ax) -> list:
    """The data series of an axis: its lines and filled bands (the warmup's shading is a patch, not a series)."""
    return [*ax.get_lines(), *ax.collections]


def _visible_integer_ticks(ax) -> list[float]:
    low, high = ax.get_xlim()
    ticks = [tick for tick in ax.get_xticks() if low <= tick <= high]
    assert len(ticks) >= 2 and all(float(tick).is_integer() for tick in ticks), (ax.get_title(), ticks)
    return ticks


def test_report_figure_puts_one_quantity_with_its_unit_on_each_axis():
    report = _full_report()
    figure = report_figure(report, metric="exact-match accuracy (greedy)")
    axes = figure.axes
    # accuracy, one panel per method metric (10), teacher entropy, continuation probe
    assert len(axes) == 13 and all(ax.axison for ax in axes)
    quantities = {}
    for ax in axes:
        ylabel, xlabel = ax.get_ylabel(), ax.get_xlabel()
        unit = re.fullmatch(r".+ \(([^()]+)\)", ylabel)
        assert unit and unit.group(1) in UNITS, f"{ax.get_title()!r}: y label {ylabel!r} names no unit"
        assert xlabel, f"{ax.get_title()!r} has no x label"
        # Every series on the axis is tagged with the quantity it plots: one per axis, the one the label names.
        tags = {series.get_gid() for series in _series(ax)}
        assert len(tags) == 1 and None not in tags, (ax.get_title(), tags)
        (tag,) = tags
        assert QUANTITIES[tag].ylabel == ylabel and tag not in quantities, tag
        quantities[tag] = ax
        _visible_integer_ticks(ax)
        if unit.group(1) == "fraction":
            assert all(0.0 <= y <= 1.0 for line in ax.get_lines() for y in line.get_ydata()), ax.get_title()
    assert set(quantities) == {
        "accuracy",
        "trb/epsilon",
        "trb/beta/mean",
        "skd/replacement_rate",
        "rollout/temperature",
        "veto/beta",
        "tropd/prefix_max_length",
        "tropd/trust_fraction",
        "tropd/switched_fraction",
        "tropd/selected_fraction",
        "tropd/clipped_fraction",
        "rollout/teacher_entropy",
        "continuation_probe",
    }
    # Every metric a method logs has its quantity, so no demo run draws a panel labelled "(as logged)".
    assert {name for spec in METHODS.values() for name in spec.metrics} <= set(quantities)
    for tag, ax in quantities.items():
        if tag != "continuation_probe":
            assert ax.get_xlabel().startswith("optimizer step"), tag  # every step axis says so
    # What each axis shows is that quantity's values: the budget panel holds TRB's and fixed-ε's ε, nothing else.
    epsilon = {line.get_label(): list(line.get_ydata()) for line in quantities["trb/epsilon"].get_lines()}
    assert epsilon == {
        "TRB": pytest.approx(report["methods"]["trb"]["metrics"]["trb/epsilon"]),
        "fixed-ε": pytest.approx([0.2] * STEPS),
    }
    beta = {line.get_label(): list(line.get_xdata()) for line in quantities["trb/beta/mean"].get_lines()}
    assert beta == {"TRB": [0, 1, 2, 3], "fixed-ε": list(range(STEPS))}  # β* is drawn only where it was logged
    assert quantities["trb/epsilon"].get_ylabel() == r"$\varepsilon_k$ (nats per token)"
    assert quantities["rollout/teacher_entropy"].get_ylabel() == "teacher entropy (nats per token)"
    assert quantities["accuracy"].get_ylabel() == "held-out exact-match accuracy (fraction)"
    # Every per-step panel spans the whole run, also where its metric stops early (TRB's β* after K).
    step_axes = [ax for tag, ax in quantities.items() if tag not in ("accuracy", "continuation_probe")]
    (span,) = {ax.get_xlim() for ax in step_axes}
    assert span[0] <= 0 and span[1] >= STEPS - 1


def test_report_figure_without_probes_or_method_metrics():
    """Vanilla OPD alone: one axis, accuracy, labelled with its unit, integer steps; nothing left unlabelled."""
    runs = {"opd": [RunResult(steps=[0, 1, 2], accuracy=[0.1, 0.2, 0.3])]}
    report = build_report(task="t", teacher_accuracy=0.9, student_initial_accuracy=0.1, seconds=1.0, runs=runs)
    (ax,) = report_figure(report).axes
    assert ax.get_ylabel() == "held-out exact-match accuracy (fraction)" and ax.get_xlabel() == "optimizer step"
    assert _visible_integer_ticks(ax) == [0, 1, 2]


# ---------------------------------------------------------------------------------------------------------------
# `trb-trl demo` end to end with the expensive parts stubbed: missing optional dependencies, report.json before
# report.png, and the run settings in report.json.


def _stub_expensive_parts(monkeypatch):
    """Tiny random models instead of pretraining, scripted distillation curves instead of training runs."""
    from trb_trl.testing import build_tiny_qwen3

    calls = {"pretrain": 0, "distil": []}

    def load_or_pretrain(name, config, tokenizer, splits, *, task, cache_dir):
        calls["pretrain"] += 1
        model = build_tiny_qwen3(len(tokenizer), hidden_size=16, num_layers=1, eos_token_id=tokenizer.eos_token_id)
        return model.eval(), 0.5, True

    def run_distillation(method, *, settings, seed, **kwargs):
        calls["distil"].append((method, seed))
        steps = sorted({*range(0, settings.steps + 1, settings.eval_every), settings.steps})
        warmup = settings.warmup_steps
        metrics = {}
        if method == "trb":
            metrics["trb/epsilon"] = [settings.epsilon * max(0.0, 1 - k / warmup) for k in range(settings.steps)]
        return RunResult(steps=steps, accuracy=[0.1 + 0.01 * step for step in steps], metrics=metrics, seconds=1.5)

    monkeypatch.setattr(runner, "load_or_pretrain", load_or_pretrain)
    monkeypatch.setattr(runner, "run_distillation", run_distillation)
    # The blend's own behaviour is tested elsewhere (and by the slow end-to-end run): fixed step-0 rollout numbers.
    monkeypatch.setattr(runner, "step0_rollout_accuracy", lambda *a, **k: {"student": 0.2, "trb": 0.4, "teacher": 0.9})
    # The probes are tested in test_demo_derail.py: fixed results here.
    diagnostics = {"accuracy": 0.5, "derailed_token_fraction": 0.5, "teacher_entropy": 0.1}
    diagnostics |= {"teacher_entropy_on_track": 0.0, "teacher_entropy_derailed": 0.2}
    monkeypatch.setattr(
        runner, "rollout_diagnostics", lambda *a, **k: dict.fromkeys(("student", "trb", "teacher"), diagnostics)
    )
    probe = {"lengths": [2], "problems": 8, "epsilon": 0.1, "prefixes": {}}
    monkeypatch.setattr(runner, "continuation_probe", lambda *a, **k: probe)
    return calls


SMALL_RUN = ["--seeds", "2", "--steps", "7", "--eval-every", "3", "--eval-size", "8", "--epsilon", "0.1"]


@pytest.mark.parametrize("module", ["matplotlib", "tqdm"])
def test_demo_checks_optional_dependencies_before_any_work(module, monkeypatch, tmp_path):
    calls = _stub_expensive_parts(monkeypatch)
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError, as if not installed
    output_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        runner.main([*SMALL_RUN, "--output-dir", str(output_dir)])
    message = str(exit_info.value)
    assert module in message and 'pip install "trb-trl[demo]"' in message
    assert calls == {"pretrain": 0, "distil": []} and not output_dir.exists()


def test_demo_checks_the_logger_it_is_asked_to_report_to(monkeypatch, tmp_path):
    calls = _stub_expensive_parts(monkeypatch)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(SystemExit, match=r"(?s)needs wandb.*pip install \"wandb\""):
        runner.main([*SMALL_RUN, "--output-dir", str(tmp_path / "out"), "--report-to", "wandb"])
    assert calls["pretrain"] == 0


def test_demo_writes_report_json_before_the_plot(monkeypatch, tmp_path, capsys):
    """A plot that fails after the runs loses nothing: report.json and the summary are already out."""
    calls = _stub_expensive_parts(monkeypatch)

    def broken_plot(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(runner, "plot_report", broken_plot)
    output_dir = tmp_path / "out"
    with pytest.raises(RuntimeError, match="plotting failed"):
        runner.main([*SMALL_RUN, "--methods", "opd,trb", "--output-dir", str(output_dir)])
    assert len(calls["distil"]) == 4  # 2 seeds x (OPD, TRB)
    report = json.loads((output_dir / "report.json").read_text())
    assert set(report) == RUN_REPORT_KEYS and not (output_dir / "report.png").exists()
    assert "vanilla OPD" in capsys.readouterr().out  # the summary table was printed before the plot


def test_step0_lines_say_what_they_measure_and_on_which_problems():
    """The console's step-0 figures: the held-out evaluation and the rollout accuracies on the whole evaluation set,
    the probes on its first problems; each line names its problem set, so two accuracies of the same student that
    differ (512 vs 256 problems) say why."""
    settings = _settings()  # rollouts and evaluation both sample at temperature 1
    heldout = runner.describe_heldout("machine", runner.metric_name(1.0), 512, teacher=0.979, student=0.107)
    assert heldout == (
        "task machine: step-0 exact-match accuracy (pass@1, one sample at temperature 1) on the 512-problem "
        "evaluation set (the curves' step 0): teacher 0.979, student 0.107"
    )
    accuracy = {"student": 0.107, "trb": 0.383, "teacher": 0.979}
    rollouts = runner.describe_rollout_accuracy(accuracy, settings, 512)
    assert rollouts.startswith("step-0 rollouts at the training temperature 1, exact-match accuracy on the same 512 ")
    assert "student 0.107, TRB blend at epsilon_0=0.2 0.383, teacher 0.979" in rollouts
    assert rollouts.endswith("(student and teacher: the evaluation above, which samples at this temperature too)")
    greedy = runner.describe_rollout_accuracy(accuracy, replace(settings, eval_temperature=0.0), 512)
    assert "evaluation above" not in greedy  # a greedy evaluation is another measurement
    entry = {"accuracy": 0.109, "derailed_token_fraction": 0.6, "teacher_entropy": 0.099}
    entry |= {"teacher_entropy_on_track": 0.006, "teacher_entropy_derailed": 0.16}
    lines = runner.describe_diagnostics({"student": entry}, problems=256, eval_size=512).splitlines()
    assert lines[0] == (
        "step-0 probes on a 256-problem probe set (the first 256 of the 512 evaluation problems), one rollout each "
        "at the training temperature:"
    )
    assert lines[2] == (
        "  student: 0.099 (0.006 | 0.160), 60% of tokens derailed, accuracy 0.109 on these 256 problems"
    )
    same = runner.describe_diagnostics({"student": entry}, problems=256, eval_size=256)
    assert same.startswith("step-0 probes on the same 256 evaluation problems,")


def test_demo_prints_the_problem_set_of_each_step0_figure(monkeypatch, tmp_path, capsys):
    """End to end (stubbed): the probes run on the first PROBE_PROBLEMS evaluation problems, and the printed lines
    name the sets the code measured on."""
    _stub_expensive_parts(monkeypatch)
    probed = []

    def rollout_diagnostics(teacher, student, tokenizer, problems, **kwargs):
        probed.append(len(problems))
        entry = {"accuracy": 0.25, "derailed_token_fraction": 0.5, "teacher_entropy": 0.1}
        return {"student": entry | {"teacher_entropy_on_track": 0.0, "teacher_entropy_derailed": 0.2}}

    monkeypatch.setattr(runner, "rollout_diagnostics", rollout_diagnostics)
    monkeypatch.setattr(runner, "PROBE_PROBLEMS", 4)
    assert runner.main([*SMALL_RUN, "--methods", "opd", "--output-dir", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert probed == [4]
    heldout = next(line for line in printed if line.startswith("task machine: step-0 "))
    assert "on the 8-problem evaluation set (the curves' step 0)" in heldout
    rollouts = next(line for line in printed if line.startswith("step-0 rollouts"))
    assert "on the same 8 problems: student 0.200, TRB blend at epsilon_0=0.1 0.400, teacher 0.900" in rollouts
    assert "step-0 probes on a 4-problem probe set (the first 4 of the 8 evaluation problems)" in " ".join(printed)
    assert any(line.endswith("accuracy 0.250 on these 4 problems") for line in printed)
    summary = next(line for line in printed if line.startswith("step-0 accuracy on 8 held-out problems: teacher"))
    assert summary.split("teacher ")[1].startswith(heldout.split("teacher ")[1].split(",")[0])  # the same figures


def test_report_json_records_the_run_settings(monkeypatch, tmp_path, capsys):
    import torch
    import transformers
    import trl

    _stub_expensive_parts(monkeypatch)
    output_dir = tmp_path / "out"
    argv = [*SMALL_RUN, "--seed", "3", "--temperature", "0.9", "--eval-temperature", "0", "--warmup-steps", "4"]
    assert runner.main([*argv, "--output-dir", str(output_dir)]) == 0
    report = json.loads((output_dir / "report.json").read_text())
    assert set(report) == RUN_REPORT_KEYS and (output_dir / "report.png").stat().st_size > 10_000
    settings = report["settings"]
    assert settings["seeds"] == [3, 4] and settings["steps"] == 7 and settings["eval_every"] == 3
    assert settings["eval_size"] == 8 and settings["eval_temperature"] == 0.0 and settings["temperature"] == 0.9
    assert settings["epsilon"] == 0.1 and settings["warmup_steps"] == 4 and settings["batch_size"] == 64
    assert settings["learning_rate"] == 5e-4 and settings["threads"] == 1 and settings["quick"] is False
    task = TASKS[runner.DEFAULT_TASK]
    assert settings["teacher"] == asdict(task.teacher) and settings["task"]["name"] == task.name
    assert settings["arguments"]["output_dir"] == str(output_dir)
    environment = report["environment"]
    assert environment["torch"] == torch.__version__ and environment["transformers"] == transformers.__version__
    assert environment["trl"] == trl.__version__ and environment["python"]
    assert report["seconds"] > 0 and report["models_cached"] == {"teacher": True, "student": True}
    assert report["metric"] == "exact-match accuracy (greedy)"
    assert set(report["step0_rollout_accuracy"]) == {"student", "trb", "teacher"}
    assert report["methods"]["opd"]["steps"] == [0, 3, 6, 7]
    table = capsys.readouterr().out
    assert "step 3 (last eval before K=4)" in table and "step 7 (final)" in table


# ---------------------------------------------------------------------------------------------------------------
# `--methods`: which arms run, and that they differ only in their method fields.


def _settings(steps: int = 60, warmup: int = 20) -> RunSettings:
    return RunSettings(
        steps=steps,
        batch_size=64,
        learning_rate=5e-4,
        temperature=1.0,
        eval_every=3,
        eval_temperature=1.0,
        epsilon=0.2,
        warmup_steps=warmup,
    )


def test_parse_methods_keeps_order_and_names_the_valid_ones():
    assert parse_methods("trb,opd") == ["trb", "opd"]
    assert parse_methods(" skd , veto,skd ") == ["skd", "veto"]  # spaces and repeats
    assert parse_methods("all") == list(METHODS)
    for bad in ("opd,sdk", "", ","):
        with pytest.raises(ValueError) as error:
            parse_methods(bad)
        assert all(name in str(error.value) for name in METHODS)
    with pytest.raises(ValueError, match="unknown methods 'x', 'y'"):
        parse_methods("x,opd,y")


def test_unknown_method_is_a_usage_error_before_any_work(monkeypatch, tmp_path, capsys):
    calls = _stub_expensive_parts(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        runner.main(["--methods", "opd,tbr", "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "unknown method 'tbr'" in error and "opd, trb, fixed_epsilon, skd, temperature, veto" in error
    assert calls["pretrain"] == 0 and not (tmp_path / "out").exists()


def test_methods_run_side_by_side_with_the_same_seeds(monkeypatch, tmp_path, capsys):
    calls = _stub_expensive_parts(monkeypatch)
    output_dir = tmp_path / "out"
    assert runner.main([*SMALL_RUN, "--methods", "veto,opd,skd", "--output-dir", str(output_dir)]) == 0
    assert calls["distil"] == [(m, seed) for seed in (0, 1) for m in ("veto", "opd", "skd")]
    report = json.loads((output_dir / "report.json").read_text())
    assert list(report["methods"]) == ["veto", "opd", "skd"] and report["settings"]["methods"] == [
        "veto",
        "opd",
        "skd",
    ]
    assert report["methods"]["skd"]["config"]["rollout_policy"] == "skd"
    assert report["methods"]["veto"]["config"] == {"rollout_policy": "student", "veto_beta_start": 0.4}
    printed = capsys.readouterr().out
    for label in ("Veto", "vanilla OPD", "SKD"):
        assert any(line.startswith(label) for line in printed.splitlines())  # a table row per method
    # The defaults: every method, DEFAULT_SEEDS seeds; --quick: QUICK_METHODS, one seed.
    calls["distil"].clear()
    assert runner.main(["--steps", "2", "--eval-size", "8", "--output-dir", str(tmp_path / "default")]) == 0
    assert calls["distil"] == [(m, s) for s in range(runner.DEFAULT_SEEDS) for m in runner.DEFAULT_METHODS]
    calls["distil"].clear()
    assert runner.main(["--quick", "--steps", "2", "--eval-size", "8", "--output-dir", str(tmp_path / "quick")]) == 0
    assert calls["distil"] == [(m, 0) for m in runner.QUICK_METHODS]


METHOD_FIELDS = set(METHOD_KEYS)  # the keys a sweep point sets: every method field of the config


def test_every_method_is_a_valid_config_that_differs_only_in_method_fields(tmp_path):
    settings = _settings()
    configs = {
        name: runner.distillation_config(
            name, settings, seed=0, output_dir=tmp_path, max_completion_length=12, report_to=["none"]
        ).to_dict()
        for name in METHODS
    }
    opd = configs["opd"]
    assert opd["rollout_policy"] == "student" and opd["veto_beta_start"] == 0 and opd["sft_warmup_steps"] == 0
    for name, config in configs.items():
        differing = {key for key in opd if config[key] != opd[key]} - {"output_dir", "run_name", "logging_dir"}
        assert differing <= METHOD_FIELDS, (name, differing - METHOD_FIELDS)
        assert set(METHODS[name].fields(settings)) <= METHOD_FIELDS
        assert config["max_steps"] == 60 and config["learning_rate"] == 5e-4 and config["seed"] == 0
    # Each method really is what its name says, with its demo-scale knobs.
    assert configs["trb"]["trb_schedule"] == "linear" and configs["trb"]["trb_warmup_steps"] == 20
    assert configs["fixed_epsilon"]["trb_schedule"] == "constant" and configs["fixed_epsilon"]["trb_epsilon"] == 0.2
    assert configs["skd"]["rollout_policy"] == "skd" and configs["skd"]["skd_steps"] is None
    assert configs["temperature"]["temperature_warmup_steps"] == 20
    assert configs["temperature"]["temperature_warmup_start"] == 0.8
    assert configs["veto"]["veto_beta_start"] == 0.4 and configs["veto"]["rollout_policy"] == "student"
    assert configs["sft_warmup"]["sft_warmup_steps"] == 20 and configs["sft_warmup"]["rollout_policy"] == "student"
    assert all(METHODS[name].describe(settings) for name in METHODS)


def test_logged_per_rollout_reads_step_k_plus_one():
    log_history = [
        {"step": 1, "loss": 1.0, "trb/epsilon": 0.2, "trb/beta/mean": 0.9},
        {"step": 2, "loss": 0.9, "trb/epsilon": 0.1},
        {"step": 3, "loss": 0.8, "trb/epsilon": 0.0},
        {"step": 3, "train_loss": 0.9, "train_runtime": 1.0},  # the end-of-training summary
    ]
    metrics = runner.logged_per_rollout(log_history, ("trb/epsilon", "trb/beta/mean", "skd/replacement_rate"), 3)
    assert metrics == {"trb/epsilon": [0.2, 0.1, 0.0], "trb/beta/mean": [0.9, None, None]}


def test_the_tropd_arms_run_on_their_own_trainer_and_are_not_in_the_default_set(tmp_path):
    from trb_trl import TrOPDConfig, TrOPDTrainer

    method = METHODS["tropd"]
    assert method.trainer_class() is TrOPDTrainer and method.config_class() is TrOPDConfig
    assert "tropd" not in runner.DEFAULT_METHODS and parse_methods("opd,tropd") == ["opd", "tropd"]
    settings = RunSettings(
        steps=10,
        batch_size=8,
        learning_rate=1e-3,
        temperature=1.0,
        eval_every=5,
        eval_temperature=1.0,
        epsilon=0.2,
        warmup_steps=4,
    )
    config = runner.distillation_config(
        "tropd", settings, seed=0, output_dir=tmp_path, max_completion_length=12, report_to="none"
    )
    assert isinstance(config, TrOPDConfig) and config.tropd_guidance and config.prefix_anneal_steps == 4
    assert config.rollout_policy == "student" and config.max_steps == 10
    # The comparison's baselines are arms of the same trainer, on request too.
    for name, objective in (("eopd", "eopd"), ("entropy_opd", "entropy_top"), ("reopold", "reopold")):
        assert METHODS[name].trainer_class() is TrOPDTrainer and name not in runner.DEFAULT_METHODS
        config = runner.distillation_config(
            name, settings, seed=0, output_dir=tmp_path, max_completion_length=12, report_to="none"
        )
        assert config.tropd_objective == objective and not config.tropd_guidance
