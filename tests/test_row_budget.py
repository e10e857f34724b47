"""Per-row token budgets: `generate` with `RowBudgetCriteria`, and the speculative engine's `row_max_new_tokens`,
stop each row at its own length and run no forward once every row has, with the tokens before each budget unchanged."""

import pytest
import torch

from trb_trl.rollout import SpeculativeBlendingSampler
from trb_trl.rollout.row_budget import RowBudgetCriteria
from trb_trl.testing import build_tiny_qwen3


PAD, EOS = 0, 1


@pytest.fixture(scope="module")
def models():
    student = build_tiny_qwen3(64, seed=0, eos_token_id=EOS, pad_token_id=PAD)
    teacher = build_tiny_qwen3(64, hidden_size=96, num_layers=3, seed=1, eos_token_id=EOS, pad_token_id=PAD)
    return student, teacher


def _prompts():
    input_ids = torch.randint(2, 64, (4, 6), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :2], attention_mask[1, :2] = PAD, 0  # left padding
    return input_ids, attention_mask


def _counting_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda module, args, output: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("do_sample", [False, True])
def test_generate_stops_each_row_at_its_budget_and_keeps_the_tokens_before_it(models, do_sample):
    student, _ = models
    input_ids, attention_mask = _prompts()
    budgets = [0, 2, 5, 3]
    settings = dict(max_new_tokens=10, do_sample=do_sample, eos_token_id=[], pad_token_id=PAD, top_k=0)
    calls, handle = _counting_forwards(student)
    try:
        torch.manual_seed(7)
        full = student.generate(input_ids=input_ids, attention_mask=attention_mask, **settings)[:, 6:]
        full_forwards = len(calls)
        calls.clear()
        torch.manual_seed(7)
        stopped = student.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            stopping_criteria=[RowBudgetCriteria(budgets, input_ids.shape[1])],
            **settings,
        )[:, 6:]
    finally:
        handle.remove()
    assert full_forwards == 10 and len(calls) == 5  # one forward per token, up to the largest budget
    assert stopped.shape == (4, 5)
    for row, budget in enumerate(budgets):
        kept = max(budget, 1)  # generate samples one token before any criterion runs
        assert torch.equal(stopped[row, :kept], full[row, :kept])
        assert (stopped[row, kept:] == PAD).all()  # finished rows are padded, as after a stop token


def test_row_budgets_are_one_nonnegative_integer_per_row():
    with pytest.raises(ValueError, match="one integer >= 0 per row"):
        RowBudgetCriteria([3, -1], 4)
    with pytest.raises(ValueError, match="2 row budgets for a batch of 3 rows"):
        RowBudgetCriteria([3, 1], 4)(torch.zeros(3, 5, dtype=torch.long), None)


def test_the_speculative_engine_stops_each_row_at_its_limit(models):
    """Greedy: the same tokens as without limits, cut at each row's limit (at least one, as generate), and fewer
    rounds; sampled rows never run past their limit either."""
    student, teacher = models
    input_ids, attention_mask = _prompts()
    limits = [0, 2, 5, 3]

    def run(do_sample, **kwargs):
        sampler = SpeculativeBlendingSampler(teacher, 0.05, draft_length=3, student_eos_token_id=EOS)
        sequences = sampler.generate(
            student,
            input_ids,
            attention_mask,
            max_new_tokens=10,
            do_sample=do_sample,
            top_k=0,
            pad_token_id=PAD,
            eos_token_id=[],
            **kwargs,
        )
        return sequences[:, 6:], sampler.student_forwards

    full, full_forwards = run(False)
    limited, limited_forwards = run(False, row_max_new_tokens=limits)
    assert full.shape[1] == 10 and limited.shape[1] == 5 and limited_forwards < full_forwards
    for row, limit in enumerate(limits):
        kept = max(limit, 1)
        assert torch.equal(limited[row, :kept], full[row, :kept])
        assert (limited[row, kept:] == PAD).all()
    torch.manual_seed(0)
    sampled, _ = run(True, row_max_new_tokens=limits)
    assert sampled.shape[1] == 5 and all(
        (sampled[row, max(limit, 1) :] == PAD).all() for row, limit in enumerate(limits)
    )
    with pytest.raises(ValueError, match="row_max_new_tokens has 2 entries for 4 generated rows"):
        run(False, row_max_new_tokens=[1, 2])


def test_trust_region_statistics_leave_out_the_steps_past_each_rows_budget(models):
    """The pad token is no stop id here, so only the budgets tell the processor which rows are done."""
    from trb_trl import TrustRegionBlendingProcessor

    student, teacher = models
    input_ids, attention_mask = _prompts()
    budgets = [0, 2, 5, 3]
    processor = TrustRegionBlendingProcessor(
        teacher, 0.5, prompt_attention_mask=attention_mask, student_eos_token_id=[EOS], teacher_eos_token_id=[EOS]
    )
    processor.stop_rows_at(budgets)
    student.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        stopping_criteria=[RowBudgetCriteria(budgets, input_ids.shape[1])],
        logits_processor=[processor],
        max_new_tokens=10,
        do_sample=True,
        eos_token_id=[],
        pad_token_id=PAD,
    )
    assert processor.statistics()["beta"].numel() == sum(budgets)  # not 4 rows x 5 steps


def test_speculative_statistics_leave_out_a_row_with_no_budget(models):
    """As the processor path does: the one token `generate` samples for a budget-0 row is not recorded."""
    student, teacher = models
    input_ids, attention_mask = _prompts()
    budgets = [0, 2, 5, 3]
    sampler = SpeculativeBlendingSampler(
        teacher, 0.5, draft_length=2, student_eos_token_id=[EOS], teacher_eos_token_id=[EOS]
    )
    sampler.generate(
        student,
        input_ids=input_ids,
        attention_mask=attention_mask,
        row_max_new_tokens=budgets,
        max_new_tokens=10,
        do_sample=True,
        eos_token_id=[],
        pad_token_id=PAD,
    )
    assert sampler.statistics()["beta"].numel() == sum(budgets)
