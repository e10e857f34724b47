"""Two-process launches on CPU (gloo) with TRB (or SKD) active and deliberately uneven rollout lengths.

Rank 0's rollouts stop after two tokens while rank 1's run to the length limit. Under DeepSpeed ZeRO-3 with
parameter caching off (`ds_z3_strict.json`), a sharded teacher stepped from a logits processor deadlocks here
(`test_naive_teacher_step_deadlocks` shows it); the trainer's two paths (teacher gathered for the rollout, or
stepped from the student's forward) must not. Every launch runs under a hang guard that dumps each rank's stack.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from launching import HERE, REPO, accelerate_command, launch_env


LAUNCH_TIMEOUT = 420  # seconds for the whole launch (first DeepSpeed use JIT-builds a comm op: ~30-60 s)
HANG_TIMEOUT = 180  # seconds after which each rank dumps its stack and exits

CASES = {
    "zero3_gathered_teacher": (HERE / "zero3_strict_cpu.yaml", ["--gather-teacher", "true"], 3),
    "zero3_sharded_teacher": (HERE / "zero3_strict_cpu.yaml", ["--gather-teacher", "false"], 3),
    # SKD consults the teacher at every token too: the same hazard, the same sharded-teacher path.
    "zero3_sharded_teacher_skd": (HERE / "zero3_strict_cpu.yaml", ["--gather-teacher", "false", "--policy", "skd"], 3),
    # TrOPD with TRB warmup: teacher prefixes from the sharded teacher (synced `generate`), TRB continuations, and
    # TrOPD's loss with both lm_heads sharded. Rank 0 has no prefix token at all (every length drawn 0) while rank 1
    # samples prefixes up to the maximum: the prefix `generate`, the prefix metrics and the loss must not care.
    "zero3_sharded_teacher_tropd": (
        HERE / "zero3_strict_cpu.yaml",
        ["--gather-teacher", "false", "--policy", "tropd", "--no-prefix-on-rank0"],
        3,
    ),
    # The speculative engine with a sharded teacher: every rank runs the same number of draft/verify rounds.
    "zero3_sharded_teacher_speculative": (
        HERE / "zero3_strict_cpu.yaml",
        ["--gather-teacher", "false", "--engine", "speculative"],
        3,
    ),
    # MOPD with TRB warmup: rank 0 has no row of teacher "b" while rank 1 has both. Both teachers are gathered on every
    # rank for each rollout, and the loss runs teacher "b" on a stand-in row on rank 0: the forwards stay in step.
    "zero3_two_teachers": (HERE / "zero3_strict_cpu.yaml", ["--gather-teacher", "true", "--two-teachers"], 3),
    "zero2": (HERE / "zero2_cpu.yaml", [], 2),
    # Rank 0 also runs the rollout hook twice per generation, as TRL's tool loop does on a rank with tool calls:
    # the parent has no collective there, so TRB must not add one. The in-training evaluation scores one problem, so
    # rank 1 has nothing to score. Two teachers (MOPD), rank 0 with no row of teacher "b", as in zero3_two_teachers.
    "ddp": (
        REPO / "recipes" / "accelerate" / "ddp_cpu.yaml",
        ["--extra-rollout-on-rank0", "--math-eval-benchmark", str(HERE / "math_problems.jsonl"), "--two-teachers"],
        0,
    ),
}
TWO_TEACHER_CASES = ("zero3_two_teachers", "ddp")

pytestmark = pytest.mark.slow


def _launch(config: Path, extra: list[str], models: str, out: Path, hang_timeout: float = HANG_TIMEOUT):
    env = launch_env()
    command = accelerate_command(
        config,
        HERE / "trb_launch.py",
        "--models",
        models,
        "--out",
        str(out),
        "--uneven",
        "--hang-timeout",
        str(hang_timeout),
        *extra,
    )
    try:
        return subprocess.run(
            command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as error:  # the in-process guard should have fired first
        pytest.fail(f"launch did not finish in {LAUNCH_TIMEOUT}s:\n{(error.stderr or b'')[-4000:]}")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_models")
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_models.py"), str(directory)], check=True)
    return str(directory)


@pytest.fixture(scope="module")
def results(models, tmp_path_factory):
    """Run every case once; tests below inspect the per-rank reports."""
    outcomes = {}
    for name, (config, extra, _) in CASES.items():
        out = tmp_path_factory.mktemp(name)
        process = _launch(config, extra, models, out)
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1) if (out / f"rank{r}.json").exists()]
        outcomes[name] = (process, ranks)
    return outcomes


@pytest.mark.parametrize("case", list(CASES))
def test_uneven_rollouts_finish_and_stay_in_sync(results, case):
    process, ranks = results[case]
    assert process.returncode == 0, f"{case} failed or hung:\n{process.stderr[-6000:]}"
    assert len(ranks) == 2 and all(r["world_size"] == 2 for r in ranks)
    assert all(r["zero_stage"] == CASES[case][2] for r in ranks)
    # The lengths really were uneven: rank 0 stopped after a few tokens, rank 1 reached the limit (with TrOPD, from
    # step 2 on, when the teacher prefixes have annealed to none).
    steps = slice(2, None) if case.endswith("_tropd") else slice(None)
    assert max(max(step) for step in ranks[0]["completion_lengths"][steps]) <= 3
    assert max(max(step) for step in ranks[1]["completion_lengths"][steps]) == 12
    # Training kept the replicas identical.
    assert ranks[0]["param_digest"] == ranks[1]["param_digest"]


@pytest.mark.parametrize("case", list(CASES))
def test_rollout_metrics_are_reduced_across_ranks(results, case):
    process, ranks = results[case]
    assert process.returncode == 0
    rollouts = ranks[0]["local_rollouts"] + ranks[1]["local_rollouts"]
    if case == "ddp":  # rank 0 ran twice the rollouts of rank 1, and nothing hung
        counts = [len(rank["local_rollouts"]) for rank in ranks]
        assert counts[0] == 2 * counts[1] > 0
        # The evaluations of one problem (rank 1 had none) logged the same scores on both ranks.
        rows = [[{k: v for k, v in row.items() if "seconds" not in k} for row in rank["eval_rows"]] for rank in ranks]
        assert [row["step"] for row in rows[0]] == [0, 3] and rows[0] == rows[1]
        assert all(0 <= row["eval_math_problems/pass@1"] <= 1 for row in rows[0])
    skd = case.endswith("_skd")
    prefix = "skd/" if skd else "trb/"
    for rank in ranks:
        if skd:
            assert [entry["skd/active"] for entry in rank["logs"]] == [1.0, 1.0, 0.0]
            warmup = [entry for entry in rank["logs"] if entry["skd/active"]]
        else:
            assert [entry["trb/epsilon"] for entry in rank["logs"]] == pytest.approx([0.05, 0.025, 0.0])
            warmup = [entry for entry in rank["logs"] if entry["trb/epsilon"] > 0]
        assert len(warmup) == 2 and all(f"{prefix}rollout_teacher_seconds" in entry for entry in warmup)
        for entry in warmup:  # each logged step reduces exactly the rollouts made at that step, on both ranks
            local = [r for r in rollouts if r["step"] == entry["step"] - 1]
            tokens = sum(r["tokens"] for r in local)
            if skd:
                replaced = sum(r["sums"]["replaced"] for r in local)
                assert entry["skd/replacement_rate"] == pytest.approx(replaced / tokens, rel=1e-5)
            else:
                beta = sum(r["sums"]["beta"] for r in local)
                assert entry["trb/beta/mean"] == pytest.approx(beta / tokens, rel=1e-5)
                assert entry["trb/kl_to_student/max"] <= entry["trb/epsilon"] * (1 + 1e-3) + 2e-5
        assert all(f"{prefix}rollout_teacher_seconds" not in entry for entry in rank["logs"][2:])
    for a, b in zip(ranks[0]["logs"], ranks[1]["logs"], strict=True):  # every rank logs the same reduced values
        for start in (prefix, "tropd/"):
            assert {k: v for k, v in a.items() if k.startswith(start) and "seconds" not in k} == pytest.approx(
                {k: v for k, v in b.items() if k.startswith(start) and "seconds" not in k}
            )
    if case.endswith("_tropd"):
        logs = ranks[0]["logs"]
        assert [entry["tropd/prefix_max_length"] for entry in logs] == [12, 6, 0]
        assert logs[0]["tropd/prefix_fraction"] > 0 and logs[2]["tropd/prefix_fraction"] == 0
        # Prefixes drawn for the greedy rollout and at steps 0 and 1: none on rank 0, some on rank 1 (the fraction
        # above is rank 1's alone).
        assert [sum(lengths) for lengths in ranks[0]["prefix_lengths"]] == [0, 0, 0]
        assert len(ranks[1]["prefix_lengths"]) == 3 and all(sum(lengths) > 0 for lengths in ranks[1]["prefix_lengths"])
        assert all(0 <= entry.get("tropd/trust_fraction", 0) <= 1 for entry in logs)


@pytest.mark.parametrize("case", TWO_TEACHER_CASES)
def test_a_rank_without_rows_of_a_teacher_stays_in_step(results, case):
    """MOPD: rank 0 routed every row to teacher "a", rank 1 rows to both; training finished with identical replicas
    (checked above), and every rank logged the same per-teacher numbers, teacher "b"'s coming from rank 1 alone."""
    process, ranks = results[case]
    assert process.returncode == 0, process.stderr[-6000:]
    assert {index for step in ranks[0]["row_teachers"] for index in step} == {0}
    assert {index for step in ranks[1]["row_teachers"] for index in step} == {0, 1}
    for a, b in zip(ranks[0]["logs"], ranks[1]["logs"], strict=True):
        teacher_keys = {k for k in a if k.startswith("mopd/") or k.endswith(("/a", "/b"))}
        assert teacher_keys and teacher_keys == {k for k in b if k.startswith("mopd/") or k.endswith(("/a", "/b"))}
        assert {k: a[k] for k in teacher_keys if "seconds" not in k} == pytest.approx(
            {k: b[k] for k in teacher_keys if "seconds" not in k}
        )
        assert a["mopd/b/rows"] > 0 and a["mopd/a/rows"] > a["mopd/b/rows"]  # rank 0's rows are all "a"
    warmup = ranks[0]["logs"][:2]
    assert all(0 < entry["trb/beta/mean/b"] <= 1 for entry in warmup)


@pytest.mark.parametrize("case", [case for case in CASES if case.startswith("zero3_sharded")])
def test_sharded_teacher_steps_with_the_student_on_every_rank(results, case):
    _, ranks = results[case]
    forwards = [[r["teacher_forwards"] for r in rank["local_rollouts"]] for rank in ranks]
    assert forwards[0] == forwards[1]  # the finished rank kept stepping the teacher with the student


def test_teacher_path_does_not_change_the_result(results):
    gathered = results["zero3_gathered_teacher"][1]
    sharded = results["zero3_sharded_teacher"][1]
    assert gathered[0]["param_digest"] == sharded[0]["param_digest"]
    assert gathered[0]["completion_lengths"] == sharded[0]["completion_lengths"]


# SKD draws its own tokens; TrOPD's greedy rollout starts with a teacher prefix.
@pytest.mark.parametrize("case", [case for case in CASES if not case.endswith(("_skd", "_tropd"))])
def test_rollouts_equal_the_single_process_rollout(results, models, case):
    """A greedy TRB rollout on each rank equals the same rollout in one plain process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

    from trb_trl import TrustRegionBlendingProcessor

    _, ranks = results[case]
    tokenizer = AutoTokenizer.from_pretrained(f"{models}/tokenizer")
    student = AutoModelForCausalLM.from_pretrained(f"{models}/student")
    teacher = AutoModelForCausalLM.from_pretrained(f"{models}/teacher")
    eos = tokenizer.eos_token_id
    for rank in ranks:
        prompts = [torch.tensor(p) for p in rank["greedy_prompts"]]
        width = max(len(p) for p in prompts)
        input_ids = torch.stack([torch.cat([torch.full((width - len(p),), eos), p]) for p in prompts])
        mask = torch.stack([torch.cat([torch.zeros(width - len(p)), torch.ones(len(p))]).long() for p in prompts])
        processor = TrustRegionBlendingProcessor(
            teacher,
            0.05,
            prompt_attention_mask=mask,
            vocab_size=len(tokenizer),
            student_eos_token_id=[eos],
            teacher_eos_token_id=teacher.generation_config.eos_token_id,
        )
        sequences = student.generate(
            input_ids=input_ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=12,
            eos_token_id=eos,
            pad_token_id=eos,
            logits_processor=LogitsProcessorList([processor]),
        )
        expected = []
        for row in sequences[:, width:].tolist():
            expected.append(row[: row.index(eos) + 1] if eos in row else row)
        assert rank["greedy_completions"] == expected, (case, rank["rank"])


def test_naive_teacher_step_deadlocks(models, tmp_path):
    """Negative control: the hazard is real here, so the passing cases above are evidence, not luck."""
    process = _launch(
        HERE / "zero3_strict_cpu.yaml",
        ["--gather-teacher", "false", "--naive-teacher-step"],
        models,
        tmp_path,
        hang_timeout=20,  # armed after set-up; the hang comes within the first rollout, seconds in
    )
    output = process.stdout + process.stderr
    assert process.returncode != 0
    # One rank waits in a collective of the sharded teacher's forward (a parameter fetch, or DeepSpeed's
    # start-of-forward trace check) called from the logits processor, while the other has moved on.
    assert "Timeout" in output, output[-4000:]
    assert "fetch_sub_module" in output or "_start_of_forward_hook" in output, output[-4000:]
