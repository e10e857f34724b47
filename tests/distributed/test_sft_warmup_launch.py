"""SFT warmup's two phases in one `trb-trl train` under a 2-process DeepSpeed ZeRO-3 launch (CPU, gloo): phase 1
gathers the teacher samples of both ranks and fine-tunes, then accelerate's and transformers' DeepSpeed state is
reset so phase 2 (SKD rollouts, a sharded teacher) starts its own ZeRO-3 engine from the phase-1 checkpoint."""

import json
import subprocess
import sys

import pytest
from launching import HERE, REPO, launch_env


pytestmark = pytest.mark.slow


def test_sft_warmup_then_opd_under_zero3(tmp_path):
    models = tmp_path / "tiny"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_models.py"), str(models)], check=True)
    out = tmp_path / "run"
    env = launch_env()
    command = [
        sys.executable,
        "-m",
        "trb_trl.cli",
        "train",
        str(REPO / "recipes" / "tiny_cpu.yaml"),
        "--accelerate_config",
        str(HERE / "zero3_strict_cpu.yaml"),
        "--model_name_or_path",
        str(models / "student"),
        "--teacher_model_name_or_path",
        str(models / "teacher"),
        "--dataset_name",
        str(models / "prompts.jsonl"),
        "--output_dir",
        str(out),
        "--sft_warmup_steps",
        "2",
        "--rollout_policy",
        "skd",
        "--gather_teacher_for_generation",
        "false",
    ]
    process = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    log = process.stdout + process.stderr
    assert process.returncode == 0, log[-6000:]
    assert "SFT warmup (phase 1 of 2)" in log and "OPD (phase 2 of 2)" in log
    phase_one = json.loads((out / "sft_warmup" / "trainer_state.json").read_text())
    assert phase_one["global_step"] == 2
    assert (out / "model.safetensors").exists()
    assert "skd/replacement_rate" in log  # phase 2 ran SKD rollouts with the sharded teacher
