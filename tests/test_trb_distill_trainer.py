import math
import os
import weakref
from pathlib import Path

import pytest
import torch
from teacher_doubles import with_fixed_stop_head
from tiny_config import tiny_prompts, tiny_run_args, tiny_trainer
from transformers import AutoModelForCausalLM, AutoTokenizer

from trb_trl import TRBDistillConfig, TRBDistillTrainer, TrustRegionBlendingProcessor
from trb_trl._compat import DistillationConfig, DistillationTrainer
from trb_trl.rollout import TeacherStepper
from trb_trl.stop_alignment import StopAlignment
from trb_trl.testing import END_OF_TEXT, IM_END, build_tiny_qwen3


TRB_KEYS = [
    "trb/epsilon",
    "trb/beta/mean",
    "trb/beta/min",
    "trb/beta/max",
    "trb/teacher_fraction",
    "trb/kl_to_student/mean",
    "trb/kl_to_student/max",
    "trb/kl_to_teacher/mean",
    "trb/teacher_invalid_fraction",
    "trb/rollout_teacher_seconds",
]


@pytest.fixture
def prompts():
    return tiny_prompts()


def _args(tmp_path, config_class=TRBDistillConfig, **kwargs):
    return tiny_run_args(tmp_path / "out", config_class, **kwargs)


def _trainer(tiny_pair_dir, args, prompts, trainer_class=TRBDistillTrainer):
    return tiny_trainer(tiny_pair_dir, args, prompts, trainer_class)


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


def test_gradient_accumulation_shares_one_budget_per_optimizer_step(tiny_pair_dir, prompts, tmp_path, monkeypatch):
    from trb_trl.rollout.sources import TrustRegionRollout

    args = _args(tmp_path, max_steps=3, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    trainer = _trainer(tiny_pair_dir, args, prompts)
    budgets = []
    original = TrustRegionRollout.processor

    def record(source, teacher, attention_mask, settings):
        budgets.append((trainer.state.global_step, source.epsilon))
        return original(source, teacher, attention_mask, settings)

    monkeypatch.setattr(TrustRegionRollout, "processor", record)
    trainer.train()
    # One generate call per accumulation cycle (the parent generates the whole cycle at once), at that step's budget.
    assert budgets == [(0, pytest.approx(0.05)), (1, pytest.approx(0.025))]


def test_zero_epsilon_is_exactly_the_parent_trainer_when_stop_ids_are_shared(
    tokenizer, prompts, tmp_path, processor_calls
):
    def fresh_pair():  # student and teacher stopping on the same id: nothing to align, the loss is TRL's own
        eos = tokenizer.eos_token_id
        student = build_tiny_qwen3(len(tokenizer), hidden_size=32, eos_token_id=eos, seed=1)
        return student, build_tiny_qwen3(len(tokenizer), hidden_size=48, num_layers=3, eos_token_id=eos, seed=2)

    runs = []
    for trainer_class, config_class, extra in (
        (TRBDistillTrainer, TRBDistillConfig, {"trb_epsilon": 0.0}),
        (DistillationTrainer, DistillationConfig, {}),
    ):
        student, teacher = fresh_pair()
        trainer = trainer_class(
            model=student,
            teacher_model=teacher,
            args=_args(tmp_path, config_class, max_steps=2, **extra),
            train_dataset=prompts,
            processing_class=tokenizer,
        )
        trainer.train()
        runs.append(trainer)
    assert runs[0]._stop_alignment is None
    assert processor_calls == []
    for (name, p), (_, q) in zip(runs[0].model.named_parameters(), runs[1].model.named_parameters(), strict=True):
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
    args = _args(tmp_path, max_steps=3, per_device_train_batch_size=4, rollout_generation_batch_size=3)
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


def _student_completion_lengths(trainer, prompts, max_new_tokens):
    student = trainer.accelerator.unwrap_model(trainer.model).eval()
    tokenizer = trainer.processing_class
    batch = tokenizer([p[0]["content"] for p in prompts["prompt"][:32]], return_tensors="pt", padding=True)
    torch.manual_seed(1)
    sequences = student.generate(
        **batch, do_sample=True, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id
    )
    completions = sequences[:, batch["input_ids"].shape[1] :].tolist()
    eos = tokenizer.eos_token_id
    return [row.index(eos) + 1 if eos in row else len(row) for row in completions]


@pytest.mark.parametrize("aligned", [True, False])
def test_opd_control_learns_to_stop_on_the_students_own_stop_id(
    tiny_pair_dir, prompts, tmp_path, monkeypatch, aligned
):
    """epsilon = 0: an instruct-style teacher that stops on <|im_end|> teaches the Base-style student to stop on
    <|endoftext|> only because the loss merges the two stop tokens."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair_dir["tokenizer"])
    endoftext, im_end = tokenizer.convert_tokens_to_ids([END_OF_TEXT, IM_END])
    if not aligned:
        monkeypatch.setattr(StopAlignment, "between", classmethod(lambda cls, student, teacher: None))
    args = _args(
        tmp_path,
        trb_epsilon=0.0,
        max_steps=8,
        learning_rate=2e-2,
        max_completion_length=16,
        per_device_train_batch_size=8,
    )
    trainer = TRBDistillTrainer(
        model=tiny_pair_dir["student"],
        teacher_model=with_fixed_stop_head(AutoModelForCausalLM.from_pretrained(tiny_pair_dir["teacher"]), im_end),
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
    )
    assert (trainer._stop_alignment == StopAlignment(endoftext, (im_end,))) is aligned
    trainer.train()
    lengths = _student_completion_lengths(trainer, prompts, max_new_tokens=16)
    mean_length = sum(lengths) / len(lengths)
    if aligned:
        assert mean_length < 8, lengths  # the teacher's stop rate (0.3 per token) now means "stop" to the student
    else:
        assert mean_length > 12, lengths  # taught <|im_end|>, which does not end its generation


def test_at_most_one_teacher_cache_is_alive_during_a_chunked_rollout(tiny_pair_dir, prompts, tmp_path, monkeypatch):
    caches, alive_counts = [], []
    original = TeacherStepper.advance

    def spy(self, new_tokens):
        logits = original(self, new_tokens)
        if not any(ref() is self._cache for ref in caches):
            caches.append(weakref.ref(self._cache))
        alive_counts.append(sum(ref() is not None for ref in caches))
        return logits

    monkeypatch.setattr(TeacherStepper, "advance", spy)
    args = _args(tmp_path, max_steps=1, per_device_train_batch_size=6, rollout_generation_batch_size=2)
    trainer = _trainer(tiny_pair_dir, args, prompts)
    trainer.train()
    assert len(caches) == 3  # a 3-chunk rollout
    assert max(alive_counts) == 1
    assert all(ref() is None for ref in caches)  # and none outlives the rollout


def test_vision_language_models_are_rejected_with_trb(tiny_pair_dir, prompts, tmp_path, monkeypatch):
    monkeypatch.setattr(DistillationTrainer, "_is_vlm", True, raising=False)
    original_init = DistillationTrainer.__init__

    def init_then_mark_vlm(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self._is_vlm = True

    monkeypatch.setattr(DistillationTrainer, "__init__", init_then_mark_vlm)
    with pytest.raises(ValueError, match="vision-language"):
        _trainer(tiny_pair_dir, _args(tmp_path), prompts)


def test_trb_metrics_reach_wandb_offline_and_wandb_does_not_change_the_trajectory(
    tiny_pair_dir, prompts, tmp_path, monkeypatch
):
    import wandb
    from wandb_offline import read_history

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    wandb.teardown()  # W&B reads its settings (WANDB_DIR included) once per process: start from a clean slate
    trainers = {}
    for report_to in ("none", "wandb"):
        args = _args(tmp_path / report_to, max_steps=2, report_to=report_to, run_name="trb-test")
        trainers[report_to] = _trainer(tiny_pair_dir, args, prompts)
        trainers[report_to].train()
        if wandb.run is not None:
            wandb.finish()
    wandb.teardown()

    # Sampling the beta histogram uses a generator of its own: the training RNG, hence the run, is unchanged.
    for (name, p), (_, q) in zip(
        trainers["none"].model.named_parameters(), trainers["wandb"].model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)

    # The run is under output_dir, and its file holds every trb/* metric and the histogram, per step.
    run_files = list((tmp_path / "wandb" / "out").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    rows = [row for row in read_history(run_files[0]) if "train/trb/epsilon" in row]
    assert [row["train/trb/epsilon"] for row in rows] == pytest.approx([0.05, 0.025])
    for row in rows:
        for key in TRB_KEYS:
            assert f"train/{key}" in row, key
        assert row["train/trb/beta_histogram/_type"] == "histogram"
        assert sum(row["train/trb/beta_histogram/values"]) == 4 * 8  # every rollout token of this process
    logged = [entry for entry in _train_logs(trainers["wandb"])]
    assert [row["train/trb/beta/mean"] for row in rows] == pytest.approx([e["trb/beta/mean"] for e in logged])


def test_wandb_runs_go_under_output_dir_unless_wandb_dir_is_set(tmp_path, monkeypatch):
    from trb_trl import report_to

    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setattr(report_to, "_wandb_dir_we_set", None)
    report_to.put_wandb_runs_under(str(tmp_path / "a"))
    report_to.put_wandb_runs_under(str(tmp_path / "b"))  # a second trainer in the same process
    assert os.environ["WANDB_DIR"] == str(tmp_path / "b")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "mine"))
    report_to.put_wandb_runs_under(str(tmp_path / "c"))
    assert os.environ["WANDB_DIR"] == str(tmp_path / "mine")


def test_loss_top_k_over_the_whole_vocabulary_trains_exactly_like_the_full_divergence(
    tiny_pair_dir, prompts, tmp_path, monkeypatch
):
    """`loss_top_k >= V` keeps every token in the support, so the top-k loss, in either estimator, is the full
    (stop-aligned) divergence: same rollouts (same seed), same updates. A small k trains too, also with Veto's target,
    and the trainer hands `loss_top_k_estimator` to the loss."""
    from trb_trl.losses import divergences

    runs = []
    vocab = len(AutoTokenizer.from_pretrained(tiny_pair_dir["tokenizer"]))
    for run_name, options in (
        ("full", {}),
        ("policy_gradient", dict(loss_top_k=vocab + 10)),
        ("renormalized", dict(loss_top_k=vocab + 10, loss_top_k_estimator="renormalized")),
    ):
        trainer = tiny_trainer(tiny_pair_dir, _args(tmp_path / run_name, max_steps=2, **options), prompts)
        trainer.train()
        runs.append(trainer)
    assert runs[0]._stop_alignment is not None  # the tiny pair stops on different ids: the aligned path
    for run in runs[1:]:
        for (name, p), (_, q) in zip(runs[0].model.named_parameters(), run.model.named_parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-5, msg=name)  # float32 summation order only

    calls = []
    loss_function = divergences.top_k_divergence_loss

    def spy(*args, **kwargs):
        calls.append(kwargs["estimator"])
        return loss_function(*args, **kwargs)

    monkeypatch.setattr(divergences, "top_k_divergence_loss", spy)
    for estimator in ("policy_gradient", "renormalized"):
        options = dict(max_steps=2, loss_top_k=4, veto_beta_start=0.4, loss_top_k_estimator=estimator)
        args = _args(tmp_path / f"k4-{estimator}", **options)
        trainer = tiny_trainer(tiny_pair_dir, args, prompts)
        calls.clear()
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        assert [entry["veto/beta"] for entry in logs] == [0.4, 0.2]
        assert all(math.isfinite(entry["loss"]) for entry in logs)  # the paper's estimate may be negative
        assert calls and set(calls) == {estimator}


def test_loss_top_k_must_be_a_positive_integer(tmp_path):
    with pytest.raises(ValueError, match="loss_top_k must be an integer >= 1"):
        _args(tmp_path, TRBDistillConfig, loss_top_k=0)
