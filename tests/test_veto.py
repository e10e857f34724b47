"""Veto's target Q ∝ pi_T * pi_S^beta and the divergence to it, pinned to naive float64 references."""

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

import trb_trl.losses.stop_aligned_divergence as divergence_module
from trb_trl.losses.stop_aligned_divergence import stop_aligned_divergence_loss
from trb_trl.losses.veto import veto_target_logprobs
from trb_trl.stop_alignment import StopAlignment


QWEN3_V, QWEN3_ENDOFTEXT, QWEN3_IM_END = 151_936, 151_643, 151_645


# ---------------------------------------------------------------------------------------------------------------------
# The target


def _reference_target(teacher_logprobs, student_logprobs, weight):
    """float64, one row at a time, from the definition: q_v ∝ p_T(v) p_S(v)^w over the ids where the product is
    positive (0^0 = 1: with w = 0 the student's zeros do not matter), in log space so spread logits lose nothing;
    a row with no such id is the teacher (renormalised)."""
    teacher = np.asarray(teacher_logprobs, dtype=np.float64).reshape(-1, teacher_logprobs.shape[-1])
    student = np.asarray(student_logprobs, dtype=np.float64).reshape(teacher.shape)
    out = np.full(teacher.shape, -np.inf)
    for row, (lt, ls) in enumerate(zip(teacher, student, strict=True)):
        support = np.isfinite(lt) & (np.isfinite(ls) if weight > 0 else True)
        if not support.any():
            support, ls = np.isfinite(lt), np.zeros_like(ls)
        log_product = lt[support] + (weight * ls[support] if weight > 0 else 0.0)
        out[row, support] = log_product - logsumexp(log_product)
    return out.reshape(teacher_logprobs.shape)


def _logprobs(shape, *, scale=1.0, temperature=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=generator, dtype=torch.float64) * scale
    return torch.log_softmax(logits / temperature, dim=-1)


def _edge_cases():
    """(name, teacher log-probs, student log-probs) in float64, before the cast to the tested dtype."""
    cases = [
        ("plain", _logprobs((6, 50), seed=1), _logprobs((6, 50), seed=2)),
        ("low_temperature", _logprobs((6, 50), temperature=0.1, seed=3), _logprobs((6, 50), temperature=0.1, seed=4)),
        ("peaked", _logprobs((6, 50), scale=30.0, seed=5), _logprobs((6, 50), scale=30.0, seed=6)),
        ("widely_spread", _logprobs((6, 50), scale=1e3, seed=7), _logprobs((6, 50), scale=1e3, seed=8)),
    ]
    teacher, student = _logprobs((6, 50), seed=9), _logprobs((6, 50), seed=10)
    teacher[:, [3, 7]] = -np.inf  # banned for the teacher (e.g. a merged stop id)
    student[:, [7, 11]] = -np.inf  # banned for the student (bad words, min_new_tokens); 7 banned for both
    student[2, 3:] = -np.inf  # row 2: the student's support {0, 1, 2} ...
    teacher[2, :3] = -np.inf  # ... and the teacher's are disjoint: no product to normalise
    cases.append(("minus_inf", torch.log_softmax(teacher, -1), torch.log_softmax(student, -1)))
    return cases


EDGE_CASES = _edge_cases()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("weight", [0.0, 0.2, 0.8, 1.0, 3.0])
@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda case: case[0])
def test_target_matches_the_float64_reference(case, weight, dtype):
    _, teacher, student = case
    teacher, student = teacher.to(dtype), student.to(dtype)
    ours = veto_target_logprobs(teacher, student, weight)
    expected = torch.from_numpy(_reference_target(teacher.double().numpy(), student.double().numpy(), weight))

    assert ours.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)  # bf16 is upcast first
    assert not ours.isnan().any()
    assert torch.equal(torch.isneginf(ours), torch.isneginf(expected))  # zero mass exactly where the definition has
    finite = torch.isfinite(expected)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours.double()[finite], expected[finite], rtol=rtol, atol=1e-5 if rtol > 1e-12 else 1e-9)
    total_tolerance = 1e-12 if dtype == torch.float64 else 1e-6  # float32 log-probs: a few ulps of 1 in the sum
    torch.testing.assert_close(
        ours.double().exp().sum(-1),
        torch.ones(ours.shape[0], dtype=torch.float64),
        rtol=total_tolerance,
        atol=total_tolerance,
    )


def test_target_at_qwen3_vocabulary_size():
    """V = 151,936 with the paper's setting: tempered logits, the merged stop id and padded rows at zero mass."""
    teacher = _logprobs((3, QWEN3_V), scale=4.0, temperature=0.6, seed=11)
    student = _logprobs((3, QWEN3_V), scale=4.0, temperature=0.6, seed=12)
    teacher[:, QWEN3_IM_END] = -np.inf
    student[:, QWEN3_IM_END] = -np.inf
    student[:, 151_669:] = -np.inf  # the lm_head rows beyond Qwen3's tokenizer
    teacher, student = torch.log_softmax(teacher, -1).float(), torch.log_softmax(student, -1).float()
    ours = veto_target_logprobs(teacher, student, 0.4)
    expected = torch.from_numpy(_reference_target(teacher.double().numpy(), student.double().numpy(), 0.4))
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isneginf(ours), ~finite) and finite.sum() == 3 * (151_669 - 1)
    torch.testing.assert_close(ours.double()[finite], expected[finite], rtol=1e-5, atol=1e-5)


def test_target_sharpens_toward_what_the_student_already_likes():
    """The point of Veto: ids the student finds unlikely lose target mass, monotonically in the weight."""
    teacher = torch.log_softmax(torch.tensor([[0.0, 0.0, 0.0]]), -1)
    student = torch.log(torch.tensor([[0.7, 0.29, 0.01]]))
    targets = [veto_target_logprobs(teacher, student, w).exp()[0] for w in (0.0, 0.4, 0.8)]
    torch.testing.assert_close(targets[0], torch.full((3,), 1 / 3))
    assert targets[0][2] > targets[1][2] > targets[2][2] and targets[0][0] < targets[1][0] < targets[2][0]


def test_the_student_term_is_detached():
    teacher = _logprobs((4, 30), seed=13).float()
    student = _logprobs((4, 30), seed=14).float().requires_grad_(True)
    assert not veto_target_logprobs(teacher, student, 0.5).requires_grad
    teacher.requires_grad_(True)  # the teacher side stays differentiable (the loss never needs it)
    veto_target_logprobs(teacher, student, 0.5).sum().backward()
    assert student.grad is None and teacher.grad is not None


@pytest.mark.parametrize("weight", [-0.1, float("nan"), float("inf")])
def test_invalid_weights_raise(weight):
    logprobs = _logprobs((2, 5)).float()
    with pytest.raises(ValueError, match="Veto weight"):
        veto_target_logprobs(logprobs, logprobs, weight)
    with pytest.raises(ValueError, match="veto_weight"):
        stop_aligned_divergence_loss(
            torch.zeros(1, 1, 2), torch.zeros(1, 1, 2), torch.zeros(5, 2), torch.zeros(5, 2), torch.ones(1, 1), 1.0,
            veto_weight=weight,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------------
# The divergence to the target, forward and backward


STOP, IM_END = 3, 5


def _problem(vocab, *, hidden=12, scale=1.0, seed=0, tokens=5):
    generator = torch.Generator().manual_seed(seed)
    hs = torch.randn(2, tokens, hidden, generator=generator, dtype=torch.float64)
    ht = torch.randn(2, tokens, hidden + 4, generator=generator, dtype=torch.float64)
    ws = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64) * scale
    wt = torch.randn(vocab, hidden + 4, generator=generator, dtype=torch.float64) * scale
    bs = torch.randn(vocab, generator=generator, dtype=torch.float64)
    mask = torch.ones(2, tokens, dtype=torch.long)
    mask[0, tokens // 2 :] = 0
    return hs, ht, ws, wt, bs, mask


def _reference_logprobs(logits, alignment):
    """float64 log-probs from the definition: the merged ids' probabilities added to the canonical id's, then the
    merged ids dropped from the support (columns removed, not masked)."""
    logprobs = torch.log_softmax(logits, -1)
    if alignment is None:
        return logprobs
    ids = [alignment.canonical_id, *alignment.merged_ids]
    merged = torch.logsumexp(logprobs[..., ids], -1, keepdim=True)
    c = alignment.canonical_id
    logprobs = torch.cat([logprobs[..., :c], merged, logprobs[..., c + 1 :]], -1)
    keep = [i for i in range(logits.shape[-1]) if i not in alignment.merged_ids]
    return logprobs[..., keep]


def _reference_divergence(ls, lq, beta):
    """TRL's generalized JSD between p_S = exp(ls) and the target q = exp(lq), in probabilities."""
    ps, q = ls.exp(), lq.exp()
    if beta == 1.0:
        return (ps * (ls - lq)).sum(-1)
    if beta == 0.0:
        return (q * (lq - ls)).sum(-1)
    mix = (1 - beta) * ps + beta * q
    return beta * (q * (lq - mix.log())).sum(-1) + (1 - beta) * (ps * (ls - mix.log())).sum(-1)


def _reference_loss(hs, ht, ws, wt, bs, mask, *, beta, temperature, alignment, weight, detach_target=True):
    """The loss in float64 with autograd; Veto's target built from the definition with the student term detached
    (`detach_target=False` differentiates through it, which Veto does not)."""
    ls = _reference_logprobs((hs @ ws.T + bs) / temperature, alignment)
    lt = _reference_logprobs((ht @ wt.T) / temperature, alignment)
    student_term = ls.detach() if detach_target else ls
    lq = torch.log_softmax(lt + weight * student_term, -1)
    per_token = _reference_divergence(ls, lq, beta)
    return (per_token * mask).sum() / mask.sum()


def _ours(hs, ht, ws, wt, bs, mask, *, beta, temperature, alignment, weight, dtype=torch.float32):
    hidden = hs.to(dtype).requires_grad_(True)
    weight_s = ws.to(dtype).requires_grad_(True)
    bias = bs.to(dtype).requires_grad_(True)
    loss, entropy, num_valid = stop_aligned_divergence_loss(
        hidden, ht.to(dtype), weight_s, wt.to(dtype), mask, beta, student_lm_head_bias=bias, temperature=temperature,
        alignment=alignment, veto_weight=weight,
    )  # fmt: skip
    loss.backward()
    assert torch.isfinite(entropy) and int(num_valid) == int(mask.sum())
    return loss, (hidden.grad, weight_s.grad, bias.grad)


def _reference(hs, ht, ws, wt, bs, mask, **kwargs):
    leaves = [x.clone().requires_grad_(True) for x in (hs, ws, bs)]
    loss = _reference_loss(leaves[0], ht, leaves[1], wt, leaves[2], mask, **kwargs)
    loss.backward()
    return loss, [leaf.grad for leaf in leaves]


def _assert_gradients_close(ours, exact, rtol=2e-3, atol_fraction=1e-4):
    """float32 against float64: close relative to each gradient's largest entry (near-zero entries are noise)."""
    for got, want in zip(ours, exact, strict=True):
        atol = max(atol_fraction * want.abs().max().item(), 1e-6)
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("aligned", [False, True], ids=["no_alignment", "stop_aligned"])
@pytest.mark.parametrize("weight", [0.0, 0.3, 0.8])
@pytest.mark.parametrize("temperature, scale", [(1.0, 1.0), (0.1, 1.0), (1.0, 6.0)], ids=["t1", "t0.1", "peaked"])
def test_loss_and_gradient_match_the_float64_reference(beta, aligned, weight, temperature, scale):
    alignment = StopAlignment(STOP, (IM_END,)) if aligned else None
    problem = _problem(40, scale=scale, seed=int(10 * beta + 100 * weight))
    if aligned:
        problem[3][IM_END] += 0.5 * problem[3].abs().mean()  # the teacher likes its own stop token
    kwargs = dict(beta=beta, temperature=temperature, alignment=alignment, weight=weight)
    loss, grads = _ours(*problem, **kwargs)
    expected, exact = _reference(*problem, **kwargs)
    assert loss.item() == pytest.approx(expected.item(), rel=2e-4, abs=1e-6)
    _assert_gradients_close(grads, exact)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_the_gradient_does_not_flow_through_the_target(beta):
    """Same loss value either way; the gradient is the detached-target one and measurably not the other."""
    problem = _problem(40, scale=2.0, seed=3)
    kwargs = dict(beta=beta, temperature=1.0, alignment=StopAlignment(STOP, (IM_END,)), weight=0.8)
    _, grads = _ours(*problem, **kwargs)
    detached_loss, detached = _reference(*problem, **kwargs)
    through_loss, through = _reference(*problem, **kwargs, detach_target=False)
    assert detached_loss.item() == pytest.approx(through_loss.item(), rel=1e-12)
    _assert_gradients_close(grads, detached)
    for got, other in zip(grads, through, strict=True):
        assert (got.double() - other).norm() > 0.05 * other.norm()


def test_veto_is_computed_per_tile_in_both_passes(monkeypatch):
    """Tiles of 3 tokens (several per batch, a short last one) give the same loss and gradients as the reference."""
    monkeypatch.setattr(divergence_module, "_TILE_ELEMENTS", 3 * 40)
    problem = _problem(40, seed=5, tokens=8)
    kwargs = dict(beta=0.5, temperature=0.7, alignment=StopAlignment(STOP, (IM_END,)), weight=0.6)
    loss, grads = _ours(*problem, **kwargs)
    expected, exact = _reference(*problem, **kwargs)
    assert loss.item() == pytest.approx(expected.item(), rel=2e-4)
    _assert_gradients_close(grads, exact)


def test_bf16_models_match_the_reference_of_their_rounded_weights():
    hs, ht, ws, wt, bs, mask = (x.bfloat16().double() if x.is_floating_point() else x for x in _problem(40, seed=6))
    kwargs = dict(beta=1.0, temperature=1.0, alignment=StopAlignment(STOP, (IM_END,)), weight=0.4)
    loss, grads = _ours(hs, ht, ws, wt, bs, mask, **kwargs, dtype=torch.bfloat16)
    expected, exact = _reference(hs, ht, ws, wt, bs, mask, **kwargs)
    assert loss.dtype == torch.float32 and all(grad.dtype == torch.bfloat16 for grad in grads)
    assert loss.item() == pytest.approx(expected.item(), rel=2e-4)
    # The logits' gradient is rounded to bf16 before it meets the bf16 weight, and the result is returned in bf16.
    _assert_gradients_close(grads, exact, rtol=2e-2, atol_fraction=4e-3)


def test_loss_at_qwen3_vocabulary_size_with_its_stop_ids():
    hs, ht, ws, wt, bs, mask = _problem(QWEN3_V, hidden=8, seed=7, tokens=3)
    kwargs = dict(beta=1.0, temperature=1.0, alignment=StopAlignment(QWEN3_ENDOFTEXT, (QWEN3_IM_END,)), weight=0.4)
    loss, grads = _ours(hs, ht, ws, wt, bs, mask, **kwargs)
    expected, exact = _reference(hs, ht, ws, wt, bs, mask, **kwargs)
    assert loss.item() == pytest.approx(expected.item(), rel=2e-4)
    _assert_gradients_close(grads, exact)


def test_weight_zero_is_bit_identical_to_the_loss_without_veto():
    hs, ht, ws, wt, _, mask = (x.float() if x.is_floating_point() else x for x in _problem(40, scale=3.0, seed=8))
    hidden = hs.requires_grad_(True)
    options = dict(temperature=0.5, alignment=StopAlignment(STOP, (IM_END,)))
    plain = stop_aligned_divergence_loss(hidden, ht, ws, wt, mask, 0.5, **options)
    (plain_grad,) = torch.autograd.grad(plain[0], hidden)
    zero = stop_aligned_divergence_loss(hidden, ht, ws, wt, mask, 0.5, **options, veto_weight=0)
    (zero_grad,) = torch.autograd.grad(zero[0], hidden)
    assert all(torch.equal(a, b) for a, b in zip(plain, zero, strict=True)) and torch.equal(plain_grad, zero_grad)
    veto = stop_aligned_divergence_loss(hidden, ht, ws, wt, mask, 0.5, **options, veto_weight=0.5)
    assert not torch.equal(plain[0], veto[0]) and torch.equal(plain[1], veto[1])  # the entropy is the student's


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_without_alignment_it_is_trls_divergence(beta):
    """`alignment=None`, `veto_weight=0`: TRL's `_chunked_divergence_loss`, value, entropy and gradients, with the
    logit scale, soft-capping, temperature, biases and masking it supports."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    hs, ht, ws, wt, bs, mask = (x.float() if x.is_floating_point() else x for x in _problem(40, scale=2.0, seed=9))
    options = dict(
        student_lm_head_bias=bs, teacher_lm_head_bias=-bs, student_logit_scale=0.8, teacher_logit_scale=1.3,
        student_final_logit_softcapping=5.0, teacher_final_logit_softcapping=None, temperature=0.7,
    )  # fmt: skip
    results = []
    for function in (stop_aligned_divergence_loss, _chunked_divergence_loss):
        hidden, weight = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
        loss, entropy, num_valid = function(hidden, ht, weight, wt, mask, beta, num_items_in_batch=7, **options)
        loss.backward()
        results.append((loss, entropy, num_valid, hidden.grad, weight.grad))
    ours, trl = results
    assert int(ours[2]) == int(trl[2]) == int(mask.sum())
    torch.testing.assert_close(ours[0], trl[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], trl[1], rtol=1e-5, atol=1e-5)
    for got, want in zip(ours[3:], trl[3:], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
