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
    assert "teacher KV cache" in str(error.value) and "trb_generation_batch_size" in str(error.value)
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
