"""From hidden states to (tempered, stop-aligned) log-probs, one tile of tokens at a time.

Every loss in this package projects hidden states through an `lm_head` itself instead of asking the model for
`(tokens, V)` logits: at V = 151,936 those logits cost more memory than the model. These are the shared steps: the
float32 projection, TRL's logit conventions (scale, then soft-capping, then temperature), the stop-token merge of
[`StopAlignment`], and the token tiles that bound the transient memory to about `TILE_ELEMENTS` floats.

Pure tensor code: no transformers imports.
"""

from dataclasses import dataclass

import torch

from ..stop_alignment import StopAlignment


# Logit given to merged stop ids: exactly zero probability in float32 while every log-prob stays finite, so no
# 0 * inf appears in a divergence or its gradient.
MERGED_LOGIT = -1.0e30
# Elements of one (tokens x vocab) float32 tile: ~128 MiB, about 220 tokens at V = 151,936. Read at call time, so a
# test can shrink it to force several tiles.
TILE_ELEMENTS = 2**25


@dataclass(frozen=True)
class LogitSpec:
    """How one model's logits become log-probs: TRL's `logit_scale`, `final_logit_softcapping` and `temperature`,
    then the stop alignment (`None`: none)."""

    scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0
    alignment: StopAlignment | None = None

    def __post_init__(self):
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap must be > 0 or None (no soft-capping), got {self.softcap}.")


def project(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile_elements: int | None = None
) -> torch.Tensor:
    """`hidden @ weight.T + bias` with float32 output, without rounding low-precision logits first."""
    if weight.dtype == torch.float32:
        logits = hidden.float() @ weight.t()
    elif hidden.is_cuda:
        logits = torch.mm(hidden.to(weight.dtype), weight.t(), out_dtype=torch.float32)
    else:  # CPU low precision: upcast one vocabulary slice of the weight at a time
        step = max(1, (tile_elements or TILE_ELEMENTS) // max(1, weight.shape[1]))
        logits = torch.cat([hidden.float() @ weight[i : i + step].float().t() for i in range(0, len(weight), step)], 1)
    return logits if bias is None else logits + bias.float()


def back_project(grad_logits: torch.Tensor, weight: torch.Tensor, tile_elements: int | None = None) -> torch.Tensor:
    """`grad_logits @ weight` in float32: the hidden states' gradient. On CPU a low-precision weight is upcast one
    vocabulary slice at a time (CPUs without native bf16 GEMM run a bf16 matmul ~100x slower than float32)."""
    if weight.dtype == torch.float32:
        return grad_logits.float() @ weight
    if grad_logits.is_cuda:
        return (grad_logits.to(weight.dtype) @ weight).float()
    step = max(1, (tile_elements or TILE_ELEMENTS) // max(1, weight.shape[1]))
    out = grad_logits.new_zeros(grad_logits.shape[0], weight.shape[1], dtype=torch.float32)
    for i in range(0, len(weight), step):
        out.addmm_(grad_logits[:, i : i + step].float(), weight[i : i + step].float())
    return out


def transform(logits: torch.Tensor, scale: float, softcap: float | None, temperature: float) -> torch.Tensor:
    """TRL's order: scale, soft-cap, then divide by the temperature."""
    logits = logits * scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature


def aligned_logits(logits: torch.Tensor, alignment: StopAlignment | None) -> torch.Tensor:
    """The logits whose softmax has the stop mass merged (merged ids at [`MERGED_LOGIT`]); unchanged without one."""
    return logits if alignment is None else alignment.apply(logits, fill=MERGED_LOGIT)


def aligned_logprobs(logits: torch.Tensor, alignment: StopAlignment | None) -> torch.Tensor:
    return torch.log_softmax(aligned_logits(logits, alignment), dim=-1)


def spec_logits(projected: torch.Tensor, spec: LogitSpec) -> torch.Tensor:
    """Raw `lm_head` outputs made into the logits `spec` describes: transformed, then stop-aligned."""
    return aligned_logits(transform(projected, spec.scale, spec.softcap, spec.temperature), spec.alignment)


def model_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: LogitSpec, vocab_size: int
) -> torch.Tensor:
    """One model's transformed, stop-aligned logits over its first `vocab_size` rows (padded rows are cut)."""
    return spec_logits(project(hidden, weight[:vocab_size], None if bias is None else bias[:vocab_size]), spec)


def aligned_ids(ids: torch.Tensor, alignment: StopAlignment | None) -> torch.Tensor:
    """Token ids with every merged stop id replaced by the canonical one: after alignment they are one event."""
    if alignment is None:
        return ids
    merged = torch.tensor(alignment.merged_ids, device=ids.device, dtype=ids.dtype)
    return torch.where(torch.isin(ids, merged), torch.full_like(ids, alignment.canonical_id), ids)


def row_chunks(num_tokens: int, vocab_size: int, tile_elements: int | None = None) -> list[slice]:
    """Token slices of at most `tile_elements // vocab_size` rows (at least one)."""
    size = max(1, (tile_elements or TILE_ELEMENTS) // max(1, vocab_size))
    return [slice(start, min(start + size, num_tokens)) for start in range(0, num_tokens, size)]


def full_lm_head(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
    """Under FSDP2 the head is a DTensor: gather it once, as TRL does, so the tile loop never re-gathers it."""
    if not torch.distributed.is_available():
        return weight, bias
    from torch.distributed.tensor import DTensor

    if isinstance(weight, DTensor):
        weight = weight.full_tensor().to(dtype)
        if bias is not None:
            bias = bias.full_tensor()
    return weight, bias


def reduce_like_trl(loss_sum: torch.Tensor, num_valid: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """TRL's reduction of a summed per-token loss: divided by `num_items_in_batch` (the generation batch's completion
    tokens), or by this batch's valid tokens when it is None."""
    if num_items_in_batch is None:
        return loss_sum / num_valid.clamp(min=1)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(loss_sum.device)
    return loss_sum / num_items_in_batch


def lm_head_backward(hidden, weight, bias, needs_grad, vocab_size: int, chunk_grad_logits, tile_elements=None):
    """Gradients w.r.t. `hidden`, `weight` and `bias` (each None unless `needs_grad` says so) of a loss on the logits
    `hidden @ weight[:vocab_size].T + bias`, one row chunk at a time: `chunk_grad_logits(rows, projected)` returns the
    loss's float32 gradient w.r.t. that chunk's projected logits, so no (tokens x V) tensor outlives a chunk."""
    needs_hidden, needs_weight, needs_bias = needs_grad
    grad_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32) if needs_hidden else None
    grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if needs_weight else None
    grad_bias = torch.zeros(bias.shape, device=bias.device, dtype=torch.float32) if needs_bias else None
    head = weight[:vocab_size]
    head_bias = None if bias is None else bias[:vocab_size]
    for rows in row_chunks(hidden.shape[0], vocab_size, tile_elements):
        with torch.no_grad():
            projected = project(hidden[rows], head, head_bias)
        grad_logits = chunk_grad_logits(rows, projected)
        if grad_hidden is not None:
            grad_hidden[rows] = back_project(grad_logits, head)
        if grad_weight is not None:
            grad_weight[:vocab_size].addmm_(grad_logits.t(), hidden[rows].float())
        if grad_bias is not None:
            grad_bias[:vocab_size] += grad_logits.sum(0)
    return (
        None if grad_hidden is None else grad_hidden.to(hidden.dtype),
        None if grad_weight is None else grad_weight.to(weight.dtype),
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )
