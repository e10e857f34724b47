"""TrOPDConfig / TrOPDTrainer on the tiny pair: config errors, the prefix schedule and draws, teacher prefixes
continued by the student, and `train()` with and without guidance and with TRB warmup."""

import contextlib
import random

import pytest
import torch
from tiny_config import tiny_prompts, tiny_run_args, tiny_trainer

from trb_trl import TrOPDConfig, TrOPDTrainer
from trb_trl.rollout.teacher_prefix import draw_prefix_lengths
from trb_trl.schedules import cosine_prefix_length
from trb_trl.stop_alignment import cut_at_stop


def _args(tmp_path, **overrides):
    return tiny_run_args(tmp_path / "out", TrOPDConfig, **overrides)


def _trainer(tiny_pair_dir, tmp_path, **overrides):
    return tiny_trainer(tiny_pair_dir, _args(tmp_path, **overrides), tiny_prompts(), trainer_class=TrOPDTrainer)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"tropd_objective": "rkl"}, "tropd_objective must be one of"),
        ({"tropd_outlier": "drop"}, "tropd_outlier must be one of"),
        ({"tropd_outlier_detection": "fixed"}, "tropd_outlier_detection must be one of"),
        ({"tropd_prefix_sampling": "normal"}, "tropd_prefix_sampling must be one of"),
        ({"tropd_threshold": 0.5}, "tropd_threshold must be a finite number < 0"),
        ({"tropd_top_k": 0}, "tropd_top_k must be an integer >= 1"),
        ({"tropd_jsd_beta": 1.0}, r"tropd_jsd_beta must be in \(0, 1\)"),
        ({"tropd_guidance_weight": -1.0}, "tropd_guidance_weight must be"),
        ({"tropd_prefix_steps": 0}, "tropd_prefix_steps must be an integer >= 1"),
        ({"eopd_top_k": 0}, "eopd_top_k must be an integer >= 1"),
        ({"entropy_selection_fraction": 0.0}, r"entropy_selection_fraction must be in \(0, 1\]"),
        ({"entropy_selection_scope": "token"}, "entropy_selection_scope must be one of"),
        ({"reopold_mixture_weight": 1.0}, r"reopold_mixture_weight must be in \(0, 1\)"),
        ({"reopold_schedule": "two_stage"}, r"reopold_schedule='two_stage' is REOPOLD's schedule"),
        ({"reopold_switch_step": 10}, "reopold_switch_step=10 only applies with reopold_schedule='two_stage'"),
        ({"loss_top_k": 16}, "loss_top_k selects the TRB paper's divergence"),
        ({"veto_beta_start": 0.4}, "veto_beta_start > 0"),
        ({"sft_warmup_steps": 5}, "sft_warmup_steps > 0"),
        ({"trb_epsilon": 0.05}, r"rollout_policy='student' .* Set `rollout_policy: trb`"),
        ({"rollout_policy": "skd", "trb_epsilon": 0.02}, r"trb_epsilon=0.02 is TRB's KL budget"),
        ({"tropd_prefix_max_length": 9}, "tropd_prefix_max_length=9 exceeds max_completion_length=8"),
        ({"max_completion_length": None}, "tropd_guidance continues each teacher prefix within max_completion_length"),
    ],
)
def test_config_refuses_invalid_values_with_the_field_named(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **overrides)


def test_config_defaults_are_the_papers(tmp_path):
    args = _args(tmp_path, max_completion_length=8, max_steps=4)
    assert (args.tropd_objective, args.tropd_outlier, args.tropd_outlier_detection) == (
        "trust_region",
        "fkl",
        "adaptive",
    )
    assert args.tropd_top_k == 64 and args.tropd_guidance_weight == 1e-3 and args.tropd_guidance
    assert args.rollout_policy == "student" and not args.needs_teacher_in_rollout
    assert (args.prefix_max_length, args.prefix_anneal_steps) == (8, 4)
    assert _args(tmp_path, tropd_prefix_max_length=3, tropd_prefix_steps=2).prefix_max_length == 3


def test_trb_epsilon_defaults_to_the_rollout_policy(tmp_path):
    """TRB's budget applies with a trust-region policy only: 0.02 by default there, 0 with TrOPD's own rollouts."""
    student = _args(tmp_path)
    assert student.trb_epsilon == 0.0 and not student.uses_trust_region
    assert _args(tmp_path, trb_epsilon=0.0).trb_epsilon == 0.0
    trb = _args(tmp_path, rollout_policy="trb")
    assert trb.trb_epsilon == 0.02 and trb.uses_trust_region and trb.needs_teacher_in_rollout
    assert _args(tmp_path, rollout_policy="fixed_epsilon", trb_epsilon=0.01).trb_epsilon == 0.01


def test_cosine_prefix_schedule_per_step():
    lengths = [cosine_prefix_length(step, 100, 10) for step in range(13)]
    assert lengths[0] == 100 and lengths[5] == 50 and lengths[10:] == [0, 0, 0]
    assert all(a >= b for a, b in zip(lengths, lengths[1:], strict=False))
    assert lengths[1] == 97 and lengths[9] == 2  # floor(100 * (1 + cos(pi k / 10)) / 2) at k = 1 and 9
    assert [cosine_prefix_length(step, 7, 4) for step in range(5)] == [7, 5, 3, 1, 0]


def test_prefix_lengths_are_uniform_up_to_the_maximum_or_the_maximum():
    rng = random.Random(0)
    draws = draw_prefix_lengths(4, 20_000, "uniform", rng)
    counts = [draws.count(value) for value in range(5)]
    assert set(draws) == set(range(5)) and all(abs(count / 20_000 - 0.2) < 0.015 for count in counts)
    assert draw_prefix_lengths(4, 3, "max", rng) == [4, 4, 4]
    assert draw_prefix_lengths(0, 3, "uniform", rng) == [0, 0, 0]
    with pytest.raises(ValueError, match="prefix sampling must be one of"):
        draw_prefix_lengths(4, 3, "normal", rng)


def test_a_teacher_stop_in_the_prefix_ends_the_response_on_the_students_stop():
    assert cut_at_stop([5, 6, 151645, 7], [151643], [151645, 151643]) == ([5, 6, 151643], True)
    assert cut_at_stop([5, 151643, 7], [151643], [151645]) == ([5, 151643], True)
    assert cut_at_stop([5, 6, 7], [151643], [151645]) == ([5, 6, 7], False)


def _greedy(model, prompt: list[int], new_tokens: int, eos: list[int]) -> list[int]:
    sequence = model.generate(
        input_ids=torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
    )[0, len(prompt) :].tolist()
    for position, token in enumerate(sequence):
        if token in eos:
            return sequence[: position + 1]
    return sequence


def test_a_guided_trajectory_is_the_teachers_prefix_then_the_students_continuation(tiny_pair_dir, tmp_path):
    """Greedy decoding makes both parts checkable: the first l tokens are the teacher's greedy tokens, the rest the
    student's greedy continuation from prompt + prefix, cut to the completion budget; the prefix mask marks l."""
    trainer = _trainer(tiny_pair_dir, tmp_path, generation_kwargs={"do_sample": False}, max_completion_length=8)
    trainer.model.train()
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10], [11, 12]]
    completions = trainer._generate_single_turn(prompts, None, {})
    lengths = trainer._prefix_lengths
    assert len(lengths) == 3 and all(0 <= length <= 8 for length in lengths)
    student, teacher = trainer.accelerator.unwrap_model(trainer.model), trainer.teacher_model
    stops = trainer.eos_token_ids
    for prompt, completion, length in zip(prompts, completions, lengths, strict=True):
        teacher_tokens = _greedy(teacher, prompt, 8, stops)
        assert completion[:length] == teacher_tokens[:length]
        if length < len(teacher_tokens) or teacher_tokens[-1] not in stops:
            continuation = _greedy(student, prompt + completion[:length], 8, stops)
            assert completion[length:] == continuation[: 8 - length]


# The continuation's rollout under each kind of policy: the parent's student rollout, TRB's processor inside
# `generate` (both sampled), and TRB's speculative engine (greedy, so that the two paths are comparable token by token).
CONTINUATION_POLICIES = {
    "student": {},
    "trb": {"rollout_policy": "trb", "trb_epsilon": 0.05, "trb_warmup_steps": 2},
    "trb_speculative": {
        "rollout_policy": "trb",
        "trb_epsilon": 0.05,
        "trb_warmup_steps": 2,
        "trb_rollout_engine": "speculative",
        "trb_draft_length": 3,
        "generation_kwargs": {"do_sample": False},
    },
}


@pytest.mark.parametrize("sampling", ["max", "uniform"])
@pytest.mark.parametrize("policy", list(CONTINUATION_POLICIES))
def test_guided_continuations_stop_at_each_rows_budget(tiny_pair_dir, tmp_path, policy, sampling):
    """Each row's continuation stops at `max_completion_length - l`: the student runs no forward once every row has
    spent its budget (counted), and the completions are exactly today's (continued to the full length, then cut)."""
    trainer = _trainer(
        tiny_pair_dir,
        tmp_path,
        max_completion_length=12,
        tropd_prefix_max_length=8,
        tropd_prefix_sampling=sampling,
        **CONTINUATION_POLICIES[policy],
    )
    trainer.model.train()
    student = trainer.accelerator.unwrap_model(trainer.model)
    forwards = []
    handle = student.register_forward_hook(lambda module, args, output: forwards.append(1))
    prompts = [[3, 4, 5], [6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    seen_budgets = []
    with_budgets = trainer._row_budgets

    def recording(budgets):
        seen_budgets.append(list(budgets))
        return with_budgets(budgets)

    def rollout(row_budgets):
        trainer._row_budgets = row_budgets
        forwards.clear()
        torch.manual_seed(5)
        completions = trainer._generate_single_turn(prompts, None, {})
        return completions, list(trainer._prefix_lengths), len(forwards)

    try:
        budgeted, lengths, budgeted_forwards = rollout(recording)
        today, today_lengths, today_forwards = rollout(lambda budgets: contextlib.nullcontext())
    finally:
        handle.remove()
    (budgets,) = seen_budgets
    assert lengths == today_lengths
    assert budgets == sorted(budgets)  # the rows go to generate sorted by budget
    remaining = sorted(budget for budget in budgets if budget)
    assert all(budget == 0 or 12 - budget in lengths for budget in budgets)
    if sampling == "max":  # every prefix that did not end the response is l_max = 8 tokens long
        assert all(budget == 12 - 8 for budget in remaining)
    assert budgeted == today  # the same tokens as today's truncation
    assert all(len(completion) <= 12 for completion in budgeted)
    if policy == "trb_speculative":  # rounds of up to draft_length + 1 student forwards: never more of them, and
        # fewer with "max" (with "uniform" these greedy rows stop on a stop token before their budgets)
        assert budgeted_forwards < today_forwards if sampling == "max" else budgeted_forwards <= today_forwards
    else:  # one student forward per generated token: up to the largest budget (at least the first token), not 12
        assert today_forwards == 12 and budgeted_forwards == max(1, *budgets)


def test_uniform_prefixes_are_continued_in_calls_of_similar_budgets(tiny_pair_dir, tmp_path, monkeypatch):
    """Uniform prefix lengths: the rows go to `generate` sorted by budget, `rollout_generation_batch_size` per call, so a
    call spans about prompt + max_completion_length columns instead of prompt + l_max + max_completion_length."""
    from trb_trl.rollout import row_budget

    trainer = _trainer(
        tiny_pair_dir,
        tmp_path,
        max_completion_length=12,
        tropd_prefix_max_length=12,
        tropd_prefix_sampling="uniform",
        rollout_generation_batch_size=2,
    )
    trainer.model.train()
    calls = []
    original = row_budget.RowBudgetCriteria.__init__

    def recording(self, budgets, prompt_length):
        calls.append((list(budgets), int(prompt_length)))
        original(self, budgets, prompt_length)

    monkeypatch.setattr(row_budget.RowBudgetCriteria, "__init__", recording)
    prompts = [[3, 4, 5]] * 8  # one prompt length: the width of a call is its longest prefix + its largest budget
    trainer._generate_single_turn(prompts, None, {})
    lengths = trainer._prefix_lengths
    assert len(calls) == 4 and all(len(budgets) == 2 for budgets, _ in calls)
    flat = [budget for budgets, _ in calls for budget in budgets]
    assert flat == sorted(flat)
    widest_call = max(width + max(budgets) for budgets, width in calls)
    one_call = 3 + max(lengths) + max(flat)  # what a single call of all 8 rows would span
    assert len(set(lengths)) > 2 and widest_call < one_call, (lengths, calls)


def _logs(trainer):
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_train_with_guidance_anneals_the_prefixes_to_none_and_logs_its_metrics(tiny_pair_dir, tmp_path):
    trainer = _trainer(
        tiny_pair_dir, tmp_path, tropd_prefix_sampling="max", max_completion_length=8, tropd_prefix_steps=3
    )
    masks = []
    original = trainer._compute_loss

    def spy(model, inputs, num_items_in_batch):
        masks.append((inputs["tropd_prefix_mask"].clone(), inputs["completion_mask"].clone()))
        return original(model, inputs, num_items_in_batch)

    trainer._compute_loss = spy
    logs = _logs(trainer)
    assert [entry["tropd/prefix_max_length"] for entry in logs] == [8, 6, 2, 0]  # 8 (1 + cos(pi k / 3)) / 2
    assert logs[0]["tropd/prefix_fraction"] == 1.0  # step 0 with "max": whole teacher responses, fully off-policy
    assert "tropd/trust_fraction" not in logs[0]
    assert logs[-1]["tropd/prefix_fraction"] == 0.0  # training ends fully on-policy
    for entry in logs[1:]:
        assert 0.0 <= entry["tropd/trust_fraction"] <= 1.0
        assert entry["tropd/trust_fraction"] + entry["tropd/outlier_fraction"] == pytest.approx(1.0)
        assert torch.isfinite(torch.tensor(entry["loss"])) and "grad_norm" in entry
    for prefix_mask, completion_mask in masks:
        assert not (prefix_mask & ~completion_mask.bool()).any()  # prefix tokens are real completion tokens


def test_tropd_metrics_are_ratios_of_token_totals_over_micro_batches(tiny_pair_dir, tmp_path):
    """Two micro-batches per optimizer step with different token counts: each `tropd/*` fraction and mean is the ratio
    of the summed counts (each token weighs the same), not the mean of the two micro-batches' ratios."""
    trainer = _trainer(tiny_pair_dir, tmp_path, gradient_accumulation_steps=2, max_steps=3, tropd_prefix_steps=4)
    records = []
    original = trainer._compute_loss

    def spy(model, inputs, num_items_in_batch):
        result = original(model, inputs, num_items_in_batch)
        records.append({name: float(value) for name, value in trainer._tropd_records.items()})
        return result

    trainer._compute_loss = spy
    logs = _logs(trainer)
    assert len(records) == 2 * len(logs) == 6
    differs = False
    for step, entry in enumerate(logs):
        pair = records[2 * step : 2 * step + 2]

        def total(name, pair=pair):
            return sum(record[name] for record in pair)

        continuation, prefix = total("continuation_tokens"), total("prefix_tokens")
        assert entry["tropd/trust_fraction"] == pytest.approx(total("trusted_tokens") / continuation)
        assert entry["tropd/outlier_fraction"] == pytest.approx(total("outlier_tokens") / continuation)
        assert entry["tropd/prefix_fraction"] == pytest.approx(prefix / (prefix + continuation))
        assert entry["tropd/reward/trusted"] == pytest.approx(total("reward_sum_trusted") / total("trusted_tokens"))
        assert entry["tropd/reward/outlier"] == pytest.approx(total("reward_sum_outlier") / total("outlier_tokens"))
        if all(record["continuation_tokens"] for record in pair):
            mean_of_ratios = sum(r["trusted_tokens"] / r["continuation_tokens"] for r in pair) / 2
            differs |= abs(mean_of_ratios - entry["tropd/trust_fraction"]) > 1e-3
    assert differs  # the micro-batches' student tokens really differ in number


def test_epoch_based_config_anneals_over_the_runs_optimizer_steps(tiny_pair_dir, tmp_path):
    """TRL's own distillation tests configure runs by epochs (no `max_steps`; these are the arguments of TRL's
    `test_train`): TrOPD anneals its prefixes over the total steps TRL's `Trainer` derives (3 epochs x 2 steps)."""
    from transformers import AutoTokenizer

    args = TrOPDConfig(
        output_dir=str(tmp_path / "out"),
        learning_rate=0.1,
        per_device_train_batch_size=3,
        max_completion_length=8,
        report_to="none",
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        save_strategy="no",
    )
    assert args.max_steps == -1 and args.prefix_anneal_steps is None
    trainer = TrOPDTrainer(
        model=tiny_pair_dir["student"],
        teacher_model=tiny_pair_dir["teacher"],
        args=args,
        train_dataset=tiny_prompts(6),
        processing_class=AutoTokenizer.from_pretrained(tiny_pair_dir["tokenizer"]),
    )
    assert trainer.prefix_anneal_steps == 0  # not known before training starts: no prefixes outside `train()`
    before = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    logs = _logs(trainer)
    assert trainer.state.max_steps == 6 and trainer.prefix_anneal_steps == 6
    assert [entry["tropd/prefix_max_length"] for entry in logs] == [cosine_prefix_length(k, 8, 6) for k in range(6)]
    assert logs[0]["tropd/prefix_fraction"] > 0 and logs[-1]["tropd/prefix_fraction"] == 0.0
    assert trainer.state.log_history[-1]["train_loss"] is not None
    assert any(not torch.equal(param, before[name]) for name, param in trainer.model.named_parameters())


def test_train_without_guidance_is_on_policy_with_the_trust_region(tiny_pair_dir, tmp_path):
    logs = _logs(_trainer(tiny_pair_dir, tmp_path, tropd_guidance=False))
    for entry in logs:
        assert entry["tropd/prefix_fraction"] == 0.0 and "tropd/prefix_max_length" not in entry
        assert 0.0 < entry["tropd/trust_fraction"] < 1.0  # random tiny models disagree: some tokens are outliers
        assert entry["tropd/reward/trusted"] > entry["tropd/reward/outlier"]


def test_trb_warmup_with_the_tropd_loss_is_one_config(tiny_pair_dir, tmp_path):
    logs = _logs(
        _trainer(
            tiny_pair_dir,
            tmp_path,
            rollout_policy="trb",
            trb_epsilon=0.05,
            trb_warmup_steps=2,
            tropd_prefix_steps=2,
        )
    )
    assert [entry["trb/epsilon"] for entry in logs] == [0.05, 0.025, 0.0, 0.0]
    assert "trb/beta/mean" in logs[0] and "trb/beta/mean" not in logs[-1]
    assert all("tropd/prefix_fraction" in entry for entry in logs)


@pytest.mark.parametrize(
    ("overrides", "fractions"),
    [
        # tau = 0: every token gets EOPD's forward-KL term (the tiny random teacher is near-uniform everywhere).
        ({"tropd_objective": "eopd", "eopd_entropy_threshold": 0.0}, ("switched",)),
        ({"tropd_objective": "entropy_top", "entropy_selection_scope": "sequence"}, ("selected",)),
        # REOPOLD 2Stage behind TRB's warmup: the rollout side and the loss side are independent.
        (
            {
                "tropd_objective": "reopold",
                "reopold_schedule": "two_stage",
                "reopold_switch_step": 2,
                "rollout_policy": "trb",
                "trb_epsilon": 0.05,
                "trb_warmup_steps": 2,
            },
            ("selected", "clipped"),
        ),
    ],
    ids=["eopd", "entropy_opd", "reopold_2stage_after_trb"],
)
def test_the_comparisons_baselines_train_and_log_their_token_fractions(tiny_pair_dir, tmp_path, overrides, fractions):
    logs = _logs(_trainer(tiny_pair_dir, tmp_path, tropd_guidance=False, **overrides))
    assert len(logs) == 4
    for entry in logs:
        assert torch.isfinite(torch.tensor(entry["loss"])) and "grad_norm" in entry
        assert "tropd/trust_fraction" not in entry  # no trust region in these objectives
        for name in fractions:
            assert 0.0 <= entry[f"tropd/{name}_fraction"] <= 1.0
        logged = {key.removeprefix("tropd/").removesuffix("_fraction") for key in entry if key.startswith("tropd/")}
        assert not ({"switched", "selected", "clipped"} - set(fractions)) & logged  # only the objective's own
    if "switched" in fractions:
        assert all(entry["tropd/switched_fraction"] == 1.0 for entry in logs)
    if overrides.get("reopold_schedule") == "two_stage":
        assert [entry["reopold/exploration"] for entry in logs] == [1.0, 1.0, 0.0, 0.0]
        assert [entry["trb/epsilon"] for entry in logs] == [0.05, 0.025, 0.0, 0.0]
        # Exploration trains on the unclipped tokens; refinement on the top 20% by entropy.
        assert all(
            entry["tropd/selected_fraction"] == pytest.approx(1 - entry["tropd/clipped_fraction"])
            for entry in logs[:2]
        )
        assert all(entry["tropd/selected_fraction"] < 0.5 for entry in logs[2:])
    elif "selected" in fractions:
        assert all(0.0 < entry["tropd/selected_fraction"] < 0.5 for entry in logs)


def test_tropd_trainer_needs_its_config(tiny_pair_dir, tmp_path):
    from trb_trl import TRBDistillConfig

    with pytest.raises(TypeError, match="TrOPDTrainer needs a TrOPDConfig"):
        tiny_trainer(
            tiny_pair_dir,
            tiny_run_args(tmp_path / "out", TRBDistillConfig),
            tiny_prompts(),
            trainer_class=TrOPDTrainer,
        )


def test_tropd_with_guidance_trains_a_peft_adapter(tiny_pair_dir, tmp_path):
    from peft import LoraConfig
    from transformers import AutoTokenizer

    trainer = TrOPDTrainer(
        model=tiny_pair_dir["student"],
        teacher_model=tiny_pair_dir["teacher"],
        args=_args(tmp_path, max_steps=2, tropd_prefix_steps=2),
        train_dataset=tiny_prompts(),
        processing_class=AutoTokenizer.from_pretrained(tiny_pair_dir["tokenizer"]),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    frozen = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if not p.requires_grad}
    adapters = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in name for name in adapters)
    logs = _logs(trainer)
    assert logs[0]["tropd/prefix_fraction"] > 0 and "tropd/trust_fraction" in logs[-1]
    params = dict(trainer.model.named_parameters())
    assert all(torch.equal(params[name], value) for name, value in frozen.items())
    assert any(not torch.equal(params[name], value) for name, value in adapters.items())
