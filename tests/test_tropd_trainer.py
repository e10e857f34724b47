"""TrOPDConfig / TrOPDTrainer on the tiny pair: config errors, the prefix schedule and draws, teacher prefixes
continued by the student, and `train()` with and without guidance and with TRB warmup."""

import random

import pytest
import torch
from tiny_config import tiny_prompts, tiny_run_args, tiny_trainer

from trb_trl import TrOPDConfig, TrOPDTrainer
from trb_trl.rollout.teacher_prefix import cut_at_stop, draw_prefix_lengths
from trb_trl.schedules import cosine_prefix_length


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
        ({"loss_top_k": 16}, "loss_top_k selects the TRB paper's divergence"),
        ({"veto_beta_start": 0.4}, "veto_beta_start > 0"),
        ({"sft_warmup_steps": 5}, "sft_warmup_steps > 0"),
        ({"max_steps": -1, "num_train_epochs": 1}, "tropd_guidance anneals the teacher prefixes over the whole run"),
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
    lengths = trainer._tropd_prefix_lengths
    assert len(lengths) == 3 and all(0 <= length <= 8 for length in lengths)
    student, teacher = trainer.accelerator.unwrap_model(trainer.model), trainer.teacher_model
    stops = trainer.eos_token_ids
    for prompt, completion, length in zip(prompts, completions, lengths, strict=True):
        teacher_tokens = _greedy(teacher, prompt, 8, stops)
        assert completion[:length] == teacher_tokens[:length]
        if length < len(teacher_tokens) or teacher_tokens[-1] not in stops:
            continuation = _greedy(student, prompt + completion[:length], 8, stops)
            assert completion[length:] == continuation[: 8 - length]


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
