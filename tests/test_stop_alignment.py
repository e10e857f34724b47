"""Stop-token alignment: the map itself, and the stop-aligned divergence pinned to a float64 reference."""

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from trb_trl._compat import DistillationTrainer, divergence_function_replaced
from trb_trl.losses.stop_aligned_divergence import stop_aligned_divergence_loss
from trb_trl.stop_alignment import StopAlignment


STOP, IM_END = 3, 5


def test_between_maps_only_teacher_stop_ids_foreign_to_the_student():
    assert StopAlignment.between([STOP], [IM_END, STOP]) == StopAlignment(STOP, (IM_END,))
    assert StopAlignment.between([STOP, IM_END], [IM_END]) is None  # shared stop ids: nothing to map
    assert StopAlignment.between(STOP, None) is None
    with pytest.raises(ValueError, match="student's stop id"):
        StopAlignment.between([], [IM_END])


def test_apply_moves_the_mass_and_keeps_the_rest():
    logits = torch.randn(4, 9, dtype=torch.float64) * 5
    aligned = StopAlignment(STOP, (IM_END, 7)).apply(logits)
    p, q = logits.softmax(-1), aligned.softmax(-1)
    torch.testing.assert_close(q[:, STOP], p[:, [STOP, IM_END, 7]].sum(-1))
    assert torch.all(q[:, [IM_END, 7]] == 0)
    keep = [i for i in range(9) if i not in (STOP, IM_END, 7)]
    torch.testing.assert_close(q[:, keep], p[:, keep])


def _reference_loss(zs, zt, mask, beta, temperature, alignment):
    """float64, straight from the definition: merge probabilities (not logits), drop the merged ids, divergence."""
    total, count = 0.0, 0
    for s_row, t_row, m in zip(zs, zt, mask, strict=True):
        if not m:
            continue
        ps = np.exp(s_row / temperature - logsumexp(s_row / temperature))
        pt = np.exp(t_row / temperature - logsumexp(t_row / temperature))
        for p in (ps, pt):
            p[alignment.canonical_id] += p[list(alignment.merged_ids)].sum()
        keep = [i for i in range(len(ps)) if i not in alignment.merged_ids]
        ps, pt = ps[keep], pt[keep]
        if beta == 0:
            value = np.sum(pt * (np.log(pt) - np.log(ps)))
        elif beta == 1:
            value = np.sum(ps * (np.log(ps) - np.log(pt)))
        else:
            mix = (1 - beta) * ps + beta * pt
            value = beta * np.sum(pt * np.log(pt / mix)) + (1 - beta) * np.sum(ps * np.log(ps / mix))
        total += value
        count += 1
    return total / count


def _problem(vocab, hidden=16, scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hs = torch.randn(2, 5, hidden, generator=generator, dtype=torch.float64)
    ht = torch.randn(2, 5, hidden + 8, generator=generator, dtype=torch.float64)
    ws = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64) * scale
    wt = torch.randn(vocab, hidden + 8, generator=generator, dtype=torch.float64) * scale
    wt[IM_END] += 0.5 * wt.abs().mean()  # the teacher likes its own stop token
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return hs, ht, ws, wt, mask


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature, scale", [(1.0, 1.0), (0.1, 1.0), (1.0, 6.0)])  # low tau, peaked logits
def test_loss_and_gradient_match_the_float64_reference(beta, temperature, scale):
    alignment = StopAlignment(STOP, (IM_END,))
    hs, ht, ws, wt, mask = _problem(40, scale=scale)
    hidden = hs.float().requires_grad_(True)
    weight = ws.float().requires_grad_(True)
    loss, entropy, num_valid = stop_aligned_divergence_loss(
        hidden, ht.float(), weight, wt.float(), mask, beta, temperature=temperature, alignment=alignment
    )
    loss.backward()

    zs, zt = (hs @ ws.T).reshape(-1, 40).numpy(), (ht @ wt.T).reshape(-1, 40).numpy()
    expected = _reference_loss(zs, zt, mask.reshape(-1).numpy(), beta, temperature, alignment)
    assert int(num_valid) == 8 and torch.isfinite(entropy)
    assert loss.item() == pytest.approx(expected, rel=2e-4, abs=1e-6)

    # Gradient against autograd through a float64 torch version of the same reference.
    hs64, ws64 = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    zs64, zt64 = (hs64 @ ws64.T) / temperature, (ht @ wt.T) / temperature
    ls, lt = (alignment.apply(z, fill=-1e30).log_softmax(-1) for z in (zs64, zt64))
    if beta == 1.0:
        per_token = (ls.exp() * (ls - lt)).sum(-1)
    elif beta == 0.0:
        per_token = (lt.exp() * (lt - ls)).sum(-1)
    else:
        lm = torch.logaddexp(ls + np.log(1 - beta), lt + np.log(beta))
        per_token = beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)
    reference = (per_token * mask).sum() / mask.sum()
    assert reference.item() == pytest.approx(expected, rel=1e-9)
    reference.backward()
    for ours, exact in ((hidden.grad, hs64.grad), (weight.grad, ws64.grad)):  # float32 vs float64, scaled by 1/tau
        torch.testing.assert_close(ours.double(), exact, rtol=2e-3, atol=max(1e-4 * exact.abs().max().item(), 1e-6))


def test_equals_trls_divergence_when_no_model_puts_mass_on_the_merged_id():
    """Cross-check against TRL's own kernel: with no mass on the teacher-only stop id, alignment changes nothing."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    hs, ht, ws, wt, mask = (x.float() if x.is_floating_point() else x for x in _problem(40))
    ws[IM_END], wt[IM_END] = 0.0, 0.0
    hs = torch.cat([hs, torch.ones(2, 5, 1)], -1)  # a constant feature: a bias that buries IM_END
    ht = torch.cat([ht, torch.ones(2, 5, 1)], -1)
    ws = torch.cat([ws, torch.zeros(40, 1)], -1)
    wt = torch.cat([wt, torch.zeros(40, 1)], -1)
    ws[IM_END, -1], wt[IM_END, -1] = -200.0, -200.0
    for beta in (0.0, 0.5, 1.0):
        ours = stop_aligned_divergence_loss(hs, ht, ws, wt, mask, beta, alignment=StopAlignment(STOP, (IM_END,)))
        trl = _chunked_divergence_loss(hs, ht, ws, wt, mask, beta)
        torch.testing.assert_close(ours[0], trl[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours[1], trl[1], rtol=1e-5, atol=1e-5)


def test_the_replacement_is_scoped_to_the_block():
    import trl.trainer.distillation_trainer as module

    original = module._chunked_divergence_loss
    calls = []
    with divergence_function_replaced(lambda **kwargs: calls.append(kwargs)):
        assert module._chunked_divergence_loss is not original
        module._chunked_divergence_loss(*range(6), temperature=0.5)  # as TRL calls it
    assert module._chunked_divergence_loss is original
    assert calls[0]["completion_mask"] == 4 and calls[0]["temperature"] == 0.5
    assert "_chunked_divergence_loss" in DistillationTrainer._compute_loss.__code__.co_names
