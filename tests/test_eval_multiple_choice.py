"""Benchmarks beyond math: the grader seam (`graders.py`), multiple choice (`multiple_choice.py`: letters, seeded option
order, GPQA and MMLU-Redux rows, flagged questions), the TrOPD registry and suites, local files of every kind, gated
datasets, code execution as an opt-in, and `evaluate` end to end on a multiple-choice file and an AMC23-format file."""

import dataclasses
import json
import pickle

import datasets
import pytest
from datasets import Dataset

from trb_trl.evaluation import callback as callback_module
from trb_trl.evaluation.benchmarks import (
    BENCHMARKS,
    LOCAL_LAYOUTS,
    MMLU_REDUX_SUBJECTS,
    PAPER_SUITES,
    REGISTRY,
    TROPD_BENCHMARKS,
    TROPD_SUITES,
    Benchmark,
    FrozenMapping,
    Problem,
    benchmark_from_dataset,
    load_benchmark,
    local_spec,
    parse_benchmarks,
)
from trb_trl.evaluation.graders import (
    SYSTEM_PROMPTS,
    Graders,
    MathGrader,
    grader_for,
    kind_module,
    system_prompt_for,
)
from trb_trl.evaluation.grading import Verdict
from trb_trl.evaluation.multiple_choice import (
    LETTERS,
    MultipleChoiceGrader,
    extract_letter,
    option_order,
    render_question,
)
from trb_trl.evaluation.runner import (
    RESULTS_FILE,
    SAMPLES_FILE,
    benchmark_scores,
    evaluate,
    read_samples,
    run_benchmark,
)
from trb_trl.evaluation.sampling import Completion
from trb_trl.testing import build_word_tokenizer


GPQA = TROPD_BENCHMARKS["gpqa_diamond"]
MMLU = TROPD_BENCHMARKS["mmlu_redux"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def gpqa_rows(count: int) -> list[dict]:
    return [
        {
            "Record ID": f"rec{i}",
            "Question": f"Which particle is number {i}?",
            "Correct Answer": f" right {i}\n",  # GPQA's texts carry stray white space
            "Incorrect Answer 1": f"wrong {i}a",
            "Incorrect Answer 2": f"wrong {i}b",
            "Incorrect Answer 3": f"wrong {i}c",
            "Subdomain": "Physics",
        }
        for i in range(count)
    ]


MMLU_ROWS = [
    {"question": "2 + 2?", "choices": ["3", "4", "5", "6"], "answer": 1, "error_type": "ok", "correct_answer": None},
    {
        "question": "Capital?",
        "choices": ["Rome", "Paris", "Oslo", "Bern"],
        "answer": 0,
        "error_type": "wrong_groundtruth",
        "correct_answer": "B",
    },
    {"question": "Red?", "choices": ["a", "b", "c", "d"], "answer": 2, "error_type": "ok", "correct_answer": None},
    {
        "question": "Pi?",
        "choices": ["3", "4", "5", "6"],
        "answer": 3,
        "error_type": "no_correct_answer",
        "correct_answer": "3.14",
    },
    {
        "question": "Both?",
        "choices": ["x", "y", "z", "w"],
        "answer": 0,
        "error_type": "multiple_correct_answers",
        "correct_answer": "A, B",
    },
    {
        "question": "Odd?",
        "choices": ["1", "2", "3", "4"],
        "answer": 1,
        "error_type": "wrong_groundtruth",
        "correct_answer": "none of them",
    },
]


def shown_options(problem: Problem) -> dict[str, str]:
    """The lettered options of a rendered multiple-choice problem: {"A": text, ...}."""
    lines = [line for line in problem.problem.splitlines() if len(line) > 2 and line[1] == ")"]
    return {line[0]: line[3:] for line in lines}


# ---------------------------------------------------------------------------------------------------------------------
# Letters


@pytest.mark.parametrize(
    ("completion", "letter", "found_in"),
    [
        (r"so it is \boxed{C}", "C", "boxed"),
        (r"$\boxed{\text{(C)}}$", "C", "boxed"),
        (r"\boxed{C. the right one}", "C", "boxed"),
        (r"\boxed{(b) Paris}", "B", "boxed"),
        (r"\boxed{c}", "C", "boxed"),
        (r"\boxed{\textbf{D}}", "D", "boxed"),
        (r"\boxed{Option A}", "A", "boxed"),
        (r"First \boxed{A}, then on reflection \boxed{D}.", "D", "boxed"),
        (r"\boxed{B}. Answer: C", "B", "boxed"),  # the box wins over an answer line
        ("Answer: B", "B", "answer_line"),
        ("**Answer:** (d)", "D", "answer_line"),
        ("Thinking...\nThe answer is (A).", "A", "answer_line"),
        ("so the correct answer is C.", "C", "answer_line"),
        ("Answer: A\nWait, no. Answer: C", "C", "answer_line"),  # the last one
        ("the final answer is: b", "B", "answer_line"),
        (r"\boxed{E} Answer: B", "B", "answer_line"),  # a box naming no offered letter falls back
    ],
)
def test_letter_extraction(completion, letter, found_in):
    assert extract_letter(completion, 4) == (letter, found_in)


@pytest.mark.parametrize(
    "completion",
    [
        "",
        None,
        "I do not know.",
        r"\boxed{E}",  # not one of A-D
        r"\boxed{42}",
        r"\boxed{a + b}",
        r"\boxed{C and D}",
        r"cut off in \boxed{C",
        "The answer is a prime number.",  # the article, not option (a)
        "Answer: E",
        "Let me check the answers.",
    ],
)
def test_bad_completions_name_no_letter(completion):
    assert extract_letter(completion, 4) == (None, None)


def test_only_offered_letters_count():
    assert extract_letter(r"\boxed{E}", 5) == ("E", "boxed")
    assert extract_letter(r"\boxed{C}", 2) == (None, None)


# ---------------------------------------------------------------------------------------------------------------------
# Option order


def test_option_order_is_a_seeded_permutation_of_the_problem_id():
    orders = {problem_id: option_order(problem_id, 4) for problem_id in (f"rec{i}" for i in range(400))}
    assert all(sorted(order) == [0, 1, 2, 3] for order in orders.values())
    assert orders == {problem_id: option_order(problem_id, 4) for problem_id in orders}  # the same on every call
    assert (
        option_order("rec0", 4, seed=1) != option_order("rec0", 4) or option_order("rec1", 4, seed=1) != orders["rec1"]
    )
    # Where the correct option (index 0 in GPQA's data) lands: every letter, about a quarter of the time each.
    landing = [order.index(0) for order in orders.values()]
    assert all(60 < landing.count(position) < 140 for position in range(4))


def test_gpqa_rows_shuffle_options_and_the_gold_letter_follows_the_correct_option():
    dataset = Dataset.from_list(gpqa_rows(12))
    benchmark = benchmark_from_dataset(dataset, GPQA)
    assert (benchmark.name, benchmark.kind, benchmark.num_samples, benchmark.source) == (
        "gpqa_diamond",
        "multiple_choice",
        4,
        "Idavidrein/gpqa",
    )
    assert [p.id for p in benchmark.problems] == [f"rec{i}" for i in range(12)]
    for i, problem in enumerate(benchmark.problems):
        options = shown_options(problem)
        assert sorted(options.values()) == sorted([f"right {i}", f"wrong {i}a", f"wrong {i}b", f"wrong {i}c"])
        assert options[problem.answer] == f"right {i}"
        assert problem.metadata == {"order": option_order(f"rec{i}", 4), "correct_index": 0}
        assert problem.problem.startswith(f"Which particle is number {i}?\n\nA) ")
        assert problem.problem.endswith("Put the letter of the correct option (A, B, C or D) within \\boxed{}.")
    assert len({p.answer for p in benchmark.problems}) > 1  # not always "A", as in the data
    assert benchmark_from_dataset(dataset, GPQA) == benchmark  # a rerun sees the same order
    # Without shuffling the correct option would always be first.
    unshuffled = benchmark_from_dataset(dataset, dataclasses.replace(GPQA, shuffle_options=False))
    assert {p.answer for p in unshuffled.problems} == {"A"}


def test_every_sample_of_a_problem_sees_the_same_prompt(tmp_path, tokenizer_dir):
    path = write_jsonl(tmp_path / "gpqa_local.jsonl", gpqa_rows(3))
    sampler = ScriptedSampler({})
    evaluate(
        tokenizer_dir, [path], num_samples=4, batch_size=3, sampler=sampler, output_dir=tmp_path / "o", progress=False
    )
    prompts = {}
    for requests, _ in sampler.calls:
        for request in requests:
            prompts.setdefault(request.problem_id, set()).add(request.prompt)
    assert {problem_id: len(texts) for problem_id, texts in prompts.items()} == {"rec0": 1, "rec1": 1, "rec2": 1}


# ---------------------------------------------------------------------------------------------------------------------
# MMLU-Redux


def test_mmlu_redux_keeps_its_order_and_leaves_flagged_questions_out():
    benchmark = benchmark_from_dataset(Dataset.from_list(MMLU_ROWS), MMLU)
    assert [(p.id, p.answer) for p in benchmark.problems] == [("0", "B"), ("2", "C")]  # ids are the original rows
    assert shown_options(benchmark.problems[0]) == {"A": "3", "B": "4", "C": "5", "D": "6"}
    assert benchmark.problems[0].metadata == {"order": (0, 1, 2, 3), "correct_index": 1}
    assert benchmark.num_samples == 1 and benchmark.kind == "multiple_choice"
    assert benchmark_from_dataset(Dataset.from_list(MMLU_ROWS), MMLU, max_problems=1).problems == (
        benchmark.problems[0],
    )


def test_mmlu_redux_corrected_uses_the_annotators_answers_where_given():
    benchmark = benchmark_from_dataset(Dataset.from_list(MMLU_ROWS), TROPD_BENCHMARKS["mmlu_redux_corrected"])
    problems = {p.id: p for p in benchmark.problems}
    assert sorted(problems) == ["0", "1", "2", "3"]  # several correct answers, or an unusable correction: left out
    assert problems["1"].answer == "B"  # wrong_groundtruth: the gold moves to the corrected letter
    assert problems["3"].answer == "D" and shown_options(problems["3"])["D"] == "3.14"  # no_correct_answer


def test_mmlu_redux_options_can_be_shuffled():
    spec = dataclasses.replace(MMLU, shuffle_options=True)
    for problem in benchmark_from_dataset(Dataset.from_list(MMLU_ROWS), spec).problems:
        row = MMLU_ROWS[int(problem.id)]
        assert shown_options(problem)[problem.answer] == row["choices"][row["answer"]]


def test_mmlu_redux_subjects_are_listed():
    assert len(MMLU_REDUX_SUBJECTS) == 57 == len(set(MMLU_REDUX_SUBJECTS))
    assert MMLU.configs == MMLU_REDUX_SUBJECTS and MMLU.flag_column == "error_type"


def test_mmlu_redux_loads_every_subject_with_stable_ids(monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return Dataset.from_list(MMLU_ROWS[:3])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    benchmark = load_benchmark("mmlu-redux")
    assert calls == [("edinburgh-dawg/mmlu-redux-2.0", subject, "test") for subject in MMLU_REDUX_SUBJECTS]
    assert len(benchmark.problems) == 2 * 57
    assert [p.id for p in benchmark.problems[:3]] == ["abstract_algebra/0", "abstract_algebra/2", "anatomy/0"]


# ---------------------------------------------------------------------------------------------------------------------
# The registry, suites, local files, gated datasets


def test_tropd_registry_and_suites():
    assert {name: (spec.kind, spec.num_samples) for name, spec in TROPD_BENCHMARKS.items()} == {
        "amc23": ("math", 32),
        "gpqa_diamond": ("multiple_choice", 4),
        "mmlu_redux": ("multiple_choice", 1),
        "mmlu_redux_corrected": ("multiple_choice", 1),
        "ifbench": ("instruction_following", 1),
        "livecodebench_v6": ("code", 1),
    }
    assert TROPD_SUITES == {
        "tropd_deepseek": ("aime24", "aime25", "amc23", "livecodebench_v6", "gpqa_diamond"),
        "tropd_qwen3": ("aime24", "aime25", "amc23", "gpqa_diamond", "mmlu_redux", "ifbench", "livecodebench_v6"),
        "tropd_math": ("aime24", "aime25", "amc23"),
    }
    assert all(name in REGISTRY for suite in TROPD_SUITES.values() for name in suite)
    assert not set(BENCHMARKS) & set(TROPD_BENCHMARKS) and not set(PAPER_SUITES) & set(TROPD_SUITES)
    assert parse_benchmarks("tropd_math,math500") == ["aime24", "aime25", "amc23", "math500"]
    assert parse_benchmarks("GPQA-Diamond,lcbv6") == ["gpqa_diamond", "livecodebench_v6"]
    assert GPQA.config == "gpqa_diamond" and GPQA.split == "train" and GPQA.shuffle_options


def test_amc23_rows_read_float_answers_as_integers():
    spec = TROPD_BENCHMARKS["amc23"]
    dataset = Dataset.from_dict({"id": [0, 1], "question": ["How many?", "Find m+n."], "answer": [27.0, 3.5]})
    assert [(p.id, p.problem, p.answer) for p in benchmark_from_dataset(dataset, spec).problems] == [
        ("0", "How many?", "27"),
        ("1", "Find m+n.", "3.5"),
    ]


@pytest.mark.parametrize("text", ["gpqa_diamonds", "tropd_qwen4", "mmlu"])
def test_unknown_benchmark_lists_the_new_ones(text):
    with pytest.raises(ValueError, match="Unknown benchmark") as error:
        parse_benchmarks(text)
    for name in [*TROPD_BENCHMARKS, *TROPD_SUITES, "Correct Answer"]:
        assert name in str(error.value)


@pytest.mark.parametrize(
    ("columns", "kind"),
    [
        (["id", "problem", "answer"], "math"),
        (["question", "answer"], "math"),
        (
            ["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"],
            "multiple_choice",
        ),
        (["question", "choices", "answer", "error_type"], "multiple_choice"),
        (["key", "prompt", "instruction_id_list", "kwargs"], "instruction_following"),
        (["question_id", "question_content", "public_test_cases", "private_test_cases"], "code"),
    ],
)
def test_a_local_files_kind_follows_its_columns(tmp_path, columns, kind):
    spec = local_spec(tmp_path / "mine.jsonl", columns)
    assert (spec.kind, spec.name, spec.dataset, spec.num_samples) == (kind, "mine", str(tmp_path / "mine.jsonl"), 1)
    assert not spec.configs and not spec.data_files and spec.config is None


def test_local_multiple_choice_files_are_read_like_their_registry_entries(tmp_path):
    gpqa = load_benchmark(write_jsonl(tmp_path / "gpqa_local.jsonl", gpqa_rows(4)))
    assert gpqa.kind == "multiple_choice" and [p.id for p in gpqa.problems] == ["rec0", "rec1", "rec2", "rec3"]
    assert gpqa.problems == benchmark_from_dataset(Dataset.from_list(gpqa_rows(4)), GPQA).problems  # same order
    mmlu = load_benchmark(write_jsonl(tmp_path / "mmlu_local.jsonl", MMLU_ROWS))
    assert [(p.id, p.answer) for p in mmlu.problems] == [("0", "B"), ("2", "C")]
    plain = [{k: v for k, v in row.items() if k not in ("error_type", "correct_answer")} for row in MMLU_ROWS]
    assert len(load_benchmark(write_jsonl(tmp_path / "plain.jsonl", plain)).problems) == 6  # no flags: every row


def test_a_missing_column_is_named_with_the_column_sets(tmp_path):
    rows = [{k: v for k, v in row.items() if k != "Incorrect Answer 3"} for row in gpqa_rows(2)]
    with pytest.raises(ValueError, match=r"no 'Incorrect Answer 3' column \(the options of 'partial'\)") as error:
        load_benchmark(write_jsonl(tmp_path / "partial.jsonl", rows))
    assert "instruction_id_list" in str(error.value) and "question_content" in str(error.value)
    with pytest.raises(ValueError, match="has no 'choices' column"):
        benchmark_from_dataset(Dataset.from_dict({"question": ["q"], "answer": [0]}), MMLU)
    with pytest.raises(ValueError, match="names none of the 4 options"):
        benchmark_from_dataset(Dataset.from_list([{**MMLU_ROWS[0], "answer": 7}]), MMLU)


def _gated_error():
    import httpx2
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import GatedRepoError

    url = "https://huggingface.co/api/datasets/Idavidrein/gpqa"
    response = httpx2.Response(401, request=httpx2.Request("GET", url))
    try:
        raise GatedRepoError("401 Client Error: access to this repository is restricted", response=response)
    except GatedRepoError as cause:
        try:  # as `datasets` raises it
            raise DatasetNotFoundError(
                "Dataset 'Idavidrein/gpqa' is a gated dataset on the Hub. You must be authenticated to access it."
            ) from cause
        except DatasetNotFoundError as error:
            return error


def test_a_gated_dataset_says_how_to_get_access(monkeypatch):
    error = _gated_error()

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    with pytest.raises(PermissionError) as raised:
        load_benchmark("gpqa_diamond")
    message = str(raised.value)
    assert "Accept the terms at https://huggingface.co/datasets/Idavidrein/gpqa" in message
    assert "hf auth login" in message and "local file with the same columns" in message and "Correct Answer" in message
    assert raised.value.__cause__ is error

    def offline(*args, **kwargs):  # other errors pass through unchanged
        raise ConnectionError("Couldn't reach 'Idavidrein/gpqa' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match="Couldn't reach"):
        load_benchmark("gpqa_diamond")


def test_problems_are_immutable_hashable_and_picklable():
    problem = Problem("p", "text", "B", {"order": [2, 0, 1], "nested": {"k": [1, 2]}})
    assert isinstance(problem.metadata, FrozenMapping) and problem.metadata["order"] == (2, 0, 1)
    with pytest.raises(TypeError):
        problem.metadata["order"] = ()
    assert pickle.loads(pickle.dumps(problem)) == problem and hash(problem) == hash(Problem("p", "text", "B"))
    assert Problem("p", "t", "1") == Problem("p", "t", "1", {}) and Verdict(None, False) == Verdict(None, False, {})


# ---------------------------------------------------------------------------------------------------------------------
# Graders


def test_grader_for_each_kind():
    assert isinstance(grader_for("math"), MathGrader)
    assert isinstance(grader_for("multiple_choice"), MultipleChoiceGrader)
    with pytest.raises(TypeError, match="no options"):
        grader_for("multiple_choice", timeout_seconds=1)
    with pytest.raises(ValueError, match="kinds are math, multiple_choice"):
        grader_for("essay")
    with pytest.raises(ValueError, match="--allow-code-execution"):
        grader_for("code")
    graders = Graders()
    assert graders["multiple_choice"] is graders["multiple_choice"]
    graders.close()


def test_a_missing_kind_module_is_a_clear_import_error(monkeypatch):
    from trb_trl.evaluation import kinds

    monkeypatch.setitem(kinds.KIND_MODULES, "instruction_following", "no_such_module_here")
    with pytest.raises(ImportError, match="instruction_following benchmarks are read and graded by .*no_such_module"):
        kind_module("instruction_following")


def test_system_prompts_by_kind():
    assert system_prompt_for("math") == SYSTEM_PROMPTS["math"] and "\\boxed{}" in SYSTEM_PROMPTS["multiple_choice"]
    assert system_prompt_for("multiple_choice", {"math": "M"}) == SYSTEM_PROMPTS["multiple_choice"]
    assert system_prompt_for("math", {"math": "M"}) == "M" and system_prompt_for("code", None) is None
    assert system_prompt_for("instruction_following", "One for all") == "One for all"
    try:
        from trb_trl.evaluation.code_execution import SYSTEM_PROMPT
    except ImportError:
        return
    assert SYSTEM_PROMPTS["code"] == SYSTEM_PROMPT


def test_multiple_choice_grader():
    problem = benchmark_from_dataset(Dataset.from_list(MMLU_ROWS), MMLU).problems[0]  # gold B
    grader = MultipleChoiceGrader()
    assert grader.check(problem, r"\boxed{B}") == Verdict("B", True, {"found_in": "boxed"})
    assert grader.check(problem, "Answer: (c)") == Verdict("C", False, {"found_in": "answer_line"})
    assert grader.check(problem, "no idea") == Verdict(None, False)
    assert grader.summary_metrics([Verdict("B", True)]) == {}


class CountingGrader:
    """A grader with summary metrics and details: correct iff the completion says "yes"."""

    def check(self, problem, completion):
        return Verdict(completion, completion == "yes", {"length": len(completion)})

    def summary_metrics(self, verdicts):
        return {"mean_length": sum(v.details["length"] for v in verdicts) / len(verdicts)}

    def close(self):
        pass


def test_summary_metrics_and_details_reach_the_scores_and_the_samples():
    benchmark = Benchmark("b", (Problem("p0", "q0", "-"), Problem("p1", "q1", "-")), 2, "b.jsonl", "math")
    answers = {("p0", 0): "yes", ("p0", 1): "no", ("p1", 0): "yes", ("p1", 1): "yes"}
    records = run_benchmark(
        benchmark,
        num_samples=2,
        prompts={"p0": "q0", "p1": "q1"},
        sampler=lambda requests, seed: [answers[(r.problem_id, r.index)] for r in requests],
        grader=CountingGrader(),
        batch_size=3,
        seed=0,
        progress=False,
    )
    assert records[("p0", 1)]["details"] == {"length": 2} and "metadata" not in records[("p0", 1)]
    scores = benchmark_scores(benchmark, records, 2, grader=CountingGrader())
    assert scores["pass@1"] == pytest.approx(0.75) and scores["mean_length"] == pytest.approx(2.75)

    class Clashing(CountingGrader):
        def summary_metrics(self, verdicts):
            return {"pass@1": 1.0}

    with pytest.raises(RuntimeError, match="overwrite"):
        benchmark_scores(benchmark, records, 2, grader=Clashing())


def test_the_callback_combines_summary_metrics_over_every_process(monkeypatch):
    evaluation = object.__new__(callback_module.MathEvalCallback)  # only what `_summary_metrics` reads
    evaluation.benchmarks = [
        Benchmark("ifb", (), 1, "ifb.jsonl", "instruction_following"),
        Benchmark("m", (), 1, "m.jsonl", "math"),
    ]
    evaluation.graders = {"instruction_following": CountingGrader()}
    own = {"ifb": [Verdict("yes", True, {"length": 3})], "m": [Verdict("1", True)]}
    assert evaluation._summary_metrics(own, world=1) == {"ifb": {"mean_length": 3.0}}

    gathered = []

    def fake_gather(objects):  # the other process holds two verdicts, of length 1 and 8
        gathered.append(objects)
        other = {"ifb": [("no", False, {"length": 1}), ("yes", True, {"length": 8})]}
        return [*objects, other]

    monkeypatch.setattr(callback_module, "gather_object", fake_gather)
    assert evaluation._summary_metrics(own, world=2) == {"ifb": {"mean_length": 4.0}}
    assert gathered == [[{"ifb": [("yes", True, {"length": 3})]}]]  # only the benchmarks with summary metrics
    assert evaluation._summary_metrics({}, world=2) == {"ifb": {"mean_length": 4.5}}  # an empty share still gathers
    evaluation.benchmarks = evaluation.benchmarks[1:]
    assert evaluation._summary_metrics(own, world=2) == {} and len(gathered) == 2  # math alone: no gather


# ---------------------------------------------------------------------------------------------------------------------
# Code execution is opt-in


def test_a_code_benchmark_without_the_flag_fails_before_anything_loads(tokenizer_dir, tmp_path, monkeypatch, capsys):
    def no_download(*args, **kwargs):
        raise AssertionError("nothing may be downloaded")

    monkeypatch.setattr(datasets, "load_dataset", no_download)
    with pytest.raises(ValueError, match="livecodebench_v6: grading code runs .*--allow-code-execution"):
        evaluate(tokenizer_dir, "tropd_deepseek", output_dir=tmp_path, sampler=ScriptedSampler({}))
    from trb_trl.cli import main as cli_main

    assert cli_main(["eval", "no/model", "--benchmarks", "lcb_v6", "--output-dir", str(tmp_path)]) == 2
    assert "Pass --allow-code-execution" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_help_lists_the_kinds_and_the_flag(capsys):
    from trb_trl.evaluation.cli import make_parser

    text = make_parser().format_help()
    for word in ("multiple_choice", "instruction_following", "--allow-code-execution", "tropd_qwen3", "gpqa_diamond"):
        assert word in text


# ---------------------------------------------------------------------------------------------------------------------
# End to end


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("word_tokenizer")
    build_word_tokenizer([f"w{i}" for i in range(8)]).save_pretrained(path)
    return str(path)


class ScriptedSampler:
    """Answers each request with `script[(problem_id, index)]` (no answer when absent); records every call."""

    def __init__(self, script: dict):
        self.script, self.calls = script, []

    def __call__(self, requests, seed):
        self.calls.append((list(requests), seed))
        return [Completion(self.script.get((r.problem_id, r.index), "No answer."), 5, True) for r in requests]


def test_multiple_choice_and_amc23_files_end_to_end(tokenizer_dir, tmp_path):
    mc_path = write_jsonl(tmp_path / "gpqa_mini.jsonl", gpqa_rows(3))
    amc_rows = [
        {"id": f"a{i}", "question": f"AMC problem {i}", "answer": answer} for i, answer in enumerate([27.0, 5])
    ]
    amc_path = write_jsonl(tmp_path / "amc_mini.jsonl", amc_rows)
    gold = {p.id: p.answer for p in load_benchmark(mc_path).problems}
    wrong = {problem_id: next(letter for letter in "ABCD" if letter != answer) for problem_id, answer in gold.items()}
    script = {
        # rec0: 2 of 2 right (box, then answer line); rec1: 1 of 2 (a wrong letter); rec2: none (no letter at all)
        ("rec0", 0): f"\\boxed{{{gold['rec0']}}}",
        ("rec0", 1): f"Answer: ({gold['rec0'].lower()})",
        ("rec1", 0): f"\\boxed{{\\text{{({gold['rec1']})}}}}",
        ("rec1", 1): f"\\boxed{{{wrong['rec1']}}}",
        ("a0", 0): r"\boxed{27}",
        ("a0", 1): r"\boxed{26}",
        ("a1", 0): r"\boxed{5}",
        ("a1", 1): r"\boxed{5.0}",
    }
    sampler = ScriptedSampler(script)
    out = tmp_path / "out"
    options = dict(output_dir=out, num_samples=2, k=(1, 2), batch_size=4, progress=False)
    results = evaluate(tokenizer_dir, [mc_path, amc_path], sampler=sampler, **options)
    mc, amc = results["benchmarks"]["gpqa_mini"], results["benchmarks"]["amc_mini"]
    assert mc["pass@1"] == pytest.approx((1 + 0.5 + 0) / 3) and mc["pass@2"] == pytest.approx(2 / 3)
    assert mc["no_answer"] == pytest.approx(2 / 6) and mc["num_correct"] == 3
    assert amc["pass@1"] == pytest.approx((0.5 + 1) / 2)
    assert results["mean"]["pass@1"] == pytest.approx((mc["pass@1"] + amc["pass@1"]) / 2)

    # Each kind's system prompt, recorded per benchmark since they differ.
    settings = json.loads((out / RESULTS_FILE).read_text())["settings"]
    assert settings["system_prompt"] == {
        "gpqa_mini": SYSTEM_PROMPTS["multiple_choice"],
        "amc_mini": SYSTEM_PROMPTS["math"],
    }
    prompts = {r.problem_id: r.prompt for requests, _ in sampler.calls for r in requests}
    assert SYSTEM_PROMPTS["multiple_choice"] in prompts["rec0"] and "Which particle is number 0?" in prompts["rec0"]
    assert SYSTEM_PROMPTS["math"] in prompts["a0"] and "AMC problem 0" in prompts["a0"]

    records = {(r["problem_id"], r["sample"]): r for r in read_samples(out / SAMPLES_FILE)}
    assert len(records) == 10
    assert records[("rec0", 1)] | {"completion": None, "num_tokens": None} == {
        "benchmark": "gpqa_mini",
        "problem_id": "rec0",
        "sample": 1,
        "answer": gold["rec0"],
        "extracted": gold["rec0"],
        "correct": True,
        "num_tokens": None,
        "finished": True,
        "details": {"found_in": "answer_line"},
        "metadata": {"order": list(option_order("rec0", 4)), "correct_index": 0},
        "completion": None,
    }
    assert records[("rec2", 0)]["extracted"] is None and "details" not in records[("rec2", 0)]
    assert records[("a0", 0)]["answer"] == "27" and records[("a0", 0)]["correct"]
    assert "details" not in records[("a0", 0)] and "metadata" not in records[("a0", 0)]

    # Resumed with the same settings: nothing generated again, the same scores.
    again = ScriptedSampler({})
    rerun = evaluate(tokenizer_dir, [mc_path, amc_path], sampler=again, **options)
    assert again.calls == [] and rerun["benchmarks"]["gpqa_mini"]["pass@1"] == mc["pass@1"]


def test_local_layouts_name_a_kind_each():
    assert {spec.kind for _, spec in LOCAL_LAYOUTS} == {
        "math",
        "multiple_choice",
        "instruction_following",
        "code",
    }
    assert render_question("Q?", ["x", "y"]).endswith("(A or B) within \\boxed{}.") and LETTERS[:2] == "AB"


_GATHER_SCRIPT = """
import faulthandler, json, sys
faulthandler.dump_traceback_later(120, exit=True)
from accelerate import PartialState
state = PartialState(cpu=True)
sys.path.insert(0, sys.argv[2])
from test_eval_multiple_choice import CountingGrader
from trb_trl.evaluation import callback
from trb_trl.evaluation.benchmarks import Benchmark
from trb_trl.evaluation.grading import Verdict
evaluation = object.__new__(callback.MathEvalCallback)
evaluation.benchmarks = [Benchmark("ifb", (), 1, "ifb.jsonl", "instruction_following")]
evaluation.graders = {"instruction_following": CountingGrader()}
mine = [Verdict("yes", True, {"length": 3}), Verdict("no", False, {"length": 7})]
own = {"ifb": mine} if state.process_index == 0 else {}  # the second process has nothing to grade
metrics = evaluation._summary_metrics(own, world=state.num_processes)
with open(f"{sys.argv[1]}/rank{state.process_index}.json", "w") as file:
    json.dump({"world": state.num_processes, "metrics": metrics}, file)
faulthandler.cancel_dump_traceback_later()
state.wait_for_everyone()
"""


@pytest.mark.slow
def test_summary_metrics_gather_with_an_empty_share_in_two_processes(tmp_path):
    """Two gloo processes, the second with no sample to grade: both enter the gather and agree on the metrics."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    script = tmp_path / "gather.py"
    script.write_text(_GATHER_SCRIPT)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(tests.parent))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(tests.parent / ".ci-cache" / "torch_extensions"))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    command += [str(tests / "distributed" / "zero2_cpu.yaml"), "--main_process_port", str(port)]
    result = subprocess.run(
        [*command, str(script), str(tmp_path), str(tests)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert reports == [{"world": 2, "metrics": {"ifb": {"mean_length": 5.0}}}] * 2
