import math
from types import SimpleNamespace

import pytest
from transformers import Qwen3Config

from trb_trl.memory_preflight import (
    GIB,
    check_rollout_memory,
    estimate_rollout_memory,
    kv_cache_bytes,
    speculative_cache_length,
)


QWEN3_1P7B = Qwen3Config(
    hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128
)
QWEN3_8B = Qwen3Config(
    hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128
)


def test_kv_cache_arithmetic_matches_hand_computation():
    # Qwen3-8B: 2 (K, V) x 36 layers x 8 kv heads x 128 dims x 2 bytes = 147,456 bytes per token
    assert kv_cache_bytes(QWEN3_8B, 1, 1, 2) == 147_456
    assert kv_cache_bytes(QWEN3_8B, 32, 8192, 2) == 147_456 * 32 * 8192
    assert kv_cache_bytes(QWEN3_1P7B, 1, 1, 2) == 2 * 28 * 8 * 128 * 2


def _paper_setup(**overrides):
    kwargs = dict(
        student_config=QWEN3_1P7B,
        teacher_config=QWEN3_8B,
        student_params=1_720_574_976,  # Qwen3-1.7B, embeddings tied
        teacher_params=8_190_735_360,
        num_sequences=32,
        sequence_length=1024 + 7168,
        dtype_bytes=2,
        world_size=8,
        zero_stage=3,
        gather_student=True,
        gather_teacher=True,
    )
    kwargs.update(overrides)
    return estimate_rollout_memory(**kwargs)


def test_the_whole_generation_batch_at_full_length_does_not_fit_on_80gb():
    estimate = _paper_setup()
    assert estimate.teacher_kv_cache / GIB == pytest.approx(36.0, abs=0.1)
    assert estimate.student_kv_cache / GIB == pytest.approx(28.0, abs=0.1)
    assert estimate.total > 80 * GIB
    with pytest.raises(ValueError, match="not to fit") as error:
        check_rollout_memory(estimate, 80 * GIB)
    assert "teacher KV cache" in str(error.value) and "rollout_generation_batch_size" in str(error.value)
    assert "GiB" in check_rollout_memory(estimate, 80 * GIB, mode="warn")
    assert check_rollout_memory(estimate, 80 * GIB, mode="off") is None


def test_chunked_generation_fits():
    estimate = _paper_setup(num_sequences=8)
    assert estimate.total < 0.9 * 80 * GIB
    assert check_rollout_memory(estimate, 80 * GIB) is None


def test_sharded_teacher_holds_only_its_shard():
    gathered, sharded = _paper_setup(), _paper_setup(gather_teacher=False)
    assert sharded.teacher_weights == gathered.teacher_weights // 8


def test_speculative_caches_hold_whole_rounds_of_drafts():
    # epsilon 0: every draft is kept, so rounds of gamma + 1 columns just cover the completion.
    assert speculative_cache_length(100, 50, 0.0, 7) == 100 + 7 * 8
    # epsilon 0.02: acceptance floor 1 - sqrt(0.01) = 0.9, so a round of 7 columns emits sum_{i<7} 0.9^i tokens.
    tokens_per_round = sum(0.9**i for i in range(7))
    columns = speculative_cache_length(1024, 7168, 0.02, 6)
    assert columns == 1024 + math.ceil(7168 / tokens_per_round) * 7
    assert (columns - 1024) / 7168 == pytest.approx(1.342, abs=1e-3)
    # epsilon >= 2: no acceptance guarantee, one token per round.
    assert speculative_cache_length(0, 10, 2.0, 3) == 40


def test_the_speculative_cache_width_is_counted_for_both_models():
    plain = _paper_setup(num_sequences=8)
    columns = speculative_cache_length(1024, 7168, 0.02, 6)
    speculative = _paper_setup(num_sequences=8, cache_length=columns)
    for name in ("student_kv_cache", "teacher_kv_cache"):
        assert getattr(speculative, name) * (1024 + 7168) == getattr(plain, name) * columns
    assert f"{columns} columns with drafts" in speculative.explain()
    assert _paper_setup(num_sequences=8, cache_length=100).total == plain.total  # never below the sequences


def test_the_engine_stays_within_the_preflight_cache_width():
    """Untruncated sampling accepts at least the Pinsker floor, so 200-token rollouts of 4 rows fit the estimate."""
    import torch

    from trb_trl.rollout import SpeculativeBlendingSampler
    from trb_trl.testing import build_tiny_qwen3

    student = build_tiny_qwen3(64, seed=0, eos_token_id=1)
    teacher = build_tiny_qwen3(64, hidden_size=96, num_layers=3, seed=1, eos_token_id=1)
    input_ids = torch.randint(2, 64, (4, 6), generator=torch.Generator().manual_seed(0))
    for epsilon, gamma in ((0.05, 4), (0.5, 6)):
        sampler = SpeculativeBlendingSampler(teacher, epsilon, draft_length=gamma, student_eos_token_id=1)
        torch.manual_seed(0)
        sampler.generate(student, input_ids, do_sample=True, top_k=0, max_new_tokens=200, min_new_tokens=200)
        columns = 6 + sum(sampler._draft_lengths) + len(sampler._draft_lengths)  # every round appends gamma + 1
        assert 6 + 200 < columns <= speculative_cache_length(6, 200, epsilon, gamma)


@pytest.fixture
def tiny_trainer(tiny_pair_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from trb_trl import TRBDistillConfig, TRBDistillTrainer

    args = TRBDistillConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", max_steps=1)
    return TRBDistillTrainer(
        model=tiny_pair_dir["student"],
        teacher_model=tiny_pair_dir["teacher"],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "w1 w2"}] * 8),
        processing_class=AutoTokenizer.from_pretrained(tiny_pair_dir["tokenizer"]),
    )


def test_trainer_runs_the_preflight_with_its_own_numbers(tiny_trainer, monkeypatch):
    import torch

    trainer = tiny_trainer
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=2**20))
    with pytest.raises(ValueError, match="not to fit"):
        trainer._check_rollout_memory()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=2**40))
    trainer._check_rollout_memory()
    trainer.args.trb_rollout_engine, trainer.args.trb_draft_length = "speculative", 6
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=2**20))
    with pytest.raises(ValueError, match="columns with drafts"):
        trainer._check_rollout_memory()


def test_a_colocated_vllm_engine_that_stays_awake_is_counted():
    asleep, awake = (
        _paper_setup(num_sequences=8),
        _paper_setup(num_sequences=8, vllm_reserved_fraction=0.6, device_bytes=80 * GIB),
    )
    assert awake.vllm_reserved == int(0.6 * 80 * GIB)
    assert awake.total - asleep.total == awake.vllm_reserved
    assert "vLLM" in awake.explain(80 * GIB)
    assert check_rollout_memory(asleep, 80 * GIB) is None
    with pytest.raises(ValueError, match="vllm_enable_sleep_mode"):
        check_rollout_memory(awake, 80 * GIB)


def test_trainer_counts_vllm_only_when_colocated_and_awake(tiny_trainer):
    trainer = tiny_trainer
    assert trainer._vllm_reserved_fraction() == 0.0
    trainer.args.use_vllm, trainer.args.vllm_mode, trainer.args.vllm_gpu_memory_utilization = True, "colocate", 0.4
    assert trainer._vllm_reserved_fraction() == 0.4
    trainer.args.vllm_enable_sleep_mode = True
    assert trainer._vllm_reserved_fraction() == 0.0
    trainer.args.vllm_enable_sleep_mode, trainer.args.vllm_mode = False, "server"
    assert trainer._vllm_reserved_fraction() == 0.0


def test_a_rollout_where_one_model_decodes_holds_only_that_models_cache():
    """TrOPD's student continuation in the Qwen3 recipe (32 rows per process, ZeRO-3 over 8): the student's KV cache at
    prompt + l_max + completion columns, the teacher's resident shard, no teacher cache."""
    estimate = _paper_setup(sequence_length=1024 + 2 * 7168, teacher_generates=False, phase="student rollout")
    assert estimate.student_kv_cache / GIB == pytest.approx(52.5, abs=0.1)
    assert estimate.teacher_kv_cache == 0 and "teacher KV cache" not in estimate.explain()
    assert estimate.teacher_weights == 8_190_735_360 * 2 // 8  # resident shard, not gathered
    assert "student rollout: 32 sequences x 15360 tokens" in estimate.explain()
    with pytest.raises(ValueError, match="The student rollout is estimated not to fit"):
        check_rollout_memory(estimate, 40 * GIB)
    prefixes = _paper_setup(student_generates=False, phase="TrOPD teacher-prefix rollout")
    assert prefixes.student_kv_cache == 0 and prefixes.student_weights == 1_720_574_976 * 2 // 8
    no_teacher = _paper_setup(teacher_config=None, teacher_params=0)
    assert (
        no_teacher.teacher_weights == no_teacher.teacher_kv_cache == 0
        and "teacher weights" not in no_teacher.explain()
    )


def _phases(trainer, **args):
    for name, value in args.items():
        setattr(trainer.args, name, value)
    return [
        (p.phase, p.num_sequences, p.sequence_length, p.teacher_generates) for p in trainer._rollout_memory_phases()
    ]


def test_every_policy_is_checked_at_each_rollout_it_makes(tiny_trainer, monkeypatch):
    """The teacher-guided rollout in chunks, and the parent's student rollout of the whole generation batch wherever
    the policy hands back to it (after TRB's warmup, SKD's steps; always for the student and temperature policies)."""
    import torch

    trainer, width = tiny_trainer, 1024 + 512
    guided, plain = ("teacher-guided rollout", 2, width, True), ("student rollout", 8, width, False)
    assert _phases(trainer, rollout_generation_batch_size=2) == [guided, plain]  # TRB: warmup, then plain rollouts
    assert _phases(trainer, trb_schedule="constant") == [guided]  # fixed epsilon: guided at every step
    assert _phases(trainer, rollout_policy="skd", skd_steps=None) == [guided]
    assert _phases(trainer, skd_steps=3) == [guided, plain]
    assert _phases(trainer, rollout_policy="student") == [plain]
    assert _phases(trainer, rollout_policy="temperature") == [plain]
    assert _phases(trainer, use_vllm=True) == []  # the parent's rollout is vLLM's (its reserved memory)
    trainer.args.use_vllm = False
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=2**20))
    with pytest.raises(ValueError, match="The student rollout is estimated not to fit") as error:
        trainer._check_rollout_memory()
    assert "student KV cache" in str(error.value) and "teacher KV cache" not in str(error.value)


@pytest.mark.parametrize(("sampling", "continuation_width"), [("uniform", 1024 + 48 + 64), ("max", 1024 + 64)])
def test_tropd_guidance_is_checked_with_its_prefixes(
    tiny_pair_dir, tmp_path, monkeypatch, sampling, continuation_width
):
    """TrOPD with `rollout_policy: student`: the teacher sampling prefixes (chunks of `rollout_generation_batch_size`), and
    the student continuing them in calls of the same size. A continuation call is left-padded to its longest prompt +
    prefix and runs until its largest remaining budget is spent: up to l_max extra columns with uniform prefix lengths
    (a call holding both extremes), none with "max"."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    from trb_trl import TrOPDConfig, TrOPDTrainer

    args = TrOPDConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to="none",
        max_steps=1,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_completion_length=64,
        tropd_prefix_max_length=48,
        tropd_prefix_sampling=sampling,
        rollout_generation_batch_size=2,
    )
    trainer = TrOPDTrainer(
        model=tiny_pair_dir["student"],
        teacher_model=tiny_pair_dir["teacher"],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "w1 w2"}] * 8),
        processing_class=AutoTokenizer.from_pretrained(tiny_pair_dir["tokenizer"]),
    )
    phases = trainer._rollout_memory_phases()
    assert [
        (p.phase, p.num_sequences, p.sequence_length, p.student_generates, p.teacher_generates) for p in phases
    ] == [
        ("TrOPD teacher-prefix rollout", 2, 1024 + 48, False, True),
        ("student rollout continuing teacher prefixes", 2, continuation_width, True, False),  # calls of 2 rows
    ]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=2**20))
    with pytest.raises(ValueError, match="not to fit"):
        trainer._check_rollout_memory()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=2**40))
    trainer._check_rollout_memory()
    trainer.args.tropd_guidance = False
    assert [p.phase for p in trainer._rollout_memory_phases()] == ["student rollout"]
