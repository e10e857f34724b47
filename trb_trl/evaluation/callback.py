"""In-training math evaluation: score the student every `math_eval_steps` optimizer steps, log pass@1 through the
trainer's loggers, and keep the best step by the suite mean, the checkpoint the paper reports (it evaluates every 20
steps and takes the best-mean checkpoint, arXiv 2605.31159 Appendix A).

The scores are cheap estimates (a few samples on the first problems of each benchmark) for curves and checkpoint
choice; `trb-trl eval` on the saved checkpoints gives the final numbers at the paper's sample counts.

Logged keys follow the Trainer's convention for evaluation metrics (`eval_loss` is shown as `eval/loss`): the row
`eval_<benchmark>/pass@1`, `eval_math/mean_pass@1`, `eval_math/best_mean_pass@1`, `eval_math/best_step` and
`eval_math/seconds` appears on W&B, TensorBoard and trackio as `eval/<benchmark>/pass@1`, `eval/math/mean_pass@1`, ...
A benchmark whose grader reports summary metrics adds `eval_<benchmark>/<metric>` (`eval/ifbench/...`). Every
evaluation is also written to `output_dir/math_eval.json`.

Benchmarks of every kind can be scored (`graders.py`): math benchmarks are asked with `math_eval_system_prompt`, the
others with their kind's default system prompt; code benchmarks need `math_eval_allow_code_execution`.
"""

import contextlib
import dataclasses
import functools
import json
import os
import random
import time

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from ..zero3 import gathered_without_hooks
from .benchmarks import Benchmark, Problem, load_benchmark, registry_kind, thaw
from .graders import SUMMARY_FREE_KINDS, Graders, require_code_execution
from .grading import AnswerChecker, Verdict
from .runner import add_summary_metrics, score_benchmarks


logger = logging.get_logger(__name__)

RESULTS_FILE = "math_eval.json"
SUITE = "math"  # the suite's name in the logged keys: eval_math/mean_pass@1
TOP_P = 1.0  # the paper's protocol (top-p 1.0, top-k off)
CODE_EXECUTION_FIELD = "math_eval_allow_code_execution=True"


def metric_key(name: str, metric: str) -> str:
    """The logged key of a score. Dashboards show `eval_x` as `eval/x`, as they show the Trainer's `eval_loss`."""
    return f"eval_{name}/{metric}"


class MathEvalCallback(TrainerCallback):
    r"""
    [`~transformers.TrainerCallback`] that scores the student on math benchmarks during training.

    At step 0 (`math_eval_on_start`, not on a resumed run), every `math_eval_steps` optimizer steps and at the last
    step, the current student samples `math_eval_num_samples` completions per problem for the first
    `math_eval_max_problems` problems of each of `math_eval_benchmarks` ([`score_benchmarks`]); pass@1 per benchmark,
    their mean (the suite mean), the best mean so far and its step are logged through the trainer's loggers and
    written to `output_dir/math_eval.json` with the checkpoint saved at each step. Unless the run selects checkpoints
    by another metric (`metric_for_best_model`), the best step also becomes the trainer state's `best_global_step`,
    so `save_total_limit` never deletes the best checkpoint and `trainer_state.json` names it.

    The processes share the work and agree on the scores: each scores a strided share of the problems (the counts are
    summed across processes), generating on its own (under ZeRO-3 the student is gathered, with none of DeepSpeed's
    hooks left, so its `generate` needs no collective). A share one problem short of the others (or empty: fewer
    problems than processes) is padded with a copy of a problem whose samples are not graded ([`process_share`]), so
    every process makes the same `generate` calls and reaches the same collectives. When the student's forward needs
    every process (ZeRO-3 with `ds3_gather_for_generation=False`, FSDP), every process scores every problem with its
    share of the samples instead, so all make the same `generate` calls.

    Turning evaluation on does not change training: the model goes back to train mode, and the random state
    (Python, NumPy, torch CPU and device generators) is restored after each evaluation, which samples with a seed of
    its own (`seed` plus the process index, the same at every evaluation so the curve compares steps on equal terms).

    Args:
        trainer ([`~transformers.Trainer`]):
            Trainer whose student is scored; its arguments (a [`TRBDistillConfig`]) hold the `math_eval_*` settings.
        checker ([`AnswerChecker`], *optional*):
            Answer checker that grades math benchmarks; a default one is made otherwise (its parsed gold answers are
            kept across evaluations). Other kinds are graded by their own graders (`graders.py`).
    """

    def __init__(self, trainer: Trainer, checker: AnswerChecker | None = None):
        self.trainer = trainer
        self.checker = checker if checker is not None else AnswerChecker()
        self.graders = Graders(checker=self.checker)
        self.benchmarks = []
        self.evaluations: list[dict] = []
        self._last_evaluated_step: int | None = None
        args = trainer.args
        # Registry code benchmarks fail here, before training starts; local files once their columns are read.
        names = getattr(args, "math_eval_benchmarks", None) or []
        require_code_execution(
            [(name, registry_kind(name)) for name in names], _allows_code(args), CODE_EXECUTION_FIELD
        )

    # Trainer events

    def on_train_begin(self, args, state, control, **kwargs):
        self._load_benchmarks(args)
        if state.global_step > 0:
            self._resume(args, state)
        elif args.math_eval_on_start:
            self._evaluate(args, state)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step != self._last_evaluated_step and (step % args.math_eval_steps == 0 or step == state.max_steps):
            self._evaluate(args, state)

    def on_save(self, args, state, control, **kwargs):
        if self.evaluations:  # the checkpoint of an evaluated step now exists, an older one may be gone
            self._write(args)

    def on_train_end(self, args, state, control, **kwargs):
        if self.evaluations:  # with save_total_limit=1 the Trainer keeps only the best checkpoint at the end
            self._write(args)
        self.graders.close()

    # Results

    @property
    def best(self) -> dict | None:
        """The evaluation with the highest suite mean (the earliest one on a tie), or None before the first."""
        best = None
        for evaluation in self.evaluations:
            if best is None or evaluation["mean_pass@1"] > best["mean_pass@1"]:
                best = evaluation
        return best

    def _evaluate(self, args, state) -> None:
        trainer = self.trainer
        accelerator = trainer.accelerator
        tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
        world, rank = accelerator.num_processes, accelerator.process_index
        split_samples = world > 1 and (
            (trainer._dist.is_zero3 and not args.ds3_gather_for_generation) or trainer._dist.is_fsdp
        )
        # Every process scores, and makes the same generate calls, whatever its share holds (DESIGN.md §4).
        if split_samples:  # every problem on every process, as a sharded forward needs
            num_samples = -(-args.math_eval_num_samples // world)
            shares, padding = list(self.benchmarks), {}
        else:
            num_samples = args.math_eval_num_samples
            shares, padding = [], {}
            for benchmark in self.benchmarks:
                share, padding[benchmark.name] = process_share(benchmark, world, rank)
                shares.append(share)
        start = time.perf_counter()
        verdicts: dict[str, list[Verdict]] = {}  # this process's own samples, by benchmark
        with (
            _preserved_rng_state(accelerator.device),
            _preserved_padding(tokenizer),
            self._generation_model(args, synced=split_samples) as model,
        ):
            results = score_benchmarks(
                model,
                tokenizer,
                shares,
                num_samples=num_samples,
                temperature=args.math_eval_temperature,
                top_p=TOP_P,
                max_new_tokens=args.math_eval_max_new_tokens or args.max_completion_length,
                system_prompt=self._system_prompt(args),
                batch_size=args.math_eval_batch_size
                or args.per_device_train_batch_size * args.gradient_accumulation_steps,
                seed=args.seed + rank,
                graders=self.graders,
                padding=padding,
                verdicts=verdicts,
            )["benchmarks"]
        # Per benchmark: the sum over this process's problems of c/n, and their number; summed over processes.
        totals = torch.zeros(len(shares), 2, dtype=torch.float64, device=accelerator.device)
        for index, share in enumerate(shares):
            if share.problems:
                totals[index, 0] = results[share.name]["pass@1"] * results[share.name]["num_problems"]
                totals[index, 1] = results[share.name]["num_problems"]
        totals = accelerator.reduce(totals, reduction="sum").cpu().tolist()
        scores = {
            benchmark.name: {
                "pass@1": pass_sum / count,
                "num_problems": len(benchmark.problems),
                "num_samples": num_samples * (world if split_samples else 1),
            }
            for benchmark, (pass_sum, count) in zip(self.benchmarks, totals, strict=True)
        }
        for name, metrics in self._summary_metrics(verdicts, world).items():
            add_summary_metrics(scores[name], metrics)
        evaluation = {
            "step": state.global_step,
            "benchmarks": scores,
            "mean_pass@1": float(np.mean([score["pass@1"] for score in scores.values()])),
            "seconds": time.perf_counter() - start,
        }
        self.evaluations.append(evaluation)
        self._last_evaluated_step = state.global_step
        best = self.best
        logs = {
            metric_key(name, metric): value
            for name, score in scores.items()
            for metric, value in score.items()
            if metric not in ("num_problems", "num_samples")
        }
        logs[metric_key(SUITE, "mean_pass@1")] = evaluation["mean_pass@1"]
        logs[metric_key(SUITE, "best_mean_pass@1")] = best["mean_pass@1"]
        logs[metric_key(SUITE, "best_step")] = best["step"]
        logs[metric_key(SUITE, "seconds")] = evaluation["seconds"]
        # The Trainer's own `log`: TRL's override would fold the pending training metrics into this row. Logging
        # clears `should_log`, which this step's training metrics still need.
        should_log = trainer.control.should_log
        Trainer.log(trainer, logs)
        trainer.control.should_log = should_log
        if args.metric_for_best_model is None:  # the run's checkpoint selection is ours: protect and name the best
            state.best_metric, state.best_global_step = best["mean_pass@1"], best["step"]
        self._write(args)

    def _system_prompt(self, args):
        """`math_eval_system_prompt` for math benchmarks (the prompt as before when all are math), each other kind's
        default for the others."""
        if all(benchmark.kind == "math" for benchmark in self.benchmarks):
            return args.math_eval_system_prompt
        return {"math": args.math_eval_system_prompt}

    def _summary_metrics(self, verdicts: dict[str, list[Verdict]], world: int) -> dict[str, dict[str, float]]:
        """Each benchmark's grader's summary metrics over the verdicts of every process. The verdicts are gathered
        only when some benchmark's kind has summary metrics; that depends on the benchmarks alone, which every process
        holds alike, so every process enters the same gather (with its own verdicts, none on an empty share)."""
        names = [benchmark.name for benchmark in self.benchmarks if benchmark.kind not in SUMMARY_FREE_KINDS]
        if not names:
            return {}
        own = {
            name: [(v.extracted, bool(v.correct), thaw(v.details)) for v in verdicts.get(name, ())] for name in names
        }
        shares = gather_object([own]) if world > 1 else [own]
        kinds = {benchmark.name: benchmark.kind for benchmark in self.benchmarks}
        metrics = {}
        for name in names:
            every = [Verdict(*verdict) for share in shares for verdict in share[name]]
            metrics[name] = self.graders[kinds[name]].summary_metrics(every) if every else {}
        return metrics

    @contextlib.contextmanager
    def _generation_model(self, args, *, synced: bool):
        """The student, unwrapped for `generate`, in eval mode; train mode (if it was on) comes back afterwards.

        Under ZeRO-3 with `ds3_gather_for_generation` it is gathered with none of DeepSpeed's hooks, not even the
        start-of-forward one (TRL's `unwrap_model_for_generation` keeps it, and it compares module traces across
        processes with a collective in the first forwards after every gather), so `generate` issues no collective
        and processes may stop at different lengths. Without the gather the forward is sharded and `synced`."""
        trainer = self.trainer
        wrapped = trainer.model_wrapped
        was_training = wrapped.training
        wrapped.eval()
        try:
            with (
                gathered_without_hooks(wrapped, trainer.accelerator, gather=args.ds3_gather_for_generation) as model,
                torch.no_grad(),
                trainer._dist.summon_full_params(wrapped, recurse=False),
            ):
                if synced:
                    yield model
                else:
                    # Gathered (or unsharded) weights need no collective in the forward; without `synced_gpus` (which
                    # transformers turns on under ZeRO-3) processes with unequal shares cannot wait on each other.
                    with _generate_without_sync(model):
                        yield model
        finally:
            if was_training:
                wrapped.train()

    # Benchmarks, resuming, the results file

    def _load_benchmarks(self, args) -> None:
        if self.benchmarks:
            return
        with self.trainer.accelerator.main_process_first():  # one download, then every process reads the cache
            self.benchmarks = [
                load_benchmark(name, max_problems=args.math_eval_max_problems) for name in args.math_eval_benchmarks
            ]
        self.graders.allow_code_execution = _allows_code(args)
        require_code_execution([(b.source, b.kind) for b in self.benchmarks], _allows_code(args), CODE_EXECUTION_FIELD)
        names = [benchmark.name for benchmark in self.benchmarks]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(
                f"math_eval_benchmarks names two benchmarks {duplicates}; their scores would share a metric name. "
                "Rename one of the files."
            )

    def _resume(self, args, state) -> None:
        """Continue the record of the interrupted run up to the resumed step, so the best step stays the run's."""
        path = os.path.join(args.output_dir, RESULTS_FILE)
        # The main process's record, on every process: the best step must be the same everywhere (the Trainer enters
        # a barrier when it saves a checkpoint only if `best_global_step` is set), also on a node without the file.
        previous = [None]
        if self.trainer.is_world_process_zero() and os.path.isfile(path):
            with open(path) as file:
                previous = [json.load(file)]
        previous = broadcast_object_list(previous)[0]
        if previous is None:
            return
        if previous.get("settings", {}).get("benchmarks") != self._settings(args)["benchmarks"]:
            logger.warning(f"{path} scored other benchmarks; the resumed run starts a new record.")
            return
        self.evaluations = [e for e in previous.get("evaluations", []) if e["step"] <= state.global_step]
        if self.evaluations:
            self._last_evaluated_step = self.evaluations[-1]["step"]

    def _settings(self, args) -> dict:
        return {
            "benchmarks": [
                {"name": b.name, "source": b.source, "num_problems": len(b.problems)} for b in self.benchmarks
            ],
            "num_samples": args.math_eval_num_samples,
            "max_problems": args.math_eval_max_problems,
            "max_new_tokens": args.math_eval_max_new_tokens or args.max_completion_length,
            "temperature": args.math_eval_temperature,
            "top_p": TOP_P,
            "system_prompt": args.math_eval_system_prompt,
            "seed": args.seed,
            "eval_steps": args.math_eval_steps,
        }

    def _write(self, args) -> None:
        if not self.trainer.is_world_process_zero():
            return

        def checkpoint(step):
            path = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
            return path if os.path.isdir(path) else None

        evaluations = [{**evaluation, "checkpoint": checkpoint(evaluation["step"])} for evaluation in self.evaluations]
        best = self.best
        content = {
            "settings": self._settings(args),
            "evaluations": evaluations,
            "best": {"step": best["step"], "mean_pass@1": best["mean_pass@1"], "checkpoint": checkpoint(best["step"])},
        }
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, RESULTS_FILE)
        with open(path + ".tmp", "w") as file:
            json.dump(content, file, indent=2)
        os.replace(path + ".tmp", path)


def process_share(
    benchmark: Benchmark, num_processes: int, process_index: int
) -> tuple[Benchmark, tuple[Problem, ...]]:
    """This process's strided share of `benchmark`'s problems, and the padding that brings it to the size of the
    largest share: copies of the benchmark's first problem under new ids, to be sampled and not graded. Every process
    then samples the same number of problems, in the same batches, so it makes the same `generate` calls as the others
    (a share is empty when there are fewer problems than processes)."""
    share = benchmark.problems[process_index::num_processes]
    size = -(-len(benchmark.problems) // num_processes)
    ids = {problem.id for problem in benchmark.problems}
    padding = []
    for index in range(size - len(share)):  # none for an empty benchmark: every share is empty alike
        template = benchmark.problems[0]
        problem_id = f"padding-{index}"
        while problem_id in ids:
            problem_id = f"_{problem_id}"
        padding.append(dataclasses.replace(template, id=problem_id))
    return dataclasses.replace(benchmark, problems=share), tuple(padding)


def _allows_code(args) -> bool:
    return bool(getattr(args, "math_eval_allow_code_execution", False))


@contextlib.contextmanager
def _preserved_rng_state(device: torch.device):
    """Run the block without touching the random state training continues from."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    if device.type == "cpu":
        devices, device_type = [], "cuda"
    else:
        index = device.index if device.index is not None else getattr(torch, device.type).current_device()
        devices, device_type = [index], device.type
    try:
        with torch.random.fork_rng(devices=devices, device_type=device_type):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextlib.contextmanager
def _preserved_padding(tokenizer):
    """Batched generation pads on the left; the trainer's tokenizer keeps its own sides."""
    sides = tokenizer.padding_side, tokenizer.truncation_side
    try:
        yield
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides


@contextlib.contextmanager
def _generate_without_sync(model):
    shadowed = model.__dict__.get("generate")
    model.generate = functools.partial(model.generate, synced_gpus=False)
    try:
        yield
    finally:
        if shadowed is None:
            model.__dict__.pop("generate", None)
        else:
            model.generate = shadowed
