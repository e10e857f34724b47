from types import SimpleNamespace

import pytest
from transformers import Qwen3Config

from trb_trl.memory_preflight import GIB, check_rollout_memory, estimate_rollout_memory, kv_cache_bytes


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
