import shutil
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
CLI = [shutil.which("trb-trl")] if shutil.which("trb-trl") else [sys.executable, "-m", "trb_trl.cli"]


def _run(*args, timeout=300, cwd=REPO):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def test_help_lists_the_commands():
    result = _run("--help")
    assert result.returncode == 0
    assert "train" in result.stdout and "demo" in result.stdout


def test_train_help_lists_the_trb_fields():
    result = _run("train", "--help")
    assert result.returncode == 0, result.stderr
    for field in ("--trb_epsilon", "--trb_warmup_steps", "--trb_schedule", "--system_prompt"):
        assert field in result.stdout


def test_unknown_command_fails():
    assert _run("frobnicate").returncode != 0


@pytest.mark.slow
def test_train_runs_the_tiny_cpu_recipe_with_overrides(tmp_path):
    make = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_tiny_models.py"), str(tmp_path / "tiny")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert make.returncode == 0, make.stderr
    output_dir = tmp_path / "run"
    result = _run(
        "train",
        "recipes/tiny_cpu.yaml",
        "--model_name_or_path",
        str(tmp_path / "tiny" / "student"),
        "--teacher_model_name_or_path",
        str(tmp_path / "tiny" / "teacher"),
        "--dataset_name",
        str(tmp_path / "tiny" / "prompts.jsonl"),
        "--output_dir",
        str(output_dir),
        "--max_steps",
        "3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'trb/epsilon': '0.05'" in result.stdout and "'trb/epsilon': '0.025'" in result.stdout
    assert (output_dir / "model.safetensors").is_file()
