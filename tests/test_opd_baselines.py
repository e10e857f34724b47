"""The loss-side baselines of TrOPD's comparison (EOPD, Entropy OPD 20%, REOPOLD): the token selection and the losses,
pinned to a float64 reference written token by token from the rules in trb_trl/losses/opd_baselines.py."""

import math

import pytest
import torch
from reference import problem_logprobs
from test_tropd_loss import IM_END, QWEN3_ENDOFTEXT, QWEN3_IM_END, QWEN3_V, STOP, _assert_gradients_close, _problem

from trb_trl.losses.opd_baselines import renormalized_top_k_forward_kl, reopold_clip_floor
from trb_trl.losses.token_selection import kept_count, top_fraction_mask
from trb_trl.losses.tropd import TrOPDLossSpec, tropd_loss, tropd_token_loss
from trb_trl.stop_alignment import StopAlignment


def _entropy(logprobs: torch.Tensor) -> float:
    """-sum p log p in float64 over the ids with p > 0."""
    logprobs = logprobs.detach().double()
    positive = logprobs.exp() > 0
    return -(logprobs[positive].exp() * logprobs[positive]).sum().item()


def _top_fraction_reference(scores, eligible, groups, fraction):
    """Per group: the ceil(fraction * n) eligible positions of highest score, the earlier one first on ties."""
    chosen = set()
    for group in sorted(set(groups)):
        members = [i for i in range(len(scores)) if groups[i] == group and eligible[i]]
        members.sort(key=lambda i: (-scores[i], i))
        chosen.update(members[: math.ceil(round(fraction * len(members), 9))])
    return chosen


def _reference(p, spec, *, temperature=1.0, alignment=None, stage="refinement"):
    """float64, one token at a time, straight from the rules; the student's log-probs by autograd."""
    leaves, valid, student, teacher = problem_logprobs(p, temperature=temperature, alignment=alignment)
    ids = p["ids"].reshape(-1)[valid].tolist()
    prefix = p["prefix"].reshape(-1)[valid].tolist()
    rows = torch.arange(p["mask"].shape[0])[:, None].expand(p["mask"].shape).reshape(-1)[valid].tolist()
    continuation = [not is_prefix for is_prefix in prefix]
    rewards, terms, switched, clipped = [], [], set(), set()
    floor = reopold_clip_floor(spec.reopold_mixture_weight)
    for t, x in enumerate(ids):
        if alignment is not None and x in alignment.merged_ids:
            x = alignment.canonical_id
        ls, lt = student[t], teacher[t]
        reward = (lt[x] - ls[x]).item()
        rewards.append(reward)
        if prefix[t]:
            terms.append(spec.guidance_weight * -ls[x])
        elif spec.objective == "eopd":
            top = lt.topk(spec.eopd_top_k).indices
            renormalized = torch.softmax(lt[top], -1)
            forward_kl = (renormalized * (renormalized.log() - ls[top])).sum()
            high = _entropy(lt) >= spec.eopd_entropy_threshold
            switched.update([t] if high else [])
            terms.append(-reward * ls[x] + (spec.eopd_weight * forward_kl if high else 0.0))
        elif spec.objective == "entropy_top":
            terms.append(-reward * ls[x])
        else:
            clipped.update([t] if reward < floor else [])
            terms.append(-max(reward, floor) * ls[x])
    entropies = [_entropy(ls.detach()) for ls in student]
    groups = rows if spec.selection_scope == "sequence" else [0] * len(ids)
    if spec.objective == "eopd":
        selected = {t for t in range(len(ids)) if continuation[t]}
    elif spec.objective == "reopold" and stage == "exploration":
        selected = {t for t in range(len(ids)) if continuation[t] and rewards[t] >= floor}
    else:
        selected = _top_fraction_reference(entropies, continuation, groups, spec.selection_fraction)
    scale = 1.0
    if spec.objective != "eopd":
        scale = max(sum(continuation), 1) / max(len(selected), 1)
    total = sum(term if prefix[t] else term * scale for t, term in enumerate(terms) if prefix[t] or t in selected)
    loss = total / valid.sum()
    counts = {"selected": len(selected), "switched": len(switched), "clipped": len(clipped)}
    return loss, torch.autograd.grad(loss, leaves), counts


def _ours(p, spec, *, temperature=1.0, alignment=None, dtype=torch.float32, stage="refinement"):
    leaves = [p[name].to(dtype).requires_grad_(True) for name in ("hs", "ws", "bs")]
    records = {}
    loss, _, _ = tropd_loss(
        leaves[0], p["ht"].to(dtype), leaves[1], p["wt"].to(dtype), p["mask"], 0.5, None,
        student_lm_head_bias=leaves[2], temperature=temperature, completion_ids=p["ids"], is_prefix=p["prefix"],
        spec=spec, alignment=alignment, records_out=records, stage=stage,
    )  # fmt: skip
    counts = {name: int(records[f"{name}_tokens"].item()) for name in ("selected", "switched", "clipped")}
    return loss, torch.autograd.grad(loss, leaves), counts


SPECS = {
    "eopd": TrOPDLossSpec(objective="eopd", eopd_top_k=6),  # EOPD's tau = 0.8 nats, alpha = 1
    "eopd_alpha": TrOPDLossSpec(objective="eopd", eopd_top_k=3, eopd_entropy_threshold=0.3, eopd_weight=0.5),
    "entropy_top": TrOPDLossSpec(objective="entropy_top"),
    "entropy_top_sequence": TrOPDLossSpec(objective="entropy_top", selection_scope="sequence", selection_fraction=0.3),
    "reopold": TrOPDLossSpec(objective="reopold", reopold_mixture_weight=0.3, selection_fraction=0.5),
}


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize(
    "temperature, scale, aligned",
    [(1.0, 1.0, True), (0.3, 1.0, False), (1.0, 4.0, True)],
    ids=["t1", "t0.3", "peaked"],
)
def test_loss_gradients_and_counts_match_the_float64_reference(name, temperature, scale, aligned):
    spec, alignment = SPECS[name], StopAlignment(STOP, (IM_END,)) if aligned else None
    p = _problem(tokens=12, scale=scale, seed=len(name) + int(10 * temperature))
    loss, grads, counts = _ours(p, spec, temperature=temperature, alignment=alignment)
    expected, exact, expected_counts = _reference(p, spec, temperature=temperature, alignment=alignment)
    assert loss.item() == pytest.approx(expected.item(), rel=2e-4, abs=1e-6)
    _assert_gradients_close(grads, exact)
    assert counts == expected_counts
    continuation = int(p["mask"].sum() - (p["prefix"] & (p["mask"] != 0)).sum())
    if spec.objective == "eopd":  # every token trained on; at t = 1 both branches are exercised
        assert counts["selected"] == continuation
        assert scale > 1 or temperature < 1 or 0 < counts["switched"] < continuation
    else:  # the top fraction of the continuation tokens is what is trained on
        assert 0 < counts["selected"] < continuation


def test_eopd_above_every_entropy_is_plain_k1():
    """A threshold above every entropy is plain K1 (EOPD's OPD baseline is its code with tau = 100)."""
    p = _problem(tokens=12, seed=5)
    plain, plain_grads, plain_counts = _ours(p, TrOPDLossSpec(objective="eopd", eopd_entropy_threshold=100.0))
    k1, k1_grads, _ = _ours(p, TrOPDLossSpec(objective="k1"))
    assert plain_counts["switched"] == 0
    assert plain.item() == pytest.approx(k1.item(), rel=1e-6)
    _assert_gradients_close(plain_grads, [g.double() for g in k1_grads])


def test_reopold_stages_and_floor():
    """Exploration trains on the unclipped tokens, refinement on the high-entropy ones; both clip the reward at
    log(lambda) / (1 - lambda)."""
    assert reopold_clip_floor(0.3) == pytest.approx(math.log(0.3) / 0.7)
    spec = TrOPDLossSpec(objective="reopold", reopold_mixture_weight=0.5)
    p = _problem(tokens=12, scale=4.0, seed=8)
    for stage in ("exploration", "refinement"):
        loss, grads, counts = _ours(p, spec, stage=stage)
        expected, exact, expected_counts = _reference(p, spec, stage=stage)
        assert loss.item() == pytest.approx(expected.item(), rel=2e-4, abs=1e-6)
        _assert_gradients_close(grads, exact)
        assert counts == expected_counts
    assert expected_counts["clipped"] > 0  # the peaked problem has tokens below the floor


def test_widely_spread_and_banned_like_logits():
    """Student logits hundreds apart and banned-like ids (-1e4): finite and exact, entropies included."""
    p = _problem(tokens=12, seed=19)
    p["bs"] = p["bs"] * 30.0
    p["bs"][[0, 7, 11]] = -1e4
    for name in ("eopd", "entropy_top", "reopold"):
        loss, grads, _ = _ours(p, SPECS[name], alignment=StopAlignment(STOP, (IM_END,)))
        expected, exact, _ = _reference(p, SPECS[name], alignment=StopAlignment(STOP, (IM_END,)))
        assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item(), rel=2e-4)
        _assert_gradients_close(grads, exact, atol_fraction=1e-3)


def test_bf16_models_match_the_reference_of_their_rounded_weights():
    p = {
        k: v.bfloat16().double() if v.is_floating_point() and k != "draws" else v for k, v in _problem(seed=16).items()
    }
    for name in ("eopd", "reopold"):
        loss, grads, _ = _ours(p, SPECS[name], dtype=torch.bfloat16)
        expected, exact, _ = _reference(p, SPECS[name])
        assert loss.item() == pytest.approx(expected.item(), rel=5e-3)
        _assert_gradients_close(grads, exact, rtol=2e-2, atol_fraction=1e-2)


def test_eopd_at_qwen3_vocabulary_size():
    alignment = StopAlignment(QWEN3_ENDOFTEXT, (QWEN3_IM_END,))
    p = _problem(QWEN3_V, hidden=8, tokens=4, seed=17)
    p["ids"][0, 0], p["ids"][1, 1] = QWEN3_IM_END, QWEN3_ENDOFTEXT
    spec = TrOPDLossSpec(objective="eopd", eopd_entropy_threshold=0.0)  # every token switched: the FKL is exercised
    loss, grads, counts = _ours(p, spec, alignment=alignment)
    expected, exact, expected_counts = _reference(p, spec, alignment=alignment)
    assert loss.item() == pytest.approx(expected.item(), rel=2e-4)
    _assert_gradients_close(grads, exact)
    assert counts == expected_counts and counts["switched"] == counts["selected"]


def test_renormalized_forward_kl_is_zero_when_the_student_matches_the_renormalised_teacher():
    teacher = torch.log(torch.tensor([[0.5, 0.2, 0.1]]))
    renormalized = teacher - teacher.logsumexp(-1, keepdim=True)
    assert renormalized_top_k_forward_kl(teacher, renormalized).item() == pytest.approx(0.0, abs=1e-7)
    assert renormalized_top_k_forward_kl(teacher, teacher).item() == pytest.approx(-math.log(0.8), rel=1e-6)


@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_top_fraction_mask_matches_the_reference_with_ties_and_ineligible_tokens(scope):
    generator = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 4, (23,), generator=generator).float()  # many ties
    eligible = torch.rand(23, generator=generator) > 0.3
    groups = torch.tensor([0] * 7 + [1] * 9 + [2] * 7)
    got = top_fraction_mask(scores, 0.35, eligible=eligible, sequence_ids=groups, scope=scope)
    reference_groups = groups.tolist() if scope == "sequence" else [0] * 23
    expected = _top_fraction_reference(scores.tolist(), eligible.tolist(), reference_groups, 0.35)
    assert set(torch.nonzero(got).flatten().tolist()) == expected


def test_top_fraction_mask_edges():
    scores = torch.arange(10.0)
    everything = torch.ones(10, dtype=torch.bool)
    assert kept_count(0.7, 10) == 7 and kept_count(0.2, 1) == 1 and kept_count(0.2, 0) == 0
    assert top_fraction_mask(scores, 0.7, eligible=everything).sum() == 7
    assert top_fraction_mask(scores, 1.0, eligible=everything).all()
    assert top_fraction_mask(scores, 0.2, eligible=everything).tolist() == [False] * 8 + [True] * 2
    assert not top_fraction_mask(scores, 0.2, eligible=~everything).any()
    assert top_fraction_mask(torch.zeros(0), 0.2, eligible=torch.zeros(0, dtype=torch.bool)).numel() == 0
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]"):
        top_fraction_mask(scores, 0.0, eligible=everything)
    with pytest.raises(ValueError, match="needs sequence_ids"):
        top_fraction_mask(scores, 0.2, eligible=everything, scope="sequence")
    with pytest.raises(ValueError, match="scope must be one of"):
        top_fraction_mask(scores, 0.2, eligible=everything, scope="token")


@pytest.mark.parametrize(
    "options, match",
    [
        ({"objective": "eopd", "eopd_top_k": 0}, "eopd_top_k must be an int >= 1"),
        ({"objective": "eopd", "eopd_entropy_threshold": float("nan")}, "eopd_entropy_threshold must be"),
        ({"objective": "eopd", "eopd_weight": -1.0}, "eopd_weight must be"),
        ({"objective": "entropy_top", "selection_fraction": 1.5}, r"selection_fraction must be in \(0, 1\]"),
        ({"objective": "entropy_top", "selection_scope": "token"}, "selection_scope must be one of"),
        ({"objective": "reopold", "reopold_mixture_weight": 1.0}, r"reopold_mixture_weight must be in \(0, 1\)"),
    ],
)
def test_invalid_baseline_specs_raise(options, match):
    with pytest.raises(ValueError, match=match):
        TrOPDLossSpec(**options)


def test_invalid_baseline_calls_raise():
    lp = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="needs the student's entropy"):
        tropd_token_loss(lp, lp.detach(), None, None, trust_draws=None, is_prefix=None, spec=SPECS["entropy_top"])
    with pytest.raises(ValueError, match="stage must be one of"):
        tropd_token_loss(
            lp, lp.detach(), None, None, trust_draws=None, is_prefix=None, spec=SPECS["reopold"], stage="warmup"
        )
