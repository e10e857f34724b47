"""`trb-trl demo`: the runs. Pick the task, pretrain (or load) its teacher and student, probe their step-0 rollouts,
distil the student with each method under identical budgets and seeds, evaluate on held-out problems, and write the
report."""

import argparse
import contextlib
import copy
import importlib
import os
import platform
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

from transformers import TrainerCallback

from .comparison import decision, paired_differences
from .methods import METHOD_LABELS, METHODS, DemoMethod, RunSettings, methods_argument
from .models import default_cache_dir, heldout_accuracy, load_or_pretrain
from .probes import continuation_probe, rollout_diagnostics, with_teacher_entropy
from .report import RunResult, build_report, plot_report, summary_table, write_report_json
from .tasks import TASKS, DemoTask, task_argument


# The task, methods and seeds of a plain `trb-trl demo` and of `--quick` (see docs/demo.md for their timings).
DEFAULT_TASK = "machine"
# The TRB paper's arms; TrOPD and its comparison's baselines on request (`--methods`): the default fits 10 minutes.
DEFAULT_METHODS = [name for name, method in METHODS.items() if method.trainer == DemoMethod.trainer]
DEFAULT_SEEDS = 3
QUICK_METHODS = ["opd", "trb"]
# Problems used by the step-0 probes (rollout diagnostics, continuation probe): a prefix of the evaluation set.
PROBE_PROBLEMS = 256


# What `trb-trl demo` imports beyond the package's own dependencies, and the extra that installs it.
DEMO_DEPENDENCIES = {"matplotlib": "trb-trl[demo]", "tqdm": "trb-trl[demo]"}
REPORT_TO_DEPENDENCIES = {"wandb": "wandb", "trackio": "trackio"}  # wandb is a core dependency; a broken install


def check_optional_dependencies(report_to: list[str]) -> None:
    """Fail at once, before any training, if a module the demo needs later is missing: the plot (matplotlib), the
    progress bars (tqdm) and the loggers asked for with `--report-to`. One `SystemExit` names all of them."""
    needed = dict(DEMO_DEPENDENCIES)
    needed.update({name: REPORT_TO_DEPENDENCIES[name] for name in report_to if name in REPORT_TO_DEPENDENCIES})
    missing = {}
    for module, extra in needed.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing[module] = extra
    if missing:
        installs = " ".join(f'"{extra}"' for extra in dict.fromkeys(missing.values()))
        raise SystemExit(
            f"trb-trl demo needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed. "
            f"Install {'it' if len(missing) == 1 else 'them'} with:\n    pip install {installs}\n"
            "(nothing was trained or written)."
        )


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trb-trl demo",
        description="CPU toy comparison of on-policy distillation methods (vanilla OPD, TRB and the paper's "
        "baselines) on a synthetic task, side by side from one student checkpoint with identical budgets "
        "and seeds. Writes OUTPUT_DIR/report.json and OUTPUT_DIR/report.png.",
    )
    parser.add_argument(
        "--output-dir", default="trb_demo", help="Where report.json/report.png go (default: %(default)s)."
    )
    parser.add_argument(
        "--task",
        type=task_argument,
        default=TASKS[DEFAULT_TASK],
        metavar="{" + ",".join(TASKS) + "}",
        help=f"The synthetic task (default {DEFAULT_TASK}): 'machine', tracing a state machine (24-step rollouts that "
        "one wrong state derails); 'addition', column addition with carries (short rollouts, local mistakes). Its "
        "models are pretrained and cached per task. See docs/demo.md.",
    )
    parser.add_argument(
        "--methods",
        type=methods_argument,
        default=None,
        help=f"Comma-separated methods to run, from {', '.join(METHODS)}, or 'all' (default: "
        f"{','.join(DEFAULT_METHODS)}; --quick: {','.join(QUICK_METHODS)}).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{','.join(QUICK_METHODS)} unless --methods says otherwise, 1 seed, fewer steps (addition 30, machine "
        "20) and 256 eval problems (about 2 minutes on a cold cache).",
    )
    parser.add_argument("--seed", type=int, default=0, help="First distillation seed; the seeds are SEED..SEED+N-1.")
    parser.add_argument(
        "--seeds", type=int, default=None, help=f"Seeds N per method (default {DEFAULT_SEEDS}, --quick 1)."
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="Optimizer steps per run (default: addition 60, machine 40; --quick: 30, 20).",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="Prompts (= rollouts) per step (default 64).")
    parser.add_argument("--learning-rate", type=float, default=5e-4, help="Constant lr of every method (5e-4).")
    parser.add_argument("--temperature", type=float, default=1.0, help="Rollout and loss temperature (1.0).")
    parser.add_argument(
        "--epsilon", type=float, default=0.2, help="TRB's epsilon_0 and fixed-ε's epsilon, nats per token (0.2)."
    )
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="Warmup length K in steps of TRB (epsilon's anneal), temperature warmup (the ramp) and SFT warmup (the "
        "supervised steps) (default: a third of --steps).",
    )
    parser.add_argument(
        "--skd-top-k",
        type=int,
        default=1,
        help="SKD: keep a student token if it is among the teacher's top-K, else replace it (default 1: at each step "
        "of these tasks only one token is right).",
    )
    parser.add_argument(
        "--skd-teacher-temperature", type=float, default=1.0, help="SKD: temperature of the teacher's replacements."
    )
    parser.add_argument(
        "--temperature-warmup-start",
        type=float,
        default=0.8,
        help="Temperature warmup: rollout temperature at step 0, rising to --temperature at step K (default 0.8).",
    )
    parser.add_argument(
        "--veto-beta-start",
        type=float,
        default=0.4,
        help="Veto: initial beta of the target pi_T * pi_S^beta, decaying to 0 over the run (default 0.4).",
    )
    parser.add_argument(
        "--eval-every", type=int, default=None, help="Evaluate every N steps (default: addition 3, machine 4)."
    )
    parser.add_argument(
        "--eval-size",
        type=int,
        default=None,
        help="Held-out problems per evaluation (default 512, --quick 256, at most the task's pool of 1024).",
    )
    parser.add_argument(
        "--early-end",
        type=int,
        default=None,
        help="The last step of the 'early' window of the paired comparison with vanilla OPD: the evaluations after "
        "step 0 up to this step (default: half of --steps).",
    )
    parser.add_argument(
        "--eval-temperature",
        type=float,
        default=1.0,
        help="0: greedy accuracy; > 0: pass@1 of one sample per problem at this temperature (default 1.0, as in the "
        "paper's evaluation).",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="Where the pretrained teacher and student are cached (default: $XDG_CACHE_HOME/trb_trl/demo or "
        "~/.cache/trb_trl/demo).",
    )
    parser.add_argument(
        "--report-to",
        nargs="+",
        default=["none"],
        choices=["none", "wandb", "trackio"],
        help="Also log the runs to W&B (offline unless WANDB_MODE says otherwise) and/or trackio.",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the tiny models are overhead-bound, and more threads than free cores slows "
        "them down several times on a shared machine).",
    )
    return parser


class HeldOutAccuracyCallback(TrainerCallback):
    """Exact-match accuracy on held-out problems at step 0, every `every` optimizer steps, and the last step.

    Evaluation samples from its own seeded random stream (see `heldout_accuracy`), so it does not change the training
    run, and every evaluation of every run sees the same random numbers (paired comparisons)."""

    def __init__(
        self,
        tokenizer,
        problems: list,
        *,
        every: int,
        temperature: float,
        progress,
        report_to: list[str],
        batch_size: int = 256,
    ):
        self.tokenizer, self.problems, self.every, self.temperature = tokenizer, problems, every, temperature
        self.progress, self.report_to, self.batch_size = progress, report_to, batch_size
        self.steps: list[int] = []
        self.accuracy: list[float] = []

    def _evaluate(self, step: int, model) -> None:
        accuracy = heldout_accuracy(
            model, self.tokenizer, self.problems, temperature=self.temperature, batch_size=self.batch_size
        )
        self.steps.append(step)
        self.accuracy.append(accuracy)
        self.progress.set_postfix(heldout_acc=f"{accuracy:.3f}")
        metrics = {"eval/heldout_exact_match": accuracy, "train/global_step": step}
        if "wandb" in self.report_to:
            import wandb

            if wandb.run is not None:
                wandb.log(metrics)
        if "trackio" in self.report_to:
            import trackio

            trackio.log(metrics)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._evaluate(0, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.progress.update(1)
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._evaluate(state.global_step, model)


def run_distillation(
    method: str,
    *,
    student,
    teacher,
    tokenizer,
    train_prompts: list[str],
    eval_problems: list,
    settings: RunSettings,
    seed: int,
    output_dir: Path,
    report_to: list[str],
    eval_batch_size: int = 256,
) -> RunResult:
    """Distil a copy of `student` with one of `METHODS` and track held-out accuracy, the method's own metrics and the
    teacher's entropy on the rollouts it trains on (`rollout/teacher_entropy`).

    Every method so far is a `TRBDistillTrainer` with the same budget; only its method fields differ
    (`METHODS[method]`)."""
    from datasets import Dataset
    from tqdm.auto import tqdm

    start = time.perf_counter()
    spec = METHODS[method]
    args = distillation_config(
        method,
        settings,
        seed=seed,
        output_dir=output_dir,
        max_completion_length=eval_problems[0].completion_length,
        report_to=report_to,
    )
    train_dataset = Dataset.from_dict({"prompt": train_prompts})
    model = copy.deepcopy(student)
    if args.sft_warmup_steps > 0:
        model = sft_warmed_student(model, teacher, tokenizer, args, train_dataset)
        args.sft_warmup_steps = 0  # phase 1 is done: the trainer below runs OPD from the warmed student

    progress = tqdm(total=settings.steps, desc=f"{METHOD_LABELS[method]:>18} seed {seed}", unit="step")
    callback = HeldOutAccuracyCallback(
        tokenizer,
        eval_problems,
        every=settings.eval_every,
        temperature=settings.eval_temperature,
        progress=progress,
        report_to=report_to,
        batch_size=eval_batch_size,
    )
    trainer = with_teacher_entropy(spec.trainer_class())(
        model=model,
        teacher_model=teacher,
        args=args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        callbacks=[callback],
    )
    _train_quietly(trainer, progress, report_to)
    metrics = logged_per_rollout(trainer.state.log_history, spec.metrics, settings.steps)
    metrics[TEACHER_ENTROPY] = trainer.rollout_teacher_entropy[: settings.steps]
    return RunResult(
        steps=callback.steps,
        accuracy=callback.accuracy,
        metrics=metrics,
        seconds=time.perf_counter() - start,
    )


# The per-step metric `with_teacher_entropy` adds to every run: the teacher's mean per-token entropy on the rollout.
TEACHER_ENTROPY = "rollout/teacher_entropy"


def distillation_config(
    method: str, settings: RunSettings, *, seed: int, output_dir: Path, max_completion_length: int, report_to
):
    """The config of one run (`METHODS[method].config_class()`: a `TRBDistillConfig`, or `TrOPDConfig` for TrOPD): the
    budget every method shares, plus the method's fields."""
    return METHODS[method].config_class()(
        output_dir=str(output_dir / "runs" / f"{method}-seed{seed}"),
        run_name=f"{method}-seed{seed}",
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",
        max_completion_length=max_completion_length,
        temperature=settings.temperature,
        logging_steps=1,
        seed=seed,
        report_to=report_to,
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        activation_checkpointing=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **METHODS[method].fields(settings),
    )


def logged_per_rollout(log_history: list[dict], names: tuple[str, ...], steps: int) -> dict[str, list[float | None]]:
    """Each named metric of a run's log, per rollout step k = 0..steps-1 (None where it was not logged); metrics
    never logged are left out. With `logging_steps=1`, the log of step k+1 holds the rollout made at step k."""
    rows = {row["step"]: row for row in log_history if any(name in row for name in names)}
    metrics = {}
    for name in names:
        values = [rows.get(k + 1, {}).get(name) for k in range(steps)]
        if any(value is not None for value in values):
            metrics[name] = [None if value is None else float(value) for value in values]
    return metrics


class _ProgressBar(TrainerCallback):
    """Advances a tqdm bar once per optimizer step (the trainers' own printers are removed for a readable console)."""

    def __init__(self, progress):
        self.progress = progress

    def on_step_end(self, args, state, control, **kwargs):
        self.progress.update(1)


def sft_warmed_student(model, teacher, tokenizer, args, train_dataset):
    """The SFT-warmup arm's first phase, in memory: one teacher response (at the rollout settings) to each row of the
    first `args.sft_warmup_steps` OPD steps, then that many `SFTTrainer` steps on them with the OPD run's optimization
    settings (`trb_trl.sft_warmup`, as `trb-trl train` runs it from checkpoints on disk). Returns the student OPD
    starts from; the OPD run then sees the same rows in the same order as every other arm."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from .._compat import SFTTrainer
    from ..sft_warmup import sft_warmup_config, teacher_responses, warmup_rows
    from ..stop_alignment import as_id_list

    rows = warmup_rows(train_dataset, args)
    prompts = train_dataset.select([index for step in rows for index in step])["prompt"]
    student_stops = as_id_list(model.generation_config.eos_token_id)
    if tokenizer.eos_token_id not in student_stops:  # as DistillationTrainer collects the student's stop ids
        student_stops = [tokenizer.eos_token_id, *student_stops]
    set_seed(args.seed)
    responses = teacher_responses(teacher, tokenizer, prompts, args, student_stop_ids=student_stops)
    progress = tqdm(total=args.sft_warmup_steps, desc=f"{'SFT phase':>18} seed {args.seed}", unit="step")
    trainer = SFTTrainer(
        model=model,
        args=sft_warmup_config(args),
        train_dataset=responses,
        processing_class=tokenizer,
        callbacks=[_ProgressBar(progress)],
    )
    _train_quietly(trainer, progress, args.report_to)
    return trainer.model.eval()


def _train_quietly(trainer, progress, report_to) -> None:
    """Train with our progress bar instead of the trainer's printer, closing the bar and any W&B run afterwards."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    try:
        trainer.train()
    finally:
        progress.close()
        if "wandb" in report_to:
            import wandb

            if wandb.run is not None:
                wandb.finish()


def _resolve_settings(args) -> tuple[RunSettings, list[int], int, list[str]]:
    quick, defaults = args.quick, args.task.defaults
    steps = args.steps if args.steps is not None else (defaults.quick_steps if quick else defaults.steps)
    num_seeds = args.seeds if args.seeds is not None else (1 if quick else DEFAULT_SEEDS)
    eval_size = (
        args.eval_size if args.eval_size is not None else (defaults.quick_eval_size if quick else defaults.eval_size)
    )
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, round(steps / 3))
    methods = args.methods if args.methods is not None else (QUICK_METHODS if quick else DEFAULT_METHODS)
    settings = RunSettings(
        steps=steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        temperature=args.temperature,
        eval_every=args.eval_every if args.eval_every is not None else defaults.eval_every,
        eval_temperature=args.eval_temperature,
        epsilon=args.epsilon,
        warmup_steps=warmup,
        skd_top_k=args.skd_top_k,
        skd_teacher_temperature=args.skd_teacher_temperature,
        temperature_warmup_start=args.temperature_warmup_start,
        veto_beta_start=args.veto_beta_start,
    )
    pool = args.task.eval_pool
    if steps < 1 or num_seeds < 1 or settings.eval_every < 1 or not 1 <= eval_size <= pool:
        raise SystemExit(f"--steps, --seeds and --eval-every must be >= 1, and --eval-size in [1, {pool}].")
    return settings, list(range(args.seed, args.seed + num_seeds)), eval_size, list(methods)


def early_end(args, settings: RunSettings) -> int:
    """The last step of the comparison's early window: `--early-end`, or half the run."""
    return args.early_end if args.early_end is not None else settings.steps // 2


def metric_name(eval_temperature: float) -> str:
    if eval_temperature > 0:
        return f"exact-match accuracy (pass@1, one sample at temperature {eval_temperature:g})"
    return "exact-match accuracy (greedy)"


def step0_rollout_accuracy(
    teacher, student, tokenizer, problems, settings: RunSettings, batch_size: int = 256
) -> dict[str, float]:
    """How often rollouts at the training temperature are right before any training: the student's own (vanilla OPD),
    the trust-region blend at epsilon_0 (TRB's first rollouts), and the teacher's. Shows what the warmup changes."""
    from ..rollout import TrustRegionBlendingProcessor

    def blend(attention_mask):
        return TrustRegionBlendingProcessor(
            teacher,
            settings.epsilon,
            prompt_attention_mask=attention_mask,
            temperature=settings.temperature,
            vocab_size=len(tokenizer),
            student_eos_token_id=tokenizer.eos_token_id,
        )

    sampled = {"temperature": settings.temperature, "batch_size": batch_size}
    return {
        "student": heldout_accuracy(student, tokenizer, problems, **sampled),
        "trb": heldout_accuracy(student, tokenizer, problems, make_logits_processor=blend, **sampled),
        "teacher": heldout_accuracy(teacher, tokenizer, problems, **sampled),
    }


@contextlib.contextmanager
def _quiet_libraries():
    """Silence the per-run warnings of transformers/TRL (weights loading, deprecations) and the datasets progress bars
    (SFT warmup's tokenization) for a readable console."""
    import datasets
    import transformers

    verbosity = transformers.logging.get_verbosity()
    datasets_bars = datasets.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()
        if datasets_bars:
            datasets.enable_progress_bars()


def run_environment() -> dict:
    """Library versions and the machine, for `report.json`: the demo's numbers depend on them."""
    import torch
    import transformers
    import trl

    from .. import __version__

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "trb_trl": __version__,
        "torch_threads": torch.get_num_threads(),
    }


def run_settings(
    args, settings: RunSettings, seeds: list[int], eval_size: int, methods: list[str], *, max_completion_length: int
) -> dict:
    """Everything that decides the demo's numbers, for `report.json`."""
    task: DemoTask = args.task
    return {
        **asdict(settings),
        "methods": methods,
        "seeds": seeds,
        "eval_size": eval_size,
        "early_end": early_end(args, settings),
        "quick": args.quick,
        "threads": args.threads,
        "arguments": {**vars(args), "task": task.name},
        "max_completion_length": max_completion_length,
        "task": {"name": task.name, **task.details},
        "split_seed": task.cache_fields["seed"],
        "teacher": asdict(task.teacher),
        "student": asdict(task.student),
    }


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    settings, seeds, eval_size, methods = _resolve_settings(args)
    report_to = [r for r in args.report_to if r != "none"] or ["none"]
    check_optional_dependencies(report_to)  # before any work: a missing plotting library must not cost a run
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if "wandb" in report_to:
        os.environ.setdefault("WANDB_MODE", "offline")  # never needs the network unless the user asks for it
        os.environ.setdefault("WANDB_DIR", str(output_dir))
        os.environ.setdefault("WANDB_PROJECT", "trb-trl-demo")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, settings, seeds, eval_size, methods, output_dir, report_to)
    finally:
        torch.set_num_threads(previous_threads)


def _run(
    args,
    settings: RunSettings,
    seeds: list[int],
    eval_size: int,
    methods: list[str],
    output_dir: Path,
    report_to: list[str],
) -> int:
    start = time.perf_counter()
    task: DemoTask = args.task
    with _quiet_libraries():
        tokenizer = task.tokenizer()
        splits = task.splits()
        eval_problems = splits.eval[:eval_size]
        cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
        models = {}
        for name, config in (("teacher", task.teacher), ("student", task.student)):
            model, _, cached = load_or_pretrain(
                name, config, tokenizer, splits, task=task.cache_fields, cache_dir=cache_dir
            )
            print(f"{name}: {'loaded from' if cached else 'trained and cached in'} {cache_dir}")
            models[name] = (model, cached)
        (teacher, teacher_cached), (student, student_cached) = models["teacher"], models["student"]
        models_seconds = time.perf_counter() - start
        scored = {"temperature": settings.eval_temperature, "batch_size": task.eval_batch_size}
        teacher_accuracy = heldout_accuracy(teacher, tokenizer, eval_problems, **scored)
        student_accuracy = heldout_accuracy(student, tokenizer, eval_problems, **scored)
        metric = metric_name(settings.eval_temperature)
        print(describe_heldout(task.name, metric, eval_size, teacher=teacher_accuracy, student=student_accuracy))
        rollout_accuracy = step0_rollout_accuracy(
            teacher, student, tokenizer, eval_problems, settings, batch_size=task.eval_batch_size
        )
        print(describe_rollout_accuracy(rollout_accuracy, settings, eval_size))
        if teacher_accuracy < 0.9:
            print("warning: the teacher is below 90% accuracy; the comparison is less meaningful.")
        probe_problems = eval_problems[:PROBE_PROBLEMS]
        probe_settings = {"epsilon": settings.epsilon, "temperature": settings.temperature}
        diagnostics = rollout_diagnostics(teacher, student, tokenizer, probe_problems, **probe_settings)
        print(describe_diagnostics(diagnostics, problems=len(probe_problems), eval_size=eval_size))
        probe = continuation_probe(
            teacher, student, tokenizer, probe_problems, lengths=list(task.defaults.probe_lengths), **probe_settings
        )

        train_prompts = [p.prompt for p in splits.train]
        runs: dict[str, list[RunResult]] = {method: [] for method in methods}
        with tempfile.TemporaryDirectory() as scratch:
            run_root = output_dir if report_to != ["none"] else Path(scratch)
            for seed in seeds:
                for method in methods:
                    runs[method].append(
                        run_distillation(
                            method,
                            student=student,
                            teacher=teacher,
                            tokenizer=tokenizer,
                            train_prompts=train_prompts,
                            eval_problems=eval_problems,
                            settings=settings,
                            seed=seed,
                            output_dir=run_root,
                            report_to=report_to,
                            eval_batch_size=task.eval_batch_size,
                        )
                    )
        report = build_report(
            task=task.description,
            teacher_accuracy=teacher_accuracy,
            student_initial_accuracy=student_accuracy,
            seconds=time.perf_counter() - start,
            runs=runs,
            methods={
                name: {"description": METHODS[name].describe(settings), "config": METHODS[name].fields(settings)}
                for name in methods
            },
            settings=run_settings(
                args, settings, seeds, eval_size, methods, max_completion_length=eval_problems[0].completion_length
            ),
            environment=run_environment(),
            metric=metric,
            models_seconds=models_seconds,
            models_cached={"teacher": teacher_cached, "student": student_cached},
            step0_rollout_accuracy=rollout_accuracy,
            rollout_diagnostics=diagnostics,
            continuation_probe=probe,
        )
        report["paired_with_opd"] = paired_differences(report["methods"], early_end=early_end(args, settings))
        # The JSON first: whatever happens to the plot, the numbers are on disk.
        json_path = write_report_json(report, output_dir)
    print()
    print(summary_table(report, warmup_steps=settings.warmup_steps, metric=report["metric"]))
    paired = describe_paired(report["paired_with_opd"])
    if paired:
        print(paired)
    print(
        f"\nsettings: {settings.steps} steps x {settings.batch_size} prompts, lr {settings.learning_rate}, "
        f"temperature {settings.temperature}; seeds {seeds}"
    )
    for name in methods:
        print(f"  {METHOD_LABELS[name]}: {METHODS[name].describe(settings)}")
    print(f"wrote {json_path}")
    png_path = json_path.parent / "report.png"
    plot_report(report, png_path, metric=report["metric"])
    print(f"wrote {png_path}")
    return 0


# The step-0 figures printed before training. Each says what it measures and on which problems: the held-out
# evaluation (the curves' step 0) and the rollout accuracies use the whole evaluation set, the probes its first
# `PROBE_PROBLEMS` problems, so the same model's step-0 accuracy can be printed twice with different values.


def describe_heldout(task_name: str, metric: str, eval_size: int, *, teacher: float, student: float) -> str:
    """The step-0 held-out evaluation: what the accuracy curves start from."""
    return (
        f"task {task_name}: step-0 {metric} on the {eval_size}-problem evaluation set (the curves' step 0): "
        f"teacher {teacher:.3f}, student {student:.3f}"
    )


def describe_rollout_accuracy(accuracy: dict[str, float], settings: RunSettings, eval_size: int) -> str:
    """How often step-0 rollouts (one per problem, at the training temperature) are right, on the evaluation set."""
    line = (
        f"step-0 rollouts at the training temperature {settings.temperature:g}, exact-match accuracy on the same "
        f"{eval_size} problems: student {accuracy['student']:.3f}, TRB blend at epsilon_0={settings.epsilon:g} "
        f"{accuracy['trb']:.3f}, teacher {accuracy['teacher']:.3f}"
    )
    if settings.eval_temperature == settings.temperature:
        line += " (student and teacher: the evaluation above, which samples at this temperature too)"
    return line


def describe_diagnostics(diagnostics: dict, *, problems: int, eval_size: int) -> str:
    """The step-0 probes on `problems` problems (the first of the `eval_size` evaluation problems): one line per
    behaviour, how much of it is derailed, the teacher's entropy there, and its accuracy on those problems."""

    def fmt(value):
        return "-" if value is None else f"{value:.3f}"

    where = (
        f"the same {problems} evaluation problems"
        if problems == eval_size
        else f"a {problems}-problem probe set (the first {problems} of the {eval_size} evaluation problems)"
    )
    lines = [
        f"step-0 probes on {where}, one rollout each at the training temperature:",
        "teacher entropy (nats/token) on the rollouts, on prefixes still on track | derailed:",
    ]
    for name, entry in diagnostics.items():
        lines.append(
            f"  {name:>7}: {fmt(entry['teacher_entropy'])} ({fmt(entry['teacher_entropy_on_track'])} | "
            f"{fmt(entry['teacher_entropy_derailed'])}), {100 * entry['derailed_token_fraction']:.0f}% of tokens "
            f"derailed, accuracy {entry['accuracy']:.3f} on these {problems} problems"
        )
    return "\n".join(lines)


def describe_paired(paired: dict) -> str:
    """The paired differences from vanilla OPD (mean over seeds and 95% t-interval), one line per method and window;
    empty when there is nothing to compare (no OPD arm, or a single seed)."""
    lines = []
    for name, windows in paired.items():
        for window, entry in windows.items():
            if entry["ci95"] is None:
                continue
            low, high = entry["ci95"]
            lines.append(
                f"  {METHOD_LABELS.get(name, name):>18} {window:>5} (steps {entry['steps'][0]}-{entry['steps'][-1]}): "
                f"{entry['mean']:+.3f} [{low:+.3f}, {high:+.3f}] -> {decision(entry['ci95'])}"
            )
    if not lines:
        return ""
    return (
        "\npaired difference from vanilla OPD in mean accuracy over the window (mean over seeds [95% t-interval]):\n"
        + "\n".join(lines)
    )
