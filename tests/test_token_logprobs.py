"""Log-probs at a few ids per token from hidden states, pinned to a float64 reference (values and gradients)."""

import pytest
import torch
from reference import logprobs_reference

import trb_trl.losses.projection as projection
from trb_trl.losses.projection import LogitSpec
from trb_trl.losses.token_logprobs import gathered_logprobs, teacher_top_k, top_k_ids, top_k_logprobs
from trb_trl.stop_alignment import StopAlignment


STOP, IM_END = 3, 5
QWEN3_V, QWEN3_ENDOFTEXT, QWEN3_IM_END = 151_936, 151_643, 151_645


def _problem(case: str, vocab: int = 40, hidden: int = 16, tokens: int = 9, seed: int = 0):
    """(hidden, weight, bias, LogitSpec options) in float64 for one edge case of real runs."""
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=generator, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64) / hidden**0.5
    b = torch.randn(vocab, generator=generator, dtype=torch.float64)
    options = {}
    if case == "low_temperature":
        options = dict(temperature=0.1)
    elif case == "peaked":
        w = w * 30.0
    elif case == "widely_spread":
        b = b * 1e3  # log-probs thousands apart
    elif case == "minus_inf_like":
        b[[1, 7, 11]] = -1e4  # banned-like ids: zero probability in float32, finite logits
    elif case == "scaled_softcapped":
        w = w * 6.0
        options = dict(scale=0.8, softcap=5.0, temperature=0.7)
    return h, w, b, options


CASES = ["plain", "low_temperature", "peaked", "widely_spread", "minus_inf_like", "scaled_softcapped"]


def _distinct_ids(tokens, vocab, m, seed=1, exclude=()):
    generator = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([v for v in range(vocab) if v not in exclude])
    return torch.stack([allowed[torch.randperm(len(allowed), generator=generator)[:m]] for _ in range(tokens)])


def _assert_gradients_close(ours, exact, rtol=2e-3, atol_fraction=1e-4):
    """float32 against float64: close relative to each gradient's largest entry (near-zero entries are noise)."""
    for got, want in zip(ours, exact, strict=True):
        atol = max(atol_fraction * want.abs().max().item(), 1e-7)
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


def _reference_gathered(h, w, b, ids, normalize, options, alignment):
    logprobs = logprobs_reference(h, w, b, alignment=alignment, **options)
    chosen = logprobs.gather(-1, ids)
    return chosen if normalize == "full" else chosen - torch.logsumexp(chosen, dim=-1, keepdim=True)


def _run(function, h, w, b, *args, dtype=torch.float32, **kwargs):
    """Call `function` on float32 (or `dtype`) copies that require grad; returns the inputs with the outputs."""
    leaves = [x.to(dtype).requires_grad_(True) for x in (h, w, b)]
    return leaves, function(*leaves, *args, **kwargs)


@pytest.mark.parametrize("normalize", ["full", "subset"])
@pytest.mark.parametrize("aligned", [False, True], ids=["no_alignment", "stop_aligned"])
@pytest.mark.parametrize("case", CASES)
def test_gathered_logprobs_match_the_float64_reference(case, aligned, normalize):
    alignment = StopAlignment(STOP, (IM_END,)) if aligned else None
    h, w, b, options = _problem(case)
    ids = _distinct_ids(9, 40, 6, exclude=(IM_END,) if aligned else ())
    ids[:, 0] = torch.tensor([STOP, 1, 7, 11, 0, 39, STOP, 2, 1])  # the stop id and the banned-like ids
    spec = LogitSpec(alignment=alignment, **options)
    leaves, (logprobs, entropy) = _run(
        gathered_logprobs, h, w, b, ids, spec, vocab_size=40, normalize=normalize, return_entropy=True
    )
    cotangent = torch.randn(logprobs.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = torch.autograd.grad((logprobs * cotangent.float()).sum(), leaves)

    exact_leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
    expected = _reference_gathered(*exact_leaves, ids, normalize, options, alignment)
    exact = torch.autograd.grad((expected * cotangent).sum(), exact_leaves)
    reference_logprobs = logprobs_reference(h, w, b, alignment=alignment, **options)
    expected_entropy = -(reference_logprobs.exp() * reference_logprobs.nan_to_num(neginf=0)).sum(-1)

    assert logprobs.dtype == torch.float32 and torch.isfinite(logprobs).all()
    torch.testing.assert_close(logprobs.double(), expected.detach(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(entropy.double(), expected_entropy, rtol=1e-4, atol=1e-5)
    assert not entropy.requires_grad
    _assert_gradients_close(grads, exact)


def test_a_merged_stop_id_has_zero_probability_and_a_finite_log_prob():
    h, w, b, _ = _problem("plain")
    ids = torch.tensor([[IM_END, STOP]] * 9)
    spec = LogitSpec(alignment=StopAlignment(STOP, (IM_END,)))
    leaves, logprobs = _run(gathered_logprobs, h, w, b, ids, spec, vocab_size=40)
    assert torch.isfinite(logprobs).all() and (logprobs[:, 0].exp() == 0).all()
    grads = torch.autograd.grad(logprobs.sum(), leaves)
    assert all(torch.isfinite(g).all() for g in grads)


def test_tiles_and_padded_rows(monkeypatch):
    """Tiles of 2 tokens (a short last one) and an lm_head with padded rows give the reference over the cut vocabulary;
    the padded rows get no gradient."""
    monkeypatch.setattr(projection, "TILE_ELEMENTS", 2 * 40)
    h, w, b, options = _problem("scaled_softcapped")
    padded_w = torch.cat([w, torch.randn(6, w.shape[1], dtype=torch.float64)])
    padded_b = torch.cat([b, torch.full((6,), 50.0, dtype=torch.float64)])  # would dominate if not cut
    ids = _distinct_ids(9, 40, 5, exclude=(IM_END,))
    spec = LogitSpec(alignment=StopAlignment(STOP, (IM_END,)), **options)
    leaves, logprobs = _run(gathered_logprobs, h, padded_w, padded_b, ids, spec, vocab_size=40)
    grads = torch.autograd.grad(logprobs.sum(), leaves)
    exact_leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
    expected = _reference_gathered(*exact_leaves, ids, "full", options, spec.alignment)
    exact = torch.autograd.grad(expected.sum(), exact_leaves)
    torch.testing.assert_close(logprobs.double(), expected.detach(), rtol=1e-5, atol=2e-5)
    assert (grads[1][40:] == 0).all() and (grads[2][40:] == 0).all()
    _assert_gradients_close((grads[0], grads[1][:40], grads[2][:40]), exact)


def test_bf16_heads_match_the_reference_of_their_rounded_weights():
    h, w, b, options = (x.bfloat16().double() if isinstance(x, torch.Tensor) else x for x in _problem("peaked"))
    ids = _distinct_ids(9, 40, 8, exclude=(IM_END,))
    spec = LogitSpec(alignment=StopAlignment(STOP, (IM_END,)), **options)
    leaves, logprobs = _run(gathered_logprobs, h, w, b, ids, spec, vocab_size=40, dtype=torch.bfloat16)
    grads = torch.autograd.grad(logprobs.sum(), leaves)
    exact_leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
    expected = _reference_gathered(*exact_leaves, ids, "full", options, spec.alignment)
    exact = torch.autograd.grad(expected.sum(), exact_leaves)
    assert logprobs.dtype == torch.float32 and all(g.dtype == torch.bfloat16 for g in grads)
    torch.testing.assert_close(logprobs.double(), expected.detach(), rtol=1e-4, atol=1e-4)  # logits kept in float32
    # Gradients are returned in bf16 (rounded), and on CUDA the logits' gradient meets the bf16 weight in bf16.
    _assert_gradients_close(grads, exact, rtol=2e-2, atol_fraction=1e-2)


@pytest.mark.parametrize("normalize", ["full", "subset"])
def test_at_qwen3_vocabulary_size_with_its_stop_ids(normalize):
    """Its top-16, the stop id and random ids (almost-zero probability) at V = 151,936."""
    alignment = StopAlignment(QWEN3_ENDOFTEXT, (QWEN3_IM_END,))
    h, w, b, _ = _problem("plain", vocab=QWEN3_V, hidden=8, tokens=3, seed=4)
    w[QWEN3_IM_END] += 3.0 * h.mean(0)  # the teacher-style stop token is likely
    ids = logprobs_reference(h, w, b, alignment=alignment).topk(16, dim=-1).indices
    ids = torch.cat([ids, torch.full((3, 1), QWEN3_ENDOFTEXT), torch.randint(0, QWEN3_V, (3, 4))], 1)
    spec = LogitSpec(alignment=alignment)
    leaves, logprobs = _run(gathered_logprobs, h, w, b, ids, spec, vocab_size=QWEN3_V, normalize=normalize)
    grads = torch.autograd.grad(logprobs.sum(), leaves)
    exact_leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
    expected = _reference_gathered(*exact_leaves, ids, normalize, {}, alignment)
    exact = torch.autograd.grad(expected.sum(), exact_leaves)
    torch.testing.assert_close(logprobs.double(), expected.detach(), rtol=1e-5, atol=2e-5)
    _assert_gradients_close(grads, exact)


@pytest.mark.parametrize("case", ["plain", "low_temperature", "peaked", "minus_inf_like"])
def test_top_k_logprobs_choose_the_reference_top_k_and_renormalise_there(case):
    alignment = StopAlignment(STOP, (IM_END,))
    h, w, b, options = _problem(case, seed=5)
    spec = LogitSpec(alignment=alignment, **options)
    leaves, (ids, logprobs, entropy) = _run(top_k_logprobs, h, w, b, spec, vocab_size=40, k=7, return_entropy=True)
    grads = torch.autograd.grad(logprobs.sum(), leaves)
    reference = logprobs_reference(h, w, b, alignment=alignment, **options)
    assert torch.equal(ids, reference.topk(7, dim=-1).indices)  # sorted by decreasing probability
    exact_leaves = [x.clone().requires_grad_(True) for x in (h, w, b)]
    expected = _reference_gathered(*exact_leaves, ids, "subset", options, alignment)
    exact = torch.autograd.grad(expected.sum(), exact_leaves)
    torch.testing.assert_close(logprobs.double(), expected.detach(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(logprobs.exp().sum(-1), torch.ones(9))
    _assert_gradients_close(grads, exact)
    assert not ids.requires_grad and not entropy.requires_grad


def test_teacher_top_k_and_top_k_ids_are_the_reference_ranking_without_gradient():
    alignment = StopAlignment(STOP, (IM_END,))
    h, w, b, options = _problem("scaled_softcapped", seed=6)
    w[IM_END] += 2.0 * h.mean(0) / 16**0.5  # the merged id would be in the top-k without the alignment
    spec = LogitSpec(alignment=alignment, **options)
    extra = torch.randint(0, 40, (9, 2), generator=torch.Generator().manual_seed(7))
    leaves = [x.float().requires_grad_(True) for x in (h, w, b)]
    top_ids, top_logprobs, extra_logprobs = teacher_top_k(*leaves, spec, vocab_size=40, k=10, extra_ids=extra)
    reference = logprobs_reference(h, w, b, alignment=alignment, **options)
    expected = reference.topk(10, dim=-1)
    assert torch.equal(top_ids, expected.indices) and not (top_ids == IM_END).any()
    torch.testing.assert_close(top_logprobs.double(), expected.values, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(extra_logprobs.double(), reference.gather(-1, extra), rtol=1e-5, atol=2e-5)
    assert not (top_logprobs.requires_grad or extra_logprobs.requires_grad)
    assert torch.equal(top_k_ids(*leaves, spec, vocab_size=40, k=10), top_ids)
    none_ids, none_logprobs, only_extra = teacher_top_k(*leaves, spec, vocab_size=40, k=0, extra_ids=extra)
    assert none_ids.shape == (9, 0) and none_logprobs.shape == (9, 0) and torch.equal(only_extra, extra_logprobs)
    all_ids, _, nothing = teacher_top_k(*leaves, spec, vocab_size=40, k=1000)  # cut to the vocabulary
    assert all_ids.shape == (9, 40) and nothing is None


def test_no_tokens_is_empty_not_an_error():
    h, w, b, _ = _problem("plain", tokens=0)
    leaves, logprobs = _run(
        gathered_logprobs, h, w, b, torch.zeros(0, 3, dtype=torch.long), LogitSpec(), vocab_size=40
    )
    assert logprobs.shape == (0, 3)
    grads = torch.autograd.grad(logprobs.sum(), leaves)
    assert all((g == 0).all() for g in grads)


def test_invalid_inputs_raise_clear_errors():
    h, w, b, _ = (x.float() if isinstance(x, torch.Tensor) else x for x in _problem("plain"))
    ids = torch.zeros(9, 2, dtype=torch.long)
    spec = LogitSpec()
    with pytest.raises(ValueError, match="vocab_size"):
        gathered_logprobs(h, w, b, ids, spec, vocab_size=41)
    with pytest.raises(ValueError, match="ids must lie in"):
        gathered_logprobs(h, w, b, ids + 40, spec, vocab_size=40)
    with pytest.raises(ValueError, match="int64"):
        gathered_logprobs(h, w, b, ids.int(), spec, vocab_size=40)
    with pytest.raises(ValueError, match="int64"):
        gathered_logprobs(h, w, b, ids[:3], spec, vocab_size=40)
    with pytest.raises(ValueError, match="normalize"):
        gathered_logprobs(h, w, b, ids, spec, vocab_size=40, normalize="top")
    with pytest.raises(ValueError, match="LogitSpec"):
        gathered_logprobs(h, w, b, ids, None, vocab_size=40)
    with pytest.raises(ValueError, match="bias"):
        gathered_logprobs(h, w, b[:10], ids, spec, vocab_size=40)
    with pytest.raises(ValueError, match="k must be"):
        top_k_logprobs(h, w, b, spec, vocab_size=40, k=0)
    with pytest.raises(ValueError, match="k must be"):
        teacher_top_k(h, w, b, spec, vocab_size=40, k=-1)
    with pytest.raises(ValueError, match="extra_ids"):
        teacher_top_k(h, w, b, spec, vocab_size=40, k=2, extra_ids=ids[:, 0])
    with pytest.raises(ValueError, match="temperature"):
        LogitSpec(temperature=0.0)
    with pytest.raises(ValueError, match="softcap"):
        LogitSpec(softcap=-1.0)


@pytest.mark.parametrize("normalize", ["full", "subset"])
def test_tiny_log_probs_of_peaked_rows_at_tempered_logits_near_350(normalize):
    """|z / tau| ~ 350 (logits ~ +-35 at tau = 0.1), near-one-hot rows: the top id's log-prob is -2e-4 to -7e-6. At
    that magnitude float32 is spaced 3e-5 apart, so `chosen - logsumexp(logits)` loses ~1e-5 nats, often more than the
    whole log-prob; log_softmax keeps `z - max` exact. The reference is float64 on the same (float32-representable) inputs:
    the top ids are pinned to 5e-7 nats, the other ids to the float32 rounding of the tempered logits themselves.
    (`"subset"`, a log_softmax over the chosen logits, was never affected: the control.)"""
    generator = torch.Generator().manual_seed(11)
    h = torch.randn(32, 8, generator=generator, dtype=torch.float64)
    w = 0.03 * torch.randn(64, 8, generator=generator, dtype=torch.float64)
    b = 35.0 - 1.2 - torch.rand(64, generator=generator, dtype=torch.float64)  # ~12-22 nats below the top, tempered
    b[0] = 35.0
    b[32:] -= 70.0  # half the tempered logits near -350, half near +350
    h, w, b = (x.float().double() for x in (h, w, b))  # exactly representable in float32
    spec = LogitSpec(temperature=0.1)
    reference = logprobs_reference(h, w, b, temperature=0.1)
    assert 250 < ((h @ w.T + b) / 0.1).abs().min() and ((h @ w.T + b) / 0.1).abs().max() < 450
    ids = reference.topk(3, dim=-1).indices
    expected = reference.gather(-1, ids)
    if normalize == "subset":
        expected = expected - torch.logsumexp(expected, dim=-1, keepdim=True)
    assert expected[:, 0].max() < 0 and expected[:, 0].min() > -1e-3  # tiny top log-probs
    leaves, logprobs = _run(gathered_logprobs, h, w, b, ids, spec, vocab_size=64, normalize=normalize)
    torch.testing.assert_close(logprobs[:, 0].double(), expected[:, 0], rtol=0, atol=5e-7)
    torch.testing.assert_close(logprobs.double(), expected, rtol=0, atol=2e-4)
    top = top_k_logprobs(h.float(), w.float(), b.float(), spec, vocab_size=64, k=3, normalize=normalize)[1]
    torch.testing.assert_close(top[:, 0].double(), expected[:, 0], rtol=0, atol=5e-7)
