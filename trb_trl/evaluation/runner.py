"""Scoring a model on benchmarks: sample `n` completions per problem, grade them, report pass@1 and pass@k.

Two entry points share one loop (`run_benchmark`):

- `evaluate` (what `trb-trl eval` runs) writes `OUTPUT_DIR/results.json` and `OUTPUT_DIR/samples.jsonl` and prints a
  table. It is resumable: every graded sample is appended to `samples.jsonl` as soon as its batch is done, and a
  restart in the same directory generates only the samples that are missing. `results.json` is written before the
  first sample (`"complete": false`), so a restart can check that its settings are those of the interrupted run.
- `score_benchmarks` scores a model already in memory (the in-training callback) and writes nothing.

Repeatability: the `(problem, sample)` pairs of a benchmark are laid out problem by problem and cut into batches of
`batch_size`; batch `b` samples from its own random stream seeded with `derive_seed(seed, benchmark, "batch", b)`.
The same settings give the same samples (up to the numerics of the device), and a restart that regenerates whole
batches gives the samples the uninterrupted run would have.

pass@1 is the mean over problems of c/n (c correct of n samples); pass@k is the unbiased estimator of Chen et al.
(2021) for each k <= n. The suite mean is the unweighted mean over benchmarks, as the paper's "Avg" column.

Each benchmark is graded by the grader of its kind (`graders.py`: math-verify for math, the answer letter for multiple
choice, ...), whose `summary_metrics` join that benchmark's scores; a sample's `details` go into its samples.jsonl line.
Each kind has its own default system prompt (`graders.SYSTEM_PROMPTS`) unless one prompt is given for all.
"""

import contextlib
import hashlib
import json
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

from .benchmarks import Benchmark, Problem, load_benchmark, parse_benchmarks, registry_kind, thaw
from .graders import SYSTEM_PROMPTS, Grader, Graders, grader_for, require_code_execution, system_prompt_for
from .grading import AnswerChecker, Verdict
from .pass_at_k import mean_pass_at_k
from .prompts import has_chat_template, render_prompt
from .sampling import HFSampler, Sampler, SampleRequest, as_completion, derive_seed, make_sampler, resolve_engine


RESULTS_FILE = "results.json"
SAMPLES_FILE = "samples.jsonl"
# HF `generate` holds a batch's KV cache at once; vLLM schedules its own batches, so give it many requests.
DEFAULT_BATCH_SIZE = {"hf": 32, "vllm": 1024}
# Settings that may differ between an interrupted run and its restart: pass@k is recomputed from the samples.
RESUMABLE_CHANGES = ("k",)
# A problem's metadata goes into each of its samples.jsonl lines only up to this many characters of JSON (the option
# order of a multiple-choice problem, yes; the tests of a code problem, no).
SAMPLE_METADATA_LIMIT = 1000

Key = tuple[str, int]  # (problem id, sample index)
SystemPrompt = str | None | Mapping[str, str | None]  # one prompt for every benchmark, or one per kind


# ---------------------------------------------------------------------------------------------------------------------
# The shared loop


def sample_batches(benchmark: Benchmark, num_samples: int, batch_size: int) -> list[list[Key]]:
    """The `(problem id, sample index)` pairs of a benchmark, problem by problem, cut into batches of `batch_size`."""
    pairs = [(problem.id, index) for problem in benchmark.problems for index in range(num_samples)]
    return [pairs[start : start + batch_size] for start in range(0, len(pairs), batch_size)]


def run_benchmark(
    benchmark: Benchmark,
    *,
    num_samples: int,
    prompts: dict[str, str],
    sampler: Sampler,
    batch_size: int,
    seed: int,
    checker: AnswerChecker | None = None,
    grader: Grader | None = None,
    done: dict[Key, dict] | None = None,
    on_batch=None,
    progress: bool = True,
) -> dict[Key, dict]:
    """Sample and grade every `(problem, sample)` pair not in `done`; return all records, keyed by pair.

    `prompts` maps problem ids to rendered prompts. Samples are graded by `grader`, by default a new one of the
    benchmark's kind (a math benchmark's wraps `checker` when given). `on_batch(records)` is called with each batch's
    new records (the runner appends them to `samples.jsonl`). A batch whose records are all in `done` is skipped; one
    with some missing samples only those, still with the batch's seed.
    """
    if grader is None:
        grader = grader_for(benchmark.kind, **({"checker": checker} if checker and benchmark.kind == "math" else {}))
        try:
            return run_benchmark(
                benchmark,
                num_samples=num_samples,
                prompts=prompts,
                sampler=sampler,
                batch_size=batch_size,
                seed=seed,
                grader=grader,
                done=done,
                on_batch=on_batch,
                progress=progress,
            )
        finally:
            grader.close()
    from tqdm.auto import tqdm

    records = dict(done or {})
    problems = {problem.id: problem for problem in benchmark.problems}
    batches = sample_batches(benchmark, num_samples, batch_size)
    missing = sum(key not in records for batch in batches for key in batch)
    bar = tqdm(total=missing, desc=benchmark.name, unit="sample", disable=not progress or missing == 0, leave=False)
    for number, batch in enumerate(batches):
        todo = [key for key in batch if key not in records]
        if not todo:
            continue
        requests = [
            SampleRequest(benchmark.name, problem_id, index, prompts[problem_id]) for problem_id, index in todo
        ]
        completions = sampler(requests, derive_seed(seed, benchmark.name, "batch", number))
        if len(completions) != len(requests):
            raise RuntimeError(f"the sampler returned {len(completions)} completions for {len(requests)} requests")
        completions = [as_completion(completion) for completion in completions]
        verdicts = _check_all(
            grader, [(problems[problem_id], c.text) for (problem_id, _), c in zip(todo, completions)]
        )
        new = []
        for (problem_id, index), completion, verdict in zip(todo, completions, verdicts, strict=True):
            record = {
                "benchmark": benchmark.name,
                "problem_id": problem_id,
                "sample": index,
                "answer": problems[problem_id].answer,
                "extracted": verdict.extracted,
                "correct": bool(verdict.correct),
                "num_tokens": completion.num_tokens,
                "finished": completion.finished,
            }
            if verdict.details:
                record["details"] = thaw(verdict.details)
            metadata = _sample_metadata(problems[problem_id])
            if metadata is not None:
                record["metadata"] = metadata
            record["completion"] = completion.text
            records[(problem_id, index)] = record
            new.append(record)
        if on_batch is not None:
            on_batch(new)
        bar.update(len(new))
    bar.close()
    return records


def _sample_metadata(problem: Problem) -> dict | None:
    """A problem's metadata as plain JSON when it is small, else None."""
    if not problem.metadata:
        return None
    plain = thaw(problem.metadata)
    try:
        return plain if len(json.dumps(plain)) <= SAMPLE_METADATA_LIMIT else None
    except TypeError:  # not JSON-serialisable
        return None


def _check_all(grader: Grader, pairs: list[tuple[Problem, str]]) -> list[Verdict]:
    """The verdicts of a batch's samples: by the grader's `check_many` when it has one (the code grader runs several
    programs at once), else one `check` at a time."""
    check_many = getattr(grader, "check_many", None)
    if check_many is not None:
        return list(check_many(pairs))
    return [grader.check(problem, text) for problem, text in pairs]


def correct_counts(benchmark: Benchmark, records: dict[Key, dict], num_samples: int) -> list[int]:
    """c per problem: how many of its `num_samples` samples are correct."""
    return [sum(records[(p.id, index)]["correct"] for index in range(num_samples)) for p in benchmark.problems]


def verdicts_of(benchmark: Benchmark, records: dict[Key, dict], num_samples: int) -> list[Verdict]:
    """The verdicts of a benchmark's samples, problem by problem, as their records hold them."""
    samples = [records[(p.id, index)] for p in benchmark.problems for index in range(num_samples)]
    return [Verdict(r["extracted"], bool(r["correct"]), r.get("details") or {}) for r in samples]


def benchmark_scores(
    benchmark: Benchmark, records: dict[Key, dict], num_samples: int, ks=(1,), grader: Grader | None = None
) -> dict:
    """pass@1 (mean c/n) and pass@k for each k in `ks`, plus the sample statistics recorded in results.json and, with
    `grader`, its `summary_metrics` of the benchmark's verdicts."""
    counts = correct_counts(benchmark, records, num_samples)
    scores = {"pass@1": sum(c / num_samples for c in counts) / len(counts)}
    for k in ks:
        if k != 1:
            scores[f"pass@{k}"] = mean_pass_at_k(counts, num_samples, k)
    samples = [records[(p.id, index)] for p in benchmark.problems for index in range(num_samples)]
    lengths = [r["num_tokens"] for r in samples if r.get("num_tokens") is not None]
    finished = [r["finished"] for r in samples if r.get("finished") is not None]
    scores = {
        **scores,
        "num_problems": len(counts),
        "num_samples": num_samples,
        "num_correct": sum(counts),
        "no_answer": sum(r["extracted"] is None for r in samples) / len(samples),
        "truncated": (1 - sum(finished) / len(finished)) if finished else None,
        "mean_completion_tokens": sum(lengths) / len(lengths) if lengths else None,
    }
    if grader is not None:
        add_summary_metrics(scores, grader.summary_metrics(verdicts_of(benchmark, records, num_samples)))
    return scores


def add_summary_metrics(scores: dict, metrics: Mapping[str, float]) -> None:
    """Add a grader's summary metrics to a benchmark's scores; a name the scores already use is an error."""
    clash = sorted(set(metrics) & set(scores))
    if clash:
        raise RuntimeError(f"summary metrics {clash} would overwrite the scores of the same names")
    scores.update({name: float(value) for name, value in metrics.items()})


def _check_counts(benchmarks: list[Benchmark], num_samples: dict[str, int], ks: list[int]) -> None:
    for benchmark in benchmarks:
        n = num_samples[benchmark.name]
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n} for {benchmark.name}.")
        if ks and max(ks) > n:
            raise ValueError(
                f"n ({n}) < k ({max(ks)}) for {benchmark.name}: pass@k needs at least k samples per problem. Raise "
                "--n or lower --k."
            )
        if not benchmark.problems:
            raise ValueError(f"benchmark {benchmark.name} ({benchmark.source}) has no problems.")


def score_benchmarks(
    model,
    tokenizer,
    benchmarks: list[Benchmark],
    *,
    num_samples: int | None,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    system_prompt: SystemPrompt,
    batch_size: int,
    seed: int,
    checker: AnswerChecker | None = None,
    progress: bool = False,
    sampler: Sampler | None = None,
    padding: Mapping[str, Sequence[Problem]] | None = None,
    graders: Graders | None = None,
    verdicts: dict[str, list[Verdict]] | None = None,
) -> dict:
    """Score `model` (in memory, HF `generate`) on `benchmarks`; write nothing.

    `num_samples=None` uses each benchmark's default n. `system_prompt` is one prompt for every benchmark (None: none)
    or a mapping of kinds to prompts (kinds it lacks get their default, `graders.SYSTEM_PROMPTS`). Each benchmark is
    graded by its kind's grader from `graders` (a new set, closed afterwards, when not given; a math benchmark's
    wraps `checker`). Returns `{"benchmarks": {name: {"pass@1", "num_problems", "num_samples", ..., and the grader's
    summary metrics}}, "mean": mean pass@1 over benchmarks}`; `verdicts`, when given, is filled with each benchmark's
    verdicts of its own samples (the in-training callback combines them across processes).
    Sampling uses its own seeded random streams, so scoring inside a training run does not change the run. `sampler`
    replaces the model's sampler (tests).

    `padding` maps a benchmark's name to extra problems that are sampled after its own, in the same batches, and not
    graded: a process of a distributed evaluation pads its share with them so that it makes the same `generate` calls
    as the others, also when its share is empty (then the benchmark's `pass@1` is None and `num_problems` 0).
    """
    padding = {name: tuple(problems) for name, problems in (padding or {}).items() if problems}
    sampled = [_padded(benchmark, padding.get(benchmark.name, ())) for benchmark in benchmarks]
    counts = {b.name: num_samples or b.num_samples for b in benchmarks}
    _check_counts(sampled, counts, [])
    own_graders = graders is None
    if own_graders:
        graders = Graders(checker=checker)
    if sampler is None:
        sampler = HFSampler(model, tokenizer, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    results = {}
    try:
        for benchmark, padded in zip(benchmarks, sampled, strict=True):
            start = time.perf_counter()
            prompt = system_prompt_for(benchmark.kind, system_prompt)
            prompts = {p.id: render_prompt(tokenizer, p.problem, prompt) for p in padded.problems}
            n = counts[benchmark.name]
            grader = graders[benchmark.kind]
            records = run_benchmark(
                padded,
                num_samples=n,
                prompts=prompts,
                sampler=sampler,
                grader=grader,
                batch_size=batch_size,
                seed=seed,
                progress=progress,
            )
            if benchmark.problems:  # graded on its own problems only: the padding's records are dropped
                results[benchmark.name] = benchmark_scores(benchmark, records, n, grader=grader)
            else:
                results[benchmark.name] = {"pass@1": None, "num_problems": 0, "num_samples": n}
            if verdicts is not None:
                verdicts[benchmark.name] = verdicts_of(benchmark, records, n)
            results[benchmark.name]["seconds"] = time.perf_counter() - start
    finally:
        if own_graders:
            graders.close()
    return {"benchmarks": results, "mean": suite_mean(results, "pass@1")}


def _padded(benchmark: Benchmark, padding: tuple[Problem, ...]) -> Benchmark:
    """`benchmark` with `padding` appended to its problems (their ids must be new)."""
    if not padding:
        return benchmark
    own = {problem.id for problem in benchmark.problems}
    ids = [problem.id for problem in padding]
    reused = sorted({i for i in ids if i in own} | {i for i in ids if ids.count(i) > 1})
    if reused:
        raise ValueError(f"The padding of {benchmark.name} reuses problem ids {reused}.")
    return replace(benchmark, problems=(*benchmark.problems, *padding))


def suite_mean(scores: dict[str, dict], metric: str) -> float | None:
    values = [s[metric] for s in scores.values() if s.get(metric) is not None]
    return sum(values) / len(values) if values and len(values) == len(scores) else None


# ---------------------------------------------------------------------------------------------------------------------
# `trb-trl eval`: files, resumption


@dataclass
class EvaluationPlan:
    """A checked evaluation, ready to run: what `prepare_evaluation` returns and `run_evaluation` carries out."""

    model_name_or_path: str
    output_dir: Path
    tokenizer: object
    benchmarks: list[Benchmark]
    num_samples: dict[str, int]
    ks: list[int]
    engine: str
    batch_size: int
    settings: dict
    prompt_format: str | dict[str, str]  # one format, or one per benchmark when their system prompts differ
    done: dict[str, dict[Key, dict]] = field(default_factory=dict)
    previous: dict = field(default_factory=dict)  # the interrupted run's results.json
    system_prompts: dict[str, str | None] = field(default_factory=dict)  # by benchmark name
    allow_code_execution: bool = False

    @property
    def missing(self) -> int:
        total = sum(len(b.problems) * self.num_samples[b.name] for b in self.benchmarks)
        return total - sum(len(records) for records in self.done.values())


def default_output_dir(model_name_or_path: str) -> Path:
    """`MODEL_DIR/eval` for a local model (a checkpoint's evaluation lives in the checkpoint: `compare.py` finds it
    there), `eval/<org>__<name>` for a Hub id."""
    path = Path(model_name_or_path)
    if path.is_dir():
        return path / "eval"
    return Path("eval") / model_name_or_path.replace("/", "__")


def _fingerprint(benchmark: Benchmark) -> str:
    """A hash of the problems, so a restart notices a dataset that changed under it."""
    rows = [[p.id, p.problem, p.answer, *([thaw(p.metadata)] if p.metadata else [])] for p in benchmark.problems]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def _parse_ks(k) -> list[int]:
    ks = [k] if isinstance(k, int) else list(k)
    if not ks or any(not isinstance(value, int) or value < 1 for value in ks):
        raise ValueError(f"k must be positive integers, got {k!r}.")
    return sorted(set(ks))


def prepare_evaluation(
    model_name_or_path: str,
    benchmarks: list[str] | str,
    *,
    output_dir: str | Path | None = None,
    num_samples: int | None = None,
    k=(1,),
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 8192,
    system_prompt: SystemPrompt = SYSTEM_PROMPTS,
    seed: int = 0,
    batch_size: int | None = None,
    max_problems: int | None = None,
    engine: str = "auto",
    allow_code_execution: bool = False,
) -> EvaluationPlan:
    """Check the arguments, load the benchmarks and the tokenizer, and read what an earlier run left in `output_dir`.

    Everything that can be wrong with the input raises here (`ValueError`, or `OSError` for a model or file that
    cannot be read), before any model is loaded: an unknown benchmark, a missing answer column, n < k, a code
    benchmark without `allow_code_execution`, settings that differ from the interrupted run's. `system_prompt` is one
    prompt for every benchmark (None: none) or a mapping of kinds to prompts (by default each kind's own).
    """
    from transformers import AutoTokenizer

    names = parse_benchmarks(benchmarks if isinstance(benchmarks, str) else ",".join(benchmarks))
    # Before anything is downloaded; local files are checked once their columns have named their kind.
    require_code_execution([(name, registry_kind(name)) for name in names], allow_code_execution)
    ks = _parse_ks(k)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    if max_problems is not None and max_problems < 1:
        raise ValueError(f"max_problems must be at least 1, got {max_problems}.")
    engine = resolve_engine(engine)
    batch_size = DEFAULT_BATCH_SIZE[engine] if batch_size is None else batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")

    loaded = [load_benchmark(name, max_problems=max_problems) for name in names]
    require_code_execution([(b.source, b.kind) for b in loaded], allow_code_execution)
    seen: dict[str, str] = {}
    for benchmark in loaded:
        if benchmark.name in seen:
            raise ValueError(
                f"two benchmarks are named {benchmark.name!r} ({seen[benchmark.name]} and {benchmark.source}); "
                "rename one of the files."
            )
        seen[benchmark.name] = benchmark.source
    counts = {b.name: num_samples or b.num_samples for b in loaded}
    _check_counts(loaded, counts, ks)

    system_prompts = {b.name: system_prompt_for(b.kind, system_prompt) for b in loaded}
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    model_path = Path(model_name_or_path)
    settings = {
        "model": str(model_path.resolve()) if model_path.exists() else model_name_or_path,
        "benchmarks": [
            {
                "name": b.name,
                "source": b.source,
                "num_problems": len(b.problems),
                "num_samples": counts[b.name],
                "fingerprint": _fingerprint(b),
            }
            for b in loaded
        ],
        "k": ks,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": -1,  # disabled, as in the paper
        "max_new_tokens": max_new_tokens,
        "system_prompt": _one_or_each(system_prompts),
        "chat_template": has_chat_template(tokenizer),
        "seed": seed,
        "batch_size": batch_size,
        "engine": engine,
        "max_problems": max_problems,
    }
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir(model_name_or_path)
    plan = EvaluationPlan(
        model_name_or_path=model_name_or_path,
        output_dir=output_dir,
        tokenizer=tokenizer,
        benchmarks=loaded,
        num_samples=counts,
        ks=ks,
        engine=engine,
        batch_size=batch_size,
        settings=settings,
        prompt_format=_one_or_each(
            {name: render_prompt(tokenizer, "{problem}", prompt) for name, prompt in system_prompts.items()}
        ),
        system_prompts=system_prompts,
        allow_code_execution=allow_code_execution,
    )
    _read_previous_run(plan)
    return plan


def _one_or_each(values: dict[str, object]):
    """The value shared by every benchmark, or the mapping of benchmark names to values when they differ."""
    distinct = list(dict.fromkeys(json.dumps(value) for value in values.values()))
    return next(iter(values.values())) if len(distinct) == 1 else dict(values)


def _settings_differences(previous: dict, current: dict) -> list[str]:
    keys = [key for key in dict.fromkeys([*previous, *current]) if key not in RESUMABLE_CHANGES]
    return [
        f"{key} {json.dumps(previous.get(key))} there, {json.dumps(current.get(key))} now"
        for key in keys
        if previous.get(key) != current.get(key)
    ]


def _read_previous_run(plan: EvaluationPlan) -> None:
    """Fill `plan.done` from `samples.jsonl` if `output_dir` holds an earlier run with the same settings."""
    results_path, samples_path = plan.output_dir / RESULTS_FILE, plan.output_dir / SAMPLES_FILE
    if not results_path.is_file():
        if samples_path.is_file() and samples_path.stat().st_size > 0:
            raise ValueError(
                f"{samples_path} exists without {RESULTS_FILE}, so its settings are unknown. Use another "
                "--output-dir, or delete the file."
            )
        return
    previous = json.loads(results_path.read_text())
    differences = _settings_differences(previous.get("settings", {}), json.loads(json.dumps(plan.settings)))
    if differences:
        raise ValueError(
            f"{plan.output_dir} holds an evaluation with other settings ({'; '.join(differences)}). Resume it with "
            "the same settings, or use another --output-dir."
        )
    plan.previous = previous
    wanted = {
        b.name: {(p.id, i) for p in b.problems for i in range(plan.num_samples[b.name])} for b in plan.benchmarks
    }
    plan.done = {name: {} for name in wanted}
    for record in read_samples(samples_path):
        key = (record["problem_id"], record["sample"])
        if key in wanted.get(record["benchmark"], ()):
            plan.done[record["benchmark"]].setdefault(key, record)


def read_samples(path: Path) -> list[dict]:
    """The records of a `samples.jsonl`, read line by line. A last line cut short by an interruption (no newline, or
    not valid JSON) is also removed from the file, so that appending continues on a clean line; a damaged line
    elsewhere is an error."""
    if not path.is_file():
        return []
    records, valid_bytes, damaged = [], 0, None
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if damaged is not None:
                if line.strip():
                    raise ValueError(f"{path}, line {damaged}, is not valid JSON; delete that line to resume.")
                continue
            if line.strip():
                try:
                    record = json.loads(line) if line.endswith(b"\n") else None
                except json.JSONDecodeError:
                    record = None
                if record is None:
                    damaged = number
                    continue
                records.append(record)
            valid_bytes += len(line)
    if damaged is not None:
        with open(path, "r+b") as f:
            f.truncate(valid_bytes)
    return records


def _write_json(path: Path, data: dict) -> None:
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


def versions(engine: str) -> dict:
    """Library versions, for results.json (read from package metadata: nothing is imported)."""
    packages = ["trb-trl", "torch", "transformers", "datasets", "math-verify", "latex2sympy2_extended"]
    if engine == "vllm":
        packages.append("vllm")
    found = {"python": platform.python_version()}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def run_evaluation(
    plan: EvaluationPlan,
    *,
    sampler: Sampler | None = None,
    checker: AnswerChecker | None = None,
    progress: bool = True,
    stream=None,
) -> dict:
    """Generate and grade what `plan` lacks, write `results.json` and `samples.jsonl`, print the table; return the
    results. The model is loaded only if samples are missing. `sampler` replaces the model (tests)."""
    start = time.perf_counter()
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    previous_seconds = plan.previous.get("seconds", 0.0)
    previous_benchmarks = plan.previous.get("benchmarks", {})
    results = {
        "complete": False,
        "model": plan.model_name_or_path,
        "settings": plan.settings,
        "prompt_format": plan.prompt_format,
        "benchmarks": {},
        "mean": {},
        "seconds": previous_seconds,
        "versions": versions(plan.engine),
    }
    results_path = plan.output_dir / RESULTS_FILE
    _write_json(results_path, results)
    if plan.missing and sampler is None:
        print(f"loading {plan.model_name_or_path} ({plan.engine})", file=stream)
        sampler = make_sampler(
            plan.engine,
            model_name_or_path=plan.model_name_or_path,
            tokenizer=plan.tokenizer,
            temperature=plan.settings["temperature"],
            top_p=plan.settings["top_p"],
            max_new_tokens=plan.settings["max_new_tokens"],
            seed=plan.settings["seed"],
        )
    graders = Graders(checker=checker, allow_code_execution=plan.allow_code_execution)
    with open(plan.output_dir / SAMPLES_FILE, "a") as samples_file, contextlib.closing(graders):

        def append(records: list[dict]) -> None:
            samples_file.write("".join(json.dumps(record) + "\n" for record in records))
            samples_file.flush()

        for benchmark in plan.benchmarks:
            benchmark_start = time.perf_counter()
            done = plan.done.get(benchmark.name, {})
            system_prompt = plan.system_prompts.get(benchmark.name, plan.settings["system_prompt"])
            prompts = {p.id: render_prompt(plan.tokenizer, p.problem, system_prompt) for p in benchmark.problems}
            grader = graders[benchmark.kind]
            records = run_benchmark(
                benchmark,
                num_samples=plan.num_samples[benchmark.name],
                prompts=prompts,
                sampler=sampler,
                grader=grader,
                batch_size=plan.batch_size,
                seed=plan.settings["seed"],
                done=done,
                on_batch=append,
                progress=progress,
            )
            scores = benchmark_scores(benchmark, records, plan.num_samples[benchmark.name], plan.ks, grader)
            seconds = previous_benchmarks.get(benchmark.name, {}).get("seconds", 0.0)
            scores["seconds"] = seconds + time.perf_counter() - benchmark_start
            scores["source"] = benchmark.source
            results["benchmarks"][benchmark.name] = scores
            results["seconds"] = previous_seconds + time.perf_counter() - start
            _write_json(results_path, results)
    results["mean"] = {
        metric: suite_mean(results["benchmarks"], metric)
        for metric in dict.fromkeys(["pass@1", *(f"pass@{k}" for k in plan.ks)])
    }
    results["complete"] = True
    results["seconds"] = previous_seconds + time.perf_counter() - start
    _write_json(results_path, results)
    print(format_table(results), file=stream)
    print(f"wrote {results_path} and {plan.output_dir / SAMPLES_FILE}", file=stream)
    return results


def evaluate(
    model_name_or_path: str,
    benchmarks: list[str] | str,
    *,
    sampler: Sampler | None = None,
    checker: AnswerChecker | None = None,
    progress: bool = True,
    stream=None,
    **settings,
) -> dict:
    """Evaluate a model or checkpoint on `benchmarks` (names, suite names or local files; a list, or one
    comma-separated string): `prepare_evaluation(model_name_or_path, benchmarks, **settings)` (its keyword arguments:
    output_dir, num_samples, k, temperature, top_p, max_new_tokens, system_prompt, seed, batch_size, max_problems,
    engine, allow_code_execution), then `run_evaluation`. Returns the contents of results.json."""
    plan = prepare_evaluation(model_name_or_path, benchmarks, **settings)
    return run_evaluation(plan, sampler=sampler, checker=checker, progress=progress, stream=stream)


def format_table(results: dict) -> str:
    """A plain-text table of results.json's scores, in percent."""
    metrics = ["pass@1", *(f"pass@{k}" for k in results["settings"]["k"] if k != 1)]
    rows = [["benchmark", "problems", "n", *metrics]]
    for name, scores in results["benchmarks"].items():
        values = [f"{100 * scores[m]:.1f}" if scores.get(m) is not None else "-" for m in metrics]
        rows.append([name, str(scores["num_problems"]), str(scores["num_samples"]), *values])
    if len(results["benchmarks"]) > 1:
        mean = results.get("mean", {})
        rows.append(["mean", "", "", *(f"{100 * mean[m]:.1f}" if mean.get(m) is not None else "-" for m in metrics)])
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths))
        )
        for row in rows
    ]
    return "\n".join(lines)
