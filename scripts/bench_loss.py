"""Time and peak memory of one forward + backward of each distillation loss, from hidden states and `lm_head`s.

Usage (from the repository root; drop `PYTHONPATH=.` once the package is installed with `pip install -e .`):

```bash
# The brief's shape: V = 151,936, H = 2048, 2048 tokens, float32 and bf16 (minutes per variant on a few CPU cores)
PYTHONPATH=. python scripts/bench_loss.py --json bench_loss.json
# A CPU shared with other jobs: narrower heads and fewer tokens, same vocabulary
PYTHONPATH=. python scripts/bench_loss.py --hidden 256 --tokens 512 --threads 1 --json bench_loss_small.json
# GPU (peak from torch.cuda.max_memory_allocated)
PYTHONPATH=. python scripts/bench_loss.py --device cuda --tokens 8192
```

Variants, all called as TRL's `DistillationTrainer._compute_loss` calls its divergence (student hidden states and
`lm_head` weight require grad, full fine-tuning; the teacher has none):

- `trl`: TRL's `_chunked_divergence_loss` (full-vocabulary generalized JSD, here `beta = 1`, reverse KL);
- `stop_aligned`: `stop_aligned_divergence_loss` with the Qwen3 stop alignment (same divergence, ids merged);
- `top_k`: `top_k_divergence_loss(top_k=16)` (the TRB paper's student-top-16 reverse KL, its policy-gradient form),
  stop-aligned;
- `top_k_renormalized`: the same with `estimator="renormalized"` (both models renormalised over the top-16);
- `tropd`: `tropd_loss` with TrOPD's default objective (adaptive trust region, top-64 forward KL on outliers).

Each (variant, dtype) runs in a fresh subprocess so that peaks do not leak between variants. The subprocess builds its
inputs without large temporaries, then runs forward + backward once to measure the peak and `--repeats` more times
for the median time. Peak memory is reported above the inputs: on CPU the process's `ru_maxrss` high-water mark minus
its resident size once the inputs exist (Linux), on CUDA `max_memory_allocated` minus the allocated bytes at that
point. It includes the student `lm_head`'s gradient (V x H, in the weight's dtype), the same for every variant. CPU
timings on a shared machine are noisy: the load average before and after is printed with them.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time


VARIANTS = ("trl", "stop_aligned", "top_k", "top_k_renormalized", "tropd")
DTYPES = ("float32", "bfloat16")
QWEN3_ENDOFTEXT_ID, QWEN3_IM_END_ID = 151_643, 151_645


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=151_936, help="lm_head rows of both models (Qwen3: 151,936).")
    parser.add_argument("--hidden", type=int, default=2048, help="Hidden size of both models (Qwen3-1.7B: 2048).")
    parser.add_argument("--tokens", type=int, default=2048, help="Valid completion tokens in the micro-batch.")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="Losses to run.")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES, help="Head and hidden dtypes.")
    parser.add_argument("--top-k", type=int, default=16, help="Support size of the `top_k*` variants (the paper: 16).")
    parser.add_argument("--tropd-k", type=int, default=64, help="Teacher top-k of the `tropd` variant (TrOPD: 64).")
    parser.add_argument("--repeats", type=int, default=2, help="Timed forward + backward passes after the first.")
    parser.add_argument("--device", default="cpu", help="`cpu` or `cuda`.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's choice).")
    parser.add_argument("--json", default=None, metavar="PATH", help="Write all results here.")
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "DTYPE"), help=argparse.SUPPRESS)
    return parser


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _inputs(args, dtype, device):
    """Seeded inputs built in place, one slice at a time (no float32 copy of a bf16 head ever exists)."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, scale=1.0):
        out = torch.empty(*shape, dtype=dtype, device=device)
        flat = out.view(-1, shape[-1])
        for start in range(0, flat.shape[0], 4096):
            block = torch.randn(min(4096, flat.shape[0] - start), shape[-1], generator=generator) * scale
            flat[start : start + len(block)] = block.to(device=device, dtype=dtype)
        return out

    scale = args.hidden**-0.5 * 4  # logits of std 4: a peaked-enough, realistic spread
    student_hidden = randn(1, args.tokens, args.hidden).requires_grad_(True)
    teacher_hidden = randn(1, args.tokens, args.hidden)
    student_weight = randn(args.vocab, args.hidden, scale=scale).requires_grad_(True)
    teacher_weight = randn(args.vocab, args.hidden, scale=scale)
    mask = torch.ones(1, args.tokens, dtype=torch.long, device=device)
    completion_ids = torch.randint(0, args.vocab, (1, args.tokens), generator=generator).to(device)
    trust_draws = torch.rand(1, args.tokens, generator=generator).to(device)
    return student_hidden, teacher_hidden, student_weight, teacher_weight, mask, completion_ids, trust_draws


def _loss_function(variant, args, completion_ids, trust_draws):
    import functools

    from trb_trl.losses.stop_aligned_divergence import stop_aligned_divergence_loss
    from trb_trl.losses.top_k_divergence import top_k_divergence_loss
    from trb_trl.losses.tropd import TrOPDLossSpec, tropd_loss
    from trb_trl.stop_alignment import StopAlignment

    alignment = None
    if args.vocab > QWEN3_IM_END_ID:
        alignment = StopAlignment(QWEN3_ENDOFTEXT_ID, (QWEN3_IM_END_ID,))
    if variant == "trl":
        from trb_trl._compat import _distillation_module

        return _distillation_module._chunked_divergence_loss
    if variant == "stop_aligned":
        return functools.partial(stop_aligned_divergence_loss, alignment=alignment)
    if variant in ("top_k", "top_k_renormalized"):
        estimator = "renormalized" if variant == "top_k_renormalized" else "policy_gradient"
        return functools.partial(top_k_divergence_loss, top_k=args.top_k, alignment=alignment, estimator=estimator)
    spec = TrOPDLossSpec(top_k=args.tropd_k)
    return functools.partial(
        tropd_loss, completion_ids=completion_ids, trust_draws=trust_draws, spec=spec, alignment=alignment
    )


def _worker(args) -> dict:
    """One variant in this (fresh) process: the first pass measures the peak, the next ones the time."""
    import gc

    import torch

    variant, dtype_name = args.worker
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    student_hidden, teacher_hidden, student_weight, teacher_weight, mask, ids, draws = _inputs(
        args, getattr(torch, dtype_name), device
    )
    loss_function = _loss_function(variant, args, ids, draws)
    # A tiny warm-up first, so that lazy imports (TRL, transformers' DeepSpeed check) and one-off allocator and BLAS
    # buffers are not counted as the loss's memory.
    tiny = (x[:, :2].detach().clone() for x in (student_hidden, teacher_hidden))
    tiny_student, tiny_teacher = tiny
    tiny_student.requires_grad_(True)
    tiny_ids, tiny_draws = ids[:, :2], draws[:, :2]
    tiny_loss = _loss_function(variant, args, tiny_ids, tiny_draws)
    tiny_loss(tiny_student, tiny_teacher, student_weight, teacher_weight, mask[:, :2], 1.0)[0].backward()
    student_weight.grad = None
    del tiny_student, tiny_teacher, tiny_loss
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = _resident_bytes()

    def step():
        student_hidden.grad = student_weight.grad = None
        start = time.perf_counter()
        loss, _, _ = loss_function(student_hidden, teacher_hidden, student_weight, teacher_weight, mask, 1.0)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, loss.item()

    first_seconds, loss_value = step()
    if cuda:
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline  # ru_maxrss is in KiB on Linux
    times = [step()[0] for _ in range(args.repeats)] or [first_seconds]
    return {
        "variant": variant,
        "dtype": dtype_name,
        "loss": loss_value,
        "first_seconds": first_seconds,
        "median_seconds": statistics.median(times),
        "times": times,
        "peak_bytes_above_inputs": max(0, peak),
        "input_bytes": baseline,
        "threads": torch.get_num_threads(),
    }


def _run_worker(args, variant, dtype) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", variant, dtype]
    for flag in ("vocab", "hidden", "tokens", "top_k", "tropd_k", "repeats", "device", "threads"):
        value = getattr(args, flag)
        if value is not None:
            command += [f"--{flag.replace('_', '-')}", str(value)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"variant": variant, "dtype": dtype, "error": done.stderr.strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(results) -> str:
    mib = 2**20
    lines = [
        f"| {'variant':<18} | {'dtype':<8} | {'time (s)':>9} | {'peak above inputs (MiB)':>24} | {'loss':>9} |",
        f"|{'-' * 20}|{'-' * 10}|{'-' * 11}|{'-' * 26}|{'-' * 11}|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']:<18} | {r['dtype']:<8} | failed: {r['error']} |")
            continue
        lines.append(
            f"| {r['variant']:<18} | {r['dtype']:<8} | {r['median_seconds']:>9.2f} | "
            f"{r['peak_bytes_above_inputs'] / mib:>24.0f} | {r['loss']:>9.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0
    load_before = os.getloadavg()
    results = []
    for dtype in args.dtypes:
        for variant in args.variants:
            results.append(_run_worker(args, variant, dtype))
            print(_table(results[-1:]).splitlines()[-1], file=sys.stderr, flush=True)  # progress: a long run
    load_after = os.getloadavg()
    lm_head_grad = args.vocab * args.hidden
    print(
        f"V={args.vocab} H={args.hidden} tokens={args.tokens} device={args.device} top_k={args.top_k} "
        f"tropd_k={args.tropd_k}; load average before {load_before[0]:.2f}, after {load_after[0]:.2f} "
        f"({os.cpu_count()} CPUs); the peak includes the lm_head gradient ({lm_head_grad * 4 / 2**20:.0f} MiB in "
        f"float32, {lm_head_grad * 2 / 2**20:.0f} MiB in bf16)"
    )
    print(_table(results))
    if args.json:
        payload = {
            "command": " ".join(sys.argv),
            "config": {k: v for k, v in vars(args).items() if k not in ("json", "worker")},
            "platform": platform.platform(),
            "load_average": {"before": load_before, "after": load_after},
            "results": results,
        }
        with open(args.json, "w") as handle:
            json.dump(payload, handle, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
