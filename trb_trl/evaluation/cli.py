"""`trb-trl eval`: score a model or checkpoint on benchmarks, or compare the evaluations of several runs.

```bash
trb-trl eval Qwen/Qwen3-1.7B-Base --benchmarks qwen3_1p7b                   # the paper's suite, its sample counts
trb-trl eval runs/trb/checkpoint-100 --benchmarks math500,aime24 --n 16 --k 1,8
trb-trl eval runs/trb/checkpoint-100 --benchmarks problems.jsonl --max-problems 50
trb-trl eval runs/tropd/checkpoint-200 --benchmarks tropd_qwen3 --allow-code-execution   # TrOPD's multi-domain table
trb-trl eval --compare runs/trb runs/opd runs/skd --output-dir comparisons/trb_vs_baselines
```

Argument parsing imports nothing beyond the standard library, so `--help` answers at once; bad input (an unknown
benchmark, a missing answer column, n < k, a code benchmark without --allow-code-execution, a gated dataset this
machine cannot read, settings that differ from an interrupted run's) is one `trb-trl eval: error: ...` line and exit
status 2, before any model is loaded.
"""

import argparse
import sys

from .benchmarks import (
    BENCHMARKS,
    KINDS,
    LOCAL_LAYOUTS,
    LOCAL_NUM_SAMPLES,
    PAPER_SUITES,
    TROPD_BENCHMARKS,
    TROPD_SUITES,
)
from .graders import SYSTEM_PROMPTS


PROG = "trb-trl eval"

DESCRIPTION = """\
Score a model or checkpoint on benchmarks: n samples per problem, each graded by its benchmark's kind, pass@1 (mean
c/n over problems) and unbiased pass@k. Writes OUTPUT_DIR/results.json and OUTPUT_DIR/samples.jsonl; rerun the same
command to resume an interrupted evaluation.

Kinds: {kinds}.

Benchmarks (the TRB paper's default n): {benchmarks}.
TrOPD benchmarks (kind, default n): {tropd}.
Suites: {suites}.
Or a local .jsonl/.json/.parquet/.csv file with the columns of one kind (default n {local_n}): {layouts}.

With --compare, plot pass@1 against optimizer step for several training runs (their in-training evaluations and
their evaluated checkpoints, RUN/checkpoint-STEP/eval/results.json) into OUTPUT_DIR/pass_at_1.png and
OUTPUT_DIR/comparison.md.
"""


KIND_HELP = {
    "math": "the last \\boxed{} graded by math-verify",
    "multiple_choice": "lettered options; the letter in the last \\boxed{}, or an 'Answer: X' line",
    "instruction_following": "the response checked against each prompt's verifiable instructions",
    "code": "the program run on the problem's tests; needs --allow-code-execution",
}


def _description() -> str:
    return DESCRIPTION.format(
        kinds="; ".join(f"{kind} ({KIND_HELP[kind]})" for kind in KINDS),
        benchmarks=", ".join(f"{name} ({spec.num_samples})" for name, spec in BENCHMARKS.items()),
        tropd=", ".join(f"{name} ({spec.kind}, {spec.num_samples})" for name, spec in TROPD_BENCHMARKS.items()),
        suites="; ".join(
            f"{name} = {','.join(members)}" for name, members in {**PAPER_SUITES, **TROPD_SUITES}.items()
        ),
        local_n=LOCAL_NUM_SAMPLES,
        layouts="; ".join(f"{spec.kind}: {', '.join(layout)}" for layout, spec in LOCAL_LAYOUTS),
    )


def _shown(prompt: str | None) -> str:
    return "none" if prompt is None else f'"{prompt}"'.replace("%", "%%")


def _error(message: object) -> int:
    print(f"{PROG}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 1,8; got {text!r}")
    return values


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        usage=f"{PROG} MODEL_OR_CHECKPOINT --benchmarks NAMES [options]\n       {PROG} --compare RUN_DIR [RUN_DIR ...] "
        "--output-dir DIR",
        description=_description(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", nargs="?", metavar="MODEL_OR_CHECKPOINT", help="A Hub model id or a local directory.")
    parser.add_argument(
        "--benchmarks",
        metavar="NAMES",
        help="Comma-separated benchmark names, suite names or local files (e.g. math500,aime24 or qwen3_1p7b).",
    )
    parser.add_argument(
        "--n",
        type=int,
        default=None,
        help="Samples per problem (default: each benchmark's own, the papers' where they give one).",
    )
    parser.add_argument(
        "--k",
        type=_positive_ints,
        default=[1],
        metavar="K[,K...]",
        help="pass@k to report, comma-separated, each <= n (default: 1).",
    )
    parser.add_argument(
        "--temperature", type=float, default=1.0, metavar="T", help="Sampling temperature; 0 is greedy (1.0)."
    )
    parser.add_argument(
        "--top-p", type=float, default=1.0, metavar="P", help="Nucleus sampling threshold (1.0: off). Top-k is off."
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=8192, metavar="N", help="Completion length limit (8192)."
    )
    parser.add_argument(
        "--system-prompt",
        default=None,
        metavar="TEXT",
        help="System prompt of every benchmark; pass '' for none. Default: each kind's own: "
        + "; ".join(f"{kind} {_shown(prompt)}" for kind, prompt in SYSTEM_PROMPTS.items())
        + ". Keep the training prompts' system message for math.",
    )
    parser.add_argument(
        "--max-problems",
        type=int,
        default=None,
        metavar="N",
        help="Evaluate only the first N problems of each benchmark.",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="B",
        help="Sequences per generation batch (default: hf 32, vllm 1024).",
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="Sampling seed; the same seed gives the same samples (0)."
    )
    parser.add_argument(
        "--engine",
        choices=["auto", "hf", "vllm"],
        default="auto",
        help="Generation engine; auto = vLLM when installed with a CUDA device, else HF generate.",
    )
    parser.add_argument(
        "--allow-code-execution",
        action="store_true",
        help="Allow grading code benchmarks (livecodebench_v6, local code files), which runs the programs the model "
        "writes on this machine. Without it, a code benchmark is an error before any model loads.",
    )
    parser.add_argument(
        "--output-dir",
        default=None,
        metavar="DIR",
        help="Where results go (default: MODEL_DIR/eval for a local model, eval/ORG__NAME for a Hub id; required "
        "with --compare).",
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="RUN_DIR",
        default=None,
        help="Compare the evaluations of these training output directories instead of evaluating a model.",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.compare is not None:
        if args.model is not None:
            return _error(f"--compare takes run directories only; got a model too ({args.model!r})")
        if args.output_dir is None:
            return _error("--compare needs --output-dir")
        from .compare import compare_runs

        try:
            compare_runs(args.compare, args.output_dir)
        except (ValueError, OSError) as error:
            return _error(error)
        return 0
    if args.model is None:
        return _error("expected MODEL_OR_CHECKPOINT (or --compare RUN_DIR ...); see `trb-trl eval --help`")
    if args.benchmarks is None:
        return _error("--benchmarks is required, e.g. --benchmarks math500,aime24 or --benchmarks qwen3_1p7b")
    if args.n is not None and args.n < max(args.k):
        return _error(f"n ({args.n}) < k ({max(args.k)}): pass@k needs at least k samples per problem")

    from .runner import prepare_evaluation, run_evaluation

    try:
        plan = prepare_evaluation(
            args.model,
            args.benchmarks,
            output_dir=args.output_dir,
            num_samples=args.n,
            k=args.k,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            system_prompt=SYSTEM_PROMPTS if args.system_prompt is None else (args.system_prompt or None),
            seed=args.seed,
            batch_size=args.batch_size,
            max_problems=args.max_problems,
            engine=args.engine,
            allow_code_execution=args.allow_code_execution,
        )
    except (ValueError, OSError) as error:
        return _error(error)
    run_evaluation(plan)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
