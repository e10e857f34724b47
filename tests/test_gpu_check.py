"""scripts/gpu_check.py: the `--dry-run` that CI runs (every check's code on CPU at tiny sizes, so the GPU run cannot
rot), and the runner's bookkeeping: a failing or overrunning check is recorded and the others still run."""

import json
import time

import pytest
from script_modules import load_script


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gpu_check():
    return load_script("gpu_check")


def test_dry_run_exercises_every_check_and_writes_the_report(gpu_check, tmp_path):
    assert gpu_check.main(["--dry-run", "--output-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    records = {record["name"]: record for record in report["checks"]}
    assert list(records) == list(gpu_check.CHECKS)
    statuses = {name: record["status"] for name, record in records.items()}
    assert statuses == {
        "gpu_tests": "skipped",  # collected, not run
        "rollout_bench": "passed",
        "bf16_training_sdpa": "passed",
        "bf16_training_flash_attention_2": "skipped",
        "peak_memory": "skipped",  # the estimate only
        "vllm_colocate": "skipped",
    }
    for record in records.values():
        assert record["seconds"] >= 0 and (record["status"] == "passed") == (record["reason"] is None)
    assert records["gpu_tests"]["figures"]["counts"]["collected"] >= 2
    bench = records["rollout_bench"]["figures"]["runs"][0]
    assert set(bench["median_seconds"]) == {
        "student",
        "teacher",
        "trb",
        "trb_eps0",
        *("spec_eps0.02_g6", "spec_eps0.002_g16"),
    }
    assert bench["shape"]["dtype"] == "bfloat16"
    training = records["bf16_training_sdpa"]["figures"]
    assert [run["engine"] for run in training["runs"]] == ["processor", "speculative"]
    assert all(run["problems"] == [] for run in training["runs"])
    columns = training["masked_cache_columns"]
    assert all(columns[role]["masked"] < 0.1 * columns[role]["attended"] for role in ("student", "teacher"))
    memory = records["peak_memory"]["figures"]["runs"][0]
    assert memory["estimate"]["total_bytes"] > 0 and memory["rollouts"] and "measured_peak_bytes" not in memory
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| check | status | seconds (budget) | figures |" in markdown
    assert all(f"| {name} | {statuses[name]} |" in markdown for name in gpu_check.CHECKS)


def test_a_failing_or_overrunning_check_is_recorded_and_the_run_exits_1(gpu_check, tmp_path, monkeypatch):
    def failing(ctx):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(gpu_check, "check_vllm_colocate", failing)
    monkeypatch.setattr(gpu_check, "check_peak_memory", lambda ctx: time.sleep(120))  # interrupted at its budget
    monkeypatch.setitem(gpu_check.DRY_PLAN.budgets, "peak_memory", 0.2)
    arguments = ["--dry-run", "--output-dir", str(tmp_path), "--checks", "vllm_colocate", "peak_memory"]
    assert gpu_check.main(arguments) == 1
    records = json.loads((tmp_path / "gpu_check.json").read_text())["checks"]
    assert [(record["name"], record["status"]) for record in records] == [
        ("peak_memory", "failed"),
        ("vllm_colocate", "failed"),
    ]
    assert "time budget of 0.2 s" in records[0]["reason"] and records[0]["seconds"] < 60  # not the whole sleep
    assert records[1]["reason"] == "ZeroDivisionError: boom" and "traceback" in records[1]
    assert "| vllm_colocate | failed |" in (tmp_path / "gpu_check.md").read_text()


def test_pytest_summaries_are_counted(gpu_check):
    assert gpu_check.pytest_counts("2 passed, 1 skipped, 350 deselected in 9.10s") == {
        "passed": 2,
        "skipped": 1,
        "deselected": 350,
    }
    assert gpu_check.pytest_counts("2/352 tests collected (350 deselected) in 4.2s") == {
        "collected": 2,
        "deselected": 350,
    }
    assert gpu_check.pytest_counts("1 failed, 1 passed, 2 errors in 3s") == {"failed": 1, "passed": 1, "error": 2}


def test_warmup_logs_are_checked(gpu_check):
    good = [
        {"loss": 0.1, "trb/epsilon": 0.05, "trb/beta/mean": 0.5},
        {"loss": 0.1, "trb/epsilon": 0.0},
    ]
    assert gpu_check.warmup_problems(good, steps=2, warmup=1) == []
    bad = [{"loss": float("nan"), "trb/epsilon": 0.05}, {"loss": 0.1, "trb/epsilon": 0.0, "trb/beta/mean": 0.1}]
    problems = gpu_check.warmup_problems(bad, steps=3, warmup=1)
    assert len(problems) == 4  # a missing step, a NaN loss, no beta in warmup, a beta after it
