"""In-training math evaluation (`MathEvalCallback`) in a 2-process DeepSpeed ZeRO-3 launch (CPU, gloo, parameter
caching off), the student gathered for generation.

The five problems split unevenly (three on one rank, two on the other); the short share is padded with an ungraded
problem, so both ranks make the same `generate` calls. The last evaluation scores a one-problem benchmark, so one rank
has nothing to score and a checkpoint is saved right after: that rank must still enter the gather, generate (padding
only) and reduce. Before the padding and the hook-free gather, that evaluation hung (rank 0 in the gather, rank 1 in
the reduce) until the hang guard fired. Scripted completions make the expected pass@1 exact.
"""

import json
import subprocess
from pathlib import Path

import pytest
from launching import HERE, REPO, accelerate_command, launch_env


LAUNCH_TIMEOUT = 360  # seconds for the whole launch (first DeepSpeed use JIT-builds a comm op: ~30-60 s)
HANG_TIMEOUT = 120  # seconds of training and evaluation after which each rank dumps its stack and exits
NAME = "five"  # the benchmark file's stem: its name in the metric keys
SOLO = "solo"  # the one-problem benchmark of the last evaluation (step 3)
MEAN = "eval_math/mean_pass@1"
# Which samples of each problem (2 samples each) answer correctly. The ranks' shares have different pass@1, so a
# mean of per-rank means (7/12) or one rank's score alone (1/6 or 1) would not pass for the right reduction (1/2).
CORRECT = [[True, False], [True, True], [False, False], [True, True], [False, False]]
EXPECTED_PASS_AT_1 = sum(sum(samples) / len(samples) for samples in CORRECT) / len(CORRECT)
# The solo problem's samples are both right: the last evaluation is the best (so the checkpoint save after it enters
# the Trainer's best-checkpoint barrier). Its padding on the other rank answers nothing: grading it would give 1/2.
SOLO_CORRECT = [True, True]

pytestmark = pytest.mark.slow


def _boxed(answer: str, ok: bool) -> str:
    return f"So the answer is \\boxed{{{answer if ok else int(answer) + 1}}}."


def _write_benchmarks(directory: Path) -> tuple[Path, Path, Path]:
    """The benchmark files and the scripted completions: the gold answer in a box when correct, another number if not."""
    answers = [str(10 + index) for index in range(len(CORRECT))]
    benchmark = directory / f"{NAME}.jsonl"
    rows = [{"problem": f"w{index} w{index + 1}", "answer": answer} for index, answer in enumerate(answers)]
    benchmark.write_text("".join(json.dumps(row) + "\n" for row in rows))
    solo = directory / f"{SOLO}.jsonl"
    solo.write_text(json.dumps({"id": "only", "problem": "w7 w8 w9", "answer": "42"}) + "\n")
    scripted = {str(index): [_boxed(answer, ok) for ok in CORRECT[index]] for index, answer in enumerate(answers)}
    scripted["only"] = [_boxed("42", ok) for ok in SOLO_CORRECT]
    completions = directory / "completions.json"
    completions.write_text(json.dumps(scripted))
    return benchmark, solo, completions


def test_uneven_and_empty_evaluation_shares_under_zero3_agree_on_exact_scores(tiny_pair_dir, tmp_path):
    benchmark, solo, completions = _write_benchmarks(tmp_path)
    out = tmp_path / "run"
    env = launch_env()
    command = accelerate_command(
        HERE / "zero3_strict_cpu.yaml",
        HERE / "eval_launch.py",
        "--models",
        str(Path(tiny_pair_dir["student"]).parent),
        "--out",
        str(out),
        "--benchmark",
        str(benchmark),
        "--completions",
        str(completions),
        "--gather-student",
        "true",
        "--solo-benchmark",
        str(solo),
        "--save-steps",
        "3",
        "--max-steps",
        "3",
        "--hang-timeout",
        str(HANG_TIMEOUT),
    )
    try:
        process = subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as error:  # the in-process guard should have fired first
        pytest.fail(f"launch did not finish in {LAUNCH_TIMEOUT}s:\n{(error.stderr or b'')[-4000:]}")
    assert process.returncode == 0, f"launch failed or hung:\n{process.stderr[-6000:]}"
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert all(r["world_size"] == 2 and r["zero_stage"] == 3 for r in ranks)

    # Step 0 (the initial student) and every step after it; both ranks log the same, exact, rows. Step 3 scores the
    # solo benchmark, which rank 1 had no problem of.
    for rank in ranks:
        assert [row["step"] for row in rank["eval_rows"]] == [0, 1, 2, 3]
        for row in rank["eval_rows"][:3]:
            assert row[MEAN] == pytest.approx(EXPECTED_PASS_AT_1, abs=1e-12)
            assert row[f"eval_{NAME}/pass@1"] == row[MEAN]
        last = rank["eval_rows"][3]
        assert last[f"eval_{SOLO}/pass@1"] == last[MEAN] == pytest.approx(sum(SOLO_CORRECT) / len(SOLO_CORRECT))
    strip = [[{k: v for k, v in row.items() if k != "eval_math/seconds"} for row in r["eval_rows"]] for r in ranks]
    assert strip[0] == strip[1]
    results = json.loads((out / "math_eval.json").read_text())
    assert [e["mean_pass@1"] for e in results["evaluations"]] == [row[MEAN] for row in ranks[0]["eval_rows"]]

    # Each evaluation really generated on both ranks, the same generate calls (the shorter share padded with an
    # ungraded problem); the real problems together cover every sample once.
    everything = sorted([str(problem), sample] for problem in range(len(CORRECT)) for sample in range(2))
    for step in (0, 1, 2, 3):
        shares, padding, shapes = [], [], []
        for rank in ranks:
            calls = [call for call in rank["generate_calls"] if call["step"] == step]
            assert calls and all(n is not None and n >= 1 for call in calls for n in call["num_tokens"])
            shapes.append([len(call["requests"]) for call in calls])
            requests = [request for call in calls for request in call["requests"]]
            shares.append(sorted(r for r in requests if not r[0].startswith("padding-")))
            padding.append(sorted(r for r in requests if r[0].startswith("padding-")))
        assert shapes[0] == shapes[1]
        if step < 3:
            assert sorted(len(share) for share in shares) == [4, 6]
            assert sorted(shares[0] + shares[1]) == everything
            assert sorted(len(p) for p in padding) == [0, 2]
        else:  # rank 1 had nothing: it sampled only the padding
            assert shares == [[["only", 0], ["only", 1]], []]
            assert padding == [[], [["padding-0", 0], ["padding-0", 1]]]

    # The checkpoint saved right after the last evaluation exists and is recorded with it; both ranks agree on the
    # best step (the Trainer's save enters a barrier when one is set).
    assert (out / "checkpoint-3").is_dir()
    assert results["evaluations"][-1]["checkpoint"] == str(out / "checkpoint-3")
    assert ranks[0]["best_global_step"] == ranks[1]["best_global_step"] == results["best"]["step"] == 3

    # Training went on in step: the logged (cross-process) losses agree.
    assert len(ranks[0]["losses"]) == 3 and ranks[0]["losses"] == ranks[1]["losses"]
