import pytest

from trb_trl.schedules import constant, kl_budget, linear_anneal


def test_linear_anneal_reaches_exactly_zero_at_k_and_stays_there():
    assert [linear_anneal(k, 0.02, 4) for k in range(7)] == pytest.approx([0.02, 0.015, 0.01, 0.005, 0, 0, 0])
    assert linear_anneal(4, 0.02, 4) == 0.0 and linear_anneal(100, 0.02, 4) == 0.0


def test_constant_is_the_fixed_budget_baseline():
    assert [constant(k, 0.01, 3) for k in (0, 3, 1000)] == [0.01, 0.01, 0.01]


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="choose one of"):
        kl_budget("cosine", 0, 0.1, 10)
