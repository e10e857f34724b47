from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer

from trb_trl import TRBDistillConfig, TRBDistillTrainer, TrustRegionBlendingProcessor
from trb_trl._compat import DistillationConfig, DistillationTrainer


TRB_KEYS = [
    "trb/epsilon",
    "trb/beta/mean",
    "trb/beta/min",
    "trb/beta/max",
    "trb/teacher_fraction",
    "trb/kl_to_student/mean",
    "trb/kl_to_student/max",
    "trb/kl_to_teacher/mean",
    "trb/rollout_teacher_seconds",
]


@pytest.fixture
def prompts():
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"w{i} w{i + 1} w{i + 2}"}]} for i in range(64)])


def _args(tmp_path, config_class=TRBDistillConfig, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        max_completion_length=8,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        gradient_checkpointing=False,
        seed=0,
    )
    if config_class is TRBDistillConfig:
        defaults.update(trb_epsilon=0.05, trb_warmup_steps=2)
    defaults.update(kwargs)
    return config_class(**defaults)


def _trainer(tiny_pair_dir, args, prompts, trainer_class=TRBDistillTrainer):
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair_dir["tokenizer"])
    return trainer_class(
        model=tiny_pair_dir["student"],
        teacher_model=tiny_pair_dir["teacher"],
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
    )


@pytest.fixture
def processor_calls(monkeypatch):
    """Records the optimizer step of every TrustRegionBlendingProcessor call."""
    calls = []
    original = TrustRegionBlendingProcessor.__call__

    def spy(self, input_ids, scores):
        calls.append(self)
        return original(self, input_ids, scores)

    monkeypatch.setattr(TrustRegionBlendingProcessor, "__call__", spy)
    return calls


def _train_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_warmup_then_plain_student_rollouts(tiny_pair_dir, prompts, tmp_path, processor_calls):
    trainer = _trainer(tiny_pair_dir, _args(tmp_path), prompts)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    steps_with_processor_calls = []
    original_generate = trainer._generate_single_turn

    def record(*args, **kwargs):
        count = len(processor_calls)
        out = original_generate(*args, **kwargs)
        steps_with_processor_calls.append((trainer.state.global_step, len(processor_calls) - count))
        return out

    trainer._generate_single_turn = record
    trainer.train()

    logs = _train_logs(trainer)
    assert [entry["trb/epsilon"] for entry in logs] == pytest.approx([0.05, 0.025, 0.0, 0.0])
    for entry in logs[:2]:
        assert set(TRB_KEYS) <= set(entry)
        assert entry["trb/kl_to_student/max"] <= entry["trb/epsilon"] * (1 + 1e-3) + 2e-5
        assert 0.0 <= entry["trb/beta/min"] <= entry["trb/beta/mean"] <= entry["trb/beta/max"] <= 1.0
        assert entry["trb/rollout_teacher_seconds"] > 0
    for entry in logs[2:]:
        assert "trb/beta/mean" not in entry
    # The processor runs at every decoding step during warmup, and never afterwards.
    assert [step for step, _ in steps_with_processor_calls] == [0, 1, 2, 3]
    assert all(calls > 0 for _, calls in steps_with_processor_calls[:2])
    assert all(calls == 0 for _, calls in steps_with_processor_calls[2:])
    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(p, before[name])]
    assert len(changed) == len(before)


def test_constant_schedule_keeps_the_budget(tiny_pair_dir, prompts, tmp_path):
    trainer = _trainer(tiny_pair_dir, _args(tmp_path, max_steps=3, trb_schedule="constant"), prompts)
    trainer.train()
    assert [entry["trb/epsilon"] for entry in _train_logs(trainer)] == pytest.approx([0.05] * 3)


def test_gradient_accumulation_shares_one_budget_per_optimizer_step(tiny_pair_dir, prompts, tmp_path):
    args = _args(tmp_path, max_steps=3, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    trainer = _trainer(tiny_pair_dir, args, prompts)
    budgets = []
    original = trainer._trust_region_rollout

    def record(epsilon):
        budgets.append((trainer.state.global_step, epsilon))
        return original(epsilon)

    trainer._trust_region_rollout = record
    trainer.train()
    # One rollout per accumulation cycle (the parent generates the whole cycle at once), at that step's budget.
    assert budgets == [(0, pytest.approx(0.05)), (1, pytest.approx(0.025))]


def test_zero_epsilon_is_exactly_the_parent_trainer(tiny_pair_dir, prompts, tmp_path, processor_calls):
    trb = _trainer(tiny_pair_dir, _args(tmp_path, max_steps=2, trb_epsilon=0.0), prompts)
    trb.train()
    parent = _trainer(
        tiny_pair_dir, _args(tmp_path, DistillationConfig, max_steps=2), prompts, trainer_class=DistillationTrainer
    )
    parent.train()
    assert processor_calls == []
    for (name, p), (_, q) in zip(trb.model.named_parameters(), parent.model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


def test_resume_continues_the_schedule(tiny_pair_dir, prompts, tmp_path):
    args = _args(tmp_path, max_steps=4, trb_warmup_steps=4, save_strategy="steps", save_steps=2)
    _trainer(tiny_pair_dir, args, prompts).train()
    checkpoint = Path(args.output_dir) / "checkpoint-2"
    assert checkpoint.is_dir()
    resumed = _trainer(tiny_pair_dir, _args(tmp_path, max_steps=4, trb_warmup_steps=4), prompts)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    new_logs = [entry for entry in _train_logs(resumed) if entry["step"] > 2]
    assert [entry["trb/epsilon"] for entry in new_logs] == pytest.approx([0.05 * 2 / 4, 0.05 * 1 / 4])


def test_evaluation_rollouts_are_the_students_own(tiny_pair_dir, prompts, tmp_path, processor_calls):
    trainer = _trainer(tiny_pair_dir, _args(tmp_path, max_steps=1, per_device_eval_batch_size=4), prompts)
    metrics = trainer.evaluate(eval_dataset=prompts.select(range(8)))
    assert "eval_loss" in metrics and processor_calls == []


def test_vllm_rollouts_resume_after_warmup(tiny_pair_dir, prompts, tmp_path, processor_calls):
    """During warmup the teacher must run inside HF generate; afterwards the parent's vLLM path is used again."""
    trainer = _trainer(tiny_pair_dir, _args(tmp_path, max_steps=3), prompts)
    vllm_steps = []

    class StubVLLM:
        def sync_weights(self):
            pass

        def generate(self, prompts, **kwargs):
            vllm_steps.append(trainer.state.global_step)
            return None, [[5, 6, trainer._tokenizer.eos_token_id] for _ in prompts], None, None

    trainer.use_vllm, trainer.vllm_generation, trainer._last_loaded_step = True, StubVLLM(), -1
    trainer.train()
    assert vllm_steps == [2]
    assert {p for p in processor_calls} and trainer.use_vllm is True


def test_trb_metrics_reach_wandb_offline(tiny_pair_dir, prompts, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer = _trainer(tiny_pair_dir, _args(tmp_path, max_steps=2, report_to="wandb", run_name="trb-test"), prompts)
    trainer.train()
    import wandb

    summary_keys = set(wandb.run.summary.keys())
    wandb.finish()
    for key in TRB_KEYS:
        assert f"train/{key}" in summary_keys, key
    assert "train/trb/beta_histogram" in summary_keys
    # And they are in the offline run file itself (protobuf stores the key strings verbatim).
    run_files = list(Path(tmp_path).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    payload = run_files[0].read_bytes()
    for key in ["train/trb/epsilon", "train/trb/beta/mean", "train/trb/kl_to_student/max", "train/trb/beta_histogram"]:
        assert key.encode() in payload, key


def test_wrong_config_class_is_rejected(tiny_pair_dir, prompts, tmp_path):
    with pytest.raises(TypeError, match="TRBDistillConfig"):
        _trainer(tiny_pair_dir, _args(tmp_path, DistillationConfig), prompts)


def test_tokenizer_larger_than_the_models_is_a_clear_error(tiny_pair_dir, prompts, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair_dir["tokenizer"])
    tokenizer.add_tokens([f"extra{i}" for i in range(32)])
    with pytest.raises(ValueError, match="share the student's tokenizer"):
        TRBDistillTrainer(
            model=tiny_pair_dir["student"],
            teacher_model=tiny_pair_dir["teacher"],
            args=_args(tmp_path),
            train_dataset=prompts,
            processing_class=tokenizer,
        )


def test_generation_batch_is_split_into_chunks_during_warmup(tiny_pair_dir, prompts, tmp_path, processor_calls):
    args = _args(tmp_path, max_steps=3, per_device_train_batch_size=4, trb_generation_batch_size=3)
    trainer = _trainer(tiny_pair_dir, args, prompts)
    trainer.train()
    first_calls = [p for i, p in enumerate(processor_calls) if i == 0 or p is not processor_calls[i - 1]]
    assert len(first_calls) == 4  # two warmup rollouts of 4 prompts, each generated as 3 + 1
    logs = _train_logs(trainer)
    assert [entry["completions/mean_length"] > 0 for entry in logs] == [True] * 3


def test_processor_blends_at_the_temperature_generate_samples_at(tiny_pair_dir, prompts, tmp_path, processor_calls):
    args = _args(tmp_path, max_steps=1, temperature=1.0, generation_kwargs={"temperature": 0.5})
    trainer = _trainer(tiny_pair_dir, args, prompts)
    trainer.train()
    assert trainer.generation_config.temperature == 0.5
    assert processor_calls and {p.temperature for p in processor_calls} == {0.5}
