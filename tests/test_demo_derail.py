"""`trb-trl demo --task machine`: the derailing task, its exact checker and splits, the probes (teacher entropy on
rollouts, continuation probe), the paired comparison, `--task` selection, and the quick mode end to end."""

import json
import math
import random
from collections import Counter

import pytest
import torch

from trb_trl.demo import runner
from trb_trl.demo.comparison import decision, mean_with_ci, paired_differences, t_critical_975
from trb_trl.demo.probes import (
    continuation_probe,
    mean_teacher_entropy,
    on_track_lengths,
    rollout_diagnostics,
    with_teacher_entropy,
)
from trb_trl.demo.tasks import ADDITION, MACHINE, TASKS
from trb_trl.demo.tasks.machine import MachineProblem, StateMachine, make_machine_splits
from trb_trl.testing import build_tiny_qwen3


MACHINE_SPEC = StateMachine()


def _problem(seed: int = 0, machine: StateMachine = MACHINE_SPEC, steps_per_stage: int = 8) -> MachineProblem:
    rng = random.Random(seed)
    start = rng.randrange(machine.num_states)
    return MachineProblem(start, machine.random_word(rng, start, steps_per_stage), machine)


# ---------------------------------------------------------------------------------------------------------------
# The machine and its problems.


def test_machine_table_is_balanced_and_injective():
    machine = MACHINE_SPEC
    table = machine.table
    assert table == StateMachine().table  # deterministic in the seed
    assert table != StateMachine(seed=1).table
    for stage in range(machine.num_stages):
        for state in range(machine.num_states):
            assert len(machine.accepted_symbols(state, stage)) == machine.accepted
        entered = Counter()
        for symbol in machine.stage_symbols(stage):
            sources = [q for q in range(machine.num_states) if (q, symbol) in table]
            targets = [table[(q, symbol)] for q in sources]
            assert len(sources) == machine.num_states * machine.accepted // machine.symbols_per_stage
            assert len(set(targets)) == len(targets)  # two runs that differ stay different
            entered.update(targets)
        assert set(entered.values()) == {machine.accepted}  # every state entered equally often
    # The misremembered entries: the configured fraction, each with a wrong next state.
    assert len(machine.misremembered) == round(machine.misremembered_fraction * len(table))
    assert all(table[entry] != wrong for entry, wrong in machine.misremembered.items())
    with pytest.raises(ValueError, match="multiple of symbols_per_stage"):
        StateMachine(num_states=15)


def test_problem_prompt_solution_and_exact_check():
    problem = _problem()
    machine = problem.machine
    symbols = problem.prompt.split()
    assert len(symbols) == 24 + 2 and symbols[-2] == "=" and symbols[-1] == machine.state_names[problem.start]
    # The solution is the run, computed here straight from the table.
    state, run = problem.start, []
    for symbol in problem.word:
        state = machine.table[(state, symbol)]
        run.append(machine.state_names[state])
    assert problem.solution.split() == run and problem.completion_length == 25
    # Stage s reads only stage s's symbols.
    for index, symbol in enumerate(problem.word):
        assert symbol in machine.stage_symbols(index // 8)

    assert problem.is_correct(problem.solution)
    assert not problem.is_correct(problem.solution, stopped=False)  # never stopped
    wrong = run.copy()
    wrong[3] = next(name for name in machine.state_names if name != run[3])
    assert not problem.is_correct(" ".join(wrong))  # one wrong state anywhere is wrong
    assert not problem.is_correct(" ".join(run[:-1]))  # too short
    assert not problem.is_correct(" ".join([*run, run[-1]]))  # too long
    assert not problem.is_correct("")


def test_sloppy_runs_make_the_students_mistakes_and_go_on_from_them():
    machine = MACHINE_SPEC
    # A problem whose run passes a misremembered entry.
    problem = next(
        p
        for p in (_problem(seed) for seed in range(200))
        if any(
            (state, symbol) in machine.misremembered
            for state, symbol in zip([p.start, *machine.run(p.start, p.word)], p.word)
        )
    )
    clean = machine.run(problem.start, problem.word)
    assert problem.worked_solution(random.Random(0), 0.0).split() == problem.solution.split()
    always = machine.run(problem.start, problem.word, random.Random(0), mistake_probability=1.0)
    # The first difference is at the first misremembered entry, and it is the student's wrong belief.
    states = [problem.start, *clean]
    first = next(i for i, (q, s) in enumerate(zip(states, problem.word)) if (q, s) in machine.misremembered)
    assert always[:first] == clean[:first]
    assert always[first] == machine.misremembered[(states[first], problem.word[first])]
    # After it, every state follows from the one written: the table where it accepts the symbol, else anything.
    for i in range(first + 1, len(always)):
        entry = (always[i - 1], problem.word[i])
        if entry in machine.table and entry not in machine.misremembered:
            assert always[i] == machine.table[entry]
    assert not problem.is_correct(problem.worked_solution(random.Random(0), 1.0))
    with pytest.raises(ValueError, match="does not accept"):
        machine.run((states[first] + 1) % 16, problem.word)  # a clean run of a word the machine rejects


def test_machine_splits_are_disjoint_and_the_eval_pool_does_not_move():
    small = make_machine_splits(MACHINE_SPEC, steps_per_stage=8, num_train=500, num_dev=50, num_eval=100, seed=0)
    keys = [{(p.start, p.word) for p in split} for split in (small.train, small.dev, small.eval)]
    assert [len(k) for k in keys] == [500, 50, 100]
    assert not keys[0] & keys[1] and not keys[0] & keys[2] and not keys[1] & keys[2]
    bigger = make_machine_splits(MACHINE_SPEC, steps_per_stage=8, num_train=900, num_dev=50, num_eval=100, seed=0)
    assert bigger.eval == small.eval and bigger.dev == small.dev
    assert {p.prompt for p in small.train}.isdisjoint(p.prompt for p in small.eval)


def test_task_tokenizer_covers_every_symbol():
    tokenizer = MACHINE.tokenizer()
    problem = _problem(3)
    ids = tokenizer(problem.prompt + " " + problem.solution)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert len(tokenizer(problem.solution)["input_ids"]) + 1 == problem.completion_length
    assert tokenizer.decode(tokenizer(problem.solution)["input_ids"]) == problem.solution


def test_task_models_are_cached_per_task():
    from trb_trl.demo.models import cache_key

    assert cache_key("teacher", MACHINE.teacher, MACHINE.cache_fields) != cache_key(
        "teacher", MACHINE.teacher, ADDITION.cache_fields
    )
    # The addition models keep the key they had before the demo had several tasks.
    assert cache_key("student", ADDITION.student, ADDITION.cache_fields) == "student-ff709a2ad475"
    assert cache_key("teacher", ADDITION.teacher, ADDITION.cache_fields) == "teacher-936ab1e07deb"


# ---------------------------------------------------------------------------------------------------------------
# The probes.


@pytest.fixture(scope="module")
def machine_tokenizer():
    return MACHINE.tokenizer()


def _tiny(tokenizer, seed: int, hidden: int = 32):
    return build_tiny_qwen3(
        len(tokenizer), hidden_size=hidden, num_layers=1, eos_token_id=tokenizer.eos_token_id, seed=seed
    )


def test_mean_teacher_entropy_matches_a_float64_reference(machine_tokenizer, one_torch_thread):
    """Left-padded prompts of different lengths, completions of different lengths: each row's entropies equal an
    unpadded float64 forward of that row alone."""
    tokenizer = machine_tokenizer
    teacher = _tiny(tokenizer, seed=5)
    with torch.no_grad():  # spread the logits: a peaked and a flat region of the vocabulary
        teacher.lm_head.weight.mul_(8.0)
    prompts = ["a b = C", "c d e f g = A", "h = B"]
    completions = [["D", "E"], ["F"], ["G", "H", "I"]]
    prompt_batch = tokenizer(prompts, return_tensors="pt", padding=True)
    width = max(len(c) for c in completions)
    completion_ids = torch.full((3, width), tokenizer.eos_token_id)
    completion_mask = torch.zeros((3, width), dtype=torch.long)
    for i, tokens in enumerate(completions):
        completion_ids[i, : len(tokens)] = torch.tensor(tokenizer.convert_tokens_to_ids(tokens))
        completion_mask[i, : len(tokens)] = 1
    measured = mean_teacher_entropy(
        teacher, prompt_batch["input_ids"], prompt_batch["attention_mask"], completion_ids, completion_mask, 0.7
    )
    reference = []
    double = teacher.to(torch.float64)
    with torch.no_grad():
        for prompt, tokens in zip(prompts, completions):
            ids = torch.tensor([tokenizer(prompt)["input_ids"] + tokenizer.convert_tokens_to_ids(tokens)])
            logits = double(input_ids=ids).logits[0, -len(tokens) - 1 : -1] / 0.7
            probs = logits.softmax(-1)
            reference += [float(-(p[p > 0] * p[p > 0].log()).sum()) for p in probs]
    teacher.to(torch.float32)
    assert measured == pytest.approx(sum(reference) / len(reference), rel=1e-4)
    assert 0 < measured < math.log(len(tokenizer))


def test_on_track_lengths_counts_the_agreeing_prefix():
    completions = torch.tensor([[1, 2, 3, 0], [1, 9, 3, 0], [7, 2, 3, 0], [1, 2, 3, 0]])
    references = [[1, 2, 3, 0], [1, 2, 3, 0], [1, 2, 3, 0], [1, 2]]
    assert on_track_lengths(completions, references) == [4, 1, 0, 2]


class _RunWriter(torch.nn.Module):
    """Stands in for a causal LM on machine problems: continues each row's completion with the reference run, except
    that it writes a wrong state at completion position `mistake_at` (if any), then stops. Ignores logits processors,
    so it is its own TRB blend."""

    def __init__(self, tokenizer, problems, mistake_at: int | None):
        super().__init__()
        self.tokenizer, self.mistake_at = tokenizer, mistake_at
        self.runs = {p.prompt: tokenizer(p.solution)["input_ids"] for p in problems}
        self.register_buffer("anchor", torch.zeros(1))
        self.generation_config = type("Config", (), {"eos_token_id": tokenizer.eos_token_id})()

    @property
    def device(self):
        return self.anchor.device

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, **kwargs):
        equals, state_a, state_b = self.tokenizer.convert_tokens_to_ids(["=", "A", "B"])
        rows = []
        for row, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            ids = [token for token, keep in zip(row, mask) if keep]
            prompt_end = ids.index(equals) + 2  # "= START"
            run = self.runs[self.tokenizer.decode(ids[:prompt_end])]
            new = run[len(ids) - prompt_end :]
            if self.mistake_at is not None and len(ids) - prompt_end <= self.mistake_at < len(run):
                at = self.mistake_at - (len(ids) - prompt_end)
                new[at] = state_b if new[at] == state_a else state_a
            new = [*new, eos_token_id][:max_new_tokens]
            rows.append(row + new + [pad_token_id] * (max_new_tokens - len(new)))
        return torch.tensor(rows)


def test_continuation_probe_scores_continuations_of_truncated_rollouts(machine_tokenizer):
    """A student that always gets state 6 wrong and a teacher that always writes the run: the teacher completes a
    prefix correctly exactly when the prefix is still on track (t <= 6); the student never does."""
    tokenizer = machine_tokenizer
    problems = [_problem(seed) for seed in range(6)]
    student = _RunWriter(tokenizer, problems, mistake_at=6)
    teacher = _tiny(tokenizer, seed=1)  # a real model for the TRB blend's construction; its rollouts are the runs
    teacher.generate = _RunWriter(tokenizer, problems, mistake_at=None).generate
    probe = continuation_probe(teacher, student, tokenizer, problems, lengths=[0, 3, 6, 7, 12, 25, 30], epsilon=0.1)
    assert probe["lengths"] == [3, 6, 7, 12]  # only lengths strictly inside the rollout budget
    for source in ("student", "trb"):
        entry = probe["prefixes"][source]
        assert entry["on_track"] == [1.0, 1.0, 0.0, 0.0]
        assert entry["teacher_continues"] == [1.0, 1.0, 0.0, 0.0]
        assert entry["student_continues"] == [0.0] * 4


def test_rollout_diagnostics_split_tokens_at_the_first_mistake(machine_tokenizer, one_torch_thread):
    tokenizer = machine_tokenizer
    problems = [_problem(seed) for seed in range(4)]
    student = _RunWriter(tokenizer, problems, mistake_at=10)
    teacher = _tiny(tokenizer, seed=1)  # the entropies need a real teacher forward
    # The teacher's entropies come from its forward, its rollouts from a writer of the correct runs.
    teacher.generate = _RunWriter(tokenizer, problems, mistake_at=None).generate
    diagnostics = rollout_diagnostics(teacher, student, tokenizer, problems, epsilon=0.1)
    # 25 completion tokens per rollout (24 states and the stop); the student's prefix leaves the run after token 10,
    # so tokens 11..24 (14 of 25) sit on derailed prefixes.
    assert diagnostics["student"]["derailed_token_fraction"] == pytest.approx(14 / 25)
    assert diagnostics["student"]["accuracy"] == 0.0
    assert diagnostics["teacher"]["derailed_token_fraction"] == 0.0 and diagnostics["teacher"]["accuracy"] == 1.0
    assert diagnostics["teacher"]["teacher_entropy_derailed"] is None
    for entry in diagnostics.values():
        mixed = (1 - entry["derailed_token_fraction"]) * entry["teacher_entropy_on_track"] + entry[
            "derailed_token_fraction"
        ] * (entry["teacher_entropy_derailed"] or 0.0)
        assert entry["teacher_entropy"] == pytest.approx(mixed, rel=1e-5)


def test_trainer_records_the_teacher_entropy_of_every_rollout(machine_tokenizer, tmp_path, one_torch_thread):
    from datasets import Dataset

    from trb_trl import TRBDistillConfig, TRBDistillTrainer

    tokenizer = machine_tokenizer
    student, teacher = _tiny(tokenizer, seed=2, hidden=16), _tiny(tokenizer, seed=3, hidden=16)
    config = TRBDistillConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        max_completion_length=6,
        learning_rate=1e-3,
        rollout_policy="trb",
        trb_epsilon=0.2,
        trb_warmup_steps=1,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer_class = with_teacher_entropy(TRBDistillTrainer)
    assert issubclass(trainer_class, TRBDistillTrainer) and "TeacherEntropy" in trainer_class.__name__
    prompts = [_problem(seed).prompt for seed in range(8)]
    trainer = trainer_class(
        model=student,
        teacher_model=teacher,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
    )
    trainer.train()
    assert len(trainer.rollout_teacher_entropy) == 2
    assert all(0 < value < math.log(len(tokenizer)) for value in trainer.rollout_teacher_entropy)


# ---------------------------------------------------------------------------------------------------------------
# The paired comparison.


def test_t_critical_values_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 80):
        assert t_critical_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-4), df
    with pytest.raises(ValueError, match="2 seeds"):
        t_critical_975(0)


def test_mean_with_ci_and_the_decision_rule():
    values = [0.02, 0.04, 0.01, 0.03, 0.05]
    result = mean_with_ci(values)
    center = sum(values) / 5
    sd = math.sqrt(sum((v - center) ** 2 for v in values) / 4)
    half = 2.7764 * sd / math.sqrt(5)
    assert result["mean"] == pytest.approx(center) and result["ci95"] == pytest.approx([center - half, center + half])
    assert decision(result["ci95"]) == "better than vanilla OPD"
    assert decision([-0.03, -0.01]) == "worse than vanilla OPD"
    assert decision([-0.01, 0.02]) == "no detectable difference"
    assert mean_with_ci([0.5])["ci95"] is None and decision(None) == "no interval (one seed)"


def test_paired_differences_are_per_seed_over_each_window():
    steps = [0, 4, 8, 12]
    methods = {
        "opd": {"steps": steps, "accuracy": [[0.1, 0.2, 0.4, 0.8], [0.1, 0.3, 0.5, 0.7]]},
        "trb": {"steps": steps, "accuracy": [[0.1, 0.3, 0.5, 0.8], [0.1, 0.3, 0.7, 0.9]]},
        "other": {"steps": [0, 6, 12], "accuracy": [[0.1, 0.5, 0.9], [0.1, 0.5, 0.9]]},  # other steps: skipped
    }
    paired = paired_differences(methods, early_end=8)
    assert set(paired) == {"trb"}
    early = paired["trb"]["early"]
    assert early["steps"] == [4, 8] and early["per_seed"] == pytest.approx([0.1, 0.1])
    assert paired["trb"]["final"]["per_seed"] == pytest.approx([0.0, 0.2])
    assert paired["trb"]["curve"]["per_seed"] == pytest.approx([0.05, 0.1])
    assert early["mean"] == pytest.approx(0.1) and early["ci95"] == pytest.approx([0.1, 0.1])
    assert paired_differences({"trb": methods["trb"]}, early_end=8) == {}  # no OPD arm: nothing to pair with


# ---------------------------------------------------------------------------------------------------------------
# `--task`.


def _stub(monkeypatch):
    from test_demo import _stub_expensive_parts

    return _stub_expensive_parts(monkeypatch)


def test_task_selects_the_problems_models_and_defaults(monkeypatch, tmp_path):
    calls = _stub(monkeypatch)
    seen = {}
    original = runner.load_or_pretrain

    def load_or_pretrain(name, config, tokenizer, splits, *, task, cache_dir):
        seen[name] = (config, task, splits.eval[0], len(tokenizer))
        return original(name, config, tokenizer, splits, task=task, cache_dir=cache_dir)

    monkeypatch.setattr(runner, "load_or_pretrain", load_or_pretrain)
    output_dir = tmp_path / "out"
    assert runner.main(["--task", "machine", "--seeds", "2", "--eval-size", "8", "--output-dir", str(output_dir)]) == 0
    assert seen["teacher"][0] == MACHINE.teacher and seen["student"][0] == MACHINE.student
    assert seen["teacher"][1] == MACHINE.cache_fields and isinstance(seen["teacher"][2], MachineProblem)
    assert seen["teacher"][3] == len(MACHINE.tokenizer())
    report = json.loads((output_dir / "report.json").read_text())
    settings = report["settings"]
    assert settings["task"]["name"] == "machine" and settings["arguments"]["task"] == "machine"
    assert settings["steps"] == 40 and settings["eval_every"] == 4 and settings["warmup_steps"] == 13
    assert settings["early_end"] == 20 and settings["max_completion_length"] == 25
    assert report["task"] == MACHINE.description
    assert report["methods"]["opd"]["steps"] == [*range(0, 41, 4)]
    assert set(report["paired_with_opd"]) == set(runner.DEFAULT_METHODS) - {"opd"}
    assert len(calls["distil"]) == 2 * len(runner.DEFAULT_METHODS)
    # --quick on the machine task: its own shorter run.
    calls["distil"].clear()
    assert runner.main(["--task", "machine", "--quick", "--eval-size", "8", "--output-dir", str(tmp_path / "q")]) == 0
    quick = json.loads((tmp_path / "q" / "report.json").read_text())["settings"]
    assert quick["steps"] == 20 and quick["seeds"] == [0] and calls["distil"] == [("opd", 0), ("trb", 0)]


def test_unknown_task_is_a_usage_error_before_any_work(monkeypatch, tmp_path, capsys):
    calls = _stub(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        runner.main(["--task", "maze", "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "unknown task 'maze'" in error and all(name in error for name in TASKS)
    assert calls["pretrain"] == 0 and not (tmp_path / "out").exists()


def test_default_task_is_the_derailing_one():
    assert runner.DEFAULT_TASK == "machine" and runner.make_parser().parse_args([]).task is MACHINE
    assert runner.make_parser().parse_args(["--task", "addition"]).task is ADDITION


# ---------------------------------------------------------------------------------------------------------------
# End to end.


@pytest.mark.slow
def test_quick_machine_demo_end_to_end(tmp_path, capsys):
    """`trb-trl demo --task machine --quick` on a cold cache: pretrains the task's teacher and weak student, probes
    their step-0 rollouts, runs OPD and TRB, writes the report."""
    output_dir, cache_dir = tmp_path / "out", tmp_path / "cache"
    argv = ["--task", "machine", "--quick", "--output-dir", str(output_dir), "--cache-dir", str(cache_dir)]
    assert runner.main(argv) == 0
    printed = capsys.readouterr().out
    assert "teacher: trained and cached" in printed and "derailed" in printed
    report = json.loads((output_dir / "report.json").read_text())
    assert (output_dir / "report.png").stat().st_size > 10_000
    assert report["teacher_accuracy"] >= 0.9
    assert report["student_initial_accuracy"] <= 0.5 * report["teacher_accuracy"]
    # The task derails: most of the student's tokens sit on prefixes that already left the run, and there the teacher
    # is far less sure than on the prefixes still on track.
    student = report["rollout_diagnostics"]["student"]
    assert student["derailed_token_fraction"] > 0.3
    assert student["teacher_entropy_derailed"] > 5 * student["teacher_entropy_on_track"]
    assert report["rollout_diagnostics"]["trb"]["derailed_token_fraction"] < student["derailed_token_fraction"]
    probe = report["continuation_probe"]
    assert probe["lengths"] == list(MACHINE.defaults.probe_lengths)
    for source in ("student", "trb"):
        entry = probe["prefixes"][source]
        # A derailed prefix cannot be completed: even the teacher succeeds at most as often as the prefix is on track.
        assert all(t <= o + 1e-9 for t, o in zip(entry["teacher_continues"], entry["on_track"]))
    for method in ("opd", "trb"):
        entry = report["methods"][method]
        assert entry["steps"][-1] == 20 and entry["accuracy"][0][-1] >= entry["accuracy"][0][0] + 0.2
        entropy = entry["metrics"]["rollout/teacher_entropy"]
        assert len(entropy) == 20 and all(0 < e < math.log(len(MACHINE.tokenizer())) for e in entropy)
    # Step 0 of every curve is the student's held-out accuracy, measured with the same random numbers.
    assert report["methods"]["opd"]["accuracy"][0][0] == report["student_initial_accuracy"]
