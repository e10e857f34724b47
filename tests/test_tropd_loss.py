"""TrOPD's loss: the per-token rules and the drop-in, pinned to a float64 reference written token by token."""

import inspect
import math

import pytest
import torch
from reference import logprobs_reference, problem_logprobs

import trb_trl.losses.projection as projection
from trb_trl.losses.tropd import TrOPDLossSpec, tropd_loss, tropd_token_loss
from trb_trl.stop_alignment import StopAlignment


STOP, IM_END = 3, 5
QWEN3_V, QWEN3_ENDOFTEXT, QWEN3_IM_END = 151_936, 151_643, 151_645

SPECS = {
    "tropd": TrOPDLossSpec(top_k=6),
    "adaptive_mask": TrOPDLossSpec(outlier="mask", top_k=6),
    "adaptive_clip": TrOPDLossSpec(outlier="clip", threshold=-1.0, top_k=6),
    "threshold_fkl": TrOPDLossSpec(outlier_detection="threshold", threshold=-1.0, top_k=6),
    "threshold_mask": TrOPDLossSpec(outlier="mask", outlier_detection="threshold", threshold=-1.0),
    "threshold_clip": TrOPDLossSpec(outlier="clip", outlier_detection="threshold", threshold=-1.0),
    "k1": TrOPDLossSpec(objective="k1"),
    "fkl": TrOPDLossSpec(objective="fkl", top_k=6),
    "jsd": TrOPDLossSpec(objective="jsd", top_k=6, jsd_beta=0.3),
}


def _problem(vocab=40, hidden=16, tokens=8, *, scale=1.0, seed=0):
    """Hidden states, heads, a student bias, completion ids (with a teacher-only stop id), mask, prefix, draws."""
    generator = torch.Generator().manual_seed(seed)
    hs = torch.randn(2, tokens, hidden, generator=generator, dtype=torch.float64)
    ht = torch.randn(2, tokens, hidden + 8, generator=generator, dtype=torch.float64)
    ws = torch.randn(vocab, hidden, generator=generator, dtype=torch.float64) * 3 * scale / hidden**0.5
    wt = torch.randn(vocab, hidden + 8, generator=generator, dtype=torch.float64) * 3 * scale / hidden**0.5
    bs = torch.randn(vocab, generator=generator, dtype=torch.float64)
    ids = torch.randint(0, vocab, (2, tokens), generator=generator)
    ids[0, 1], ids[1, 3] = STOP, IM_END  # a sampled teacher-only stop id is the student's stop after alignment
    mask = torch.ones(2, tokens, dtype=torch.long)
    mask[0, tokens - 2 :] = 0
    prefix = torch.zeros(2, tokens, dtype=torch.bool)
    prefix[1, :3] = True  # a teacher prefix of 3 tokens in the second row
    draws = torch.rand(2, tokens, generator=generator, dtype=torch.float64)
    return dict(hs=hs, ht=ht, ws=ws, wt=wt, bs=bs, ids=ids, mask=mask, prefix=prefix, draws=draws)


def _reference(p, spec, *, temperature=1.0, alignment=None, num_items=None):
    """float64, one token at a time, straight from the rules; the student's log-probs by autograd."""
    leaves, valid, student, teacher = problem_logprobs(p, temperature=temperature, alignment=alignment)
    ids = p["ids"].reshape(-1)[valid].tolist()
    prefix, draws = p["prefix"].reshape(-1)[valid].tolist(), p["draws"].reshape(-1)[valid].tolist()
    total, trusted_count, outlier_count = 0.0, 0, 0
    for t, x in enumerate(ids):
        if alignment is not None and x in alignment.merged_ids:
            x = alignment.canonical_id
        ls, lt = student[t], teacher[t]
        reward = (lt[x] - ls[x]).item()
        if prefix[t]:
            total = total + spec.guidance_weight * -ls[x]
            continue
        top = lt.topk(min(spec.top_k, len(lt))).indices
        forward_kl = (lt[top].exp() * (lt[top] - ls[top])).sum()
        if spec.objective == "k1":
            total = total - reward * ls[x]
        elif spec.objective == "fkl":
            total = total + forward_kl
        elif spec.objective == "jsd":
            b = spec.jsd_beta
            log_m = torch.log(b * lt[top].exp() + (1 - b) * ls[top].exp())
            log_m_x = math.log(b * math.exp(lt[x].item()) + (1 - b) * math.exp(ls[x].item()))
            total = total + b * (lt[top].exp() * (lt[top] - log_m)).sum() - (1 - b) * (log_m_x - ls[x].item()) * ls[x]
        else:
            if spec.outlier_detection == "adaptive":
                trusted = draws[t] < math.exp(min(reward, 0.0))  # min(1, pi_T / pi_S)
            else:
                trusted = reward >= spec.threshold
            trusted_count += trusted
            outlier_count += not trusted
            if trusted:
                total = total - reward * ls[x]
            elif spec.outlier == "fkl":
                total = total + forward_kl
            elif spec.outlier == "clip":
                total = total - max(reward, spec.threshold) * ls[x]
    loss = total / (valid.sum() if num_items is None else num_items)
    return loss, torch.autograd.grad(loss, leaves), (trusted_count, outlier_count)


def _ours(p, spec, *, temperature=1.0, alignment=None, num_items=None, dtype=torch.float32, records_out=None):
    leaves = [p[name].to(dtype).requires_grad_(True) for name in ("hs", "ws", "bs")]
    loss, entropy, num_valid = tropd_loss(
        leaves[0], p["ht"].to(dtype), leaves[1], p["wt"].to(dtype), p["mask"], 0.5, num_items,
        student_lm_head_bias=leaves[2], temperature=temperature, completion_ids=p["ids"], is_prefix=p["prefix"],
        trust_draws=p["draws"].float(), spec=spec, alignment=alignment, records_out=records_out,
    )  # fmt: skip
    assert int(num_valid) == int(p["mask"].sum())
    return loss, entropy, torch.autograd.grad(loss, leaves)


def _assert_gradients_close(ours, exact, rtol=2e-3, atol_fraction=1e-4):
    for got, want in zip(ours, exact, strict=True):
        atol = max(atol_fraction * want.abs().max().item(), 1e-7)
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize(
    "temperature, scale, aligned",
    [(1.0, 1.0, True), (0.3, 1.0, False), (1.0, 4.0, True)],
    ids=["t1", "t0.3", "peaked"],
)
def test_loss_and_gradients_match_the_float64_reference(name, temperature, scale, aligned):
    spec, alignment = SPECS[name], StopAlignment(STOP, (IM_END,)) if aligned else None
    p = _problem(scale=scale, seed=len(name) + int(10 * temperature))
    records = {}
    loss, entropy, grads = _ours(p, spec, temperature=temperature, alignment=alignment, records_out=records)
    expected, exact, (trusted, outliers) = _reference(p, spec, temperature=temperature, alignment=alignment)
    assert loss.item() == pytest.approx(expected.item(), rel=2e-4, abs=1e-6)
    _assert_gradients_close(grads, exact)
    if spec.objective == "trust_region":
        assert (records["trusted_tokens"].item(), records["outlier_tokens"].item()) == (trusted, outliers)
    if name in ("tropd", "threshold_fkl"):
        assert trusted > 0 and outliers > 0  # the problem exercises both branches


@pytest.mark.parametrize("name", ["tropd", "threshold_clip", "jsd"])
def test_widely_spread_and_banned_like_logits(name):
    """Student logits hundreds apart and banned-like ids (-1e4), one of them a teacher-prefix token: finite and exact."""
    p = _problem(seed=19)
    p["bs"] = p["bs"] * 30.0
    p["bs"][[0, 7, 11]] = -1e4
    p["ids"][1, 1] = 7  # inside the teacher prefix: the student's NLL of it is about 1e4
    loss, _, grads = _ours(p, SPECS[name], alignment=StopAlignment(STOP, (IM_END,)))
    expected, exact, _ = _reference(p, SPECS[name], alignment=StopAlignment(STOP, (IM_END,)))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(expected.item(), rel=2e-4)
    _assert_gradients_close(grads, exact, atol_fraction=1e-3)


def test_k1_gradient_is_the_policy_gradient_form():
    """OPD's K1: the reward is a constant of the gradient, -R * grad log pi_S(x), not the gradient of the sampled
    reverse-KL estimate log pi_S(x) - log pi_T(x) (which is just grad log pi_S(x))."""
    p = _problem(seed=11)
    p["prefix"][:] = False
    _, _, grads = _ours(p, SPECS["k1"])
    hidden = p["hs"].clone().requires_grad_(True)
    valid = p["mask"].reshape(-1) != 0
    ls = logprobs_reference(hidden.reshape(-1, 16)[valid], p["ws"], p["bs"])
    lt = logprobs_reference(p["ht"].reshape(-1, 24)[valid], p["wt"])
    x = p["ids"].reshape(-1)[valid][:, None]
    ls_x, lt_x = ls.gather(-1, x)[:, 0], lt.gather(-1, x)[:, 0]
    (policy_gradient,) = torch.autograd.grad((-(lt_x - ls_x).detach() * ls_x).mean(), hidden, retain_graph=True)
    (estimate_gradient,) = torch.autograd.grad((ls_x - lt_x).mean(), hidden)
    _assert_gradients_close((grads[0],), (policy_gradient,))
    assert (grads[0].double() - estimate_gradient).norm() > 0.1 * estimate_gradient.norm()


def test_adaptive_trust_rate_is_min_one_and_the_probability_ratio():
    """Each token is trusted with probability min(1, pi_T(x) / pi_S(x)): many draws per token, within 5 binomial
    standard deviations (deterministic seed)."""
    rewards = torch.tensor([-6.0, -3.0, -1.5, -0.7, -0.2, -0.01, 0.0, 0.4, 3.0])
    lp_s = torch.full((len(rewards),), -2.0)
    draws_per_token = 20_000
    lp_s, lp_t = lp_s.repeat(draws_per_token), (lp_s + rewards).repeat(draws_per_token)
    draws = torch.rand(lp_s.shape, generator=torch.Generator().manual_seed(3))
    spec = TrOPDLossSpec(outlier="mask")
    _, records = tropd_token_loss(lp_s, lp_t, None, None, trust_draws=draws, is_prefix=None, spec=spec)
    rate = records["trusted"].reshape(draws_per_token, -1).double().mean(0)
    expected = rewards.double().exp().clamp(max=1)
    tolerance = 5 * (expected * (1 - expected) / draws_per_token).sqrt() + 1e-12
    assert ((rate - expected).abs() <= tolerance).all(), (rate, expected)
    assert torch.equal(records["outlier"], ~records["trusted"])
    torch.testing.assert_close(records["trust_probability"].reshape(draws_per_token, -1)[0].double(), expected)


def test_prefix_tokens_get_the_guidance_nll_only_and_stay_out_of_the_trust_statistics():
    p = _problem(seed=12)
    p["prefix"][:] = False
    p["prefix"][1] = True  # the whole second row is a teacher prefix
    records = {}
    loss, _, _ = _ours(p, TrOPDLossSpec(top_k=6, guidance_weight=0.25), records_out=records)
    without, _, _ = _ours(p, TrOPDLossSpec(top_k=6, guidance_weight=0.0))
    # The prefix part of the loss is 0.25 * the student's NLL of the teacher's tokens.
    hs, valid = p["hs"][1], p["mask"][1] != 0
    x = p["ids"][1][valid].clone()
    ls = logprobs_reference(hs[valid], p["ws"], p["bs"]).gather(-1, x[:, None])[:, 0]
    prefix_part = 0.25 * -ls.sum() / p["mask"].sum()
    assert loss.item() - without.item() == pytest.approx(prefix_part.item(), rel=1e-4)
    assert records["prefix_tokens"].item() == int(valid.sum())
    assert records["continuation_tokens"].item() == int(p["mask"][0].sum())
    assert records["trusted_tokens"] + records["outlier_tokens"] == records["continuation_tokens"]


def test_records_accumulate_and_match_the_per_token_records():
    p = _problem(seed=13)
    records = {}
    _ours(p, SPECS["tropd"], records_out=records)
    once = {key: value.clone() for key, value in records.items()}
    _ours(p, SPECS["tropd"], records_out=records)
    assert all(torch.equal(records[key], 2 * once[key]) for key in once)
    valid = p["mask"].reshape(-1) != 0
    prefix = p["prefix"].reshape(-1)[valid]
    assert once["prefix_tokens"].item() == prefix.sum().item()
    assert once["continuation_tokens"].item() == (~prefix).sum().item()
    total = once["reward_sum_prefix"] + once["reward_sum_continuation"]
    assert (once["reward_sum_trusted"] + once["reward_sum_outlier"]).item() == pytest.approx(
        once["reward_sum_continuation"].item(), abs=1e-5
    )
    assert math.isfinite(total.item()) and 0 < once["trust_probability_sum"].item() <= (~prefix).sum().item()


def test_a_sampled_teacher_only_stop_id_is_the_students_stop():
    p = _problem(seed=14)
    alignment = StopAlignment(STOP, (IM_END,))
    as_stop = dict(p, ids=torch.where(p["ids"] == IM_END, STOP, p["ids"]))
    assert (p["ids"] == IM_END).any()
    first, _, first_grads = _ours(p, SPECS["tropd"], alignment=alignment)
    second, _, second_grads = _ours(as_stop, SPECS["tropd"], alignment=alignment)
    assert torch.equal(first, second) and all(torch.equal(a, b) for a, b in zip(first_grads, second_grads))


def test_reduction_entropy_and_tiles(monkeypatch):
    """`num_items_in_batch` divides the sum (TRL's reduction); tiles of 3 tokens change nothing; the entropy is the
    student's full-vocabulary one over every valid token."""
    p = _problem(seed=15)
    spec = SPECS["jsd"]
    plain, entropy, _ = _ours(p, spec)
    scaled, _, grads = _ours(p, spec, num_items=torch.tensor(23))
    assert scaled.item() * 23 == pytest.approx(plain.item() * int(p["mask"].sum()), rel=1e-5)
    monkeypatch.setattr(projection, "TILE_ELEMENTS", 3 * 40)
    tiled, tiled_entropy, tiled_grads = _ours(p, spec, num_items=torch.tensor(23))
    expected, exact, _ = _reference(p, spec, num_items=23)
    assert tiled.item() == pytest.approx(expected.item(), rel=2e-4)
    _assert_gradients_close(tiled_grads, exact)
    valid = p["mask"].reshape(-1) != 0
    ls = logprobs_reference(p["hs"].reshape(-1, 16)[valid], p["ws"], p["bs"])
    assert entropy.item() == pytest.approx(-(ls.exp() * ls).sum().item(), rel=1e-5)
    assert tiled_entropy.item() == pytest.approx(entropy.item(), rel=1e-5)
    empty = dict(p, mask=torch.zeros_like(p["mask"]))
    loss, entropy, _ = tropd_loss(
        p["hs"].float(), p["ht"].float(), p["ws"].float(), p["wt"].float(), empty["mask"], 0.5,
        completion_ids=p["ids"], trust_draws=p["draws"].float(), spec=spec,
    )  # fmt: skip
    assert loss.item() == 0.0 and entropy.item() == 0.0  # a fully masked rank: a finite zero


def test_bf16_models_match_the_reference_of_their_rounded_weights():
    p = {
        k: v.bfloat16().double() if v.is_floating_point() and k != "draws" else v for k, v in _problem(seed=16).items()
    }
    alignment = StopAlignment(STOP, (IM_END,))
    loss, _, grads = _ours(p, SPECS["tropd"], alignment=alignment, dtype=torch.bfloat16)
    expected, exact, _ = _reference(p, SPECS["tropd"], alignment=alignment)
    assert loss.dtype == torch.float32 and all(grad.dtype == torch.bfloat16 for grad in grads)
    assert loss.item() == pytest.approx(expected.item(), rel=5e-4)
    _assert_gradients_close(grads, exact, rtol=2e-2, atol_fraction=1e-2)


def test_at_qwen3_vocabulary_size_with_k_64():
    alignment = StopAlignment(QWEN3_ENDOFTEXT, (QWEN3_IM_END,))
    p = _problem(QWEN3_V, hidden=8, tokens=4, seed=17)
    p["ids"][0, 0], p["ids"][1, 1] = QWEN3_IM_END, QWEN3_ENDOFTEXT
    p["prefix"][:] = False
    p["prefix"][1, 0] = True
    p["wt"][QWEN3_IM_END] += 3.0 * p["ht"].reshape(-1, 16).mean(0)
    spec = TrOPDLossSpec(top_k=64)
    loss, entropy, grads = _ours(p, spec, alignment=alignment)
    expected, exact, _ = _reference(p, spec, alignment=alignment)
    assert loss.item() == pytest.approx(expected.item(), rel=2e-4)
    _assert_gradients_close(grads, exact)


def test_memory_kept_between_the_passes_is_tokens_times_k():
    """No tensor of (tokens x V) is saved for the backward: only the inputs and (tokens x (1 + k)) values."""
    vocab, tokens, k = 3000, 64, 8
    generator = torch.Generator().manual_seed(18)
    hs, ht = torch.randn(1, tokens, 4, generator=generator), torch.randn(1, tokens, 4, generator=generator)
    ws, wt = torch.randn(vocab, 4, generator=generator), torch.randn(vocab, 4, generator=generator)
    ws.requires_grad_(True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        tropd_loss(
            hs, ht, ws, wt, torch.ones(1, tokens), 0.5, completion_ids=torch.randint(0, vocab, (1, tokens)),
            trust_draws=torch.rand(1, tokens), spec=TrOPDLossSpec(top_k=k),
        )  # fmt: skip
    largest = max(t.numel() for t in saved if t.data_ptr() != ws.data_ptr())
    assert saved and largest <= tokens * (1 + k) * 4, largest


@pytest.mark.parametrize("valid_tokens", [0, 2, 13])
def test_the_heads_are_gathered_the_same_number_of_times_whatever_the_token_count(monkeypatch, valid_tokens):
    """Under ZeRO-3 a gather is a collective: ranks with different token counts (0, one tile, several) must enter it
    equally often, so it sits around the tile loops, never inside."""
    import contextlib

    import trb_trl._compat as compat

    entries = []

    @contextlib.contextmanager
    def counting(*params):
        entries.append(len(params))
        yield

    monkeypatch.setattr(compat, "maybe_gather_lm_head_ctx", counting)
    monkeypatch.setattr(projection, "TILE_ELEMENTS", 3 * 40)
    p = {k: v.float() if v.is_floating_point() else v for k, v in _problem(seed=20).items()}
    mask = torch.zeros_like(p["mask"]).reshape(-1)
    mask[:valid_tokens] = 1
    hidden = p["hs"].requires_grad_(True)
    loss, _, _ = tropd_loss(
        hidden, p["ht"], p["ws"], p["wt"], mask.reshape(p["mask"].shape), 0.5, completion_ids=p["ids"],
        trust_draws=p["draws"], spec=SPECS["tropd"],
    )  # fmt: skip
    loss.backward()
    assert len(entries) == 3  # teacher pass, student forward, student backward


def test_it_is_a_drop_in_for_trls_divergence():
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    ours = list(inspect.signature(tropd_loss).parameters.values())
    trl = list(inspect.signature(_chunked_divergence_loss).parameters.values())
    assert [(p.name, p.default) for p in ours[: len(trl)]] == [(p.name, p.default) for p in trl]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(trl) :])


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(objective="opd"), "objective"),
        (dict(outlier="drop"), "outlier must"),
        (dict(outlier_detection="fixed"), "outlier_detection"),
        (dict(threshold=5.0), "threshold"),
        (dict(threshold=float("nan")), "threshold"),
        (dict(threshold=float("-inf")), "threshold"),
        (dict(top_k=0), "top_k"),
        (dict(top_k=6.0), "top_k"),
        (dict(jsd_beta=0.0), "jsd_beta"),
        (dict(jsd_beta=1.0), "jsd_beta"),
        (dict(guidance_weight=-1e-3), "guidance_weight"),
        (dict(guidance_weight=float("inf")), "guidance_weight"),
    ],
)
def test_invalid_specs_raise(options, match):
    with pytest.raises(ValueError, match=match):
        TrOPDLossSpec(**options)


def test_invalid_calls_raise():
    p = {k: v.float() if v.is_floating_point() else v for k, v in _problem().items()}
    args = (p["hs"], p["ht"], p["ws"], p["wt"], p["mask"], 0.5)
    with pytest.raises(ValueError, match="trust_draws"):
        tropd_loss(*args, completion_ids=p["ids"], spec=TrOPDLossSpec())
    with pytest.raises(ValueError, match="completion_ids"):
        tropd_loss(*args, completion_ids=p["ids"][:, :3], trust_draws=p["draws"], spec=TrOPDLossSpec())
    with pytest.raises(ValueError, match="is_prefix"):
        tropd_loss(*args, completion_ids=p["ids"], trust_draws=p["draws"], is_prefix=p["prefix"][0], spec=SPECS["k1"])
    with pytest.raises(ValueError, match="TrOPDLossSpec"):
        tropd_loss(*args, completion_ids=p["ids"], trust_draws=p["draws"], spec=dict(objective="k1"))
    lp = torch.zeros(4)
    with pytest.raises(ValueError, match="top-k"):
        tropd_token_loss(lp, lp, None, None, trust_draws=lp, is_prefix=None, spec=SPECS["fkl"])
    with pytest.raises(ValueError, match="trust_draws"):
        tropd_token_loss(lp, lp, None, None, trust_draws=None, is_prefix=None, spec=SPECS["adaptive_mask"])
    assert tropd_loss(*args, completion_ids=p["ids"], spec=SPECS["threshold_mask"])[0].isfinite()  # no draws needed
