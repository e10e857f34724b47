"""Launched by tests/distributed/test_eval_callback_launch.py under `accelerate launch` (2 processes, CPU, gloo).

Trains the tiny pair for a few steps with in-training math evaluation (`MathEvalCallback`) on a local benchmark and
writes what each rank saw to OUT/rank{N}.json. The processes hold unequal shares of the problems. The student really
generates (HF `generate` on the model the callback hands over); its completions are then swapped for the scripted
ones of `--completions` (a wrong answer for a problem they do not name), so the expected pass@1 is known.

With `--solo-benchmark`, the run takes one step more and its last evaluation scores that benchmark alone: one problem
for two processes, so one process has nothing to score (the case that once hung in the gather and the reduce). A
checkpoint is saved right after it (`--save-steps`). A hang dumps every rank's stack and exits.
"""

import json
import os
import sys
from pathlib import Path

from launching import guard_against_hangs, launched_script_parser, write_rank_report


def parse_args():
    parser = launched_script_parser(max_steps=2, hang_timeout=120)
    parser.add_argument("--benchmark", required=True, help="Local benchmark file (problem and answer columns).")
    parser.add_argument(
        "--completions",
        required=True,
        help="JSON file mapping each problem id to its scripted completions, one per sample.",
    )
    parser.add_argument("--gather-student", choices=["true", "false"], default="true")
    parser.add_argument(
        "--solo-benchmark",
        help="Local benchmark file the last evaluation (at --max-steps) scores instead of --benchmark.",
    )
    parser.add_argument("--save-steps", type=int, default=None, help="Save a checkpoint every N steps.")
    return parser.parse_args()


def main():
    args = parse_args()
    guard_against_hangs(args.hang_timeout, setup=True)

    from tiny_config import tiny_prompts, tiny_run_args
    from transformers import AutoTokenizer, TrainerCallback

    from trb_trl import TRBDistillTrainer
    from trb_trl.evaluation import callback
    from trb_trl.evaluation.benchmarks import load_benchmark
    from trb_trl.evaluation.runner import score_benchmarks
    from trb_trl.evaluation.sampling import Completion, HFSampler

    rank = int(os.environ.get("RANK", 0))
    models = Path(args.models)
    scripted = json.loads(Path(args.completions).read_text())
    num_samples = len(next(iter(scripted.values())))
    config = tiny_run_args(
        args.out,
        max_steps=args.max_steps,
        per_device_train_batch_size=2,
        max_completion_length=6,
        rollout_policy="student",  # plain on-policy rollouts: the evaluation is what is under test
        trb_epsilon=0.0,
        ds3_gather_for_generation=args.gather_student == "true",
        math_eval_benchmarks=[args.benchmark],
        math_eval_steps=1,
        math_eval_num_samples=num_samples,
        math_eval_max_new_tokens=4,
        math_eval_batch_size=4,  # a share of 6 samples takes two generate calls, one of 4 samples one
        **({"save_strategy": "steps", "save_steps": args.save_steps} if args.save_steps else {}),
    )
    trainer = TRBDistillTrainer(
        model=str(models / "student"),
        teacher_model=str(models / "teacher"),
        args=config,
        train_dataset=tiny_prompts(32),
        processing_class=AutoTokenizer.from_pretrained(models / "tokenizer"),
    )

    generate_calls = []

    def scripted_scores(model, tokenizer, benchmarks, **kwargs):
        """`score_benchmarks` with the real generation, graded on the scripted completions instead of its text."""
        sampler = HFSampler(
            model,
            tokenizer,
            temperature=kwargs["temperature"],
            top_p=kwargs["top_p"],
            max_new_tokens=kwargs["max_new_tokens"],
        )

        def sample(requests, seed):
            generated = sampler(requests, seed)
            generate_calls.append(
                {
                    "step": trainer.state.global_step,
                    "requests": [[r.problem_id, r.index] for r in requests],
                    "num_tokens": [g.num_tokens for g in generated],
                }
            )
            return [
                Completion(scripted[r.problem_id][r.index] if r.problem_id in scripted else "No answer.")
                for r in requests
            ]

        return score_benchmarks(model, tokenizer, benchmarks, sampler=sample, **kwargs)

    callback.score_benchmarks = scripted_scores

    class SoloBenchmarkLast(TrainerCallback):
        """Before the last step, hand the evaluation callback the one-problem benchmark."""

        def __init__(self, benchmark):
            self.benchmark = benchmark

        def on_step_begin(self, args_, state, control, **kwargs):
            if state.global_step == state.max_steps - 1:
                evaluation = next(
                    c for c in trainer.callback_handler.callbacks if isinstance(c, callback.MathEvalCallback)
                )
                evaluation.benchmarks = [self.benchmark]

    if args.solo_benchmark:
        with trainer.accelerator.main_process_first():  # one dataset-cache build, then every process reads it
            trainer.add_callback(SoloBenchmarkLast(load_benchmark(args.solo_benchmark)))

    guard_against_hangs(args.hang_timeout, setup=False)
    trainer.train()

    log_history = trainer.state.log_history
    result = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "zero_stage": trainer._dist.zero_stage,
        "generate_calls": generate_calls,
        "eval_rows": [entry for entry in log_history if callback.metric_key("math", "mean_pass@1") in entry],
        "best_global_step": trainer.state.best_global_step,
        "losses": [entry["loss"] for entry in log_history if "loss" in entry],
    }
    write_rank_report(args.out, rank, result, trainer.accelerator)
    return 0


if __name__ == "__main__":
    sys.exit(main())
