"""The TRB paper's student-top-k renormalised divergence, pinned to a float64 reference and to the full-vocabulary
divergence when k covers the vocabulary."""

import inspect
import math

import pytest
import torch
from reference import logprobs_reference

import trb_trl.losses.projection as projection
from trb_trl.losses.stop_aligned_divergence import stop_aligned_divergence_loss
from trb_trl.losses.top_k_divergence import top_k_divergence_loss
from trb_trl.stop_alignment import StopAlignment


STOP, IM_END = 3, 5
QWEN3_V, QWEN3_ENDOFTEXT, QWEN3_IM_END = 151_936, 151_643, 151_645


def _problem(vocab=40, hidden=16, tokens=5, *, scale=1.0, seed=0):
    """(student hidden, teacher hidden, student weight, teacher weight, student bias, mask) in float64."""
    generator = torch.Generator().manual_seed(seed)
    hs = torch.randn(2, tokens, hidden, generator=generator, dtype=torch.float64)
    ht = torch.randn(2, tokens, hidden + 8, generator=generator, dtype=torch.float64)
    ws = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64) * scale / hidden**0.5 * 3
    wt = torch.randn(vocab, hidden + 8, generator=generator, dtype=torch.float64) * scale / hidden**0.5 * 3
    bs = torch.randn(vocab, generator=generator, dtype=torch.float64)
    wt[IM_END] += 0.5 * wt.abs().mean()  # the teacher likes its own stop token
    mask = torch.ones(2, tokens, dtype=torch.long)
    mask[0, tokens - 2 :] = 0
    return hs, ht, ws, wt, bs, mask


def _generalized_jsd(ls, lt, beta):
    if beta == 1.0:
        return (ls.exp() * (ls - lt)).sum(-1)
    if beta == 0.0:
        return (lt.exp() * (lt - ls)).sum(-1)
    lm = torch.logaddexp(ls + math.log(1 - beta), lt + math.log(beta))
    return beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)


def _reference(hs, ht, ws, wt, bs, mask, *, beta, k, temperature=1.0, alignment=None, num_items=None, veto=0.0):
    """float64 from the definition: S = the student's top-k ids, both distributions restricted to S and renormalised
    (with Veto, the target q ∝ p_T p_S^veto on S, p_S a constant), TRL's generalized JSD on S, summed over valid tokens
    / (num_items or the valid count); gradients by autograd."""
    leaves = [x.clone().requires_grad_(True) for x in (hs, ws, bs)]
    valid = mask.reshape(-1) != 0
    student = logprobs_reference(
        leaves[0].reshape(-1, hs.shape[-1])[valid], leaves[1], leaves[2], temperature=temperature, alignment=alignment
    )
    teacher = logprobs_reference(ht.reshape(-1, ht.shape[-1])[valid], wt, temperature=temperature, alignment=alignment)
    support = student.detach().topk(k, dim=-1).indices
    ls, lt = student.gather(-1, support), teacher.gather(-1, support)
    ls, lt = ls - ls.logsumexp(-1, keepdim=True), lt - lt.logsumexp(-1, keepdim=True)
    if veto:
        lt = lt + veto * ls.detach()
        lt = lt - lt.logsumexp(-1, keepdim=True)
    loss = _generalized_jsd(ls, lt, beta).sum() / (valid.sum() if num_items is None else num_items)
    entropy = -(student.exp() * student.nan_to_num(neginf=0)).sum()
    return loss, entropy, torch.autograd.grad(loss, leaves)


def _ours(hs, ht, ws, wt, bs, mask, *, beta, k, temperature=1.0, alignment=None, num_items=None, veto=0.0, dtype=None):
    leaves = [x.to(dtype or torch.float32).requires_grad_(True) for x in (hs, ws, bs)]
    loss, entropy, num_valid = top_k_divergence_loss(
        leaves[0], ht.to(leaves[1].dtype), leaves[1], wt.to(leaves[1].dtype), mask, beta, num_items,
        student_lm_head_bias=leaves[2], temperature=temperature, top_k=k, alignment=alignment, veto_weight=veto,
    )  # fmt: skip
    assert int(num_valid) == int(mask.sum())
    return loss, entropy, torch.autograd.grad(loss, leaves)


def _assert_gradients_close(ours, exact, rtol=2e-3, atol_fraction=1e-4):
    for got, want in zip(ours, exact, strict=True):
        atol = max(atol_fraction * want.abs().max().item(), 1e-7)
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("aligned", [False, True], ids=["no_alignment", "stop_aligned"])
@pytest.mark.parametrize("temperature, scale", [(1.0, 1.0), (0.1, 1.0), (1.0, 8.0)], ids=["t1", "t0.1", "peaked"])
def test_loss_and_gradients_match_the_float64_reference(beta, aligned, temperature, scale):
    alignment = StopAlignment(STOP, (IM_END,)) if aligned else None
    problem = _problem(scale=scale, seed=int(10 * beta) + int(10 * scale))
    kwargs = dict(beta=beta, k=6, temperature=temperature, alignment=alignment)
    loss, entropy, grads = _ours(*problem, **kwargs)
    expected, expected_entropy, exact = _reference(*problem, **kwargs)
    assert loss.item() == pytest.approx(expected.item(), rel=2e-4, abs=1e-6)
    assert entropy.item() == pytest.approx(expected_entropy.item(), rel=1e-4, abs=1e-5)
    _assert_gradients_close(grads, exact)


def test_widely_spread_and_banned_like_logits():
    """A student bias thousands apart and banned-like ids (-1e4) inside the vocabulary, over several tiles."""
    hs, ht, ws, wt, bs, mask = _problem(seed=3)
    bs = bs * 30.0
    bs[[0, 7, 11]] = -1e4
    kwargs = dict(beta=1.0, k=38, alignment=StopAlignment(STOP, (IM_END,)))  # the support reaches the banned ids
    loss, entropy, grads = _ours(hs, ht, ws, wt, bs, mask, **kwargs)
    expected, expected_entropy, exact = _reference(hs, ht, ws, wt, bs, mask, **kwargs)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item(), rel=2e-4, abs=1e-6)
    # Near one-hot rows: each logit's gradient is a float32 difference of O(|log p|) terms, so the error is relative
    # to those, not to the tiny gradient (TRL's own kernel is about 5x further from the reference on this problem).
    _assert_gradients_close(grads, exact, atol_fraction=2e-2)


def test_per_tile_in_both_passes(monkeypatch):
    monkeypatch.setattr(projection, "TILE_ELEMENTS", 3 * 40)
    problem = _problem(seed=4, tokens=6)
    kwargs = dict(beta=0.5, k=5, temperature=0.7, alignment=StopAlignment(STOP, (IM_END,)), num_items=13)
    loss, _, grads = _ours(*problem, **kwargs)
    expected, _, exact = _reference(*problem, **kwargs)
    assert loss.item() == pytest.approx(expected.item(), rel=2e-4)
    _assert_gradients_close(grads, exact)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("top_k, veto", [(40, 0.0), (1000, 0.0), (40, 0.6)])
def test_k_covering_the_vocabulary_is_the_full_vocabulary_divergence(beta, top_k, veto):
    """The strong cross-check: with S = every id, renormalising changes nothing, so the loss, the entropy and the
    gradients are those of `stop_aligned_divergence_loss`, with the logit scale, soft-capping, biases, reduction and
    Veto's target."""
    hs, ht, ws, wt, bs, mask = (x.float() if x.is_floating_point() else x for x in _problem(scale=2.0, seed=5))
    options = dict(
        student_lm_head_bias=bs, teacher_lm_head_bias=-bs, student_logit_scale=0.8, teacher_logit_scale=1.3,
        student_final_logit_softcapping=5.0, teacher_final_logit_softcapping=None, temperature=0.7,
        alignment=StopAlignment(STOP, (IM_END,)),
    )  # fmt: skip
    results = []
    options["veto_weight"] = veto
    for function, extra in ((top_k_divergence_loss, dict(top_k=top_k)), (stop_aligned_divergence_loss, {})):
        hidden, weight = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        loss, entropy, num_valid = function(hidden, ht, weight, wt, mask, beta, 7, **options, **extra)
        loss.backward()
        results.append((loss, entropy, num_valid, hidden.grad, weight.grad))
    ours, full = results
    assert int(ours[2]) == int(full[2]) == int(mask.sum())
    torch.testing.assert_close(ours[0], full[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], full[1], rtol=1e-5, atol=1e-5)
    for got, want in zip(ours[3:], full[3:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_veto_target_on_the_support(beta):
    problem = _problem(seed=10, scale=2.0)
    kwargs = dict(beta=beta, k=8, alignment=StopAlignment(STOP, (IM_END,)), veto=0.5)
    loss, _, grads = _ours(*problem, **kwargs)
    expected, _, exact = _reference(*problem, **kwargs)
    plain, _, _ = _reference(*problem, **(kwargs | dict(veto=0.0)))
    assert loss.item() == pytest.approx(expected.item(), rel=2e-4) and abs(expected.item() - plain.item()) > 1e-3
    _assert_gradients_close(grads, exact)


def test_the_gradient_reaches_the_student_logits_on_its_top_k_only():
    hs, ht, ws, wt, bs, mask = (x.float() if x.is_floating_point() else x for x in _problem(seed=6))
    mask = torch.zeros_like(mask)
    mask[1, 2] = 1  # one token
    bias = bs.clone().requires_grad_(True)
    loss, _, _ = top_k_divergence_loss(hs, ht, ws, wt, mask, 1.0, student_lm_head_bias=bias, top_k=6)
    loss.backward()
    support = (hs[1, 2] @ ws.T + bs).topk(6).indices
    outside = torch.ones(40, dtype=torch.bool)
    outside[support] = False
    assert (bias.grad[outside] == 0).all() and (bias.grad[support] != 0).all()


def test_reduction_with_num_items_in_batch():
    problem = _problem(seed=7)
    plain, _, _ = _ours(*problem, beta=1.0, k=4)
    scaled, _, _ = _ours(*problem, beta=1.0, k=4, num_items=torch.tensor(20))
    assert scaled.item() * 20 == pytest.approx(plain.item() * int(problem[-1].sum()), rel=1e-6)
    empty = problem[:-1] + (torch.zeros_like(problem[-1]),)
    loss, entropy, _ = _ours(*empty, beta=1.0, k=4)
    assert loss.item() == 0.0 and entropy.item() == 0.0  # a fully masked rank: a finite zero


def test_bf16_models_match_the_reference_of_their_rounded_weights():
    problem = tuple(x.bfloat16().double() if x.is_floating_point() else x for x in _problem(seed=8))
    kwargs = dict(beta=1.0, k=16, alignment=StopAlignment(STOP, (IM_END,)))
    loss, _, grads = _ours(*problem, **kwargs, dtype=torch.bfloat16)
    expected, _, exact = _reference(*problem, **kwargs)
    assert loss.dtype == torch.float32 and all(grad.dtype == torch.bfloat16 for grad in grads)
    assert loss.item() == pytest.approx(expected.item(), rel=5e-4)
    _assert_gradients_close(grads, exact, rtol=2e-2, atol_fraction=1e-2)


def test_at_qwen3_vocabulary_size_with_its_stop_ids():
    hs, ht, ws, wt, bs, mask = _problem(QWEN3_V, hidden=8, tokens=2, seed=9)
    wt[QWEN3_IM_END] += 3.0 * ht.reshape(-1, 16).mean(0)  # the teacher wants to stop on its own id
    kwargs = dict(beta=1.0, k=16, alignment=StopAlignment(QWEN3_ENDOFTEXT, (QWEN3_IM_END,)))
    loss, entropy, grads = _ours(hs, ht, ws, wt, bs, mask, **kwargs)
    expected, expected_entropy, exact = _reference(hs, ht, ws, wt, bs, mask, **kwargs)
    assert loss.item() == pytest.approx(expected.item(), rel=2e-4)
    assert entropy.item() == pytest.approx(expected_entropy.item(), rel=1e-4)
    _assert_gradients_close(grads, exact)


def test_it_is_a_drop_in_for_trls_divergence():
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    ours = list(inspect.signature(top_k_divergence_loss).parameters.values())
    trl = list(inspect.signature(_chunked_divergence_loss).parameters.values())
    assert [(p.name, p.default) for p in ours[: len(trl)]] == [(p.name, p.default) for p in trl]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(trl) :])


@pytest.mark.parametrize("top_k", [0, -3, 2.5, True, None])
def test_invalid_top_k_raises(top_k):
    problem = tuple(x.float() if x.is_floating_point() else x for x in _problem())
    with pytest.raises(ValueError, match="top_k"):
        top_k_divergence_loss(*problem[:4], problem[-1], 1.0, top_k=top_k)


def test_invalid_beta_and_veto_weight_raise():
    problem = tuple(x.float() if x.is_floating_point() else x for x in _problem())
    with pytest.raises(ValueError, match="beta"):
        top_k_divergence_loss(*problem[:4], problem[-1], 1.5, top_k=16)
    with pytest.raises(ValueError, match="veto_weight"):
        top_k_divergence_loss(*problem[:4], problem[-1], 1.0, top_k=16, veto_weight=-0.1)
