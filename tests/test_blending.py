import math

import numpy as np
import pytest
import torch
from reference import blend_row_reference

from trb_trl import trust_region_blend
from trb_trl.rollout import blending


def _random_pair(batch, vocab, seed, scale=3.0, correlation=0.5):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, vocab, generator=generator) * scale
    teacher = torch.randn(batch, vocab, generator=generator) * scale + correlation * student
    return student, teacher


def _peaked_pair(batch, vocab, seed, overlap):
    """Rows shaped like real LM logits: a bulk around 0 and a few tokens 15-40 above it.

    Student and teacher peak at different tokens; with `overlap` the teacher also peaks at the student's top token.
    At low temperature the student's log-prob of the teacher's peaks is in the hundreds or thousands below 0.
    """
    rng = np.random.default_rng(seed)
    student = rng.normal(0.0, 2.0, (batch, vocab))
    teacher = rng.normal(0.0, 2.0, (batch, vocab)) + 0.5 * student
    for row in range(batch):
        peaks = rng.choice(vocab, size=6, replace=False)
        student_peaks, teacher_peaks = peaks[: rng.integers(1, 4)], peaks[3 : 3 + rng.integers(1, 4)]
        if overlap:
            teacher_peaks = np.append(teacher_peaks, student_peaks[0])
        student[row, student_peaks] += rng.uniform(15.0, 40.0, len(student_peaks))
        teacher[row, teacher_peaks] += rng.uniform(15.0, 40.0, len(teacher_peaks))
    return torch.tensor(student, dtype=torch.float32), torch.tensor(teacher, dtype=torch.float32)


def _spread_pair(batch, vocab, seed):
    """Logits uniform over [-100, 100]: at tau = 0.05 tempered log-probs span about 4000 nats."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(2, batch, vocab, generator=generator) * 200.0 - 100.0).unbind(0)


def _rows(kind, batch, vocab, seed):
    if kind == "spread":
        return _spread_pair(batch, vocab, seed)
    return _peaked_pair(batch, vocab, seed, overlap=kind == "peaked_overlap")


def _assert_matches_reference(student, teacher, epsilon, temperature=1.0):
    result = trust_region_blend(student, teacher, epsilon, temperature=temperature)
    for field in (result.logprobs, result.beta, result.kl_to_student, result.kl_to_teacher):
        assert not torch.isnan(field).any()
    epsilons = epsilon.tolist() if isinstance(epsilon, torch.Tensor) else [epsilon] * student.shape[0]
    for row, eps in enumerate(epsilons):
        ref_logprobs, ref_beta, ref_kl_student, ref_kl_teacher = blend_row_reference(
            student[row].double().numpy(), teacher[row].double().numpy(), eps, temperature
        )
        beta = result.beta[row].item()
        assert abs(beta - ref_beta) < 2e-3, (row, eps, beta, ref_beta)
        mu = result.logprobs[row].double().exp().numpy()
        total_variation = 0.5 * np.abs(mu - np.exp(ref_logprobs)).sum()
        assert total_variation < 2e-3, (row, eps, total_variation)
        # The realised KL, measured in float64 on the returned distribution, respects the budget.
        allowed = np.isfinite(student[row].double().numpy())
        z = student[row].double().numpy()[allowed] / temperature
        log_student = z - np.logaddexp.reduce(z)
        log_mu = result.logprobs[row].double().numpy()[allowed]
        kept = log_mu > -np.inf  # the tokens the teacher rules out are dropped once beta > 0
        realised = float(np.sum(np.exp(log_mu[kept]) * (log_mu[kept] - log_student[kept])))
        assert realised <= eps * (1 + 1e-3) + 2e-5, (row, eps, realised)
        assert result.kl_to_student[row].item() == pytest.approx(ref_kl_student, rel=1e-2, abs=2e-5)
        assert result.kl_to_teacher[row].item() == pytest.approx(ref_kl_teacher, rel=1e-2, abs=1e-4)
    return result


@pytest.mark.parametrize("vocab", [50, 1000, 32_000])
@pytest.mark.parametrize("epsilon", [0.0, 1e-4, 1e-3, 0.02, 0.3, 50.0])
def test_matches_float64_reference(vocab, epsilon):
    student, teacher = _random_pair(3, vocab, seed=vocab)
    _assert_matches_reference(student, teacher, epsilon, temperature=0.7)


def test_matches_reference_at_qwen3_vocab_size():
    student, teacher = _random_pair(2, 151_936, seed=1)
    _assert_matches_reference(student, teacher, torch.tensor([1e-3, 0.02]))


def test_per_row_epsilon():
    student, teacher = _random_pair(5, 300, seed=2)
    epsilon = torch.tensor([0.0, 1e-3, 0.01, 0.1, 1e3])
    result = _assert_matches_reference(student, teacher, epsilon)
    assert result.beta[0].item() == 0.0
    assert result.beta[-1].item() == 1.0


def test_zero_budget_is_student_and_large_budget_is_teacher():
    student, teacher = _random_pair(4, 200, seed=3)
    temperature = 0.8
    zero = trust_region_blend(student, teacher, 0.0, temperature=temperature)
    torch.testing.assert_close(zero.logprobs, torch.log_softmax(student / temperature, -1))
    assert torch.all(zero.beta == 0) and torch.all(zero.kl_to_student == 0)
    kl_teacher_student = (
        torch.softmax(teacher / temperature, -1)
        * (torch.log_softmax(teacher / temperature, -1) - torch.log_softmax(student / temperature, -1))
    ).sum(-1)
    full = trust_region_blend(student, teacher, kl_teacher_student * 1.001, temperature=temperature)
    assert torch.all(full.beta == 1)
    torch.testing.assert_close(full.logprobs, torch.log_softmax(teacher / temperature, -1), atol=1e-4, rtol=0)


def test_banned_tokens_keep_zero_mass_and_teacher_is_renormalised():
    student, teacher = _random_pair(3, 120, seed=4)
    student[:, :10] = float("-inf")
    student[1, 50:100] = float("-inf")
    # The teacher puts most of its mass on banned tokens: it must be renormalised, not produce NaN.
    teacher[:, :10] += 20.0
    for epsilon in [0.0, 0.01, 0.5, 100.0]:
        result = _assert_matches_reference(student, teacher, epsilon)
        assert torch.all(result.logprobs[:, :10] == float("-inf"))
        assert torch.all(result.logprobs[1, 50:100] == float("-inf"))
        assert not torch.isnan(result.logprobs).any()
        torch.testing.assert_close(result.logprobs.exp().sum(-1), torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_blended_in_float32(dtype):
    student, teacher = _random_pair(3, 500, seed=5)
    student, teacher = student.to(dtype), teacher.to(dtype)
    result = _assert_matches_reference(student, teacher, 0.02)
    assert result.logprobs.dtype == torch.float32


def test_extreme_logits_never_produce_nan_or_inf():
    student, teacher = _random_pair(6, 256, seed=6)
    student[0] *= 1e4  # near one-hot student
    teacher[1] *= 1e4  # near one-hot teacher
    student[2, 0], teacher[2, 1] = 1e30, 1e30  # disjoint point masses
    teacher[3] = 0.0  # uniform teacher
    student[4] = student[4, :1].expand(256)  # uniform student, equal logits
    teacher[5] = student[5]  # identical distributions
    for source in (student, student.bfloat16()):
        for epsilon in [0.0, 1e-6, 0.02, 5.0]:
            result = trust_region_blend(source, teacher, epsilon)
            finite_or_banned = torch.isfinite(result.logprobs) | (result.logprobs == float("-inf"))
            assert finite_or_banned.all()
            assert torch.isfinite(result.logprobs).any(-1).all()
            for field in (result.beta, result.kl_to_student, result.kl_to_teacher):
                assert torch.isfinite(field).all()
            assert torch.all(result.kl_to_student <= epsilon * (1 + 1e-3) + 2e-5)
            assert torch.all((result.beta >= 0) & (result.beta <= 1))


def test_budget_is_respected_and_monotone_on_random_problems():
    """Property: over many random problems, KL(mu||pi_S) <= eps and beta grows with eps."""
    rng = np.random.default_rng(7)
    for trial in range(40):
        vocab = int(rng.integers(2, 3000))
        scale = float(rng.uniform(0.1, 8.0))
        student, teacher = _random_pair(4, vocab, seed=100 + trial, scale=scale, correlation=float(rng.uniform(-1, 1)))
        previous_beta = torch.zeros(4)
        for epsilon in sorted(10 ** rng.uniform(-6, 1, size=4)):
            result = trust_region_blend(student, teacher, float(epsilon))
            log_student = torch.log_softmax(student.double(), -1)
            log_mu = result.logprobs.double()
            realised = (log_mu.exp() * (log_mu - log_student)).sum(-1)
            assert torch.all(realised <= epsilon * (1 + 1e-3) + 2e-5), (trial, epsilon, realised)
            assert torch.all(result.beta >= previous_beta - 1e-4)
            previous_beta = result.beta


def test_small_budget_matches_second_order_approximation():
    student, teacher = _random_pair(3, 400, seed=8, scale=1.0)
    epsilon = 1e-6
    result = trust_region_blend(student, teacher, epsilon)
    log_student = torch.log_softmax(student.double(), -1)
    log_ratio = torch.log_softmax(teacher.double(), -1) - log_student
    probs = log_student.exp()
    variance = (probs * log_ratio.square()).sum(-1) - (probs * log_ratio).sum(-1).square()
    approx = torch.sqrt(2 * epsilon / variance)
    torch.testing.assert_close(result.beta.double(), approx, rtol=2e-2, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epsilon": -0.1}, "epsilon must be >= 0"),
        ({"epsilon": math.nan}, "epsilon must be >= 0"),
        ({"epsilon": 0.1, "temperature": 0.0}, "temperature must be > 0"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    student, teacher = _random_pair(2, 10, seed=9)
    with pytest.raises(ValueError, match=message):
        trust_region_blend(student, teacher, **kwargs)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="must both be"):
        trust_region_blend(torch.zeros(2, 10), torch.zeros(2, 11), 0.1)


@pytest.mark.parametrize("temperature", [0.05, 0.1, 0.3, 1.0])
@pytest.mark.parametrize("epsilon", [1e-4, 1e-3, 0.02, 0.05, 0.5])
@pytest.mark.parametrize("kind", ["peaked_disjoint", "peaked_overlap", "spread"])
def test_matches_reference_on_peaked_and_spread_logits(kind, epsilon, temperature):
    """Low temperature and peaked logits put student log-probs far below -88 on tokens mu* needs (no overflow)."""
    student, teacher = _rows(kind, 4, 2000, seed=int(1e4 * epsilon) + int(100 * temperature))
    _assert_matches_reference(student, teacher, epsilon, temperature)


@pytest.mark.parametrize("temperature", [0.05, 0.1])
def test_matches_reference_on_peaked_rows_at_qwen3_vocab_size(temperature):
    peaked, peaked_teacher = _peaked_pair(2, 151_936, seed=11, overlap=True)
    spread, spread_teacher = _spread_pair(1, 151_936, seed=12)
    student, teacher = torch.cat([peaked, spread]), torch.cat([peaked_teacher, spread_teacher])
    _assert_matches_reference(student, teacher, torch.tensor([1e-3, 0.05, 0.02]), temperature)


@pytest.mark.parametrize("temperature", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peaked_rows_with_banned_tokens(dtype, temperature):
    student, teacher = _peaked_pair(4, 3000, seed=13, overlap=False)
    student[:, :30] = float("-inf")
    student[0, student[0].argmax()] = float("-inf")  # the student's own favourite is banned
    teacher[1, :30] += 60.0  # the teacher prefers banned tokens by far: renormalised over the rest
    for epsilon in [1e-3, 0.05, 0.5]:
        result = _assert_matches_reference(student.to(dtype), teacher.to(dtype), epsilon, temperature)
        assert torch.all(result.logprobs[:, :30] == float("-inf"))


def test_tokens_the_teacher_rules_out():
    """A teacher `-inf` on a token the student allows (e.g. a teacher-only stop id) is exact zero mass.

    Every mu_b with b > 0 drops that token, so KL(mu_b || pi_S) >= cost = -log(1 - p0), p0 the student's mass on it:
    a smaller budget leaves the student untouched (beta* = 0), a larger one blends over the teacher's support.
    """
    student, teacher = _peaked_pair(4, 500, seed=14, overlap=True)
    student[:, 7] = student.amax(-1) + torch.tensor([-30.0, -8.0, -3.0, 1.0])  # p0 from ~0 to the favourite
    teacher[:, 7] = float("-inf")
    for temperature in [0.3, 1.0]:
        log_student = torch.log_softmax(student.double() / temperature, -1)
        cost = -torch.log1p(-log_student[:, 7].exp())
        for epsilon in [0.0, 1e-4, 0.02, 0.5, 5.0]:
            result = _assert_matches_reference(student, teacher, epsilon, temperature)
            stays = (epsilon < cost).tolist()
            assert (result.beta == 0).tolist() == stays, (temperature, epsilon, result.beta, cost)
            for row, student_row in enumerate(stays):
                if student_row:
                    torch.testing.assert_close(result.logprobs[row].double(), log_student[row], atol=1e-5, rtol=1e-6)
                else:
                    assert result.logprobs[row, 7] == float("-inf")
            assert torch.all(result.teacher_valid)


def test_invalid_teacher_rows_fall_back_to_the_student_and_are_flagged():
    student, teacher = _peaked_pair(7, 300, seed=15, overlap=False)
    student[:, :5] = float("-inf")
    teacher[0, 100] = float("nan")  # NaN on an allowed token
    teacher[1, 2] = float("nan")  # NaN only on a banned token: ignored, the row is valid
    teacher[2, 5:] = float("-inf")  # no finite mass on the allowed set
    teacher[3] = float("nan")
    teacher[4, 50] = float("inf")  # +inf: not a distribution
    teacher[5, :5] = float("inf")  # +inf only on banned tokens: valid
    for temperature, epsilon in [(1.0, 0.05), (0.1, 1e3), (0.3, 0.0)]:
        result = trust_region_blend(student, teacher, epsilon, temperature=temperature)
        valid = torch.tensor([False, True, False, False, False, True, True])
        assert torch.equal(result.teacher_valid, valid)
        invalid = ~valid
        assert torch.all(result.beta[invalid] == 0)
        assert torch.all(result.kl_to_student[invalid] == 0) and torch.all(result.kl_to_teacher[invalid] == 0)
        torch.testing.assert_close(result.logprobs[invalid], torch.log_softmax(student[invalid] / temperature, -1))
        for field in (result.logprobs, result.beta, result.kl_to_student, result.kl_to_teacher):
            assert not torch.isnan(field).any()
        for row in valid.nonzero().flatten().tolist():
            _, ref_beta, _, _ = blend_row_reference(
                student[row].double().numpy(), teacher[row].double().numpy(), epsilon, temperature
            )
            assert abs(result.beta[row].item() - ref_beta) < 2e-3


def test_fixed_iteration_count_of_accelerators_gives_the_same_blend(monkeypatch):
    """Accelerators run every Newton step (no host sync): iterating past convergence must not move the answer."""
    student, teacher = _peaked_pair(6, 2000, seed=16, overlap=False)
    spread_student, spread_teacher = _spread_pair(2, 2000, seed=17)
    wide_student, wide_teacher = _random_pair(2, 2000, seed=18, scale=15.0, correlation=-0.5)
    student = torch.cat([student, spread_student, wide_student])
    teacher = torch.cat([teacher, spread_teacher, wide_teacher])
    teacher[0, 3] = float("-inf")
    epsilon = torch.tensor([1e-4, 1e-3, 0.02, 0.05, 0.5, 1e-6, 0.02, 0.5, 1e-6, 1e-5])
    for temperature in [0.1, 1.0]:
        early = trust_region_blend(student, teacher, epsilon, temperature=temperature)
        monkeypatch.setattr(blending, "_STOP_EARLY_ON_CPU", False)
        fixed = _assert_matches_reference(student, teacher, epsilon, temperature)
        monkeypatch.setattr(blending, "_STOP_EARLY_ON_CPU", True)
        torch.testing.assert_close(fixed.beta, early.beta, atol=1e-5, rtol=0)


def test_the_old_module_path_still_imports_with_a_warning():
    import importlib
    import sys

    sys.modules.pop("trb_trl.blending", None)
    with pytest.warns(FutureWarning, match="moved to trb_trl.rollout.blending"):
        old = importlib.import_module("trb_trl.blending")
    assert old.trust_region_blend is trust_region_blend
