"""Rollout memory preflight: estimate what one GPU holds during a rollout, before training starts.

At the peak of a teacher-guided warmup rollout a GPU holds both models' weights (gathered under ZeRO-3 unless told
otherwise), the student's and the teacher's KV caches for one `generate` chunk at full length (each chunk's caches are
freed when its `generate` returns, so chunks never coexist), each rank's share of the student's training state, and,
with a colocated vLLM engine that is not put to sleep, the memory vLLM reserved. A rollout in which only one model
decodes (the parent's student rollout, TrOPD's teacher prefixes) holds that model's KV cache and the other's resident
weights. A run makes several kinds of rollout (a [`RolloutPhase`] each); the trainer checks the largest. The estimate
is arithmetic on the configs, not a measurement: it is meant to catch the configurations that cannot fit and to show
the numbers, not to predict peak memory to the byte. The speculative rollout engine keeps rejected drafts (masked) in
both caches, so its caches are wider than the sequences they hold ([`speculative_cache_length`]).
"""

import math
from dataclasses import dataclass


GIB = 1024**3
# Mixed-precision training state per student parameter: fp32 master weights (4) + fp32 gradients (4) + Adam m, v (8).
TRAINING_BYTES_PER_PARAM = 16


def count_parameters(model) -> int:
    """Full parameter count, also for ZeRO-3 partitioned parameters (whose local `numel()` is 0)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def kv_cache_bytes(config, num_sequences: int, sequence_length: int, dtype_bytes: int) -> int:
    """Keys and values for every layer: 2 x layers x kv_heads x head_dim x tokens x dtype bytes."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * num_sequences * sequence_length * dtype_bytes


def speculative_cache_length(prompt_tokens: int, completion_tokens: int, epsilon: float, draft_length: int) -> int:
    """KV-cache columns of a speculative rollout of `completion_tokens` tokens: every round appends `draft_length` + 1
    columns to both caches (rejected drafts stay, masked) and emits E = (1 - a^(gamma + 1)) / (1 - a) tokens per
    sequence, taken at the acceptance floor a = 1 - sqrt(epsilon / 2) (Pinsker; the largest epsilon of the warmup is
    the widest). An expectation, not a bound: the slowest row of a chunk may run a few more rounds, and top-k / top-p
    truncation can accept below that floor (it truncates mu* and the student separately; on a near-uniform tiny model
    top-k 50 of 64 tokens accepted 0.6 at epsilon = 0.05, against a floor of 0.84)."""
    gamma = draft_length
    alpha = max(0.0, 1.0 - math.sqrt(epsilon / 2.0))
    per_round = gamma + 1 if alpha >= 1.0 else (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)
    return prompt_tokens + math.ceil(completion_tokens / per_round) * (gamma + 1)


@dataclass(frozen=True)
class RolloutPhase:
    """One kind of `generate` call a run makes: `num_sequences` sequences of up to `sequence_length` tokens (prompt
    included), `cache_length` KV columns where drafts widen the caches, and which models decode. A model that decodes
    holds its KV cache and its weights as gathered for generation; the other holds its resident weights only."""

    phase: str
    num_sequences: int
    sequence_length: int
    student_generates: bool = True
    teacher_generates: bool = True
    cache_length: int | None = None


@dataclass
class RolloutMemoryEstimate:
    """Per-GPU bytes during one rollout phase, with the arithmetic that produced them."""

    student_weights: int
    teacher_weights: int
    training_state: int
    student_kv_cache: int
    teacher_kv_cache: int
    vllm_reserved: int
    lines: list[str]
    phase: str = "teacher-guided rollout"

    @property
    def total(self) -> int:
        held = self.student_weights + self.teacher_weights + self.training_state + self.vllm_reserved
        return held + self.student_kv_cache + self.teacher_kv_cache

    def explain(self, device_bytes: int | None = None) -> str:
        text = "\n".join(f"  {line}" for line in self.lines)
        text += f"\n  {'total':<52}{self.total / GIB:8.1f} GiB"
        if device_bytes:
            text += f"  of {device_bytes / GIB:.1f} GiB on the device ({100 * self.total / device_bytes:.0f}%)"
        return text


def estimate_rollout_memory(
    *,
    student_config,
    teacher_config,
    student_params: int,
    teacher_params: int,
    num_sequences: int,
    sequence_length: int,
    dtype_bytes: int,
    world_size: int,
    zero_stage: int,
    gather_student: bool,
    gather_teacher: bool,
    vllm_reserved_fraction: float = 0.0,
    device_bytes: int = 0,
    cache_length: int | None = None,
    student_generates: bool = True,
    teacher_generates: bool = True,
    phase: str = "teacher-guided rollout",
) -> RolloutMemoryEstimate:
    """Estimate per-GPU memory of a rollout whose `generate` chunks hold `num_sequences` sequences of up to
    `sequence_length` tokens. `vllm_reserved_fraction` of `device_bytes` is held by a colocated vLLM engine.
    `cache_length` is the KV caches' width when it exceeds `sequence_length` (the speculative engine). A model that does
    not decode in this phase (`student_generates`, `teacher_generates`) holds no KV cache and only its resident
    weights (its shard under ZeRO-3); `teacher_config=None` means no local teacher."""
    shards = max(world_size, 1)
    student_full = student_params * dtype_bytes
    teacher_full = teacher_params * dtype_bytes if teacher_config is not None else 0
    if zero_stage == 3:
        student_gathered = student_generates and gather_student
        teacher_gathered = teacher_generates and gather_teacher
        student_weights = student_full if student_gathered else student_full // shards
        teacher_weights = teacher_full if teacher_gathered else teacher_full // shards
        training = TRAINING_BYTES_PER_PARAM * student_params // shards
        layout = f"ZeRO-3 over {shards} ranks"
        held = {True: "gathered", False: f"1/{shards} shard"}
        student_held, teacher_held = held[student_gathered], held[teacher_gathered]
    elif zero_stage in (1, 2):
        student_weights, teacher_weights = student_full, teacher_full
        training = (4 + (TRAINING_BYTES_PER_PARAM - 4) // shards) * student_params
        layout = f"ZeRO-{zero_stage} over {shards} ranks (teacher: full copy)"
        student_held = teacher_held = "full copy"
    else:
        student_weights, teacher_weights = student_full, teacher_full
        training = TRAINING_BYTES_PER_PARAM * student_params
        layout = "no sharding (DDP or single device)"
        student_held = teacher_held = "full copy"
    columns = max(cache_length or 0, sequence_length)
    student_kv = kv_cache_bytes(student_config, num_sequences, columns, dtype_bytes) if student_generates else 0
    teacher_generates = teacher_generates and teacher_config is not None
    teacher_kv = kv_cache_bytes(teacher_config, num_sequences, columns, dtype_bytes) if teacher_generates else 0
    chunk = "one generate chunk" if columns == sequence_length else f"one chunk, {columns} columns with drafts"
    vllm = int(vllm_reserved_fraction * device_bytes)
    rows = [
        (f"student weights {student_params / 1e9:.2f}B x {dtype_bytes} B ({student_held})", student_weights),
        (f"student training state ({TRAINING_BYTES_PER_PARAM} B/param, rank share)", training),
    ]
    if teacher_config is not None:
        rows.insert(
            1, (f"teacher weights {teacher_params / 1e9:.2f}B x {dtype_bytes} B ({teacher_held})", teacher_weights)
        )
    if student_generates:
        rows.append((f"student KV cache ({chunk})", student_kv))
    if teacher_generates:
        rows.append((f"teacher KV cache ({chunk})", teacher_kv))
    if vllm:
        rows.append((f"colocated vLLM engine ({vllm_reserved_fraction:.0%} of the device, awake)", vllm))
    lines = [
        f"layout: {layout}; {phase}: {num_sequences} sequences x {sequence_length} tokens, {dtype_bytes}-byte dtype"
    ]
    lines += [f"{label:<52}{value / GIB:8.1f} GiB" for label, value in rows]
    return RolloutMemoryEstimate(
        student_weights, teacher_weights, training, student_kv, teacher_kv, vllm, lines, phase=phase
    )


def check_rollout_memory(estimate: RolloutMemoryEstimate, device_bytes: int, mode: str = "error") -> str | None:
    """Return a warning if the estimate exceeds 90% of the device; raise (mode "error") if it exceeds the device."""
    if mode == "off" or not device_bytes:
        return None
    advice = (
        "Lower `rollout_generation_batch_size` (teacher-guided rollouts and TrOPD's teacher prefixes are generated in "
        "chunks of it; the parent's student rollout is not), `max_completion_length`, `per_device_train_batch_size` "
        "or `gradient_accumulation_steps`, set `gather_teacher_for_generation=False` "
        "(slower: the teacher is gathered layer by layer at every step), put a colocated vLLM engine to sleep "
        "outside its own generation (`vllm_enable_sleep_mode=True`), or use more GPUs."
    )
    if estimate.total > device_bytes and mode == "error":
        raise ValueError(
            f"The {estimate.phase} is estimated not to fit in device memory:\n"
            + estimate.explain(device_bytes)
            + f"\n{advice} Set `rollout_memory_preflight='warn'` to start anyway."
        )
    if estimate.total > 0.9 * device_bytes:
        return (
            f"The {estimate.phase} is estimated to use most of device memory:\n"
            + estimate.explain(device_bytes)
            + (f"\n{advice}")
        )
    return None
