"""bf16 end to end on CPU: the proxy of a GPU run until one has been lent (scripts/gpu_check.py is the GPU check).

The tiny pair is loaded in bf16 (`model_init_kwargs={"dtype": "bfloat16"}`, the teacher likewise) and trained with
`bf16=True`, which transformers accepts on CPU (autocast to bf16): the TRB processor, the speculative engine and TrOPD
with TRB warmup, each for two optimizer steps across the warmup boundary (K = 1). The blend runs in float32 from bf16
logits, so the KL budget holds as in float32. The learning rate is large because these runs have no float32 master
weights: an update below half a unit in the last place is lost (0.004 for the RMSNorm scales at 1.0), and every
parameter must move.
"""

import math

import pytest
import torch
from tiny_config import tiny_prompts, tiny_run_args, tiny_trainer

from trb_trl import TrOPDConfig, TrOPDTrainer


pytestmark = pytest.mark.usefixtures("one_torch_thread")

BF16 = dict(
    bf16=True,
    model_init_kwargs={"dtype": "bfloat16"},
    teacher_model_init_kwargs={"dtype": "bfloat16"},
    learning_rate=1e-2,
    max_steps=2,
    trb_epsilon=0.05,
    trb_warmup_steps=1,
)


def _train_in_bf16(trainer) -> list[dict]:
    """Train; check the models stayed bf16, every loss is finite and every student parameter moved."""
    assert {p.dtype for p in trainer.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trainer.teacher_model.parameters()} == {torch.bfloat16}
    assert trainer.args.bf16 and trainer.accelerator.mixed_precision == "bf16"
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(math.isfinite(entry["loss"]) for entry in logs)
    unchanged = [name for name, p in trainer.model.named_parameters() if torch.equal(p, before[name])]
    assert unchanged == []
    assert [entry["trb/epsilon"] for entry in logs] == pytest.approx([0.05, 0.0])
    assert 0.0 <= logs[0]["trb/beta/mean"] <= 1.0 and "trb/beta/mean" not in logs[1]
    assert logs[0]["trb/kl_to_student/max"] <= 0.05 * (1 + 1e-3) + 2e-5
    return logs


@pytest.mark.parametrize("engine", ["processor", "speculative"])
def test_trb_trains_in_bf16_across_the_warmup_boundary(tiny_pair_dir, tmp_path, engine):
    args = tiny_run_args(tmp_path / "out", trb_rollout_engine=engine, trb_draft_length=4, **BF16)
    logs = _train_in_bf16(tiny_trainer(tiny_pair_dir, args, tiny_prompts(8)))
    if engine == "speculative":
        assert 0.0 < logs[0]["trb/speculative/teacher_forwards_per_token"] <= 1.0
        assert "trb/speculative/teacher_forwards_per_token" not in logs[1]


def test_tropd_with_trb_warmup_trains_in_bf16(tiny_pair_dir, tmp_path):
    args = tiny_run_args(tmp_path / "out", TrOPDConfig, rollout_policy="trb", tropd_prefix_steps=2, **BF16)
    logs = _train_in_bf16(tiny_trainer(tiny_pair_dir, args, tiny_prompts(8), trainer_class=TrOPDTrainer))
    assert all("tropd/prefix_fraction" in entry for entry in logs)
    assert all(0.0 <= entry.get("tropd/trust_fraction", 1.0) <= 1.0 for entry in logs)
