"""`evaluate` / `score_benchmarks`: prompts as training renders them, seeded batched sampling, exact pass@k on a
fixed fake sampler, results.json / samples.jsonl, and resumption after an interruption."""

import itertools
import json
from fractions import Fraction
from math import comb

import pytest
import torch

from trb_trl.evaluation.benchmarks import load_benchmark
from trb_trl.evaluation.prompts import DEFAULT_SYSTEM_PROMPT, render_prompt, tokenize_prompts
from trb_trl.evaluation.runner import (
    RESULTS_FILE,
    SAMPLES_FILE,
    default_output_dir,
    evaluate,
    read_samples,
    sample_batches,
    score_benchmarks,
)
from trb_trl.evaluation.sampling import Completion, HFSampler, SampleRequest
from trb_trl.prompt_data import to_chat_prompt
from trb_trl.testing import build_word_tokenizer


ANSWERS = ["3", "\\frac{1}{2}", "7", "12", "(0, 1]"]
N = 4
CORRECT = [0, 1, 2, 3, 4]  # c per problem: the fake answers sample j of problem i correctly iff j < CORRECT[i]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def bench_file(tmp_path):
    path = tmp_path / "five.jsonl"
    rows = [{"id": f"p{i}", "problem": f"w{i} w{i + 1}", "answer": answer} for i, answer in enumerate(ANSWERS)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("word_tokenizer")
    build_word_tokenizer([f"w{i}" for i in range(61)]).save_pretrained(path)
    return str(path)


class FakeSampler:
    """Answers sample j of problem p{i} with the gold `\\boxed{}` iff j < CORRECT[i]; wrong answers alternate between
    a wrong box and no box. Records every call."""

    def __init__(self, fail_after_batches: int | None = None):
        self.calls: list[tuple[list[SampleRequest], int]] = []
        self.fail_after_batches = fail_after_batches

    def __call__(self, requests, seed):
        if self.fail_after_batches is not None and len(self.calls) >= self.fail_after_batches:
            raise KeyboardInterrupt
        self.calls.append((list(requests), seed))
        completions = []
        for r in requests:
            i = int(r.problem_id[1:])
            if r.index < CORRECT[i]:
                completions.append(Completion(f"so the answer is \\boxed{{{ANSWERS[i]}}}.", 9, True))
            elif r.index % 2:
                completions.append(Completion("\\boxed{999}", 4, True))
            else:
                completions.append(Completion("I am not sure", 8, False))
        return completions

    @property
    def keys(self):
        return [(r.benchmark, r.problem_id, r.index) for requests, _ in self.calls for r in requests]


def brute_force_pass_at_k(c: int, n: int, k: int) -> Fraction:
    """The fraction of k-subsets of n samples (c correct) that contain a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(j < c for j in subset) for subset in subsets), len(subsets))


def run(bench_file, tokenizer_dir, output_dir, sampler, **kwargs):
    options = dict(output_dir=output_dir, num_samples=N, k=(1, 2, 4), batch_size=3, sampler=sampler, progress=False)
    return evaluate(tokenizer_dir, [bench_file], **(options | kwargs))


def test_prompt_matches_training_tokenization(tokenizer_dir):
    from trb_trl.testing import build_qwen3_tokenizer

    for tokenizer in (build_word_tokenizer([f"w{i}" for i in range(61)]), build_qwen3_tokenizer()):
        for system_prompt in (DEFAULT_SYSTEM_PROMPT, None):
            problem = "What is $1+1$? w1 w2"
            messages = to_chat_prompt({"problem": problem}, system_prompt=system_prompt)["prompt"]
            expected = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True
            )
            rendered = render_prompt(tokenizer, problem, system_prompt)
            assert tokenize_prompts(tokenizer, [rendered])["input_ids"][0] == expected["input_ids"]
    plain = build_word_tokenizer(["w1"])
    plain.chat_template = None
    assert render_prompt(plain, "w1 w1", "Be brief.") == "Be brief.\n\nw1 w1\n"
    assert render_prompt(plain, "w1 w1", None) == "w1 w1\n"


def test_fake_sampler_scores_exactly(bench_file, tokenizer_dir, tmp_path, capsys):
    sampler = FakeSampler()
    results = run(bench_file, tokenizer_dir, tmp_path / "out", sampler)

    scores = results["benchmarks"]["five"]
    assert scores["pass@1"] == pytest.approx(sum(c / N for c in CORRECT) / 5)
    for k in (2, 4):
        expected = sum(brute_force_pass_at_k(c, N, k) for c in CORRECT) / 5
        assert scores[f"pass@{k}"] == pytest.approx(float(expected), abs=1e-12)
    assert (scores["num_problems"], scores["num_samples"], scores["num_correct"]) == (5, N, sum(CORRECT))
    wrong = 5 * N - sum(CORRECT)
    no_box = sum(1 for c in CORRECT for j in range(c, N) if j % 2 == 0)
    assert scores["no_answer"] == pytest.approx(no_box / (5 * N))
    assert scores["truncated"] == pytest.approx(no_box / (5 * N)) and wrong > no_box > 0
    assert results["mean"]["pass@2"] == scores["pass@2"]  # one benchmark: the suite mean is its score

    # Batches: the (problem, sample) pairs problem by problem, cut every 3; one seed per batch.
    assert sampler.keys == [("five", f"p{i}", j) for i in range(5) for j in range(N)]
    assert [len(requests) for requests, _ in sampler.calls] == [3] * 6 + [2]
    assert len({seed for _, seed in sampler.calls}) == 7
    prompts = {r.problem_id: r.prompt for requests, _ in sampler.calls for r in requests}
    assert prompts["p2"].endswith("<|im_start|> assistant ") and "w2 w3" in prompts["p2"]

    on_disk = json.loads((tmp_path / "out" / RESULTS_FILE).read_text())
    assert on_disk == json.loads(json.dumps(results)) and on_disk["complete"]
    settings = on_disk["settings"]
    assert settings["benchmarks"][0] | {"fingerprint": None} == {
        "name": "five",
        "source": bench_file,
        "num_problems": 5,
        "num_samples": N,
        "fingerprint": None,
    }
    assert (settings["temperature"], settings["top_p"], settings["seed"], settings["k"]) == (1.0, 1.0, 0, [1, 2, 4])
    assert settings["system_prompt"] == DEFAULT_SYSTEM_PROMPT and settings["chat_template"]
    assert {"python", "torch", "transformers", "math-verify"} <= set(on_disk["versions"])

    records = read_samples(tmp_path / "out" / SAMPLES_FILE)
    assert len(records) == 5 * N
    by_key = {(r["problem_id"], r["sample"]): r for r in records}
    assert by_key[("p1", 0)]["correct"] and by_key[("p1", 0)]["extracted"] == "\\frac{1}{2}"
    assert not by_key[("p1", 1)]["correct"] and by_key[("p1", 1)]["extracted"] == "999"
    assert by_key[("p1", 2)]["extracted"] is None and by_key[("p1", 2)]["finished"] is False
    assert by_key[("p4", 3)]["correct"] and by_key[("p4", 3)]["answer"] == "(0, 1]"
    assert sum(r["correct"] for r in records) == sum(CORRECT)

    table = capsys.readouterr().out
    assert "five" in table and f"{100 * scores['pass@1']:.1f}" in table and f"{100 * scores['pass@4']:.1f}" in table


def test_resume_generates_only_missing_samples(bench_file, tokenizer_dir, tmp_path):
    reference = FakeSampler()
    full = run(bench_file, tokenizer_dir, tmp_path / "full", reference)
    seeds = {tuple((r.problem_id, r.index) for r in requests): seed for requests, seed in reference.calls}

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run(bench_file, tokenizer_dir, out, FakeSampler(fail_after_batches=2))
    assert not json.loads((out / RESULTS_FILE).read_text())["complete"]
    assert len(read_samples(out / SAMPLES_FILE)) == 6
    with open(out / SAMPLES_FILE, "a") as f:  # the interruption also cut a line short
        f.write('{"benchmark": "five", "problem_id": "p2", "sam')

    resumed = FakeSampler()
    results = run(bench_file, tokenizer_dir, out, resumed)
    assert sorted(resumed.keys) == sorted(("five", f"p{i}", j) for i in range(5) for j in range(N))[6:]
    for requests, seed in resumed.calls:  # whole batches again, with the seeds of the uninterrupted run
        assert seeds[tuple((r.problem_id, r.index) for r in requests)] == seed
    assert results["benchmarks"]["five"] | {"seconds": 0} == full["benchmarks"]["five"] | {"seconds": 0}
    records = read_samples(out / SAMPLES_FILE)
    assert len(records) == 5 * N and len({(r["problem_id"], r["sample"]) for r in records}) == 5 * N

    # A finished run asked again: nothing generated; k may change, since pass@k comes from the samples.
    again = FakeSampler(fail_after_batches=0)
    results = run(bench_file, tokenizer_dir, out, again, k=(1, 3))
    assert again.calls == [] and results["benchmarks"]["five"]["pass@3"] == pytest.approx(
        float(sum(brute_force_pass_at_k(c, N, 3) for c in CORRECT) / 5)
    )


def test_resume_with_other_settings_is_an_error(bench_file, tokenizer_dir, tmp_path):
    run(bench_file, tokenizer_dir, tmp_path, FakeSampler())
    for change, named in (
        ({"temperature": 0.6}, "temperature"),
        ({"num_samples": 8}, "num_samples"),
        ({"seed": 1}, "seed"),
    ):
        with pytest.raises(ValueError, match=f"other settings.*{named}.*Resume it with the same settings"):
            run(bench_file, tokenizer_dir, tmp_path, FakeSampler(fail_after_batches=0), **change)
    (tmp_path / RESULTS_FILE).unlink()
    with pytest.raises(ValueError, match="without results.json"):
        run(bench_file, tokenizer_dir, tmp_path, FakeSampler(fail_after_batches=0))


def test_n_below_k_is_an_error(bench_file, tokenizer_dir, tmp_path):
    with pytest.raises(ValueError, match=r"n \(4\) < k \(8\) for five"):
        run(bench_file, tokenizer_dir, tmp_path, FakeSampler(), k=(1, 8))
    with pytest.raises(ValueError, match=r"n \(1\) < k \(2\)"):  # a local file's default n is 1
        run(bench_file, tokenizer_dir, tmp_path, FakeSampler(), num_samples=None, k=(1, 2))
    assert not (tmp_path / RESULTS_FILE).exists()


def test_sample_batches_and_default_output_dir(bench_file, tmp_path):
    benchmark = load_benchmark(bench_file, max_problems=2)
    assert sample_batches(benchmark, 3, 4) == [[("p0", 0), ("p0", 1), ("p0", 2), ("p1", 0)], [("p1", 1), ("p1", 2)]]
    assert default_output_dir(str(tmp_path)) == tmp_path / "eval"
    assert str(default_output_dir("Qwen/Qwen3-1.7B-Base")) == "eval/Qwen__Qwen3-1.7B-Base"


def test_tiny_model_end_to_end_repeatable_and_resumable(bench_file, tiny_pair_dir, tmp_path):
    options = dict(num_samples=2, k=(1, 2), max_new_tokens=6, batch_size=4, engine="hf", progress=False)
    first = evaluate(tiny_pair_dir["student"], bench_file, output_dir=tmp_path / "a", **options)
    records = read_samples(tmp_path / "a" / SAMPLES_FILE)
    assert len(records) == 10 and {(r["problem_id"], r["sample"]) for r in records} == {
        (f"p{i}", j) for i in range(5) for j in range(2)
    }
    assert all(r["num_tokens"] is not None and 1 <= r["num_tokens"] <= 6 for r in records)
    scores = first["benchmarks"]["five"]
    assert scores["pass@1"] == sum(r["correct"] for r in records) / 10
    assert 0 <= scores["pass@1"] <= scores["pass@2"] <= 1

    evaluate(tiny_pair_dir["student"], bench_file, output_dir=tmp_path / "b", **options)
    assert read_samples(tmp_path / "b" / SAMPLES_FILE) == records  # seeded: the same samples

    lines = (tmp_path / "b" / SAMPLES_FILE).read_text().splitlines(keepends=True)
    (tmp_path / "b" / SAMPLES_FILE).write_text("".join(lines[:8]))  # lose the last batch (samples 9 and 10)
    evaluate(tiny_pair_dir["student"], bench_file, output_dir=tmp_path / "b", **options)
    assert read_samples(tmp_path / "b" / SAMPLES_FILE) == records


def test_score_benchmarks_in_memory(bench_file, student, tokenizer):
    benchmark = load_benchmark(bench_file)
    student.train()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    kwargs = dict(
        num_samples=3, temperature=1.0, top_p=1.0, max_new_tokens=4, system_prompt=None, batch_size=8, seed=0
    )
    results = score_benchmarks(student, tokenizer, [benchmark], **kwargs)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream is untouched
    assert student.training  # handed back in train mode
    assert set(results) == {"benchmarks", "mean"}
    assert results["benchmarks"]["five"]["num_problems"] == 5 and results["benchmarks"]["five"]["num_samples"] == 3
    assert results["mean"] == results["benchmarks"]["five"]["pass@1"]

    fake = score_benchmarks(None, tokenizer, [benchmark], **(kwargs | {"num_samples": N}), sampler=FakeSampler())
    assert fake["mean"] == pytest.approx(sum(c / N for c in CORRECT) / 5)


def test_padding_is_sampled_in_the_same_batches_and_not_graded(bench_file, tokenizer):
    """A distributed evaluation pads a short (or empty) share with problems that are sampled, not graded."""
    from dataclasses import replace

    benchmark = load_benchmark(bench_file)
    kwargs = dict(
        num_samples=N, temperature=1.0, top_p=1.0, max_new_tokens=4, system_prompt=None, batch_size=3, seed=0
    )
    pad = benchmark.problems[4]  # all N samples correct: graded, it would raise the score
    share = replace(benchmark, problems=benchmark.problems[:2])
    sampler = FakeSampler()
    padded = score_benchmarks(None, tokenizer, [share], **kwargs, sampler=sampler, padding={"five": [pad]})
    scores = padded["benchmarks"]["five"]
    assert padded["mean"] == scores["pass@1"] == pytest.approx((0 + 1 / N) / 2)  # p0 and p1 only
    assert (scores["num_problems"], scores["num_correct"]) == (2, 1)
    # 3 problems x N samples in batches of 3: the padding's samples share the last real batch, as a full share's would.
    assert [len(requests) for requests, _ in sampler.calls] == [3, 3, 3, 3]
    assert sampler.keys[-N:] == [("five", "p4", j) for j in range(N)]

    sampler = FakeSampler()
    empty = replace(benchmark, problems=())
    nothing = score_benchmarks(None, tokenizer, [empty], **kwargs, sampler=sampler, padding={"five": [pad]})
    scores = nothing["benchmarks"]["five"]
    assert (scores["pass@1"], scores["num_problems"], scores["num_samples"]) == (None, 0, N)
    assert nothing["mean"] is None and sampler.keys == [("five", "p4", j) for j in range(N)]
    with pytest.raises(ValueError, match="reuses problem ids"):
        score_benchmarks(
            None, tokenizer, [share], **kwargs, sampler=FakeSampler(), padding={"five": share.problems[:1]}
        )


def test_hf_sampler_left_padding_and_neutral_sampling(student, tokenizer):
    prompts = [render_prompt(tokenizer, "w1", None), render_prompt(tokenizer, "w2 w3 w4 w5 w6 w7 w8 w9", None)]
    greedy = HFSampler(student, tokenizer, temperature=0.0, top_p=1.0, max_new_tokens=5)
    alone = greedy([SampleRequest("b", "0", 0, prompts[0])], seed=0)
    batched = greedy([SampleRequest("b", str(i), 0, p) for i, p in enumerate(prompts)], seed=0)
    assert batched[0] == alone[0]

    student.generation_config.top_k = 1  # a model default that must not leak into evaluation sampling
    try:
        sampler = HFSampler(student, tokenizer, temperature=1.0, top_p=1.0, max_new_tokens=5)
        texts = [c.text for c in sampler([SampleRequest("b", "0", j, prompts[0]) for j in range(8)], seed=0)]
    finally:
        student.generation_config.top_k = None
    assert len(set(texts)) > 1
    assert [c.text for c in sampler([SampleRequest("b", "0", j, prompts[0]) for j in range(8)], seed=0)] == texts

    eos = tokenizer.eos_token_id
    assert greedy._completion([5, 6, eos, eos]) == Completion(tokenizer.decode([5, 6]), 3, True)
    assert greedy._completion([5, 6, 7]) == Completion(tokenizer.decode([5, 6, 7]), 3, False)


def test_pass_at_k_reference_is_the_closed_form():
    for n, c, k in itertools.product(range(1, 6), range(6), range(1, 6)):
        if c <= n and k <= n:
            assert brute_force_pass_at_k(c, n, k) == 1 - Fraction(comb(n - c, k), comb(n, k))


def test_read_samples_drops_only_a_cut_last_line(tmp_path):
    path = tmp_path / SAMPLES_FILE
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": 3}')  # the last record lost its newline: incomplete
    assert read_samples(path) == [{"a": 1}, {"a": 2}] and path.read_text() == '{"a": 1}\n\n{"a": 2}\n'
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n')
    with pytest.raises(ValueError, match="line 2, is not valid JSON"):
        read_samples(path)


def test_sample_completions(student, tokenizer):
    from trb_trl.evaluation.sampling import sample_completions

    prompts = [render_prompt(tokenizer, "w1 w2", None), render_prompt(tokenizer, "w3", None)]
    kwargs = dict(num_samples=3, temperature=1.0, top_p=0.9, max_new_tokens=4, batch_size=4, seed=5, engine="hf")
    completions = sample_completions(student, tokenizer, prompts, **kwargs)
    assert [len(c) for c in completions] == [3, 3] and all(isinstance(t, str) for c in completions for t in c)
    assert sample_completions(student, tokenizer, prompts, **kwargs) == completions
    assert sample_completions(student, tokenizer, prompts, **(kwargs | {"seed": 6})) != completions
