"""Benchmarks (Hub id, split, columns, kind, default sample count), the papers' suites, and local files.

The TRB paper (papers.md §1.7) reports pass@1 from n samples per problem: GSM8K 32; MATH500 and OlympiadBench 64;
AIME24, AIME25 and AMC 512 (`BENCHMARKS`, `PAPER_SUITES`). The TrOPD paper (papers.md §2.6) adds AMC23 (32 samples,
like AIME24 and AIME25), GPQA-Diamond, MMLU-Redux v2, IFBench and LiveCodeBench v6 (`TROPD_BENCHMARKS`,
`TROPD_SUITES`). Neither names its Hub copies; the copies below are the widely used ones, chosen per entry.

Every benchmark has a kind (`KINDS`), which says how its rows become problems and how its samples are graded
(`graders.py`): `math` (the last `\\boxed{}` against the gold answer by math-verify), `multiple_choice`
(`multiple_choice.py`: lettered options, the letter of the answer), `instruction_following`
(`instruction_following.py`) and `code` (`code_execution.py`, opt-in: it runs the model's programs).

A local `.jsonl`, `.json`, `.parquet` or `.csv` file with the columns of one kind (`LOCAL_LAYOUTS`; math: `problem`
(or `question`) and `answer`, with an optional unique `id`) is a benchmark too, of the kind its columns name; it defaults to 1 sample
per problem, so pass `num_samples` to evaluate it as the papers evaluate their benchmarks.
"""

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .frozen import FrozenMapping, freeze, thaw  # noqa: F401 (re-exported)
from .kinds import KINDS, kind_module


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where a benchmark lives on the Hub and how to read a problem and its gold answer from one row."""

    name: str  # "math500"
    dataset: str  # Hub id, e.g. "HuggingFaceH4/MATH-500"
    split: str
    problem_column: str
    answer_column: str  # a list-valued answer (OlympiadBench) is joined with ", "
    num_samples: int  # the paper's default n
    config: str | None = None
    # math: "plain", or "gsm8k" (the gold is the text after "####"). multiple_choice: "text" (the answer column holds
    # the correct option's text, `extra_columns` the incorrect ones) or "index" (the answer column holds the 0-based
    # index, or the letter, of the correct option in the list column `extra_columns[0]`).
    answer_format: str = "plain"
    id_column: str | None = None  # problem ids from this column when present and unique, else the row index
    kind: str = "math"  # one of KINDS: how rows become problems and how samples are graded
    configs: tuple[str, ...] = ()  # several configs, loaded and concatenated (MMLU-Redux: one per subject)
    data_files: tuple[str, ...] = ()  # files of the Hub repository read directly (LiveCodeBench)
    extra_columns: tuple[str, ...] = ()  # further columns its rows need (GPQA: the incorrect answers)
    shuffle_options: bool = False  # multiple_choice: options in a seeded order per problem (multiple_choice.py)
    flag_column: str | None = None  # multiple_choice: the column that marks flawed questions (MMLU-Redux: error_type)
    # multiple_choice with a flag column: "exclude" scores the rows flagged "ok" only; "corrected" also the flawed rows
    # whose corrected answer the annotators give (multiple_choice.py).
    flagged: str = "exclude"


# Problem counts are those of the copies named here.
BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        # 1,319 problems. OpenAI's own copy; the gold is a worked solution ending in "#### 72".
        BenchmarkSpec("gsm8k", "openai/gsm8k", "test", "question", "answer", 32, config="main", answer_format="gsm8k"),
        # 500 problems: the MATH test subset of "Let's Verify Step by Step", as used by lighteval and open-r1.
        BenchmarkSpec("math500", "HuggingFaceH4/MATH-500", "test", "problem", "answer", 64, id_column="unique_id"),
        # 674 problems: OlympiadBench's open-ended, text-only, English competition-math subset (OE_TO_maths_en_COMP),
        # the subset math papers report as "OlympiadBench" (Qwen2.5-Math's copy of it has 675), from the upload the
        # OlympiadBench repository links to (lighteval uses it too). Its only split is "train"; `final_answer` is a
        # list of strings such as ["$\frac{1}{2}$"].
        BenchmarkSpec(
            "olympiadbench",
            "Hothan/OlympiadBench",
            "train",
            "question",
            "final_answer",
            64,
            config="OE_TO_maths_en_COMP",
            id_column="id",
        ),
        # 83 problems of AMC 12 2022 and 2023 (Project Numina's AIMO validation set), the "AMC" of open-r1 and
        # lighteval. AMC23 alone (40 problems, e.g. Qwen2.5-Math's suite) is `amc23` below; the TRB paper does not
        # say which it used.
        BenchmarkSpec("amc", "AI-MO/aimo-validation-amc", "train", "problem", "answer", 512, id_column="id"),
        # 30 problems (AIME 2024 I and II), as used by open-r1 and lighteval.
        BenchmarkSpec("aime24", "HuggingFaceH4/aime_2024", "train", "problem", "answer", 512, id_column="id"),
        # 30 problems (AIME 2025 I and II): MathArena's copy, whose statements were checked for the MathArena
        # leaderboard; answers are integers.
        BenchmarkSpec("aime25", "MathArena/aime_2025", "train", "problem", "answer", 512, id_column="problem_idx"),
    )
}

GPQA_INCORRECT_COLUMNS = ("Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
# MMLU-Redux 2.0 has one config per MMLU subject (100 questions each), listed as lighteval and evalscope list them.
MMLU_REDUX_SUBJECTS = (
    "abstract_algebra",
    "anatomy",
    "astronomy",
    "business_ethics",
    "clinical_knowledge",
    "college_biology",
    "college_chemistry",
    "college_computer_science",
    "college_mathematics",
    "college_medicine",
    "college_physics",
    "computer_security",
    "conceptual_physics",
    "econometrics",
    "electrical_engineering",
    "elementary_mathematics",
    "formal_logic",
    "global_facts",
    "high_school_biology",
    "high_school_chemistry",
    "high_school_computer_science",
    "high_school_european_history",
    "high_school_geography",
    "high_school_government_and_politics",
    "high_school_macroeconomics",
    "high_school_mathematics",
    "high_school_microeconomics",
    "high_school_physics",
    "high_school_psychology",
    "high_school_statistics",
    "high_school_us_history",
    "high_school_world_history",
    "human_aging",
    "human_sexuality",
    "international_law",
    "jurisprudence",
    "logical_fallacies",
    "machine_learning",
    "management",
    "marketing",
    "medical_genetics",
    "miscellaneous",
    "moral_disputes",
    "moral_scenarios",
    "nutrition",
    "philosophy",
    "prehistory",
    "professional_accounting",
    "professional_law",
    "professional_medicine",
    "professional_psychology",
    "public_relations",
    "security_studies",
    "sociology",
    "us_foreign_policy",
    "virology",
    "world_religions",
)

_MMLU_REDUX = BenchmarkSpec(
    # 5,700 questions (57 subjects x 100), re-annotated by the MMLU-Redux authors (arXiv 2406.04127). `answer` is the
    # 0-based index into `choices`; `error_type` flags flawed questions ("ok" when none), `correct_answer` holds the
    # annotators' correction where they give one. One sample: our choice (TrOPD gives none; 5,700 prompts).
    "mmlu_redux",
    "edinburgh-dawg/mmlu-redux-2.0",
    "test",
    "question",
    "answer",
    1,
    configs=MMLU_REDUX_SUBJECTS,
    answer_format="index",
    id_column="id",  # "subject/row", added when the subjects are concatenated
    kind="multiple_choice",
    extra_columns=("choices",),
    flag_column="error_type",
)

TROPD_BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        # 40 problems (AMC 12 2023 A and B), the "AMC23" of Qwen2.5-Math, SimpleRL and the TrOPD tables, from the
        # math-ai organisation's copy (columns `question` and `answer`, split "test"); some copies store answers as
        # floats (27.0), read as integers. TrOPD: the mean over 32 samples.
        BenchmarkSpec("amc23", "math-ai/amc23", "test", "question", "answer", 32, id_column="id"),
        # 198 graduate-level science questions (Rein et al. 2023), the authors' gated upload: accept its terms on the
        # Hub and log in. Its only split is "train"; the correct option is always the "Correct Answer" column, so the
        # options are shuffled per problem. 4 samples: TrOPD does not say, but its GPQA-D numbers are all multiples
        # of 1/792 = 1/(198 x 4).
        BenchmarkSpec(
            "gpqa_diamond",
            "Idavidrein/gpqa",
            "train",
            "Question",
            "Correct Answer",
            4,
            config="gpqa_diamond",
            answer_format="text",
            id_column="Record ID",
            kind="multiple_choice",
            extra_columns=GPQA_INCORRECT_COLUMNS,
            shuffle_options=True,
        ),
        # MMLU-Redux v2 on the questions its annotators found sound (error_type "ok"), the usual protocol (ZeroEval's
        # MMLU-Redux set keeps only such questions); `mmlu_redux_corrected` also scores the flawed questions whose
        # corrected answer is given.
        _MMLU_REDUX,
        dataclasses.replace(_MMLU_REDUX, name="mmlu_redux_corrected", flagged="corrected"),
        # AllenAI's IFBench test prompts with out-of-domain verifiable constraints (its only split is "train"). TrOPD's
        # IFBench numbers are all multiples of 1/294: it scored the earlier 294-prompt file; the Hub copy has 300 (6
        # prompts added, 4 changed), so its numbers are not exactly comparable. Rows are read and graded by instruction_following.py. One
        # sample, as IFBench scores one response per prompt.
        BenchmarkSpec(
            "ifbench",
            "allenai/IFBench_test",
            "train",
            "prompt",
            "instruction_id_list",
            1,
            id_column="key",
            kind="instruction_following",
            extra_columns=("kwargs",),
        ),
        # The problems LiveCodeBench added in release_v6 (test6.jsonl), read as JSON lines (the repository's loading
        # script is not supported by `datasets` >= 4) and kept to the v6 window, contests dated 2025-02-01 to
        # 2025-05-01 (code_execution.in_v6_window; TrOPD does not state its window). Rows are read and graded by
        # code_execution.py, which runs the model's programs: opt-in. 1 sample: TrOPD does not say, but its LCBv6
        # numbers are all multiples of 1/175, one sample of 175 problems.
        BenchmarkSpec(
            "livecodebench_v6",
            "livecodebench/code_generation_lite",
            "train",
            "question_content",
            "public_test_cases",
            1,
            id_column="question_id",
            kind="code",
            data_files=("test6.jsonl",),
        ),
    )
}

# Every registry benchmark, by name.
REGISTRY: dict[str, BenchmarkSpec] = {**BENCHMARKS, **TROPD_BENCHMARKS}

# The TRB paper's two evaluation suites (papers.md §1.7), by student.
PAPER_SUITES: dict[str, tuple[str, ...]] = {
    "qwen3_1p7b": ("math500", "olympiadbench", "amc", "aime24", "aime25"),  # Qwen3-1.7B-Base <- Qwen3-8B
    "qwen3_0p6b": ("gsm8k", "math500", "olympiadbench", "amc"),  # Qwen3-0.6B-Base <- Qwen3-4B
}

# The TrOPD paper's tables (papers.md §2.7), by student.
TROPD_SUITES: dict[str, tuple[str, ...]] = {
    # DeepSeek-R1-Distill-Qwen-1.5B (both teachers, single- and multi-domain)
    "tropd_deepseek": ("aime24", "aime25", "amc23", "livecodebench_v6", "gpqa_diamond"),
    # Qwen3-SFT-1.7B <- Qwen3-Nemotron-4B, multi-domain
    "tropd_qwen3": ("aime24", "aime25", "amc23", "gpqa_diamond", "mmlu_redux", "ifbench", "livecodebench_v6"),
    # the math ablation (DeepSeek-R1-Distill-Qwen-1.5B <- Skywork-OR1-Math-7B)
    "tropd_math": ("aime24", "aime25", "amc23"),
}

SUITES: dict[str, tuple[str, ...]] = {**PAPER_SUITES, **TROPD_SUITES}

# Other spellings of registry names (the paper's table says "Olympiad").
ALIASES: dict[str, str] = {
    "olympiad": "olympiadbench",
    "math-500": "math500",
    "gpqa-diamond": "gpqa_diamond",
    "gpqa_d": "gpqa_diamond",
    "mmlu-redux": "mmlu_redux",
    "lcb_v6": "livecodebench_v6",
    "lcbv6": "livecodebench_v6",
}

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
LOCAL_NUM_SAMPLES = 1

# The columns that make a local file a benchmark of each kind, with the registry entry it is read like, in the order
# they are tried: the first whose columns the file has all of.
LOCAL_LAYOUTS: tuple[tuple[tuple[str, ...], BenchmarkSpec], ...] = (
    (("problem", "answer"), BenchmarkSpec("local", "local", "train", "problem", "answer", LOCAL_NUM_SAMPLES)),
    (("Question", "Correct Answer", *GPQA_INCORRECT_COLUMNS), TROPD_BENCHMARKS["gpqa_diamond"]),
    (("question", "choices", "answer"), _MMLU_REDUX),
    (("question", "answer"), TROPD_BENCHMARKS["amc23"]),  # math, as AMC23's copy names its columns
    (("prompt", "instruction_id_list", "kwargs"), TROPD_BENCHMARKS["ifbench"]),
    (("question_content", "public_test_cases"), TROPD_BENCHMARKS["livecodebench_v6"]),
)


@dataclass(frozen=True)
class Problem:
    id: str  # stable within the benchmark: the dataset's id column when it has a unique one, else the row index
    problem: str  # the text of the user turn (multiple choice: the question with its lettered options)
    answer: str  # gold answer text, post-processed (GSM8K: the text after "####"; multiple choice: the gold letter)
    # What the kind's grader needs beyond the answer (multiple choice: the option order; instruction following: the
    # instruction ids and their arguments; code: the tests), read-only. Written into samples.jsonl only when small.
    metadata: Mapping = field(default_factory=FrozenMapping, hash=False)

    def __post_init__(self):
        if not isinstance(self.metadata, FrozenMapping):
            object.__setattr__(self, "metadata", FrozenMapping(self.metadata))


@dataclass(frozen=True)
class Benchmark:
    name: str  # registry name, or the file stem for a local file
    problems: tuple[Problem, ...]
    num_samples: int  # default n: the paper's for registry benchmarks, LOCAL_NUM_SAMPLES for local files
    source: str  # Hub id or file path, recorded in results
    kind: str = "math"  # one of KINDS: which grader scores its samples


def parse_benchmarks(text: str) -> list[str]:
    """`"math500,aime24"`, a suite name (`"qwen3_1p7b"`, `"tropd_qwen3"`), local files, or a mix -> registry names and
    paths, in order, without repeats. An unknown name is a `ValueError` that lists the known ones."""
    names: list[str] = []
    for token in (part.strip() for part in text.split(",")):
        if not token:
            continue
        key = token.lower()
        if key in SUITES:
            names.extend(SUITES[key])
        elif key in REGISTRY or key in ALIASES:
            names.append(ALIASES.get(key, key))
        elif _is_local(token):
            if not Path(token).is_file():
                raise ValueError(f"Benchmark file {token} does not exist.")
            names.append(token)
        else:
            raise ValueError(f"Unknown benchmark {token!r}. {_known_benchmarks()}")
    if not names:
        raise ValueError(f"No benchmark given. {_known_benchmarks()}")
    return list(dict.fromkeys(names))


def registry_kind(name_or_path: str) -> str | None:
    """The kind of a registry benchmark (known without loading it); `None` for a local file, whose kind its columns
    name once it is read."""
    spec = REGISTRY.get(ALIASES.get(name_or_path.lower(), name_or_path.lower()))
    return spec.kind if spec is not None else None


def load_benchmark(name_or_path: str, *, max_problems: int | None = None) -> Benchmark:
    """A registry benchmark (downloaded through `datasets`) or a local file, as gold-answered problems.

    `max_problems` keeps the first N problems, in dataset order. A missing column or a row without a usable problem
    or answer is a `ValueError` that says which; a gated dataset the Hub refuses is a `PermissionError` that says how
    to get access.
    """
    if max_problems is not None and max_problems < 1:
        raise ValueError(f"max_problems must be >= 1, got {max_problems}.")
    key = name_or_path.lower()
    if key in REGISTRY or key in ALIASES:
        spec = REGISTRY[ALIASES.get(key, key)]
        return benchmark_from_dataset(_load_from_hub(spec), spec, max_problems=max_problems)
    if not _is_local(name_or_path):
        raise ValueError(f"Unknown benchmark {name_or_path!r}. {_known_benchmarks()}")
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"Benchmark file {name_or_path} does not exist.")
    from datasets import load_dataset

    dataset = load_dataset(LOCAL_FORMATS[path.suffix.lower()], data_files=str(path), split="train")
    spec = local_spec(path, dataset.column_names)
    if len(dataset):  # an empty file is named as such by `benchmark_from_dataset`
        _check_columns(spec, list(dataset.column_names), _local_layouts_hint())
    return benchmark_from_dataset(dataset, spec, max_problems=max_problems)


def local_spec(path: Path, columns: list[str]) -> BenchmarkSpec:
    """How a local file is read: the registry layout (`LOCAL_LAYOUTS`) whose columns it has, or, when it has none in
    full, the one it shares most columns with (so a missing column is named; math on a tie)."""
    present = set(columns)
    full = [spec for layout, spec in LOCAL_LAYOUTS if present.issuperset(layout)]
    template = full[0] if full else max(LOCAL_LAYOUTS, key=lambda entry: len(present & set(entry[0])))[1]
    return dataclasses.replace(
        template,
        name=path.stem,
        dataset=str(path),
        split="train",
        num_samples=LOCAL_NUM_SAMPLES,
        config=None,
        configs=(),
        data_files=(),
        id_column="id" if "id" in present or template.id_column is None else template.id_column,
        flag_column=template.flag_column if template.flag_column in present else None,
    )


def _load_from_hub(spec: BenchmarkSpec):
    from datasets import Dataset, load_dataset

    try:
        if spec.data_files:  # read as files: the repository's loading script (if any) is not run
            builder = "parquet" if spec.data_files[0].endswith(".parquet") else "json"
            files = [f"hf://datasets/{spec.dataset}/{name}" for name in spec.data_files]
            return load_dataset(builder, data_files=files, split="train")
        if not spec.configs:
            return load_dataset(spec.dataset, spec.config, split=spec.split)
        rows = []  # one config per subject, concatenated; ids "subject/row" stay stable whatever is filtered later
        for config in spec.configs:
            for index, row in enumerate(load_dataset(spec.dataset, config, split=spec.split)):
                rows.append({**row, "id": f"{config}/{index}", "subject": config})
        return Dataset.from_list(rows)
    except Exception as error:
        if _is_gated_error(error):
            raise PermissionError(
                f"{spec.dataset} is a gated dataset on the Hugging Face Hub and this machine has no access to it. "
                f"Accept the terms at https://huggingface.co/datasets/{spec.dataset} and log in with `hf auth login` "
                f"(or set HF_TOKEN), or pass a local file with the same columns ("
                f"{', '.join(_spec_columns(spec))})."
            ) from error
        raise


def _is_gated_error(error: BaseException) -> bool:
    """Whether `error` (or an exception it was raised from) is the Hub refusing a gated repository: huggingface_hub's
    `GatedRepoError`, or the `DatasetNotFoundError` that `datasets` raises from it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if type(error).__name__ == "GatedRepoError" or (
            type(error).__name__ == "DatasetNotFoundError" and "gated" in str(error).lower()
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def benchmark_from_dataset(dataset, spec: BenchmarkSpec, *, max_problems: int | None = None) -> Benchmark:
    """The rows of a `datasets.Dataset` read as `spec` says (`load_benchmark` after loading, and tests)."""
    if spec.kind not in KINDS:
        raise ValueError(f"Unknown kind {spec.kind!r} for {spec.name!r}; the kinds are {', '.join(KINDS)}.")
    if len(dataset) == 0:
        raise ValueError(f"{spec.dataset} has no rows: a benchmark needs at least one problem.")
    columns = list(dataset.column_names)
    _check_columns(spec, columns)
    ids = [str(value) for value in dataset[spec.id_column]] if spec.id_column in columns else []
    if len(set(ids)) != len(dataset) or "None" in ids:
        ids = [str(index) for index in range(len(dataset))]
    rows = list(range(len(dataset)))
    if spec.kind != "math":  # a kind's module may leave rows out (MMLU-Redux's flawed questions)
        rows_to_score = getattr(kind_module(spec.kind), "rows_to_score", None)
        if rows_to_score is not None:
            rows = list(rows_to_score(dataset, spec))
            if not rows:
                raise ValueError(
                    f"{spec.dataset}: no row of {spec.name!r} is left to score (flagged or filtered out)."
                )
    if max_problems is not None:
        rows = rows[:max_problems]
    problems = tuple(problem_from_row(dataset[index], ids[index], spec) for index in rows)
    return Benchmark(spec.name, problems, spec.num_samples, spec.dataset, spec.kind)


def _spec_columns(spec: BenchmarkSpec) -> list[str]:
    return [spec.problem_column, spec.answer_column, *spec.extra_columns]


def _check_columns(spec: BenchmarkSpec, columns: list[str], hint: str = "") -> None:
    roles = [("problem", spec.problem_column), ("answer", spec.answer_column)]
    roles += [("options" if spec.kind == "multiple_choice" else "input", column) for column in spec.extra_columns]
    for role, column in roles:
        if column not in columns:
            raise ValueError(
                f"{spec.dataset} has no {column!r} column (the {role} of {spec.name!r}); its columns are "
                f"{columns}.{hint}"
            )


def problem_from_row(row: Mapping, problem_id: str, spec: BenchmarkSpec) -> Problem:
    """One row as a `Problem`, read by its kind: math here (the problem text and the gold answer, post-processed per
    `spec.answer_format`), the other kinds by their modules' `problem_from_row`."""
    if spec.kind != "math":
        return kind_module(spec.kind).problem_from_row(row, problem_id, spec)
    where = f"{spec.dataset}, problem {problem_id}"
    problem = row[spec.problem_column]
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError(f"{where}: the {spec.problem_column!r} column holds no problem text ({problem!r}).")
    answer = _answer_text(row[spec.answer_column])
    if spec.answer_format == "gsm8k":
        if "####" not in answer:
            raise ValueError(f"{where}: a GSM8K-style answer ends with '#### <number>', got {answer[-80:]!r}.")
        # "#### 1,000" -> "1000": thousands separators are formatting, not a tuple.
        answer = re.sub(r"(?<=\d),(?=\d{3}\b)", "", answer.rsplit("####", 1)[1].strip())
    elif spec.answer_format != "plain":
        raise ValueError(f"Unknown answer_format {spec.answer_format!r} for {spec.name!r}; use 'plain' or 'gsm8k'.")
    if not answer:
        raise ValueError(f"{where}: the {spec.answer_column!r} column holds no answer.")
    return Problem(problem_id, problem, answer)


def _answer_text(value) -> str:
    if isinstance(value, (list, tuple)):  # OlympiadBench: ["$\frac{1}{2}$"]; several answers are one comma list
        return ", ".join(_answer_text(item) for item in value)
    if isinstance(value, float) and value.is_integer():  # AMC copies store 27 as 27.0
        value = int(value)
    return "" if value is None else str(value).strip()


def _is_local(name_or_path: str) -> bool:
    return Path(name_or_path).suffix.lower() in LOCAL_FORMATS


def _local_layouts_hint() -> str:
    layouts = "; ".join(f"{spec.kind}: {', '.join(layout)}" for layout, spec in LOCAL_LAYOUTS)
    return f" A local benchmark file has the columns of one kind ({layouts})."


def _known_benchmarks() -> str:
    suites = "; ".join(f"{name} ({', '.join(members)})" for name, members in sorted(SUITES.items()))
    return (
        f"Known benchmarks: {', '.join(sorted(REGISTRY))}; suites: {suites}; or a local "
        f"{'/'.join(sorted(LOCAL_FORMATS))} file with 'problem' and 'answer' columns (math) or the columns of another "
        f"kind ({'; '.join(', '.join(layout) for layout, _ in LOCAL_LAYOUTS[1:])})."
    )
