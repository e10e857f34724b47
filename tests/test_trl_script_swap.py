"""The README's promise: TRL's own `trl/scripts/distillation.py` becomes a TRB run by swapping two imports."""

import subprocess
import sys
from pathlib import Path

import pytest
import trl
import yaml


SWAPS = [
    (
        "from trl import DistillationTrainer, get_dataset",
        "from trb_trl import TRBDistillTrainer as DistillationTrainer\n    from trl import get_dataset",
    ),
    (
        "from trl import DatasetMixtureConfig, DistillationConfig, ModelConfig",
        "from trb_trl import TRBDistillConfig as DistillationConfig\n    from trl import DatasetMixtureConfig, ModelConfig",
    ),
]


@pytest.mark.slow
def test_trl_distillation_script_with_two_swapped_imports_runs_trb(tiny_pair_dir, tmp_path):
    source = (Path(trl.__file__).parent / "scripts" / "distillation.py").read_text()
    for old, new in SWAPS:
        assert source.count(old) == 1, f"TRL's script changed: {old!r} not found once"
        source = source.replace(old, new)
    script = tmp_path / "distillation.py"
    script.write_text(source)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "w{i} w{i + 1} w{i + 2}"}}\n' for i in range(16)))
    recipe = {
        "model_name_or_path": tiny_pair_dir["student"],
        "teacher_model_name_or_path": tiny_pair_dir["teacher"],
        "datasets": [{"path": "json", "data_files": str(prompts)}],
        "output_dir": str(tmp_path / "out"),
        "max_steps": 3,
        "per_device_train_batch_size": 4,
        "max_completion_length": 8,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,
        "gradient_checkpointing": False,
        "save_strategy": "no",
        "trb_epsilon": 0.04,
        "trb_warmup_steps": 2,
    }
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe))
    result = subprocess.run(
        [sys.executable, str(script), "--config", str(config)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'trb/epsilon': '0.04'" in result.stdout and "'trb/beta/mean'" in result.stdout
