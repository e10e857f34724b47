"""In-training math evaluation (`MathEvalCallback`): scores logged at the right steps, `math_eval.json` with the best
step and its checkpoint, an unchanged training trajectory, and config errors that name the field."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_config import tiny_prompts, tiny_run_args, tiny_trainer
from transformers import TrainerCallback
from transformers.integrations.integration_utils import rewrite_logs

from trb_trl import TRBDistillConfig
from trb_trl.evaluation import callback as callback_module
from trb_trl.evaluation.callback import (
    RESULTS_FILE,
    MathEvalCallback,
    _preserved_rng_state,
    metric_key,
    process_share,
)


NAME = "five"  # the local benchmark's file stem, its name in the metric keys
MEAN, BEST_MEAN, BEST_STEP = (metric_key("math", m) for m in ("mean_pass@1", "best_mean_pass@1", "best_step"))


@pytest.fixture
def benchmark_file(tmp_path):
    path = tmp_path / f"{NAME}.jsonl"
    rows = [{"problem": f"w{i} w{i + 1}", "answer": str(i)} for i in range(5)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _args(output_dir, benchmark_file=None, **overrides):
    if benchmark_file is not None:
        overrides = dict(
            math_eval_benchmarks=[benchmark_file], math_eval_steps=2, math_eval_num_samples=2, **overrides
        )
    return tiny_run_args(output_dir, max_completion_length=4, **overrides)


class _TrainModeProbe(TrainerCallback):
    """Records whether the student is in train mode after every step's callbacks (the math evaluation's included)."""

    def __init__(self, trainer):
        self.trainer, self.modes = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        self.modes.append(self.trainer.model.training)


def _eval_rows(trainer):
    return [entry for entry in trainer.state.log_history if MEAN in entry]


def test_scores_are_logged_every_eval_steps_and_training_is_unchanged(tiny_pair_dir, benchmark_file, tmp_path):
    prompts = tiny_prompts()
    runs = {}
    for name, file in (("plain", None), ("evaluated", benchmark_file)):
        runs[name] = trainer = tiny_trainer(tiny_pair_dir, _args(tmp_path / name, file), prompts)
        probe = _TrainModeProbe(trainer)
        trainer.add_callback(probe)
        trainer.train()  # each trainer seeds the run when it is made: make it, then train it
    assert not any(isinstance(c, MathEvalCallback) for c in runs["plain"].callback_handler.callbacks)

    # The same trajectory: evaluation samples from its own random stream and hands the model back in train mode.
    losses = {name: [e["loss"] for e in t.state.log_history if "loss" in e] for name, t in runs.items()}
    assert len(losses["plain"]) == 4 and losses["plain"] == losses["evaluated"]
    for (name, p), (_, q) in zip(
        runs["plain"].model.named_parameters(), runs["evaluated"].model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    assert probe.modes == [True] * 4

    # Step 0 (the initial student), every 2 steps, rows of their own (no training metric folded in).
    rows = _eval_rows(runs["evaluated"])
    assert [row["step"] for row in rows] == [0, 2, 4]
    for row in rows:
        assert 0.0 <= row[metric_key(NAME, "pass@1")] <= 1.0
        assert row[MEAN] == row[metric_key(NAME, "pass@1")]  # a one-benchmark suite
        assert "loss" not in row and "trb/epsilon" not in row
    best = max(rows, key=lambda row: (row[MEAN], -row["step"]))  # the earliest of the best
    assert rows[-1][BEST_MEAN] == best[MEAN] and rows[-1][BEST_STEP] == best["step"]
    # The training metrics still reach their own rows, every step.
    assert [e["step"] for e in runs["evaluated"].state.log_history if "trb/epsilon" in e] == [1, 2, 3, 4]

    results = json.loads((tmp_path / "evaluated" / RESULTS_FILE).read_text())
    assert [e["step"] for e in results["evaluations"]] == [0, 2, 4]
    assert [e["mean_pass@1"] for e in results["evaluations"]] == [row[MEAN] for row in rows]
    assert results["best"] == {"step": best["step"], "mean_pass@1": best[MEAN], "checkpoint": None}
    scores = results["evaluations"][0]["benchmarks"][NAME]
    assert (scores["num_problems"], scores["num_samples"]) == (5, 2)
    settings = results["settings"]
    assert settings["benchmarks"] == [{"name": NAME, "source": benchmark_file, "num_problems": 5}]
    assert (settings["num_samples"], settings["max_new_tokens"], settings["temperature"]) == (2, 4, 1.0)


class _ScriptedScores:
    """Stands in for `score_benchmarks`: returns the next scripted pass@1 and records what it was asked."""

    def __init__(self, scores):
        self.scores, self.calls = list(scores), []

    def __call__(self, model, tokenizer, benchmarks, **kwargs):
        self.calls.append({"training": model.training, "problems": [len(b.problems) for b in benchmarks], **kwargs})
        score = self.scores.pop(0)
        return {
            "benchmarks": {
                b.name: {"pass@1": score, "num_problems": len(b.problems), "num_samples": kwargs["num_samples"]}
                for b in benchmarks
            },
            "mean": score,
        }


def test_best_step_is_recorded_with_its_checkpoint_and_kept_by_rotation(
    tiny_pair_dir, benchmark_file, tmp_path, monkeypatch
):
    scripted = _ScriptedScores([0.2, 0.6, 0.4])
    monkeypatch.setattr(callback_module, "score_benchmarks", scripted)
    save = dict(save_strategy="steps", save_steps=1, save_total_limit=2)
    args = _args(tmp_path / "out", benchmark_file, math_eval_max_problems=3, math_eval_temperature=0.7, **save)
    trainer = tiny_trainer(tiny_pair_dir, args, tiny_prompts())
    trainer.train()

    rows = _eval_rows(trainer)
    assert [row["step"] for row in rows] == [0, 2, 4]
    assert [row[MEAN] for row in rows] == pytest.approx([0.2, 0.6, 0.4])
    assert [row[BEST_MEAN] for row in rows] == pytest.approx([0.2, 0.6, 0.6])
    assert [row[BEST_STEP] for row in rows] == [0, 2, 2]
    # The student in eval mode, the first 3 problems, the run's settings; max_new_tokens defaults to the rollouts'.
    assert all(not call["training"] and call["problems"] == [3] for call in scripted.calls)
    call = scripted.calls[0]
    assert (call["num_samples"], call["temperature"], call["top_p"], call["max_new_tokens"]) == (2, 0.7, 1.0, 4)
    assert call["batch_size"] == 4 and call["seed"] == 0
    assert call["system_prompt"] == TRBDistillConfig.math_eval_system_prompt

    # The best step's checkpoint survives save_total_limit=2 next to the last one (checkpoint-3 would have been kept
    # otherwise), and trainer_state names it.
    out = Path(args.output_dir)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert trainer.state.best_global_step == 2 and trainer.state.best_metric == pytest.approx(0.6)
    assert Path(trainer.state.best_model_checkpoint) == out / "checkpoint-2"
    results = json.loads((out / RESULTS_FILE).read_text())
    assert results["best"] == {"step": 2, "mean_pass@1": pytest.approx(0.6), "checkpoint": str(out / "checkpoint-2")}
    checkpoints = [None, str(out / "checkpoint-2"), str(out / "checkpoint-4")]
    assert [e["checkpoint"] for e in results["evaluations"]] == checkpoints

    # A run resumed from step 2 keeps the record up to step 2 (no new step-0 evaluation) and carries on.
    scripted.scores = [0.1]
    resumed = tiny_trainer(tiny_pair_dir, _args(out, benchmark_file, math_eval_max_problems=3), tiny_prompts())
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    new_rows = [row for row in _eval_rows(resumed) if row["step"] > 2]  # log_history resumes from the checkpoint's
    assert [(row["step"], row[BEST_STEP]) for row in new_rows] == [(4, 2)]
    results = json.loads((out / RESULTS_FILE).read_text())
    assert [e["step"] for e in results["evaluations"]] == [0, 2, 4]
    assert [e["mean_pass@1"] for e in results["evaluations"]] == pytest.approx([0.2, 0.6, 0.1])


@pytest.mark.parametrize("num_problems", [1, 3, 4, 5])
def test_every_process_share_is_padded_to_the_same_size(num_problems):
    """Fewer problems than processes, or a share one short: every process samples as many problems as the largest
    share, its own first, and together they hold every problem once. Padding ids are new (a problem already named
    `padding-0` included)."""
    from trb_trl.evaluation.benchmarks import Benchmark, Problem

    problems = tuple(Problem(str(i) if i else "padding-0", f"w{i}", str(i)) for i in range(num_problems))
    benchmark = Benchmark("b", problems, 1, "b.jsonl")
    world = 4
    shares = [process_share(benchmark, world, rank) for rank in range(world)]
    assert {len(share.problems) + len(padding) for share, padding in shares} == {-(-num_problems // world)}
    for rank, (share, padding) in enumerate(shares):
        assert share.problems == problems[rank::world]
        assert all(p.problem == problems[0].problem and p.id not in {q.id for q in problems} for p in padding)
        assert len({p.id for p in padding}) == len(padding)


def test_dashboards_show_the_scores_under_eval():
    """W&B, TensorBoard and trackio rewrite `eval_x` to `eval/x` (everything else goes under `train/`)."""
    logs = {metric_key("math500", "pass@1"): 0.5, MEAN: 0.5, BEST_STEP: 20}
    assert rewrite_logs(logs) == {"eval/math500/pass@1": 0.5, "eval/math/mean_pass@1": 0.5, "eval/math/best_step": 20}


def test_rng_state_is_restored_after_the_block():
    def draws():
        return random.random(), np.random.rand(), torch.rand(3).tolist()

    state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    expected = draws()
    random.setstate(state[0]), np.random.set_state(state[1]), torch.set_rng_state(state[2])
    with _preserved_rng_state(torch.device("cpu")):
        torch.manual_seed(123), random.seed(123), np.random.seed(123)
        draws()
    assert draws() == expected


def _config(**kwargs):
    return TRBDistillConfig(output_dir="unused", use_cpu=True, report_to="none", **kwargs)


def test_benchmark_names_are_resolved_at_config_time(benchmark_file):
    from trb_trl.evaluation.benchmarks import PAPER_SUITES
    from trb_trl.evaluation.prompts import DEFAULT_SYSTEM_PROMPT

    assert _config().math_eval_benchmarks is None  # off by default
    assert _config(math_eval_benchmarks=["qwen3_0p6b"]).math_eval_benchmarks == list(PAPER_SUITES["qwen3_0p6b"])
    assert _config(math_eval_benchmarks="math500,aime24").math_eval_benchmarks == ["math500", "aime24"]
    assert _config(math_eval_benchmarks=[benchmark_file]).math_eval_benchmarks == [benchmark_file]
    assert TRBDistillConfig.math_eval_system_prompt == DEFAULT_SYSTEM_PROMPT  # the prompt training uses


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"math_eval_benchmarks": ["math5000"]}, "math_eval_benchmarks"),
        ({"math_eval_benchmarks": []}, "math_eval_benchmarks"),
        ({"math_eval_steps": 0}, "math_eval_steps"),
        ({"math_eval_num_samples": 0}, "math_eval_num_samples"),
        ({"math_eval_max_problems": 0}, "math_eval_max_problems"),
        ({"math_eval_max_new_tokens": -1}, "math_eval_max_new_tokens"),
        ({"math_eval_batch_size": 0}, "math_eval_batch_size"),
        ({"math_eval_temperature": 0.0}, "math_eval_temperature"),
        ({"math_eval_temperature": float("nan")}, "math_eval_temperature"),
    ],
)
def test_invalid_math_eval_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        _config(**kwargs)
