"""Rollout cost of TRB: student-only, teacher-only, TRB, epsilon = 0 and speculative TRB, on identical prompts.

Usage (from the repository root; drop `PYTHONPATH=.` once the package is installed with `pip install -e .`):

```bash
# CPU: tiny Qwen3 pair (V = 4096, batch 16, 48 new tokens); about 30 s on 2 idle cores
PYTHONPATH=. python scripts/bench_rollout.py --json bench_cpu.json
# CPU shared with other jobs: a smaller workload on one thread (the setting docs/performance.md records)
PYTHONPATH=. python scripts/bench_rollout.py --threads 1 --batch-size 8 --new-tokens 32 --repeats 3 --json bench_cpu.json

# GPU: the tiny pair, then a Qwen3-1.7B-shaped student with a Qwen3-8B-shaped teacher (random weights, bf16, batch 64)
PYTHONPATH=. python scripts/bench_rollout.py --device cuda --json bench_gpu.json
PYTHONPATH=. python scripts/bench_rollout.py --device cuda --shapes qwen3 --strict

# No timing: bytes read per decoding step and KV-cache sizes of the Qwen3 pair for the 1.7B <- 8B recipe (instant)
PYTHONPATH=. python scripts/bench_rollout.py --arithmetic --json bench_arithmetic.json

# Speculative TRB against its floors (batch 2, 96 tokens, one thread: the overhead-bound CPU proxy of GPU decoding)
PYTHONPATH=. python scripts/bench_rollout.py --threads 1 --batch-size 2 --new-tokens 96 --repeats 7 --json bench_spec.json
```

Every variant generates exactly the same number of tokens from the same left-padded prompts
(`min_new_tokens == max_new_tokens`, sampling at temperature 1.0, no top-k/top-p). After one warm-up of each variant,
the variants run round-robin for `--repeats` rounds; medians are reported with two ratios and the spec's floors:

- TRB / (student + teacher) <= 1.10: blending adds little beyond running both models;
- (epsilon = 0) / student <= 1.02: a processor at epsilon = 0 costs nothing (it never calls the teacher);
- speculative TRB / student <= 2.0 at epsilon = 0.02 and <= 1.6 at epsilon = 0.002, checked at batch <= 2 only
  (`--speculative EPS:GAMMA ...` picks the variants, default 0.02:6, 0.002:12 and 0.002:16, `EPS:GAMMA:adaptive`
  lets the engine choose gamma <= GAMMA per round; `--speculative` alone runs none).
  Their acceptance rate and tokens per teacher forward are printed too, and on CPU the share of the two models'
  forwards alone (the part no engine overhead can remove) next to that of the blend, sampling and bookkeeping.

It also reports the teacher's forward time inside TRB, one `trust_region_blend` call timed alone on random logits of
the same shape, peak CUDA memory per variant on a GPU, and (Linux) how much CPU other processes used meanwhile: CPU
timings taken on a busy machine are meaningless. PASS/FAIL against the floors is printed; the exit code is 0 either
way unless `--strict`. `--json PATH` writes everything, with the command and the environment.

`--arithmetic` times nothing: it counts the Qwen3 pair's parameters on the meta device and prints the bytes a
memory-bound decoding step reads (weights once per step, plus the KV cache at the mean context), per generated token,
for student-only rollouts and TRB warmup rollouts at the recipe's chunking, and the KV cache one `generate` chunk holds.
"""

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import transformers
from transformers import DynamicCache, LogitsProcessorList, Qwen3Config, Qwen3ForCausalLM

from trb_trl import TrustRegionBlendingProcessor, trust_region_blend
from trb_trl.rollout import SpeculativeBlendingSampler
from trb_trl.rollout.cached_forward import forward_with_cache
from trb_trl.testing import build_tiny_qwen3


VARIANTS = ("student", "teacher", "trb", "trb_eps0")
TRB_FLOOR = 1.10  # TRB <= 1.10 x (student + teacher)
EPS0_FLOOR = 1.02  # epsilon = 0 <= 1.02 x student
# Speculative TRB <= floor x student, at batch <= SPECULATIVE_FLOOR_BATCH (the overhead-bound CPU proxy of GPU decoding).
SPECULATIVE_FLOORS = {0.02: 2.0, 0.002: 1.6}
SPECULATIVE_FLOOR_BATCH = 2
PAD_ID = 0


@dataclass
class Shape:
    """One student/teacher pair and its workload. The student stops on `student_eos`, the teacher first on another id
    (a Base student and an instruct teacher), which exercises the processor's stop-mass mapping."""

    name: str
    vocab_size: int  # lm_head rows of both models
    shared_vocab: int  # len(tokenizer), passed to the processor as `vocab_size`
    student_eos: int
    teacher_eos: list[int]
    student: dict
    teacher: dict
    batch_size: int
    new_tokens: int
    min_prompt: int
    max_prompt: int
    dtype: str


SHAPES = {
    "tiny": Shape(
        name="tiny",
        vocab_size=4096,
        shared_vocab=4096,
        student_eos=1,
        teacher_eos=[2, 1],
        student=dict(num_layers=4, hidden_size=256, num_heads=4, num_kv_heads=2),
        teacher=dict(num_layers=8, hidden_size=512, num_heads=8, num_kv_heads=4),
        batch_size=16,
        new_tokens=48,
        min_prompt=8,
        max_prompt=24,
        dtype="float32",
    ),
    "qwen3": Shape(
        name="qwen3",
        vocab_size=151936,
        shared_vocab=151669,  # len(Qwen3 tokenizer); lm_head rows beyond it are padding
        student_eos=151643,  # <|endoftext|>
        teacher_eos=[151645, 151643],  # <|im_end|>, <|endoftext|>
        # Qwen3-1.7B-shaped student, Qwen3-8B-shaped teacher.
        # Qwen3-1.7B ties its lm_head to the embedding; Qwen3-8B does not.
        student=dict(
            num_layers=28, hidden_size=2048, num_heads=16, num_kv_heads=8, head_dim=128, intermediate=6144, tie=True
        ),
        teacher=dict(
            num_layers=36, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128, intermediate=12288, tie=False
        ),
        batch_size=64,
        new_tokens=128,
        min_prompt=32,
        max_prompt=128,
        dtype="bfloat16",
    ),
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda.")
    parser.add_argument(
        "--shapes",
        nargs="+",
        choices=sorted(SHAPES),
        default=None,
        help="Model pairs to run. Defaults to tiny on CPU, tiny and qwen3 on CUDA.",
    )
    parser.add_argument("--repeats", type=int, default=5, help="Timed rounds after the warm-up (round-robin).")
    parser.add_argument("--epsilon", type=float, default=0.02, help="KL budget of the TRB variant.")
    parser.add_argument("--batch-size", type=int, default=None, help="Override every shape's batch size.")
    parser.add_argument("--new-tokens", type=int, default=None, help="Override every shape's generation length.")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's own). 1 is steadier on a CPU that other jobs share.",
    )
    parser.add_argument(
        "--speculative",
        nargs="*",
        default=["0.02:6", "0.002:12", "0.002:16"],
        metavar="EPS:GAMMA",
        help="Speculative TRB variants, each a KL budget and a draft length, EPS:GAMMA[:adaptive] (default: 0.02:6 0.002:12 "
        "0.002:16); none if empty.",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="Write all results here.")
    parser.add_argument("--strict", action="store_true", help="Exit 1 when a floor is not met.")
    arithmetic = parser.add_argument_group("--arithmetic (no timing; the 1.7B <- 8B recipe by default)")
    arithmetic.add_argument(
        "--arithmetic", action="store_true", help="Print the memory-traffic and KV-cache arithmetic of the qwen3 pair."
    )
    arithmetic.add_argument("--prompt-tokens", type=int, default=1024, help="Prompt length (1024).")
    arithmetic.add_argument("--completion-tokens", type=int, default=7168, help="max_completion_length (7168).")
    arithmetic.add_argument(
        "--chunk", type=int, default=8, help="Sequences per TRB generate call, rollout_generation_batch_size (8)."
    )
    arithmetic.add_argument(
        "--generation-batch",
        type=int,
        default=32,
        help="Sequences per GPU per rollout, per_device_train_batch_size x gradient_accumulation_steps (32).",
    )
    arithmetic.add_argument(
        "--bandwidth-tbps", type=float, default=3.35, help="Memory bandwidth for the time floors (H100 SXM: 3.35)."
    )
    arithmetic.add_argument(
        "--count-ops",
        action="store_true",
        help="With --arithmetic: also count the operators a decoding step dispatches (student, teacher, blend); "
        "about half a minute on CPU.",
    )
    return parser


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_pair(shape: Shape, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    if shape.name == "tiny":
        student = build_tiny_qwen3(shape.vocab_size, eos_token_id=shape.student_eos, seed=0, **shape.student)
        teacher = build_tiny_qwen3(shape.vocab_size, eos_token_id=shape.teacher_eos, seed=1, **shape.teacher)
        return student.to(device), teacher.to(device)
    student = build_qwen3(shape.student, shape.vocab_size, shape.student_eos, device)
    teacher = build_qwen3(shape.teacher, shape.vocab_size, shape.teacher_eos, device)
    return student, teacher


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def qwen3_config(spec: dict, vocab_size: int, eos_token_id) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_kv_heads"],
        head_dim=spec["head_dim"],
        max_position_embeddings=8192,
        tie_word_embeddings=spec.get("tie", False),
        eos_token_id=eos_token_id,
        pad_token_id=PAD_ID,
        bos_token_id=None,
    )


def build_qwen3(spec: dict, vocab_size: int, eos_token_id, device: torch.device) -> Qwen3ForCausalLM:
    """A random-weight Qwen3 built directly on `device` with bf16 parameters (no download, no float32 copy; the
    rotary buffers stay float32 as with `from_pretrained(dtype=torch.bfloat16)`)."""
    config = qwen3_config(spec, vocab_size, eos_token_id)
    with device, default_dtype(torch.bfloat16):
        model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = PAD_ID
    return model.eval()


def decode_traffic(spec: dict, vocab_size: int) -> dict:
    """Parameters of a Qwen3 of this shape (counted on the meta device: no memory), the bytes of weights a decoding
    step reads (bf16), and KV-cache bytes per token. A step reads every weight once for the whole batch; the input
    embedding is a gather of one row per sequence, so an untied model's embedding matrix is not read, while a tied one
    reads it in full as the lm_head."""
    config = qwen3_config(spec, vocab_size, eos_token_id=None)
    with torch.device("meta"):
        model = Qwen3ForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    embedding = model.get_input_embeddings().weight.numel()
    read_per_step = params if config.tie_word_embeddings else params - embedding
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
    return {"params": params, "weight_bytes_read_per_step": 2 * read_per_step, "kv_bytes_per_token": kv_per_token}


def arithmetic(args) -> dict:
    """Memory-bound decoding arithmetic for the Qwen3-1.7B-shaped student and Qwen3-8B-shaped teacher (bf16)."""
    shape = SHAPES["qwen3"]
    student, teacher = decode_traffic(shape.student, shape.vocab_size), decode_traffic(shape.teacher, shape.vocab_size)
    length = args.prompt_tokens + args.completion_tokens
    mean_context = args.prompt_tokens + args.completion_tokens / 2  # a rollout that runs to max_completion_length
    bandwidth = args.bandwidth_tbps * 1e12
    w_s, w_t = student["weight_bytes_read_per_step"], teacher["weight_bytes_read_per_step"]
    kv_s, kv_t = student["kv_bytes_per_token"], teacher["kv_bytes_per_token"]

    def step(weights: float, kv_per_token: float, batch: int) -> dict:
        total = weights + batch * mean_context * kv_per_token
        return {
            "sequences_per_generate": batch,
            "bytes_per_step": total,
            "bytes_per_generated_token": total / batch,
            "seconds_per_step_at_bandwidth": total / bandwidth,
            "seconds_per_rollout_at_bandwidth": total
            / bandwidth
            * args.completion_tokens
            * (args.generation_batch // batch),
        }

    rollouts = {
        "student, whole generation batch (the parent's rollout)": step(w_s, kv_s, args.generation_batch),
        "student, one chunk": step(w_s, kv_s, args.chunk),
        "TRB, chunked (recipe)": step(w_s + w_t, kv_s + kv_t, args.chunk),
        "TRB, whole generation batch": step(w_s + w_t, kv_s + kv_t, args.generation_batch),
    }
    chunks = args.generation_batch // args.chunk
    kv_chunk_s, kv_chunk_t = args.chunk * length * kv_s, args.chunk * length * kv_t
    return {
        "student": student,
        "teacher": teacher,
        "settings": {
            "prompt_tokens": args.prompt_tokens,
            "completion_tokens": args.completion_tokens,
            "chunk": args.chunk,
            "generation_batch": args.generation_batch,
            "mean_context": mean_context,
            "bandwidth_bytes_per_second": bandwidth,
        },
        "weights_only_ratio": (w_s + w_t) / w_s,
        "rollouts": rollouts,
        "kv_cache": {
            "student_one_chunk": kv_chunk_s,
            "teacher_one_chunk": kv_chunk_t,
            "teacher_all_chunks": chunks * kv_chunk_t,
            "chunks": chunks,
        },
    }


def speculative_arithmetic(result: dict, specs: list[str], blend_bytes_per_row: float | None) -> list[dict]:
    """Bytes read per generated token (one chunk, memory-bound) by speculative TRB at acceptance
    alpha = 1 - sqrt(epsilon / 2), the floor that Pinsker's inequality puts on 1 - TV(mu*, pi_S) before truncation.

    A round reads the student's weights and KV cache gamma + 1 times and the teacher's once, and emits
    E = (1 - alpha^(gamma + 1)) / (1 - alpha) tokens per sequence. Rejected drafts stay (masked) in both caches, so
    the caches grow (gamma + 1) / E columns per token and every KV read is that much larger. The blend runs on all
    gamma + 1 positions of every row; its traffic (unfused, from `--count-ops`) is listed apart."""
    settings, student, teacher = result["settings"], result["student"], result["teacher"]
    chunk, context = settings["chunk"], settings["mean_context"]
    w_s, w_t = student["weight_bytes_read_per_step"], teacher["weight_bytes_read_per_step"]
    kv_s, kv_t = chunk * context * student["kv_bytes_per_token"], chunk * context * teacher["kv_bytes_per_token"]
    rows = []
    for name, (epsilon, gamma, adaptive) in speculative_variants(specs).items():
        if adaptive:
            continue  # the arithmetic is per fixed gamma
        alpha = 1.0 - (epsilon / 2.0) ** 0.5
        tokens = (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)
        waste = (gamma + 1) / tokens
        models = (gamma + 1) * (w_s + waste * kv_s) + w_t + waste * kv_t
        blend = None if blend_bytes_per_row is None else (gamma + 1) * chunk * blend_bytes_per_row
        rows.append(
            {
                "variant": name,
                "epsilon": epsilon,
                "draft_length": gamma,
                "acceptance_floor": alpha,
                "tokens_per_round": tokens,
                "kv_growth": waste,
                "bytes_per_token_models": models / (tokens * chunk),
                "bytes_per_token_blend_unfused": None if blend is None else blend / (tokens * chunk),
                "limit_alpha_1_weights_only": (w_s + w_t / (gamma + 1)) / w_s,
            }
        )
    return rows


def print_arithmetic(result: dict) -> None:
    gb, gib = 1e9, 2**30
    student, teacher, settings = result["student"], result["teacher"], result["settings"]
    print("Arithmetic, not a measurement: bf16, memory-bound decoding (every weight read once per step).")
    for role, entry in (("student (Qwen3-1.7B shape, tied)", student), ("teacher (Qwen3-8B shape)", teacher)):
        print(
            f"{role:<34} {entry['params'] / 1e9:.3f}B params, {entry['weight_bytes_read_per_step'] / gb:.2f} GB "
            f"weights read per step, KV {entry['kv_bytes_per_token'] / 1024:.0f} KiB per token"
        )
    print(f"weights read per step, TRB / student: {result['weights_only_ratio']:.2f}x")
    print(
        f"\nper decoding step at the mean context of a full-length rollout ({settings['mean_context']:.0f} tokens), "
        f"floors at {settings['bandwidth_bytes_per_second'] / 1e12:.2f} TB/s:"
    )
    print(f"{'rollout':<56} {'GB/step':>8} {'GB/token':>9} {'ms/step':>8} {'s/rollout':>10}")
    for name, entry in result["rollouts"].items():
        print(
            f"{name:<56} {entry['bytes_per_step'] / gb:>8.2f} {entry['bytes_per_generated_token'] / gb:>9.3f} "
            f"{1e3 * entry['seconds_per_step_at_bandwidth']:>8.2f} {entry['seconds_per_rollout_at_bandwidth']:>10.1f}"
        )
    counts = result.get("op_counts")
    if counts:
        student_ops, teacher_ops = counts["student_decode_step"], counts["teacher_decode_step"]
        blend_ops = counts["trust_region_blend_fixed_path"]
        print(
            f"\noperators dispatched per decoding step (batch {counts['batch_size']}; a count, not a time): student "
            f"{student_ops}, teacher {teacher_ops}, trust_region_blend {blend_ops} (accelerator path); "
            f"(student + teacher + blend) / (student + teacher) = "
            f"{(student_ops + teacher_ops + blend_ops) / (student_ops + teacher_ops):.2f}"
        )
        blend_bytes = counts["trust_region_blend_unfused_bytes"]
        trb = result["rollouts"]["TRB, chunked (recipe)"]["bytes_per_step"]
        print(
            f"trust_region_blend tensors read + written per call, unfused: {blend_bytes / 1e9:.2f} GB "
            f"({100 * blend_bytes / trb:.0f}% of the chunked TRB step's {trb / 1e9:.2f} GB)"
        )
    student_chunk = result["rollouts"]["student, one chunk"]["bytes_per_generated_token"]
    processor_chunk = result["rollouts"]["TRB, chunked (recipe)"]["bytes_per_generated_token"]
    print(
        f"\nspeculative TRB, per generated token of a {settings['chunk']}-sequence chunk at acceptance "
        f"1 - sqrt(eps/2) (student chunk {student_chunk / gb:.3f} GB, processor TRB {processor_chunk / gb:.3f} GB):"
    )
    print(
        f"{'variant':<20} {'alpha':>6} {'tok/round':>9} {'KV x':>5} {'GB/token':>9} {'x student':>9} "
        f"{'+blend GB':>9} {'alpha=1 limit':>13}"
    )
    for row in result.get("speculative", []):
        blend = row["bytes_per_token_blend_unfused"]
        print(
            f"{row['variant']:<20} {row['acceptance_floor']:>6.3f} {row['tokens_per_round']:>9.2f} "
            f"{row['kv_growth']:>5.2f} {row['bytes_per_token_models'] / gb:>9.3f} "
            f"{row['bytes_per_token_models'] / student_chunk:>9.2f} "
            f"{'n/a' if blend is None else f'{blend / gb:.3f}':>9} {row['limit_alpha_1_weights_only']:>13.2f}"
        )
    kv = result["kv_cache"]
    length = settings["prompt_tokens"] + settings["completion_tokens"]
    print(f"\nKV cache of one generate chunk ({settings['chunk']} sequences x {length} tokens):")
    print(f"  student {kv['student_one_chunk'] / gb:.2f} GB ({kv['student_one_chunk'] / gib:.2f} GiB)")
    print(f"  teacher {kv['teacher_one_chunk'] / gb:.2f} GB ({kv['teacher_one_chunk'] / gib:.2f} GiB)")
    print(
        f"  teacher, all {kv['chunks']} chunks of a {settings['generation_batch']}-sequence generation batch alive: "
        f"{kv['teacher_all_chunks'] / gb:.2f} GB ({kv['teacher_all_chunks'] / gib:.2f} GiB)"
    )


VIEW_OPS = (
    "alias", "detach", "expand", "permute", "reshape", "select", "slice", "squeeze", "t", "transpose", "unsqueeze",
    "view", "_unsafe_view",
)  # fmt: skip


def count_dispatched_ops(function) -> tuple[int, int]:
    """How many non-view ATen operators `function()` dispatches (on a GPU, roughly the kernels it launches), and the
    bytes of their input and output tensors summed over them (memory traffic if nothing were fused or cached)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        count = 0
        nbytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ not in VIEW_OPS:
                Counter.count += 1
                outs = list(out) if isinstance(out, tuple | list) else [out]
                for value in [*args, *(kwargs or {}).values(), *outs]:
                    if isinstance(value, torch.Tensor):
                        Counter.nbytes += value.numel() * value.element_size()
            return out

    with torch.no_grad(), Counter():
        function()
    return Counter.count, Counter.nbytes


def op_counts(batch_size: int) -> dict:
    """Operators per decoding step for the Qwen3-shaped pair (the same layers and modules at small widths, on CPU:
    the count does not depend on the width) and per `trust_region_blend` call on the accelerator path (fixed Newton
    count; run on the meta device, which takes that path and allocates nothing)."""
    shape = SHAPES["qwen3"]
    counts = {}
    for role in ("student", "teacher"):
        spec = dict(getattr(shape, role), hidden_size=128, head_dim=8, intermediate=256)
        config = qwen3_config(spec, shape.vocab_size, eos_token_id=None)
        torch.manual_seed(0)
        model = Qwen3ForCausalLM(config).eval()
        prompt = torch.randint(3, 1000, (batch_size, 16))
        with torch.no_grad():
            _, cache = forward_with_cache(model, DynamicCache(config=config), input_ids=prompt)
        step = prompt[:, :1]
        counts[f"{role}_decode_step"], _ = count_dispatched_ops(
            lambda model=model, cache=cache, step=step: forward_with_cache(
                model, cache, input_ids=step, logits_to_keep=1
            )
        )
    logits = torch.zeros(2, batch_size, shape.shared_vocab, device="meta")
    counts["trust_region_blend_fixed_path"], counts["trust_region_blend_unfused_bytes"] = count_dispatched_ops(
        lambda: trust_region_blend(logits[0], logits[1], 0.02)
    )
    counts["batch_size"] = batch_size
    return counts


def make_prompts(shape: Shape, batch_size: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids in [3, shared_vocab) with different lengths, left padded with `PAD_ID`."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shape.min_prompt, shape.max_prompt + 1, (batch_size,), generator=generator)
    lengths[0] = shape.max_prompt  # the longest prompt sets the padded width
    width = shape.max_prompt
    input_ids = torch.randint(3, shape.shared_vocab, (batch_size, width), generator=generator)
    attention_mask = (torch.arange(width)[None, :] >= width - lengths[:, None]).long()
    input_ids = input_ids.masked_fill(attention_mask == 0, PAD_ID)
    return input_ids.to(device), attention_mask.to(device)


def run_shape(shape: Shape, args, device: torch.device) -> dict:
    batch_size = args.batch_size or shape.batch_size
    new_tokens = args.new_tokens or shape.new_tokens
    build_start = time.perf_counter()
    student, teacher = build_pair(shape, device)
    synchronize(device)
    build_seconds = time.perf_counter() - build_start
    input_ids, attention_mask = make_prompts(shape, batch_size, args.seed, device)
    generate_kwargs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        min_new_tokens=new_tokens,
        max_new_tokens=new_tokens,
        pad_token_id=PAD_ID,
    )

    def trb_processor(epsilon: float) -> TrustRegionBlendingProcessor:
        return TrustRegionBlendingProcessor(
            teacher,
            epsilon,
            prompt_attention_mask=attention_mask,
            temperature=1.0,
            vocab_size=shape.shared_vocab,
            student_eos_token_id=shape.student_eos,
        )

    speculative = speculative_variants(args.speculative)
    variants = (*VARIANTS, *speculative)
    teacher_seconds = []  # teacher forwards inside the TRB processor, per timed TRB run
    speculation = {name: [] for name in speculative}  # the sampler's summary, per timed run
    peak_memory = {variant: 0 for variant in variants}  # CUDA: the most any call of the variant allocated

    def run(variant: str, seed: int) -> float:
        model, processor, sampler = student, None, None
        if variant == "teacher":
            model = teacher
        elif variant in ("trb", "trb_eps0"):
            processor = trb_processor(args.epsilon if variant == "trb" else 0.0)
        elif variant in speculative:
            epsilon, draft_length, adaptive = speculative[variant]
            sampler = SpeculativeBlendingSampler(
                teacher,
                epsilon,
                draft_length=draft_length,
                adaptive_draft_length=adaptive,
                temperature=1.0,
                vocab_size=shape.shared_vocab,
                student_eos_token_id=shape.student_eos,
            )
        torch.manual_seed(seed)
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        if sampler is not None:
            with timed_forwards(student, enabled=device.type == "cpu") as drafting:
                sequences = sampler.generate(student, **generate_kwargs)
        else:
            sequences = model.generate(
                **generate_kwargs, logits_processor=LogitsProcessorList([processor] if processor is not None else [])
            )
        synchronize(device)
        seconds = time.perf_counter() - start
        if device.type == "cuda":
            peak_memory[variant] = max(peak_memory[variant], torch.cuda.max_memory_allocated(device))
        if sequences.shape[1] != input_ids.shape[1] + new_tokens:
            raise RuntimeError(
                f"{variant} generated {sequences.shape[1] - input_ids.shape[1]} tokens, not {new_tokens}"
            )
        if variant == "trb":
            teacher_seconds.append(processor.teacher_seconds)
            if processor.teacher_forwards != new_tokens:
                raise RuntimeError(f"TRB ran {processor.teacher_forwards} teacher forwards for {new_tokens} tokens")
        if variant == "trb_eps0" and processor.teacher_forwards != 0:
            raise RuntimeError("epsilon = 0 called the teacher")
        if sampler is not None:
            speculation[variant].append(sampler.summary() | {"student_forward_seconds": drafting.get("seconds")})
        return seconds

    for variant in variants:  # warm-up
        run(variant, args.seed)
    teacher_seconds.clear()
    for summaries in speculation.values():
        summaries.clear()
    samples = {variant: [] for variant in variants}
    for repeat in range(args.repeats):
        for variant in variants:
            samples[variant].append(run(variant, args.seed + 1 + repeat))

    medians = {variant: statistics.median(values) for variant, values in samples.items()}
    blend_seconds = time_blend(batch_size, shape.shared_vocab, args.epsilon, device, args.seed)
    tokens = batch_size * new_tokens
    ratios = {
        "trb_over_student_plus_teacher": medians["trb"] / (medians["student"] + medians["teacher"]),
        "eps0_over_student": medians["trb_eps0"] / medians["student"],
    }
    passes = {
        "trb_over_student_plus_teacher": ratios["trb_over_student_plus_teacher"] <= TRB_FLOOR,
        "eps0_over_student": ratios["eps0_over_student"] <= EPS0_FLOOR,
    }
    speculative_results = {}
    for name, (epsilon, draft_length, adaptive) in speculative.items():
        ratio = medians[name] / medians["student"]
        floor = SPECULATIVE_FLOORS.get(epsilon) if batch_size <= SPECULATIVE_FLOOR_BATCH else None
        summaries = speculation[name]
        speculative_results[name] = {
            "epsilon": epsilon,
            "draft_length": draft_length,
            "adaptive": adaptive,
            "mean_draft_length": statistics.mean(s["mean_draft_length"] for s in summaries),
            "over_student": ratio,
            "floor": floor,
            "acceptance_rate": statistics.mean(s["acceptance_rate"] for s in summaries),
            "tokens_per_teacher_forward": statistics.mean(s["tokens_per_teacher_forward"] for s in summaries),
            "teacher_seconds_median": statistics.median(s["teacher_seconds"] for s in summaries),
        }
        if device.type == "cpu":
            # The two models' forwards alone, over the student-only rollout: what no engine overhead can go below.
            student_share = statistics.median(s["student_forward_seconds"] for s in summaries) / medians["student"]
            teacher_share = speculative_results[name]["teacher_seconds_median"] / medians["student"]
            speculative_results[name] |= {
                "student_forwards_over_student": student_share,
                "teacher_forwards_over_student": teacher_share,
                "engine_rest_over_student": ratio - student_share - teacher_share,
            }
        ratios[f"{name}_over_student"] = ratio
        if floor is not None:
            passes[f"{name}_over_student"] = ratio <= floor
    return {
        "shape": asdict(shape) | {"batch_size": batch_size, "new_tokens": new_tokens},
        "build_seconds": build_seconds,
        "median_seconds": medians,
        "samples_seconds": samples,
        "tokens_per_second": {variant: tokens / seconds for variant, seconds in medians.items()},
        "trb_teacher_seconds_median": statistics.median(teacher_seconds),
        "blend_seconds_per_step_median": blend_seconds,
        "ratios": ratios,
        "speculative": speculative_results,
        **({"peak_memory_bytes": peak_memory} if device.type == "cuda" else {}),
        "pass": passes,
    }


@contextlib.contextmanager
def timed_forwards(model: torch.nn.Module, enabled: bool):
    """Yields a dict that holds, on exit, the wall seconds spent in `model`'s forwards (CPU only: no CUDA sync)."""
    result, starts = {}, []
    if not enabled:
        yield result
        return
    seconds = [0.0]
    handles = [
        model.register_forward_pre_hook(lambda module, args: starts.append(time.perf_counter())),
        model.register_forward_hook(
            lambda module, args, output: seconds.__setitem__(0, seconds[0] + time.perf_counter() - starts.pop())
        ),
    ]
    try:
        yield result
    finally:
        for handle in handles:
            handle.remove()
        result["seconds"] = seconds[0]


def speculative_variants(specs: list[str]) -> dict[str, tuple[float, int, bool]]:
    """`["0.02:6", "0.002:32:adaptive"]` -> `{"spec_eps0.02_g6": (0.02, 6, False), "spec_eps0.002_g32a": (0.002, 32,
    True)}` (adaptive: gamma chosen per round, at most GAMMA)."""
    variants = {}
    for spec in specs:
        parts = spec.split(":")
        try:
            if len(parts) not in (2, 3) or parts[2:] not in ([], ["adaptive"]):
                raise ValueError
            epsilon, draft_length, adaptive = float(parts[0]), int(parts[1]), len(parts) == 3
        except ValueError:
            raise SystemExit(
                f"--speculative takes EPS:GAMMA or EPS:GAMMA:adaptive, such as 0.02:6, got {spec!r}."
            ) from None
        variants[f"spec_eps{epsilon:g}_g{draft_length}{'a' if adaptive else ''}"] = (epsilon, draft_length, adaptive)
    return variants


def time_blend(batch_size: int, vocab: int, epsilon: float, device: torch.device, seed: int, calls: int = 20) -> float:
    """Median seconds of one `trust_region_blend` call on random (batch, vocab) logits (the blend's share of a step)."""
    generator = torch.Generator().manual_seed(seed)
    student_logits, teacher_logits = (2.0 * torch.randn(2, batch_size, vocab, generator=generator)).to(device)
    seconds = []
    for call in range(calls + 3):
        synchronize(device)
        start = time.perf_counter()
        trust_region_blend(student_logits, teacher_logits, epsilon)
        synchronize(device)
        if call >= 3:  # warm-up
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux /proc/stat), or None elsewhere."""
    try:
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def print_result(result: dict) -> None:
    shape = result["shape"]
    print(
        f"\n== {shape['name']}: V={shape['vocab_size']}, batch {shape['batch_size']}, {shape['new_tokens']} new "
        f"tokens, prompts {shape['min_prompt']}-{shape['max_prompt']}, {shape['dtype']} =="
    )
    print(f"{'variant':<20} {'median s':>10} {'min s':>9} {'max s':>9} {'tokens/s':>10}")
    for variant, values in result["samples_seconds"].items():
        print(
            f"{variant:<20} {result['median_seconds'][variant]:>10.4f} {min(values):>9.4f} {max(values):>9.4f} "
            f"{result['tokens_per_second'][variant]:>10.1f}"
        )
    if "peak_memory_bytes" in result:
        peaks = ", ".join(f"{variant} {value / 2**30:.2f}" for variant, value in result["peak_memory_bytes"].items())
        print(f"peak CUDA memory allocated (GiB, weights included): {peaks}")
    print(f"teacher forwards inside TRB (median): {result['trb_teacher_seconds_median']:.4f} s")
    blend = result["blend_seconds_per_step_median"]
    steps = shape["new_tokens"]
    print(f"trust_region_blend alone: {1e3 * blend:.3f} ms/step, x{steps} steps = {blend * steps:.4f} s")
    foreign = result.get("foreign_cpu_cores")
    if foreign is not None:
        note = "  WARNING: other processes shared the CPU; timings are unreliable" if foreign > 0.1 else ""
        print(f"CPU used by other processes during the run: {foreign:.2f} cores on average{note}")
    for key, floor in (("trb_over_student_plus_teacher", TRB_FLOOR), ("eps0_over_student", EPS0_FLOOR)):
        verdict = "PASS" if result["pass"][key] else "FAIL"
        print(f"{key:<31} {result['ratios'][key]:.3f}  (floor {floor:.2f})  {verdict}")
    for name, entry in result["speculative"].items():
        if entry["floor"] is None:
            verdict = f"(floors apply at batch <= {SPECULATIVE_FLOOR_BATCH} for eps in {sorted(SPECULATIVE_FLOORS)})"
        else:
            verdict = f"(floor {entry['floor']:.2f})  {'PASS' if result['pass'][f'{name}_over_student'] else 'FAIL'}"
        print(
            f"{name + ' / student':<31} {entry['over_student']:.3f}  {verdict}; acceptance "
            f"{entry['acceptance_rate']:.3f}, tokens per teacher forward {entry['tokens_per_teacher_forward']:.2f}, "
            f"mean draft length {entry['mean_draft_length']:.1f}, "
            f"teacher {entry['teacher_seconds_median']:.3f} s"
        )
        if "student_forwards_over_student" in entry:
            models = entry["student_forwards_over_student"] + entry["teacher_forwards_over_student"]
            print(
                f"{'':<31} models alone {models:.3f} (student forwards {entry['student_forwards_over_student']:.3f}, "
                f"teacher {entry['teacher_forwards_over_student']:.3f}), blend, sampling and bookkeeping "
                f"{entry['engine_rest_over_student']:.3f}"
            )


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1.")
    command = " ".join(["python", os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)])
    if args.arithmetic:
        result = arithmetic(args)
        if args.count_ops:
            result["op_counts"] = op_counts(args.chunk)
        counts = result.get("op_counts")
        blend_per_row = counts["trust_region_blend_unfused_bytes"] / counts["batch_size"] if counts else None
        result["speculative"] = speculative_arithmetic(result, args.speculative, blend_per_row)
        print_arithmetic(result)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"command": command, "arithmetic": result}, handle, indent=2)
            print(f"\nwrote {args.json}")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available.")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shapes = args.shapes or (["tiny", "qwen3"] if device.type == "cuda" else ["tiny"])
    environment = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    print(" ".join(f"{key}={value}" for key, value in environment.items()))
    config = {key: value for key, value in vars(args).items() if key not in ("json", "strict")} | {"shapes": shapes}
    results = []
    for name in shapes:
        busy_before, own_before, wall_before = busy_cpu_seconds(), sum(os.times()[:2]), time.perf_counter()
        result = run_shape(SHAPES[name], args, device)
        if busy_before is not None:
            # Other processes on the same cores distort CPU timings badly (torch's intra-op threads stall on them).
            own = sum(os.times()[:2]) - own_before
            foreign = (busy_cpu_seconds() - busy_before - own) / (time.perf_counter() - wall_before)
            result["foreign_cpu_cores"] = max(foreign, 0.0)
        if device.type == "cuda":
            gc.collect()  # the pair went out of scope with run_shape: free it before building the next one
            torch.cuda.empty_cache()
        print_result(result)
        results.append(result)
    if args.json:
        with open(args.json, "w") as handle:
            payload = {"command": command, "environment": environment, "config": config, "results": results}
            payload["wall_seconds"] = time.perf_counter() - start
            json.dump(payload, handle, indent=2)
        print(f"\nwrote {args.json}")
    passed = all(all(result["pass"].values()) for result in results)
    return 0 if passed or not args.strict else 1


if __name__ == "__main__":
    raise SystemExit(main())
