"""A few log-probs per token from hidden states, without keeping `(tokens, V)` logits.

Top-k losses (the TRB paper's student-top-16 reverse KL, TrOPD's teacher-top-64 forward KL on outliers) need each
model's log-probs at a handful of ids per token, normalised over the whole vocabulary or over just those ids. The
functions here project the hidden states through the `lm_head` one tile of tokens at a time (O(tile x V) transient
memory), keep only the `(tokens, m)` gathered values, and, for the student, recompute each tile in the backward, so
the memory kept between the passes is O(tokens x m).

- [`gathered_logprobs`]: differentiable log-probs at given ids (`normalize="full"` or `"subset"`).
- [`top_k_logprobs`]: the same at the model's own top-k ids, chosen in the same pass (the choice is not
  differentiated).
- [`teacher_top_k`] / [`top_k_ids`]: no-grad passes for the teacher's top-k (ids and full-vocabulary log-probs, plus
  log-probs at extra ids such as the sampled token) and for a model's top-k ids alone.

Every function also reads the logit conventions of TRL's `_chunked_divergence_loss` from a [`LogitSpec`] (scale,
soft-capping, temperature) and merges stop tokens with its [`StopAlignment`] before normalising. Under DeepSpeed
ZeRO-3 the `lm_head` is gathered once around each tile loop, never inside it.
"""

from typing import Literal

import torch

from .projection import LogitSpec, lm_head_backward, model_logits, row_chunks, spec_logits


Normalization = Literal["full", "subset"]


def _rows(weight: torch.Tensor) -> int:
    """The head's row count, also under ZeRO-3, where a partitioned parameter is empty outside a gather."""
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def _check(hidden, weight, bias, spec, vocab_size, normalize: str | None = None):
    if not isinstance(spec, LogitSpec):
        raise ValueError(f"spec must be a LogitSpec (scale, softcap, temperature, alignment), got {type(spec)}.")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (tokens, hidden_size), got shape {tuple(hidden.shape)}.")
    rows = _rows(weight)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= rows:
        raise ValueError(f"vocab_size must be an int in [1, {rows}] (the lm_head's rows), got {vocab_size!r}.")
    if bias is not None and int(getattr(bias, "ds_shape", bias.shape)[0]) != rows:
        raise ValueError(f"bias must have one entry per lm_head row ({rows}), got shape {tuple(bias.shape)}.")
    if normalize is not None and normalize not in ("full", "subset"):
        raise ValueError(f"normalize must be 'full' or 'subset', got {normalize!r}.")


def _check_ids(ids: torch.Tensor, num_tokens: int, vocab_size: int, name: str = "ids"):
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.dim() != 2 or ids.shape[0] != num_tokens:
        got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids)
        raise ValueError(f"{name} must be a (tokens={num_tokens}, m) int64 tensor, got {got}.")
    if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < vocab_size):
        raise ValueError(
            f"{name} must lie in [0, vocab_size={vocab_size}), got values in [{int(ids.min())}, {int(ids.max())}]."
        )


def _check_k(k, minimum: int = 1):
    if isinstance(k, bool) or not isinstance(k, int) or k < minimum:
        raise ValueError(f"k must be an int >= {minimum}, got {k!r}.")


def _normalised(logits: torch.Tensor, ids: torch.Tensor, normalize: str) -> torch.Tensor:
    if normalize == "subset":
        return torch.log_softmax(logits.gather(-1, ids), dim=-1)
    # log_softmax, then gather: `logits - max` is exact, so a near-one-hot row keeps its tiny log-probs. The gathered
    # `chosen - logsumexp(logits)` would subtract two float32 values rounded at the logits' magnitude (at |z/tau| ~ 350
    # ~1e-5 nats lost, more than a top id's whole log-prob in a peaked row).
    return torch.log_softmax(logits, dim=-1).gather(-1, ids)


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    return _entropy_of_logprobs(torch.log_softmax(logits, dim=-1))


def _entropy_of_logprobs(logprobs: torch.Tensor) -> torch.Tensor:
    """-sum p log p, with 0 log 0 = 0 (ids at -inf, such as a merged stop id, add nothing instead of NaN)."""
    probs = logprobs.exp()
    return -torch.where(probs > 0, probs * logprobs, torch.zeros_like(logprobs)).sum(-1)


class _GatheredLogprobs(torch.autograd.Function):
    """Log-probs at given (or own top-k) ids and the full-vocabulary entropy per token; gradients to the head and the
    hidden states, recomputed tile by tile."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, spec, vocab_size, normalize, top_k, with_entropy):
        from .._compat import maybe_gather_lm_head_ctx

        num_tokens = hidden.shape[0]
        width = ids.shape[1] if ids is not None else min(top_k, vocab_size)
        logprobs = hidden.new_zeros(num_tokens, width, dtype=torch.float32)
        entropy = hidden.new_zeros(num_tokens, dtype=torch.float32)
        chosen = ids if ids is not None else hidden.new_zeros(num_tokens, width, dtype=torch.long)
        with torch.no_grad(), maybe_gather_lm_head_ctx(weight, bias):
            for rows in row_chunks(num_tokens, vocab_size):
                logits = model_logits(hidden[rows], weight, bias, spec, vocab_size)
                if ids is None:
                    chosen[rows] = logits.topk(width, dim=-1, sorted=True).indices
                logprobs[rows] = _normalised(logits, chosen[rows], normalize)
                if with_entropy:
                    entropy[rows] = _entropy(logits)
        ctx.save_for_backward(hidden, weight, bias, chosen)
        ctx.options = (spec, vocab_size, normalize)
        ctx.mark_non_differentiable(entropy, chosen)
        return logprobs, entropy, chosen

    @staticmethod
    def backward(ctx, grad_logprobs, _grad_entropy, _grad_ids):
        from .._compat import maybe_gather_lm_head_ctx

        hidden, weight, bias, ids = ctx.saved_tensors
        spec, vocab_size, normalize = ctx.options
        if grad_logprobs is None:
            return (None,) * 9

        def chunk_grad_logits(rows, projected):
            projected.requires_grad_(True)
            with torch.enable_grad():
                logprobs = _normalised(spec_logits(projected, spec), ids[rows], normalize)
                (grad_logits,) = torch.autograd.grad(logprobs, projected, grad_logprobs[rows].float())
            return grad_logits

        with maybe_gather_lm_head_ctx(weight, bias):
            grads = lm_head_backward(hidden, weight, bias, ctx.needs_input_grad[:3], vocab_size, chunk_grad_logits)
        return (
            *grads,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def gathered_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    ids: torch.Tensor,
    spec: LogitSpec,
    *,
    vocab_size: int,
    normalize: Normalization = "full",
    return_entropy: bool = False,
):
    """Log-probs of one model at `ids`, differentiable with respect to `hidden`, `weight` and `bias`.

    Args:
        hidden (`torch.Tensor`): `(N, H)` hidden states (before the `lm_head`).
        weight (`torch.Tensor`): `(V', H)` `lm_head` weight; rows from `vocab_size` on (padding) are cut.
        bias (`torch.Tensor` or `None`): `(V',)` `lm_head` bias.
        ids (`torch.Tensor`): `(N, m)` int64 token ids in `[0, vocab_size)`; repeats are allowed.
        spec ([`LogitSpec`]): scale, soft-capping, temperature and stop alignment of this model's logits.
        vocab_size (`int`): the shared vocabulary size.
        normalize (`"full"` or `"subset"`):
            `"full"`: the log-softmax over the whole (aligned, tempered) vocabulary, read at `ids`. `"subset"`: the
            log-softmax over the `m` given logits only (the distribution renormalised to those ids).
        return_entropy (`bool`): also return the per-token full-vocabulary entropy (no gradient), from the same pass.

    Returns:
        `(N, m)` float32 log-probs, and with `return_entropy` the `(N,)` float32 entropies as well.
    """
    _check(hidden, weight, bias, spec, vocab_size, normalize)
    _check_ids(ids, hidden.shape[0], vocab_size)
    logprobs, entropy, _ = _GatheredLogprobs.apply(
        hidden, weight, bias, ids, spec, vocab_size, normalize, None, return_entropy
    )
    return (logprobs, entropy) if return_entropy else logprobs


def top_k_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    spec: LogitSpec,
    *,
    vocab_size: int,
    k: int,
    normalize: Normalization = "subset",
    return_entropy: bool = False,
):
    """The model's own top-`k` ids (of its aligned, tempered logits) and its log-probs there, in one pass.

    The choice of ids is not differentiated; the log-probs are, as in [`gathered_logprobs`]. `k` larger than the
    vocabulary is cut to it. Returns `(ids (N, k), logprobs (N, k))`, plus the `(N,)` entropies with `return_entropy`;
    ids are sorted by decreasing logit.
    """
    _check(hidden, weight, bias, spec, vocab_size, normalize)
    _check_k(k)
    logprobs, entropy, ids = _GatheredLogprobs.apply(
        hidden, weight, bias, None, spec, vocab_size, normalize, k, return_entropy
    )
    return (ids, logprobs, entropy) if return_entropy else (ids, logprobs)


@torch.no_grad()
def teacher_top_k(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    spec: LogitSpec,
    *,
    vocab_size: int,
    k: int,
    extra_ids: torch.Tensor | None = None,
    return_entropy: bool = False,
):
    """The teacher's top-`k` ids with their full-vocabulary log-probs, and its log-probs at `extra_ids`; no gradient.

    Args:
        k (`int`): how many ids per token (`0`: none, only `extra_ids`); cut to `vocab_size`.
        extra_ids (`torch.Tensor`, *optional*): `(N, e)` int64 ids to read as well (e.g. the sampled token).
        return_entropy (`bool`): also return the per-token full-vocabulary entropy, from the same pass (EOPD).

    Returns:
        `(top_ids (N, k) int64, top_logprobs (N, k) float32, extra_logprobs (N, e) float32 or None)`, ids sorted by
        decreasing probability, plus the `(N,)` float32 entropies with `return_entropy`. Only these are kept: memory
        O(N x (k + e)) besides one O(tile x V) tile.
    """
    from .._compat import maybe_gather_lm_head_ctx

    _check(hidden, weight, bias, spec, vocab_size)
    _check_k(k, minimum=0)
    num_tokens, width = hidden.shape[0], min(k, vocab_size)
    if extra_ids is not None:
        _check_ids(extra_ids, num_tokens, vocab_size, "extra_ids")
    top_ids = hidden.new_zeros(num_tokens, width, dtype=torch.long)
    top_logprobs = hidden.new_zeros(num_tokens, width, dtype=torch.float32)
    extra = None if extra_ids is None else hidden.new_zeros(extra_ids.shape, dtype=torch.float32)
    entropy = hidden.new_zeros(num_tokens, dtype=torch.float32) if return_entropy else None
    with maybe_gather_lm_head_ctx(weight, bias):
        for rows in row_chunks(num_tokens, vocab_size):
            logprobs = torch.log_softmax(model_logits(hidden[rows], weight, bias, spec, vocab_size), dim=-1)
            if width:
                top_logprobs[rows], top_ids[rows] = logprobs.topk(width, dim=-1, sorted=True)
            if extra is not None:
                extra[rows] = logprobs.gather(-1, extra_ids[rows])
            if entropy is not None:
                entropy[rows] = _entropy_of_logprobs(logprobs)
    if return_entropy:
        return top_ids, top_logprobs, extra, entropy
    return top_ids, top_logprobs, extra


@torch.no_grad()
def top_k_ids(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: LogitSpec, *, vocab_size: int, k: int
) -> torch.Tensor:
    """A model's top-`k` ids `(N, k)` (of its aligned, tempered logits, sorted), without gradient; `k` is cut to
    `vocab_size`."""
    _check_k(k)
    return teacher_top_k(hidden, weight, bias, spec, vocab_size=vocab_size, k=k)[0]
