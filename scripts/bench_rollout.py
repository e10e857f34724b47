"""Rollout cost of TRB: student-only, teacher-only, TRB and epsilon = 0 `generate`, on identical prompts.

Usage:

```bash
# CPU (tiny Qwen3 pair, V = 4096, batch 16, 48 new tokens; about a minute on 2 cores)
python scripts/bench_rollout.py --json bench_cpu.json

# GPU: the tiny pair plus a Qwen3-1.7B-shaped student and a Qwen3-8B-shaped teacher (random weights, bf16, batch 64)
python scripts/bench_rollout.py --device cuda --json bench_gpu.json
python scripts/bench_rollout.py --device cuda --shapes qwen3 --repeats 5 --strict
```

Every variant generates exactly the same number of tokens from the same left-padded prompts
(`min_new_tokens == max_new_tokens`, sampling at temperature 1.0, no top-k/top-p). After one warm-up of each variant,
the variants run round-robin for `--repeats` rounds; medians are reported with two ratios and the spec's floors:

- TRB / (student + teacher) <= 1.10: blending adds little beyond running both models;
- (epsilon = 0) / student <= 1.02: a processor at epsilon = 0 costs nothing (it never calls the teacher).

The script prints PASS/FAIL against the floors and exits 0 either way unless `--strict`.
"""

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import transformers
from transformers import LogitsProcessorList, Qwen3Config, Qwen3ForCausalLM

from trb_trl import TrustRegionBlendingProcessor, trust_region_blend
from trb_trl.tiny_models import build_tiny_qwen3


VARIANTS = ("student", "teacher", "trb", "trb_eps0")
TRB_FLOOR = 1.10  # TRB <= 1.10 x (student + teacher)
EPS0_FLOOR = 1.02  # epsilon = 0 <= 1.02 x student
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
        student=dict(num_layers=28, hidden_size=2048, num_heads=16, num_kv_heads=8, head_dim=128, intermediate=6144),
        teacher=dict(num_layers=36, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128, intermediate=12288),
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
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        choices=range(1, 1001),
        metavar="N",
        help="Timed rounds after the warm-up (round-robin).",
    )
    parser.add_argument("--epsilon", type=float, default=0.02, help="KL budget of the TRB variant.")
    parser.add_argument("--batch-size", type=int, default=None, help="Override every shape's batch size.")
    parser.add_argument("--new-tokens", type=int, default=None, help="Override every shape's generation length.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="Write all results here.")
    parser.add_argument("--strict", action="store_true", help="Exit 1 when a floor is not met.")
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


def build_qwen3(spec: dict, vocab_size: int, eos_token_id, device: torch.device) -> Qwen3ForCausalLM:
    """A random-weight Qwen3 built directly on `device` with bf16 parameters (no download, no float32 copy; the
    rotary buffers stay float32 as with `from_pretrained(dtype=torch.bfloat16)`)."""
    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"],
        num_key_value_heads=spec["num_kv_heads"],
        head_dim=spec["head_dim"],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        eos_token_id=eos_token_id,
        pad_token_id=PAD_ID,
        bos_token_id=None,
    )
    with device, default_dtype(torch.bfloat16):
        model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = PAD_ID
    return model.eval()


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

    teacher_seconds = []  # teacher forwards inside the TRB processor, per timed TRB run

    def run(variant: str, seed: int) -> float:
        model, processor = student, None
        if variant == "teacher":
            model = teacher
        elif variant in ("trb", "trb_eps0"):
            processor = trb_processor(args.epsilon if variant == "trb" else 0.0)
        torch.manual_seed(seed)
        synchronize(device)
        start = time.perf_counter()
        sequences = model.generate(
            **generate_kwargs, logits_processor=LogitsProcessorList([processor] if processor is not None else [])
        )
        synchronize(device)
        seconds = time.perf_counter() - start
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
        return seconds

    for variant in VARIANTS:  # warm-up
        run(variant, args.seed)
    teacher_seconds.clear()
    samples = {variant: [] for variant in VARIANTS}
    for repeat in range(args.repeats):
        for variant in VARIANTS:
            samples[variant].append(run(variant, args.seed + 1 + repeat))

    medians = {variant: statistics.median(values) for variant, values in samples.items()}
    blend_seconds = time_blend(batch_size, shape.shared_vocab, args.epsilon, device, args.seed)
    tokens = batch_size * new_tokens
    ratios = {
        "trb_over_student_plus_teacher": medians["trb"] / (medians["student"] + medians["teacher"]),
        "eps0_over_student": medians["trb_eps0"] / medians["student"],
    }
    return {
        "shape": asdict(shape) | {"batch_size": batch_size, "new_tokens": new_tokens},
        "build_seconds": build_seconds,
        "median_seconds": medians,
        "samples_seconds": samples,
        "tokens_per_second": {variant: tokens / seconds for variant, seconds in medians.items()},
        "trb_teacher_seconds_median": statistics.median(teacher_seconds),
        "blend_seconds_per_step_median": blend_seconds,
        "ratios": ratios,
        "pass": {
            "trb_over_student_plus_teacher": ratios["trb_over_student_plus_teacher"] <= TRB_FLOOR,
            "eps0_over_student": ratios["eps0_over_student"] <= EPS0_FLOOR,
        },
    }


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
    print(f"{'variant':<10} {'median s':>10} {'min s':>9} {'max s':>9} {'tokens/s':>10}")
    for variant in VARIANTS:
        values = result["samples_seconds"][variant]
        print(
            f"{variant:<10} {result['median_seconds'][variant]:>10.4f} {min(values):>9.4f} {max(values):>9.4f} "
            f"{result['tokens_per_second'][variant]:>10.1f}"
        )
    print(f"teacher forwards inside TRB (median): {result['trb_teacher_seconds_median']:.4f} s")
    blend = result["blend_seconds_per_step_median"]
    print(
        f"trust_region_blend alone: {1e3 * blend:.3f} ms/step, x{shape['new_tokens']} steps = {blend * shape['new_tokens']:.4f} s"
    )
    foreign = result.get("foreign_cpu_cores")
    if foreign is not None:
        note = "  WARNING: other processes shared the CPU; timings are unreliable" if foreign > 0.1 else ""
        print(f"CPU used by other processes during the run: {foreign:.2f} cores on average{note}")
    for key, floor in (("trb_over_student_plus_teacher", TRB_FLOOR), ("eps0_over_student", EPS0_FLOOR)):
        verdict = "PASS" if result["pass"][key] else "FAIL"
        print(f"{key:<31} {result['ratios'][key]:.3f}  (floor {floor:.2f})  {verdict}")


def main(args=None) -> int:
    args = make_parser().parse_args(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available.")
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
            torch.cuda.empty_cache()  # the pair went out of scope with run_shape
        print_result(result)
        results.append(result)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"environment": environment, "config": config, "results": results}, handle, indent=2)
        print(f"\nwrote {args.json}")
    passed = all(all(result["pass"].values()) for result in results)
    return 0 if passed or not args.strict else 1


if __name__ == "__main__":
    raise SystemExit(main())
