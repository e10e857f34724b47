"""The first GPU, in one command: CUDA, bf16 speed, FlashAttention-2 with the speculative engine's masked cache
columns, peak CUDA memory against the rollout memory preflight, and vLLM's hand-back after warmup.

Usage (from the repository root; drop `PYTHONPATH=.` once the package is installed with `pip install -e .`):

```bash
# One 80 GB GPU (H100 / A100), no Hub access: about 4 minutes, at most 8 (every check has its own time budget)
PYTHONPATH=. python scripts/gpu_check.py --output-dir outputs/gpu_check
# The same code paths on CPU at tiny sizes (what CI runs, so the script cannot rot): about half a minute
PYTHONPATH=. python scripts/gpu_check.py --dry-run --output-dir outputs/gpu_check_dry
# Rerun some checks only; a slower GPU gets longer budgets
PYTHONPATH=. python scripts/gpu_check.py --output-dir outputs/gpu_check --checks rollout_bench peak_memory --time-scale 2
```

Every model is built locally with random weights: a tiny pair written to disk (head_dim 64, Base/instruct stop ids,
lm_heads padded by 8 rows) and a Qwen3-1.7B-shaped student with a Qwen3-8B-shaped teacher at a quarter of their depth
(7 and 9 layers, the real widths and the real 151,936-row vocabulary). The checks, in order:

1. `gpu_tests`: the GPU-marked tests (`pytest -m gpu`), in a subprocess.
2. `rollout_bench`: `scripts/bench_rollout.py`'s `run_shape` on CUDA in bf16, quarter-depth Qwen3 pair: student
   alone, teacher alone, processor TRB (and epsilon = 0), speculative TRB at epsilon 0.02 / gamma 6 and 0.002 / gamma 16;
   batch 8 (the recipes' `rollout_generation_batch_size`) and batch 2 (where the speculative floors apply), 128 tokens.
3. `bf16_training_sdpa`, `bf16_training_flash_attention_2`: `TRBDistillTrainer` in bf16 on the tiny pair, 3 steps
   across the warmup boundary (K = 2), with each rollout engine (processor, speculative): finite losses, beta logged
   during warmup, epsilon 0 and no beta after, every parameter updated, the attention implementation really used;
   and the masked KV-cache columns the speculative engine leaves behind (rejected drafts) must not leak into the
   logits read through them. FlashAttention-2 is skipped when `flash_attn` is not installed.
4. `peak_memory`: `torch.cuda.max_memory_allocated` around every rollout of a short training run on the quarter-depth
   Qwen3 pair (both engines, constant epsilon) against the trainer's own `memory_preflight` estimate for the prompt
   length it really saw; fails if a measurement exceeds the estimate.
5. `vllm_colocate`: TRB warmup then the parent's colocated vLLM engine after warmup (skipped without `vllm`).

It writes `DIR/gpu_check.json` (everything, with the environment) and `DIR/gpu_check.md` (tables to paste into
docs/performance.md) after every check, so a crash keeps what ran. Exit code 1 if any check failed; a skipped check
(no FlashAttention-2, no vLLM) is not a failure. The benchmark's speed floors are reported, and fail the run only with
`--strict`. `--dry-run` runs the same functions on CPU at tiny sizes, bf16 where the code allows it (GPU tests are
collected, not run; the memory check computes the estimate only; vLLM and FlashAttention-2 are skipped).
"""

import argparse
import contextlib
import dataclasses
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path


for _name, _value in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("WANDB_MODE", "offline")):
    os.environ.setdefault(_name, _value)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]


def _load_bench_rollout():
    """`scripts/bench_rollout.py` as a module (scripts/ is no package): the bench's shapes and `run_shape` are reused."""
    if "bench_rollout" in sys.modules:
        return sys.modules["bench_rollout"]
    spec = importlib.util.spec_from_file_location("bench_rollout", Path(__file__).with_name("bench_rollout.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_rollout"] = module
    spec.loader.exec_module(module)
    return module


bench_rollout = _load_bench_rollout()

CHECKS = (
    "gpu_tests",
    "rollout_bench",
    "bf16_training_sdpa",
    "bf16_training_flash_attention_2",
    "peak_memory",
    "vllm_colocate",
)
SPECULATIVE = ("0.02:6", "0.002:16")  # EPS:GAMMA, as bench_rollout's --speculative
GIB = 2**30

_QWEN3 = bench_rollout.SHAPES["qwen3"]
# Qwen3-1.7B-shaped student and Qwen3-8B-shaped teacher at a quarter of their depth (28 -> 7, 36 -> 9 layers): the real
# widths, heads and vocabulary, so kernels, the 151,936-column blend and the KV layout are the real ones. 0.66B + 2.98B
# parameters (the embeddings and lm_heads are most of them at this depth): 7.3 GB of bf16 weights.
QUARTER_DEPTH = dataclasses.replace(
    _QWEN3,
    name="qwen3_quarter_depth",
    student=_QWEN3.student | {"num_layers": 7},
    teacher=_QWEN3.teacher | {"num_layers": 9},
)
# The dry run's stand-in: the same structure (tied student, untied teacher, GQA, shared vocabulary cut from padded
# lm_heads, Base/instruct stop ids) at toy sizes.
DRY_SHAPE = dataclasses.replace(
    _QWEN3,
    name="qwen3_dry",
    vocab_size=1024,
    shared_vocab=1000,
    student_eos=1,
    teacher_eos=[2, 1],
    student=dict(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate=128, tie=True),
    teacher=dict(num_layers=3, hidden_size=96, num_heads=6, num_kv_heads=2, head_dim=16, intermediate=192, tie=False),
    min_prompt=4,
    max_prompt=12,
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes and per-check time budgets (seconds) of one mode."""

    bench_shape: object  # bench_rollout.Shape
    bench_workloads: tuple  # (batch size, new tokens) per bench run
    bench_repeats: int
    train_steps: int
    train_warmup: int
    train_batch: int
    train_completion: int
    memory_shape: object
    memory_batch: int
    memory_completion: int
    memory_prompt_words: int
    memory_steps: int
    memory_engines: tuple
    budgets: dict


# Time on one H100 (the arithmetic behind the budgets; nothing here has run on a GPU yet, so the budgets carry about
# 2x margin over these guesses, and their sum, 450 s, plus ~30 s of imports stays within 8 minutes):
# - gpu_tests: pytest start + collecting the GPU-marked files ~10 s, CUDA init ~5 s, two tiny-model tests ~5 s: ~20 s.
# - rollout_bench: decoding at batch 2-8 is launch-bound, ~0.5 ms per layer and step plus ~2 ms of generate's own work:
#   student 7 layers ~5.5 ms, teacher 9 layers ~6.5 ms a token. 128 tokens: student 0.7 s, teacher 0.85 s, TRB ~1.7 s
#   (both + blend), epsilon 0 0.7 s, speculative 0.02/6 ~25 rounds x (7 x 5.5 + 7) ms ~1.1 s, 0.002/16 ~10 rounds x
#   (17 x 5.5 + 8) ms ~1.0 s: ~6 s a round, x 4 rounds (warm-up + 3 repeats) = 24 s per workload; two workloads and two
#   pair builds (3.6B parameters initialised on the GPU, ~5 s each): ~60 s.
# - bf16_training_*: trainer setup ~3 s + 3 steps x (64 tokens x ~8 ms + loss) ~2 s = ~9 s per engine, x 2 engines,
#   + the masked-columns probe (a few forwards) ~2 s: ~20 s each.
# - peak_memory: build the pair ~5 s, trainer ~3 s, 2 steps x (128 tokens x ~14 ms + loss ~0.5 s) ~5 s = ~13 s per
#   engine, x 2: ~26 s.
# - vllm_colocate: vLLM start (load, profile, compile, CUDA graphs) ~40-60 s + 3 steps ~5 s: ~60 s.
GPU_PLAN = Plan(
    bench_shape=QUARTER_DEPTH,
    bench_workloads=((8, 128), (2, 128)),
    bench_repeats=3,
    train_steps=3,
    train_warmup=2,
    train_batch=4,
    train_completion=64,
    memory_shape=QUARTER_DEPTH,
    memory_batch=8,
    memory_completion=128,
    memory_prompt_words=96,
    memory_steps=2,
    memory_engines=("processor", "speculative"),
    budgets={
        "gpu_tests": 60,
        "rollout_bench": 140,
        "bf16_training_sdpa": 45,
        "bf16_training_flash_attention_2": 45,
        "peak_memory": 60,
        "vllm_colocate": 100,
    },
)
# The dry run: every function at toy sizes on CPU (about 30 s on 2 cores); generous budgets, a slow CI runner is no bug.
DRY_PLAN = Plan(
    bench_shape=DRY_SHAPE,
    bench_workloads=((2, 16),),
    bench_repeats=1,
    train_steps=2,
    train_warmup=1,
    train_batch=4,
    train_completion=8,
    memory_shape=DRY_SHAPE,
    memory_batch=2,
    memory_completion=8,
    memory_prompt_words=8,
    memory_steps=1,
    memory_engines=("processor",),
    budgets=dict.fromkeys(CHECKS, 300),
)


class SkipCheck(Exception):
    """The check cannot run here (no CUDA, not installed); its figures may still say what was computed."""

    def __init__(self, reason: str, figures: dict | None = None):
        super().__init__(reason)
        self.figures = figures or {}


class CheckFailed(Exception):
    """A check that ran to the end and found something wrong; its figures are kept."""

    def __init__(self, reason: str, figures: dict):
        super().__init__(reason)
        self.figures = figures


class CheckTimeout(Exception):
    pass


@dataclasses.dataclass
class Context:
    device: torch.device
    dry_run: bool
    plan: Plan
    work_dir: Path
    strict: bool
    _pairs: dict = dataclasses.field(default_factory=dict)

    def pair(self, pad_rows: int) -> dict:
        """The tiny pair on disk (written once per `pad_rows`)."""
        if pad_rows not in self._pairs:
            self._pairs[pad_rows] = write_pair(self.work_dir / f"pair_pad{pad_rows}", pad_rows=pad_rows)
        return self._pairs[pad_rows]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True, help="Where gpu_check.json, gpu_check.md and work files go.")
    parser.add_argument(
        "--dry-run", action="store_true", help="Run every check's code on CPU at tiny sizes (no GPU needed)."
    )
    parser.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS), help="Checks to run (all).")
    parser.add_argument(
        "--time-scale", type=float, default=1.0, help="Multiply every check's time budget (a slower GPU: 2)."
    )
    parser.add_argument("--strict", action="store_true", help="A missed speed floor of the rollout bench fails it.")
    return parser


# ---------------------------------------------------------------------------------------------------------------------
# Shared pieces


def write_pair(output_dir: Path, *, pad_rows: int) -> dict:
    """A word tokenizer, a 2-layer student and a 3-layer teacher (head_dim 64, as FlashAttention-2 and vLLM's kernels
    expect), saved to `output_dir` with the tokenizer beside each model. The student stops on `<|endoftext|>`, the
    teacher on `<|im_end|>` first (Base/instruct); lm_heads have `pad_rows` rows beyond the tokenizer (Qwen3 has 267)."""
    from trb_trl.testing import END_OF_TEXT, IM_END, build_tiny_qwen3, build_word_tokenizer

    tokenizer = build_word_tokenizer([f"w{i}" for i in range(256)])
    vocab = len(tokenizer) + pad_rows
    eos, im_end = tokenizer.convert_tokens_to_ids([END_OF_TEXT, IM_END])
    student = build_tiny_qwen3(vocab, hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1, eos_token_id=eos)
    teacher = build_tiny_qwen3(
        vocab, hidden_size=256, num_layers=3, num_heads=4, num_kv_heads=2, eos_token_id=[im_end, eos], seed=1
    )
    paths = {name: str(output_dir / name) for name in ("tokenizer", "student", "teacher")}
    tokenizer.save_pretrained(paths["tokenizer"])
    for name, model in (("student", student), ("teacher", teacher)):
        model.to(torch.bfloat16).save_pretrained(paths[name])  # bf16 on disk, as checkpoints (and vLLM) expect
        tokenizer.save_pretrained(paths[name])
    return paths


def word_prompts(num_prompts: int, words: int = 3):
    from datasets import Dataset

    return Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": " ".join(f"w{(i + j) % 256}" for j in range(words))}]}
            for i in range(num_prompts)
        ]
    )


def run_args(ctx: Context, output_dir: Path, config_class=None, **overrides):
    """Training arguments of a short bf16 run: a few steps, no saving, no reporting."""
    from trb_trl import TRBDistillConfig
    from trb_trl._compat import HAS_ACTIVATION_CHECKPOINTING

    checkpointing = "activation_checkpointing" if HAS_ACTIVATION_CHECKPOINTING else "gradient_checkpointing"
    defaults = dict(
        output_dir=str(output_dir),
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        use_cpu=ctx.device.type == "cpu",
        bf16=True,
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        **{checkpointing: False},
    )
    return (config_class or TRBDistillConfig)(**(defaults | overrides))


def make_trainer(args, model, teacher_model, train_dataset, processing_class):
    """`TRBDistillTrainer` without the per-step log printing (the report has the figures)."""
    from transformers.trainer_callback import PrinterCallback

    from trb_trl import TRBDistillTrainer

    trainer = TRBDistillTrainer(
        model=model,
        teacher_model=teacher_model,
        args=args,
        train_dataset=train_dataset,
        processing_class=processing_class,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def step_logs(trainer) -> list[dict]:
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def warmup_problems(logs: list[dict], steps: int, warmup: int) -> list[str]:
    """What is wrong with a run's per-step logs: a missing step, a non-finite loss, no beta during warmup, a nonzero
    epsilon or a beta after it."""
    problems = []
    if len(logs) != steps:
        problems.append(f"{len(logs)} logged steps, expected {steps}")
    for step, entry in enumerate(logs):
        if not math.isfinite(entry["loss"]):
            problems.append(f"step {step}: loss {entry['loss']}")
        if step < warmup:
            if "trb/beta/mean" not in entry or not entry.get("trb/epsilon", 0.0) > 0.0:
                problems.append(f"step {step} (warmup): no beta or epsilon logged")
        elif entry.get("trb/epsilon") != 0.0 or "trb/beta/mean" in entry:
            problems.append(f"step {step} (after warmup): epsilon {entry.get('trb/epsilon')}, beta logged")
    return problems


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise `CheckTimeout` in the main thread after `seconds` (SIGALRM; no limit where there is none)."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise CheckTimeout(f"exceeded its time budget of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------------------------------------
# 1. The GPU-marked tests


def gpu_test_files() -> list[str]:
    """Test files that mark a test `gpu` (the marker conftest skips without CUDA)."""
    files = sorted((ROOT / "tests").rglob("test_*.py"))
    return [str(path.relative_to(ROOT)) for path in files if "mark.gpu" in path.read_text()]


def pytest_counts(output: str) -> dict:
    """The counts of pytest's summary line ("2 passed, 1 skipped, 350 deselected in 9.1s"; with --collect-only
    "2/352 tests collected (350 deselected)")."""
    counts = {}
    collected = re.findall(r"(\d+)(?:/\d+)? tests? collected", output)
    if collected:
        counts["collected"] = int(collected[-1])
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)\b", output):
        counts[word.rstrip("s") if word.startswith("error") else word] = int(number)
    return counts


def check_gpu_tests(ctx: Context) -> dict:
    files = gpu_test_files()
    if not files:
        raise RuntimeError("no test file marks a test `gpu`")
    run_them = ctx.device.type == "cuda"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", *files]
    if not run_them:
        command.append("--collect-only")
    environment = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=environment)
    output = completed.stdout + completed.stderr
    figures = {
        "command": " ".join(["python", *command[1:]]),
        "files": files,
        "returncode": completed.returncode,
        "counts": pytest_counts(output),
        "output_tail": output[-3000:],
    }
    if completed.returncode != 0:
        raise RuntimeError(f"pytest exited {completed.returncode}: {output.strip().splitlines()[-1:]}")
    counts = figures["counts"]
    if not run_them:
        if not counts.get("collected"):
            raise RuntimeError("no GPU-marked test was collected")
        raise SkipCheck(f"no CUDA: {counts['collected']} GPU-marked tests collected, not run", figures)
    if not counts.get("passed"):
        raise RuntimeError(f"no GPU test passed ({counts})")
    return figures


# ---------------------------------------------------------------------------------------------------------------------
# 2. The rollout bench in bf16


def check_rollout_bench(ctx: Context) -> dict:
    plan, runs, missed = ctx.plan, [], []
    for batch_size, new_tokens in plan.bench_workloads:
        arguments = ["--device", ctx.device.type, "--repeats", str(plan.bench_repeats), "--epsilon", "0.02"]
        arguments += ["--batch-size", str(batch_size), "--new-tokens", str(new_tokens), "--speculative", *SPECULATIVE]
        args = bench_rollout.make_parser().parse_args(arguments)
        result = bench_rollout.run_shape(plan.bench_shape, args, ctx.device)
        free_device_memory(ctx.device)
        runs.append(result)
        missed += [f"batch {batch_size}: {name}" for name, passed in result["pass"].items() if not passed]
    figures = {"shape": plan.bench_shape.name, "speculative": list(SPECULATIVE), "runs": runs, "missed_floors": missed}
    if missed and ctx.strict and ctx.device.type == "cuda":
        raise CheckFailed(f"speed floors missed: {', '.join(missed)}", figures)
    return figures


# ---------------------------------------------------------------------------------------------------------------------
# 3. bf16 training across the warmup boundary, per attention implementation and rollout engine


def train_across_warmup(ctx: Context, attn: str, engine: str) -> tuple[dict, list[str]]:
    """A short bf16 TRB run on the tiny pair; its figures and what went wrong."""
    from transformers import AutoTokenizer

    plan, pair = ctx.plan, ctx.pair(pad_rows=8)
    init = {"dtype": "bfloat16", "attn_implementation": attn}
    args = run_args(
        ctx,
        ctx.work_dir / f"train_{attn}_{engine}",
        max_steps=plan.train_steps,
        per_device_train_batch_size=plan.train_batch,
        max_completion_length=plan.train_completion,
        trb_epsilon=0.05,
        trb_warmup_steps=plan.train_warmup,
        trb_rollout_engine=engine,
        trb_draft_length=6,
        # Pure bf16 (no fp32 master weights): an update below half a unit in the last place is lost, 0.004 for the
        # RMSNorm scales at 1.0, so the learning rate is large enough for every parameter to move.
        learning_rate=1e-2,
        model_init_kwargs=init,
        teacher_model_init_kwargs=dict(init),
    )
    trainer = make_trainer(
        args,
        pair["student"],
        pair["teacher"],
        word_prompts(plan.train_batch * plan.train_steps),
        AutoTokenizer.from_pretrained(pair["tokenizer"]),
    )
    problems = []
    for role, model in (("student", trainer.model), ("teacher", trainer.teacher_model)):
        model = trainer.accelerator.unwrap_model(model)
        used = model.config._attn_implementation
        if used != attn or next(model.parameters()).dtype != torch.bfloat16:
            problems.append(f"{role}: attention {used}, dtype {next(model.parameters()).dtype}")
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    free_device_memory(ctx.device)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logs = step_logs(trainer)
    problems += warmup_problems(logs, plan.train_steps, plan.train_warmup)
    unchanged = [name for name, p in trainer.model.named_parameters() if torch.equal(p, before[name])]
    if unchanged:
        problems.append(f"{len(unchanged)} of {len(before)} parameters unchanged (first: {unchanged[0]})")
    keys = ("loss", "trb/epsilon", "trb/beta/mean", "trb/kl_to_student/max", "step_time")
    keys += ("trb/rollout_teacher_seconds", "trb/speculative/teacher_forwards_per_token")
    figures = {
        "attn_implementation": attn,
        "engine": engine,
        "train_seconds": seconds,
        "steps": [{key: entry[key] for key in keys if key in entry} for entry in logs],
    }
    if ctx.device.type == "cuda":
        figures["peak_memory_bytes"] = torch.cuda.max_memory_allocated(ctx.device)
    del trainer, before
    free_device_memory(ctx.device)
    return figures, problems


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _read_block(model, prompt, prompt_mask, block, junk=None, junk_mask=None) -> torch.Tensor:
    """Logits of `block` read through a KV cache of the prompt, then of `junk` (written attended, then masked with
    `junk_mask` for the block), at the block's positions without the junk: as the speculative engine reads a block
    after rejected drafts."""
    from trb_trl.rollout.cached_forward import forward_with_cache

    columns = block.shape[1]
    ones = torch.ones_like(block)
    block_positions = _positions(torch.cat([prompt_mask, ones], dim=1))[:, -columns:]
    _, cache = forward_with_cache(
        model, None, input_ids=prompt, attention_mask=prompt_mask, position_ids=_positions(prompt_mask)
    )
    mask = prompt_mask
    if junk is not None:
        mask = torch.cat([prompt_mask, ones], dim=1)
        junk_positions = _positions(mask)[:, -columns:]
        _, cache = forward_with_cache(model, cache, input_ids=junk, attention_mask=mask, position_ids=junk_positions)
        mask = torch.cat([prompt_mask, junk_mask], dim=1)
    mask = torch.cat([mask, ones], dim=1)
    outputs, _ = forward_with_cache(model, cache, input_ids=block, attention_mask=mask, position_ids=block_positions)
    return outputs.logits.float()


def masked_cache_columns(ctx: Context, attn: str, columns: int = 6) -> tuple[dict, list[str]]:
    """The speculative engine leaves rejected drafts in both KV caches as masked columns (zeros in the 2-D attention
    mask between the prompt and the next block). For each model of the pair in bf16 with `attn`, the logits of a block
    of `columns` tokens read through a cache that holds `columns` masked junk columns, against one uncached forward of
    prompt + block: max |difference| (`masked`), next to the same read without junk (`clean`, the kernel's own noise)
    and with the junk attended (`attended`, what a kernel that ignored the mask would give). Masked columns that leak
    a tenth of `attended` are a failure (on CPU in bf16 with SDPA: masked ~0.005-0.008, attended ~0.8-1.1)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pair = ctx.pair(pad_rows=8)
    tokenizer = AutoTokenizer.from_pretrained(pair["tokenizer"])
    texts = ["w1 w2 w3 w4 w5 w6 w7 w8 w9", "w10", "w11 w12 w13", "w14 w15 w16 w17 w18 w19"]  # left padded
    batch = tokenizer(texts, return_tensors="pt", padding=True).to(ctx.device)
    prompt, prompt_mask = batch["input_ids"], batch["attention_mask"]
    generator = torch.Generator().manual_seed(0)
    block, junk = torch.randint(3, len(tokenizer), (2, len(texts), columns), generator=generator).to(ctx.device)
    full_mask = torch.cat([prompt_mask, torch.ones_like(block)], dim=1)
    figures, problems = {"attn_implementation": attn, "columns": columns}, []
    for role in ("student", "teacher"):
        model = AutoModelForCausalLM.from_pretrained(pair[role], dtype=torch.bfloat16, attn_implementation=attn)
        model = model.to(ctx.device).eval()
        with torch.no_grad():
            inputs = dict(attention_mask=full_mask, position_ids=_positions(full_mask))
            reference = model(input_ids=torch.cat([prompt, block], dim=1), **inputs).logits[:, -columns:].float()
            reads = {
                "clean": _read_block(model, prompt, prompt_mask, block),
                "masked": _read_block(model, prompt, prompt_mask, block, junk, torch.zeros_like(block)),
                "attended": _read_block(model, prompt, prompt_mask, block, junk, torch.ones_like(block)),
            }
        errors = {name: (logits - reference).abs().max().item() for name, logits in reads.items()}
        figures[role] = errors
        if not errors["masked"] <= 0.1 * errors["attended"]:
            problems.append(f"{role}: masked cache columns leak into the block's logits ({errors})")
        del model
    free_device_memory(ctx.device)
    return figures, problems


def bf16_training(ctx: Context, attn: str) -> dict:
    runs, problems = [], []
    for engine in ("processor", "speculative"):
        try:
            figures, found = train_across_warmup(ctx, attn, engine)
        except CheckTimeout:
            raise
        except Exception as error:  # the other engine still runs
            figures, found = {"attn_implementation": attn, "engine": engine}, [f"{type(error).__name__}: {error}"]
            figures["traceback"] = traceback.format_exc()
        runs.append(figures | {"problems": found})
        problems += [f"{engine}: {problem}" for problem in found]
    try:
        columns, found = masked_cache_columns(ctx, attn)
    except CheckTimeout:
        raise
    except Exception as error:
        columns, found = (
            {"traceback": traceback.format_exc()},
            [f"masked cache columns: {type(error).__name__}: {error}"],
        )
    problems += found
    figures = {"runs": runs, "masked_cache_columns": columns}
    if problems:
        raise CheckFailed("; ".join(problems), figures)
    return figures


def check_bf16_training_sdpa(ctx: Context) -> dict:
    return bf16_training(ctx, "sdpa")


def check_bf16_training_flash_attention_2(ctx: Context) -> dict:
    if ctx.device.type != "cuda":
        raise SkipCheck("no CUDA: FlashAttention-2 runs on GPUs only")
    if importlib.util.find_spec("flash_attn") is None:
        raise SkipCheck("flash_attn is not installed")
    return bf16_training(ctx, "flash_attention_2")


# ---------------------------------------------------------------------------------------------------------------------
# 4. Peak CUDA memory of training rollouts against the preflight's estimate


def memory_pair(ctx: Context, shape) -> tuple:
    """The shape's student and teacher built in bf16 on the device (random weights), and the word tokenizer: its
    vocabulary is cut from the models' lm_heads as Qwen3's is from its padded 151,936 rows."""
    from trb_trl.testing import END_OF_TEXT, IM_END, build_word_tokenizer

    tokenizer = build_word_tokenizer([f"w{i}" for i in range(256)])
    eos, im_end = tokenizer.convert_tokens_to_ids([END_OF_TEXT, IM_END])
    torch.manual_seed(0)
    student = bench_rollout.build_qwen3(shape.student, shape.vocab_size, eos, ctx.device)
    teacher = bench_rollout.build_qwen3(shape.teacher, shape.vocab_size, [im_end, eos], ctx.device)
    return student, teacher, tokenizer


def measure_rollout_memory(ctx: Context, engine: str) -> dict:
    """Train `memory_steps` steps at a constant epsilon (every rollout teacher-guided) and record the peak allocated
    memory of each rollout, then the trainer's own preflight estimate for the widest prompt it saw."""
    plan = ctx.plan
    student, teacher, tokenizer = memory_pair(ctx, plan.memory_shape)
    args = run_args(
        ctx,
        ctx.work_dir / f"memory_{engine}",
        max_steps=plan.memory_steps,
        per_device_train_batch_size=plan.memory_batch,
        max_completion_length=plan.memory_completion,
        trb_epsilon=0.02,
        trb_schedule="constant",
        trb_rollout_engine=engine,
        trb_draft_length=6,
        learning_rate=1e-5,
    )
    trainer = make_trainer(
        args,
        student,
        teacher,
        word_prompts(plan.memory_batch * plan.memory_steps, words=plan.memory_prompt_words),
        tokenizer,
    )
    del student, teacher
    rollouts, original = [], trainer._generate_single_turn
    cuda = ctx.device.type == "cuda"

    def measured(prompt_ids, *args, **kwargs):
        if cuda:
            torch.cuda.synchronize(ctx.device)
            torch.cuda.reset_peak_memory_stats(ctx.device)
        before = torch.cuda.memory_allocated(ctx.device) if cuda else None
        output = original(prompt_ids, *args, **kwargs)
        if cuda:
            torch.cuda.synchronize(ctx.device)
        rollouts.append(
            {
                "step": trainer.state.global_step,
                "sequences": len(prompt_ids),
                "prompt_tokens": max(len(ids) for ids in prompt_ids),
                "allocated_before_bytes": before,
                "peak_bytes": torch.cuda.max_memory_allocated(ctx.device) if cuda else None,
            }
        )
        return output

    trainer._generate_single_turn = measured
    free_device_memory(ctx.device)
    trainer.train()
    losses = [entry["loss"] for entry in step_logs(trainer)]
    prompt_tokens = max(rollout["prompt_tokens"] for rollout in rollouts)
    device_bytes = torch.cuda.get_device_properties(ctx.device).total_memory if cuda else 0
    estimates = trainer._rollout_memory_estimates(device_bytes, prompt_tokens=prompt_tokens)
    estimate = max(estimates, key=lambda e: e.total)
    figures = {
        "engine": engine,
        "shape": plan.memory_shape.name,
        "losses": losses,
        "rollouts": rollouts,
        "estimate": {
            "phase": estimate.phase,
            "total_bytes": estimate.total,
            "student_weights_bytes": estimate.student_weights,
            "teacher_weights_bytes": estimate.teacher_weights,
            "training_state_bytes": estimate.training_state,
            "kv_cache_bytes": estimate.student_kv_cache + estimate.teacher_kv_cache,
            "arithmetic": estimate.lines,
        },
    }
    trainer = None  # free the pair before the next engine (the spy above holds a reference to the name only)
    free_device_memory(ctx.device)
    if not all(math.isfinite(loss) for loss in losses):
        raise CheckFailed(f"{engine}: non-finite loss {losses}", figures)
    if cuda:
        peak = max(rollouts, key=lambda rollout: rollout["peak_bytes"])
        figures["measured_peak_bytes"] = peak["peak_bytes"]
        figures["measured_over_estimate"] = peak["peak_bytes"] / estimate.total
        # What the rollout itself added (caches, logits, blend temporaries) against the KV caches the estimate counts.
        figures["rollout_increment_bytes"] = peak["peak_bytes"] - peak["allocated_before_bytes"]
    return figures


def check_peak_memory(ctx: Context) -> dict:
    runs = [measure_rollout_memory(ctx, engine) for engine in ctx.plan.memory_engines]
    figures = {"runs": runs}
    if ctx.device.type != "cuda":
        totals = ", ".join(f"{run['engine']} {run['estimate']['total_bytes'] / GIB:.3f} GiB" for run in runs)
        raise SkipCheck(f"no CUDA: estimate only ({totals})", figures)
    over = [run for run in runs if run["measured_peak_bytes"] > run["estimate"]["total_bytes"]]
    if over:
        detail = ", ".join(f"{run['engine']} x{run['measured_over_estimate']:.2f}" for run in over)
        raise CheckFailed(f"measured peak above the preflight's estimate: {detail}", figures)
    return figures


# ---------------------------------------------------------------------------------------------------------------------
# 5. A colocated vLLM engine takes the rollouts over after warmup


def check_vllm_colocate(ctx: Context) -> dict:
    if ctx.device.type != "cuda":
        raise SkipCheck("no CUDA: a colocated vLLM engine needs a GPU")
    if importlib.util.find_spec("vllm") is None:
        raise SkipCheck("vllm is not installed")
    from transformers import AutoTokenizer

    plan = ctx.plan
    pair = ctx.pair(pad_rows=0)  # vLLM samples every lm_head row; padded rows would be ids the tokenizer cannot decode
    args = run_args(
        ctx,
        ctx.work_dir / "vllm_colocate",
        max_steps=plan.train_steps,
        per_device_train_batch_size=plan.train_batch,
        max_completion_length=plan.train_completion,
        trb_epsilon=0.05,
        trb_warmup_steps=plan.train_warmup,
        use_vllm=True,
        vllm_mode="colocate",
        vllm_gpu_memory_utilization=0.3,
        vllm_max_model_length=512,
        model_init_kwargs={"dtype": "bfloat16"},
        teacher_model_init_kwargs={"dtype": "bfloat16"},
    )
    start = time.perf_counter()
    trainer = make_trainer(
        args,
        pair["student"],
        pair["teacher"],
        word_prompts(plan.train_batch * plan.train_steps),
        AutoTokenizer.from_pretrained(pair["tokenizer"]),
    )
    setup_seconds = time.perf_counter() - start
    vllm_steps, generation = [], trainer.vllm_generation
    original = generation.generate

    def spy(*args, **kwargs):
        vllm_steps.append(trainer.state.global_step)
        return original(*args, **kwargs)

    generation.generate = spy
    start = time.perf_counter()
    trainer.train()
    logs = step_logs(trainer)
    figures = {
        "setup_seconds": setup_seconds,
        "train_seconds": time.perf_counter() - start,
        "vllm_generate_steps": vllm_steps,
        "steps": [{key: entry.get(key) for key in ("loss", "trb/epsilon", "trb/beta/mean")} for entry in logs],
    }
    problems = warmup_problems(logs, plan.train_steps, plan.train_warmup)
    expected = list(range(plan.train_warmup, plan.train_steps))
    if sorted(set(vllm_steps)) != expected:
        problems.append(f"vLLM generated at steps {vllm_steps}, expected {expected} (after warmup only)")
    trainer = generation = None
    free_device_memory(ctx.device)
    if problems:
        raise CheckFailed("; ".join(problems), figures)
    return figures


# ---------------------------------------------------------------------------------------------------------------------
# Running and reporting


def run_check(name: str, ctx: Context, budget: float) -> dict:
    """One check under its time budget: {name, status, reason, seconds, budget_seconds, figures}."""
    function = globals()[f"check_{name}"]
    record = {"name": name, "status": "passed", "reason": None, "budget_seconds": budget, "figures": {}}
    start = time.perf_counter()
    try:
        with time_limit(budget):
            record["figures"] = function(ctx)
    except SkipCheck as skip:
        record.update(status="skipped", reason=str(skip), figures=skip.figures)
    except CheckFailed as failure:
        record.update(status="failed", reason=str(failure), figures=failure.figures)
    except Exception as error:  # a failed check is recorded; the others still run
        record.update(status="failed", reason=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
    record["seconds"] = time.perf_counter() - start
    with contextlib.suppress(Exception):
        free_device_memory(ctx.device)
    return record


def environment(device: torch.device, dry_run: bool) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    info = {
        "dry_run": dry_run,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else bench_rollout.cpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
    }
    for package in ("trl", "trb-trl", "accelerate", "flash-attn", "vllm"):
        info[package] = installed(package)
    if device.type == "cuda":
        info["device_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    info["cpu_count"] = os.cpu_count()
    return info


def summary(record: dict) -> str:
    """One line of figures for the overview table."""
    figures, name = record["figures"], record["name"]
    if record["status"] != "passed":
        return (record["reason"] or "").replace("|", "/").replace("\n", " ")[:300]
    if name == "gpu_tests":
        return ", ".join(f"{count} {word}" for word, count in figures["counts"].items())
    if name == "rollout_bench":
        parts = []
        for run in figures["runs"]:
            ratios = run["ratios"]
            parts.append(
                f"batch {run['shape']['batch_size']}: TRB/(S+T) {ratios['trb_over_student_plus_teacher']:.2f}, "
                + ", ".join(
                    f"{key.removesuffix('_over_student')}/S {value:.2f}"
                    for key, value in ratios.items()
                    if key.startswith("spec")
                )
            )
        return "; ".join(parts)
    if name.startswith("bf16_training"):
        columns = figures["masked_cache_columns"]
        leak = max(columns[role]["masked"] / columns[role]["attended"] for role in ("student", "teacher"))
        times = ", ".join(f"{run['engine']} {run['train_seconds']:.1f} s" for run in figures["runs"])
        return f"{times}; masked cache columns leak {leak:.3f} of attended"
    if name == "peak_memory":
        return ", ".join(
            f"{run['engine']} {run['measured_peak_bytes'] / GIB:.2f} of {run['estimate']['total_bytes'] / GIB:.2f} GiB"
            for run in figures["runs"]
        )
    if name == "vllm_colocate":
        return f"vLLM at steps {figures['vllm_generate_steps']}, setup {figures['setup_seconds']:.0f} s"
    return ""


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"## gpu_check: {env['device']}{' (dry run)' if env['dry_run'] else ''}",
        "",
        f"`{report['command']}`, {report['started']}, {report['wall_seconds']:.0f} s wall; torch {env['torch']} "
        f"(CUDA {env['cuda']}), transformers {env['transformers']}, trl {env['trl']}, flash-attn {env['flash-attn']}, "
        f"vllm {env['vllm']}.",
        "",
        "| check | status | seconds (budget) | figures |",
        "|---|---|---|---|",
    ]
    for record in report["checks"]:
        lines.append(
            f"| {record['name']} | {record['status']} | {record['seconds']:.1f} ({record['budget_seconds']:.0f}) | "
            f"{summary(record)} |"
        )
    for record in report["checks"]:
        detail = DETAILS.get(record["name"].removesuffix("_sdpa").removesuffix("_flash_attention_2"))
        if detail and record["figures"].get("runs"):
            lines += ["", f"### {record['name']}", "", *detail(record["figures"])]
    return "\n".join(lines) + "\n"


def _bench_detail(figures: dict) -> list[str]:
    lines = []
    for run in figures["runs"]:
        shape = run["shape"]
        lines += [
            f"{shape['name']}, batch {shape['batch_size']}, {shape['new_tokens']} new tokens, {shape['dtype']}:",
            "",
            "| variant | median s | tokens/s | peak GiB | acceptance | tokens / teacher forward |",
            "|---|---|---|---|---|---|",
        ]
        for variant, seconds in run["median_seconds"].items():
            peak = run.get("peak_memory_bytes", {}).get(variant)
            spec = run["speculative"].get(variant)
            speculation = (
                "| | |"
                if spec is None
                else (f"| {spec['acceptance_rate']:.3f} | {spec['tokens_per_teacher_forward']:.2f} |")
            )
            lines.append(
                f"| {variant} | {seconds:.4f} | {run['tokens_per_second'][variant]:.0f} | "
                f"{'n/a' if peak is None else f'{peak / GIB:.2f}'} {speculation}"
            )
        ratios = ", ".join(
            f"{key} {value:.3f}{'' if run['pass'].get(key, True) else ' (floor missed)'}"
            for key, value in run["ratios"].items()
        )
        lines += ["", f"Ratios: {ratios}; blend {1e3 * run['blend_seconds_per_step_median']:.2f} ms/step.", ""]
    return lines


def _joined(values, spec: str) -> str:
    return ", ".join(format(value, spec) for value in values)


def _training_detail(figures: dict) -> list[str]:
    lines = [
        "| engine | train s | s/step | losses | beta (warmup) | epsilon | peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    nan = float("nan")
    for run in figures["runs"]:
        steps, peak = run.get("steps", []), run.get("peak_memory_bytes")
        lines.append(
            f"| {run['engine']} | {run.get('train_seconds', nan):.1f} | "
            f"{_joined((step.get('step_time', nan) for step in steps), '.2f')} | "
            f"{_joined((step['loss'] for step in steps), '.4f')} | "
            f"{_joined((step['trb/beta/mean'] for step in steps if 'trb/beta/mean' in step), '.3f')} | "
            f"{_joined((step.get('trb/epsilon', nan) for step in steps), 'g')} | "
            f"{'n/a' if peak is None else f'{peak / GIB:.2f}'} |"
        )
    columns = figures.get("masked_cache_columns")
    if columns and "columns" in columns:
        lines += [
            "",
            f"Masked KV-cache columns ({columns['columns']} junk columns, max |logit error| against one uncached "
            "forward): "
            + "; ".join(
                f"{role} clean {columns[role]['clean']:.4f}, masked {columns[role]['masked']:.4f}, attended "
                f"{columns[role]['attended']:.4f}"
                for role in ("student", "teacher")
                if role in columns
            )
            + ".",
        ]
    return lines


def _memory_detail(figures: dict) -> list[str]:
    lines = [
        "| engine | prompt tokens | measured peak GiB | estimate GiB | measured / estimate | rollout increment GiB | "
        "estimated KV GiB | estimated training state GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in figures["runs"]:
        estimate, measured = run["estimate"], run.get("measured_peak_bytes")
        prompt = max(rollout["prompt_tokens"] for rollout in run["rollouts"])

        def gib(value):
            return "n/a" if value is None else f"{value / GIB:.3f}"

        ratio = run.get("measured_over_estimate")
        lines.append(
            f"| {run['engine']} | {prompt} | {gib(measured)} | {gib(estimate['total_bytes'])} | "
            f"{'n/a' if ratio is None else f'{ratio:.3f}'} | {gib(run.get('rollout_increment_bytes'))} | "
            f"{gib(estimate['kv_cache_bytes'])} | {gib(estimate['training_state_bytes'])} |"
        )
    return lines


DETAILS = {"rollout_bench": _bench_detail, "bf16_training": _training_detail, "peak_memory": _memory_detail}


def write_report(report: dict, output_dir: Path) -> None:
    (output_dir / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (output_dir / "gpu_check.md").write_text(markdown(report))


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("CUDA is not available; run with --dry-run to exercise the checks on CPU.")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.dry_run else "cuda")
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    ctx = Context(device, args.dry_run, plan, output_dir / "work", args.strict)
    ctx.work_dir.mkdir(exist_ok=True)
    report = {
        "command": " ".join(["python", "scripts/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "environment": environment(device, args.dry_run),
        "plan": dataclasses.asdict(plan)
        | {"bench_shape": plan.bench_shape.name, "memory_shape": plan.memory_shape.name},
        "checks": [],
        "wall_seconds": 0.0,
    }
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    try:
        for name in (name for name in CHECKS if name in args.checks):
            print(f"[gpu_check] {name} ...", flush=True)
            record = run_check(name, ctx, plan.budgets[name] * args.time_scale)
            print(
                f"[gpu_check] {name}: {record['status']} in {record['seconds']:.1f} s"
                + (f" ({record['reason']})" if record["reason"] else ""),
                flush=True,
            )
            report["checks"].append(record)
            report["wall_seconds"] = time.perf_counter() - start
            write_report(report, output_dir)  # after every check: a crash keeps what ran
    finally:
        transformers.logging.set_verbosity(verbosity)
    failed = [record["name"] for record in report["checks"] if record["status"] == "failed"]
    print(f"[gpu_check] wrote {output_dir / 'gpu_check.json'} and gpu_check.md; {len(failed)} failed {failed or ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
