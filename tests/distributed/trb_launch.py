"""Launched by tests/distributed/test_multiprocess.py under `accelerate launch` (2 processes, CPU, gloo).

Trains TRB (or SKD, `--policy skd`; or TrOPD with TRB warmup and teacher-prefix guidance, `--policy tropd`) for a few
steps on the tiny pair and writes what each rank saw to
OUT/rank{N}.json. With `--uneven`, rank 0's rollouts are forced to stop after two tokens while rank 1's run to the
length limit, the case that deadlocks a sharded teacher stepped from a logits processor under `synced_gpus`. A hang
dumps every rank's stack and exits.
"""

import hashlib
import os
import sys
from pathlib import Path

import torch
from launching import guard_against_hangs, launched_script_parser, write_rank_report


def parse_args():
    parser = launched_script_parser(max_steps=3, hang_timeout=240)
    parser.add_argument("--uneven", action="store_true")
    parser.add_argument("--gather-teacher", choices=["true", "false"], default="true")
    parser.add_argument(
        "--policy",
        choices=["trb", "skd", "tropd"],
        default="trb",
        help="The teacher-guided rollout policy ('tropd': TrOPDTrainer with TRB warmup and teacher prefixes).",
    )
    parser.add_argument(
        "--engine",
        choices=["processor", "speculative"],
        default="processor",
        help="How trust-region rollouts are sampled (trb_rollout_engine).",
    )
    parser.add_argument(
        "--extra-rollout-on-rank0",
        action="store_true",
        help="Rank 0 runs the rollout hook twice per generation (as TRL's tool loop does on a rank with tool calls).",
    )
    parser.add_argument(
        "--math-eval-benchmark",
        help="In-training math evaluation at the first and last step on the first problem of this benchmark "
        "(math_eval_max_problems=1): rank 1 has no problem to score.",
    )
    parser.add_argument(
        "--no-prefix-on-rank0",
        action="store_true",
        help="TrOPD: rank 0 draws prefix length 0 for every row (no teacher prefix token), rank 1 draws as usual.",
    )
    parser.add_argument(
        "--two-teachers",
        action="store_true",
        help="MOPD: the teacher under two names, rows routed to 'a' and 'b' by a teacher_id column, except on rank 0, "
        "whose rows all go to 'a' (it has no row of teacher 'b').",
    )
    parser.add_argument(
        "--naive-teacher-step",
        action="store_true",
        help="Negative control: step a sharded teacher from the logits processor (the design that deadlocks).",
    )
    return parser.parse_args()


def main():
    args = parse_args()
    guard_against_hangs(args.hang_timeout, setup=True)

    from datasets import Dataset
    from tiny_config import tiny_run_args
    from transformers import AutoTokenizer

    from trb_trl import TRBDistillConfig, TRBDistillTrainer, TrOPDConfig, TrOPDTrainer, trainer_base
    from trb_trl.rollout import SpeculativeBlendingSampler, TeacherGuidedProcessor

    if args.naive_teacher_step:
        TeacherGuidedProcessor.attach_to_student = lambda self, student: None

    rank = int(os.environ.get("RANK", 0))
    models = Path(args.models)
    prefix_lengths = []  # TrOPD: the prefix lengths this rank drew, per rollout
    draw_prefix_lengths = trainer_base.draw_prefix_lengths

    def record_prefix_lengths(max_length, count, *a, **k):
        lengths = draw_prefix_lengths(max_length, count, *a, **k)
        if args.no_prefix_on_rank0 and rank == 0:
            lengths = [0] * count
        prefix_lengths.append(lengths)
        return lengths

    trainer_base.draw_prefix_lengths = record_prefix_lengths
    tokenizer = AutoTokenizer.from_pretrained(models / "tokenizer")
    prompts = Dataset.from_list(
        [{"prompt": f"w{i} w{i + 1} w{i + 2} w{i % 7}", **({"teacher_id": "ab"[i % 2]} if args.two_teachers else {})}
         for i in range(64)]
    )  # fmt: skip
    policy = {
        "trb": {},
        "skd": {"rollout_policy": "skd", "skd_top_k": 3, "skd_steps": 2},
        # TRB warmup + TrOPD loss; teacher prefixes at steps 0 and 1 (their lengths differ across ranks).
        "tropd": {"rollout_policy": "trb", "trb_epsilon": 0.05, "trb_warmup_steps": 2, "tropd_prefix_steps": 2},
    }[args.policy]
    config = tiny_run_args(
        args.out,
        TrOPDConfig if args.policy == "tropd" else TRBDistillConfig,
        gather_teacher_for_generation=args.gather_teacher == "true",
        max_steps=args.max_steps,
        per_device_train_batch_size=2,
        max_completion_length=12,
        shuffle_dataset=False,
        **policy,
        **({"trb_rollout_engine": "speculative", "trb_draft_length": 4} if args.engine == "speculative" else {}),
        **(
            {
                "math_eval_benchmarks": [args.math_eval_benchmark],
                "math_eval_max_problems": 1,
                "math_eval_steps": args.max_steps,
                "math_eval_num_samples": 2,
                "math_eval_max_new_tokens": 4,
            }
            if args.math_eval_benchmark
            else {}
        ),
    )

    local_rollouts = []
    teachers = (
        {"teacher_models": {"a": str(models / "teacher"), "b": str(models / "teacher")}}
        if args.two_teachers
        else {"teacher_model": str(models / "teacher")}
    )
    trainer = (TrOPDTrainer if args.policy == "tropd" else TRBDistillTrainer)(
        model=str(models / "student"),
        args=config,
        train_dataset=prompts,
        processing_class=tokenizer,
        **teachers,
    )
    row_teachers = []  # MOPD: each rollout's row teachers on this rank
    if args.two_teachers:
        route = trainer.teacher_set.indices

        def record_route(teacher_ids):
            indices = route(teacher_ids)
            if rank == 0:
                indices = [0] * len(indices)
            row_teachers.append(indices)
            return indices

        trainer.teacher_set.indices = record_route

    # Record what each `generate` call contributes on this rank, as the trainer folds it into its statistics.
    original_add = trainer._rollout_statistics.add
    forwards = {}

    def recording_forwards(original_statistics):
        def record_forwards(self, *a, **k):
            forwards["last"] = self.teacher_forwards
            return original_statistics(self, *a, **k)

        return record_forwards

    def record_add(statistics, *, teacher_seconds, step):
        local_rollouts.append(
            {
                "step": step,
                "tokens": int(next(iter(statistics.values())).numel()),
                "sums": {name: float(value.float().sum()) for name, value in statistics.items()},
                "teacher_forwards": forwards.get("last", 0),
            }
        )
        return original_add(statistics, teacher_seconds=teacher_seconds, step=step)

    for rollout_class in (TeacherGuidedProcessor, SpeculativeBlendingSampler):
        rollout_class.statistics = recording_forwards(rollout_class.statistics)
    trainer._rollout_statistics.add = record_add

    guard_against_hangs(args.hang_timeout, setup=False)
    # A greedy TRB rollout of fixed, rank-specific prompts before training, for comparison with a single process. It
    # also runs the teacher before its DeepSpeed trace exists, when a leftover ZeRO-3 hook would still broadcast.
    greedy_prompts = [[3 + rank, 10, 11, 12], [20 + rank, 21], [30, 31 + rank, 32]]
    trainer.model.train()
    trainer.generation_config.do_sample = False
    greedy_completions = trainer._generate_single_turn(greedy_prompts, None, {})
    trainer.generation_config.do_sample = True
    trainer._metrics["train"].clear()
    trainer._rollout_statistics.reset()
    local_rollouts.clear()

    eos = tokenizer.eos_token_id
    decode_steps = {"n": 0}

    def force_early_stop(module, inputs, kwargs, output):
        """Rank 0 only: from the third generated token on, the only allowed token is EOS."""
        if torch.is_grad_enabled():
            return output
        input_ids = kwargs.get("input_ids")
        if input_ids is not None and input_ids.shape[1] > 1:  # prefill
            decode_steps["n"] = 0
        else:
            decode_steps["n"] += 1
        if decode_steps["n"] >= 2:
            output.logits[:, -1, :] = float("-inf")
            output.logits[:, -1, eos] = 0.0
        return output

    if args.uneven and rank == 0:
        student = trainer.accelerator.unwrap_model(trainer.model)
        student.register_forward_hook(force_early_stop, with_kwargs=True)

    lengths = []
    original = trainer._generate_single_turn

    def record_lengths(*a, **k):
        if args.extra_rollout_on_rank0 and rank == 0:
            original(*a, **k)  # a second round on this rank only, its result dropped (a tool round would use it)
        completion_ids = original(*a, **k)
        lengths.append([len(c) for c in completion_ids])
        return completion_ids

    trainer._generate_single_turn = record_lengths
    trainer.train()

    digest = hashlib.sha256()
    for _, param in sorted(trainer.model.named_parameters()):
        if hasattr(param, "ds_id"):  # ZeRO-3 shard: gather the full tensor (a collective: every rank runs it)
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                digest.update(param.detach().float().cpu().numpy().tobytes())
        else:
            digest.update(param.detach().float().cpu().numpy().tobytes())
    result = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "zero_stage": trainer._dist.zero_stage,
        "param_digest": digest.hexdigest(),
        "completion_lengths": lengths,
        "greedy_prompts": greedy_prompts,
        "greedy_completions": greedy_completions,
        "local_rollouts": local_rollouts,
        "prefix_lengths": prefix_lengths,
        "row_teachers": row_teachers,
        "logs": [entry for entry in trainer.state.log_history if "loss" in entry],
        "eval_rows": [entry for entry in trainer.state.log_history if "eval_math/mean_pass@1" in entry],
    }
    write_rank_report(args.out, rank, result, trainer.accelerator)
    return 0


if __name__ == "__main__":
    sys.exit(main())
