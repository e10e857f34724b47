import copy
import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from reference import blend_row_reference
from scipy.stats import chi2_contingency, chisquare
from teacher_doubles import StopLovingTeacher
from transformers import LogitsProcessorList

from trb_trl import TrustRegionBlendingProcessor
from trb_trl.rollout import SPECULATIVE_METRICS, TRUST_REGION_METRICS, RolloutStatistics, SpeculativeBlendingSampler
from trb_trl.rollout.cached_forward import forward_with_cache
from trb_trl.rollout.speculative import sample_categorical
from trb_trl.testing import END_OF_TEXT, IM_END, build_tiny_qwen3, build_word_tokenizer


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _processor_generate(student, teacher, batch, epsilon, **kwargs):
    """The reference path: `student.generate` with a `TrustRegionBlendingProcessor` blending at the generation
    temperature."""
    processor = TrustRegionBlendingProcessor(
        teacher,
        epsilon,
        prompt_attention_mask=batch["attention_mask"],
        temperature=kwargs.get("temperature") or 1.0,
        student_eos_token_id=kwargs.pop("student_eos_token_id", None),
        teacher_eos_token_id=kwargs.pop("teacher_eos_token_id", None),
    )
    sequences = student.generate(**batch, logits_processor=LogitsProcessorList([processor]), **kwargs)
    return sequences, processor


def _count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda module, args, output: calls.append(1))
    return calls, handle


# ---------------------------------------------------------------------------------------------------------------------
# Exactness: the joint law of the first three tokens, against the float64 reference and the processor path


def _truncate_reference(logp, top_k=0, top_p=1.0, min_p=None):
    """generate's top-k, top-p and min-p warpers on log-probs, in float64, straight from their definitions."""
    keep = np.isfinite(logp)
    if top_k:
        keep &= logp >= np.sort(logp)[-min(top_k, logp.size)]
    if top_p < 1.0:
        probs = np.where(keep, np.exp(logp - logp[keep].max()), 0.0)
        probs /= probs.sum()
        order = np.argsort(probs, kind="stable")  # ascending: drop the least likely while their mass <= 1 - top_p
        removed = np.cumsum(probs[order]) <= 1.0 - top_p
        removed[-1] = False
        keep[order[removed]] = False
    if min_p is not None:
        probs = np.where(keep, np.exp(logp - logp[keep].max()), 0.0)
        keep &= probs >= min_p * probs.max()
    probs = np.where(keep, np.exp(logp - logp[keep].max()), 0.0)
    return probs / probs.sum()


def _reference_joint(pair, prompt, setting):
    """P(x1, x2, x3) of the processor path, in float64: mu* from `blend_row_reference` at every prefix (bans, both
    models' stop mass merged), truncated, a row that stops padded with the stop id (= pad)."""
    vocab, stop, teacher_stop = pair.vocab, pair.stop, pair.teacher_stop
    prefixes = torch.tensor(list(itertools.product(range(vocab), repeat=2)))
    sequences = torch.cat([prompt.expand(len(prefixes), -1), prefixes], dim=1)
    with torch.no_grad():
        student = pair.student(sequences).logits[:, -3:].double().numpy()
        teacher = pair.teacher(sequences).logits[:, -3:].double().numpy()

    tau = setting["temperature"]

    def merge_stop(z):  # each model's stop mass onto the student's stop id, in the tempered distribution
        z[stop], z[teacher_stop] = tau * np.logaddexp(z[stop] / tau, z[teacher_stop] / tau), -np.inf

    def law(row, step):
        s, t = student[row, step].copy(), teacher[row, step].copy()
        s[setting.get("suppress_tokens", [])] = -np.inf
        merge_stop(s)
        merge_stop(t)
        if step < setting.get("min_new_tokens", 0):
            s[stop] = -np.inf  # a banned stop stays banned
        epsilon = setting["epsilon"] if np.isscalar(setting["epsilon"]) else setting["epsilon"][setting["group"]]
        logp, _, _, _ = blend_row_reference(s, t, epsilon, setting["temperature"])
        return _truncate_reference(logp, setting.get("top_k", 0), setting.get("top_p", 1.0), setting.get("min_p"))

    joint = np.zeros((vocab,) * 3)
    first = law(0, 0)
    for x1 in range(vocab):
        if x1 == stop:
            joint[x1, stop, stop] += first[x1]
            continue
        second = law(x1 * vocab, 1)
        for x2 in range(vocab):
            if x2 == stop:
                joint[x1, x2, stop] += first[x1] * second[x2]
            else:
                joint[x1, x2] += first[x1] * second[x2] * law(x1 * vocab + x2, 2)
    return joint


def _counts(sequences, prompt_length, vocab, stop):
    completions = sequences[:, prompt_length:]
    completions = torch.nn.functional.pad(completions, (0, 3 - completions.shape[1]), value=stop)
    flat = (completions[:, 0] * vocab + completions[:, 1]) * vocab + completions[:, 2]
    return np.bincount(flat.numpy(), minlength=vocab**3)


def _pooled(*counts, keep):
    """The kept cells, plus one cell pooling the rest where it is not empty."""
    rest = [c[~keep].sum() for c in counts]
    return [np.append(c[keep], r) if max(rest) > 0 else c[keep] for c, r in zip(counts, rest, strict=True)]


def _goodness_of_fit(observed, probabilities):
    expected = probabilities.flatten() * observed.sum()
    return chisquare(*_pooled(observed, expected, keep=expected > 5)).pvalue


def _same_law(first, second):
    return chi2_contingency(np.stack(_pooled(first, second, keep=first + second >= 10))).pvalue


def test_sample_categorical_draws_the_normalised_weights_and_never_a_zero_weight():
    weights = torch.tensor([[0.0, 2.0, 0.0, 1.0, 1.0e-3, 0.0, 5.0]]).expand(200_000, -1)
    torch.manual_seed(0)
    draws = sample_categorical(weights)
    counts = np.bincount(draws.numpy(), minlength=weights.shape[1])
    assert counts[[0, 2, 5]].sum() == 0
    probabilities = weights[0].double().numpy() / weights[0].double().sum().item()
    assert _goodness_of_fit(counts, probabilities) > 1e-3


def test_sample_categorical_resolves_tiny_weights_behind_a_large_cumulative_mass(monkeypatch):
    """At V = 151,936 a token of mass 1e-9 after half the mass is invisible to a float32 cumulative sum (its ulp at
    0.5 is 6e-8); the float64 one gives it its own interval, and zero-weight tokens at its edges never take it."""
    vocab = 151_936
    weights = torch.zeros(1, vocab)
    weights[0, :150_000] = 0.5 / 150_000
    weights[0, 150_001] = 1e-9
    weights[0, vocab - 1] = 0.5
    cumulative = weights.cumsum(-1, dtype=torch.float64)[0]
    inside = (cumulative[150_000] + cumulative[150_001]) / 2 / cumulative[-1]
    trailing_zeros = weights.clone()
    trailing_zeros[0, vocab - 1], trailing_zeros[0, 150_002] = 0.0, 0.5
    cases = [(weights, 0.0, 0), (weights, float(inside), 150_001), (weights, 1.0 - 1e-16, vocab - 1)]
    # A draw that rounds up to the total lands on the last token of positive weight, not on the zeros after it.
    cases += [(trailing_zeros, 1.0, 150_002)]
    for row, fraction, token in cases:
        monkeypatch.setattr(
            torch, "rand", lambda *shape, fraction=fraction, **kwargs: torch.full(shape, fraction, **kwargs)
        )
        assert int(sample_categorical(row)) == token


@pytest.fixture(scope="module")
def small_pair():
    """A 12-token pair with peaked distributions (entropy ~1.4 nats, KL(teacher || student) ~ 4), so the joint law of
    three tokens is a tractable table far from both models; the teacher stops on its own stop id."""
    tokenizer = build_word_tokenizer([f"w{i}" for i in range(9)])
    stop, teacher_stop = tokenizer.convert_tokens_to_ids([END_OF_TEXT, IM_END])
    kwargs = dict(num_heads=2, num_kv_heads=1)
    student = build_tiny_qwen3(len(tokenizer), hidden_size=16, num_layers=1, eos_token_id=stop, seed=3, **kwargs)
    teacher = build_tiny_qwen3(
        len(tokenizer), hidden_size=24, num_layers=2, eos_token_id=teacher_stop, seed=4, **kwargs
    )
    for model in (student, teacher):
        model.lm_head.weight.data *= 30
    prompts = [tokenizer(text, return_tensors="pt")["input_ids"] for text in ("w1 w2 w3", "w4")]
    return SimpleNamespace(
        tokenizer=tokenizer,
        student=student,
        teacher=teacher,
        vocab=len(tokenizer),
        stop=stop,
        teacher_stop=teacher_stop,
        prompts=prompts,
    )


SETTINGS = {
    "eps0.1-adaptive-gamma": dict(epsilon=0.1, temperature=1.0, draft_length=2, adaptive_draft_length=True),
    "eps0.4-t0.7-topk-bans-gamma1": dict(
        epsilon=0.4, temperature=0.7, draft_length=1, top_k=6, suppress_tokens=[5, 9], min_new_tokens=2
    ),
    "per-row-eps-t1.3-topp-minp-gamma4": dict(
        epsilon=(0.05, 1.0), temperature=1.3, draft_length=4, top_p=0.8, min_p=0.1, suppress_tokens=[7]
    ),
}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_joint_law_of_three_tokens_matches_the_processor_path_and_the_reference(small_pair, name):
    """Rows of two prompts (one left padded) sample 3 tokens; per prompt, the joint law from the engine matches the
    float64 reference and the processor path, and clearly differs from the student's own law."""
    setting = SETTINGS[name]
    num_rows = 12_000
    pair = small_pair
    batch = pair.tokenizer(["w1 w2 w3", "w4"] * (num_rows // 2), return_tensors="pt", padding=True)
    epsilon = setting["epsilon"]
    if not np.isscalar(epsilon):
        epsilon = torch.tensor(epsilon * (num_rows // 2))
    generate = dict(
        do_sample=True,
        max_new_tokens=3,
        temperature=setting["temperature"],
        top_k=setting.get("top_k", 0),
        top_p=setting.get("top_p", 1.0),
        min_p=setting.get("min_p"),
        suppress_tokens=setting.get("suppress_tokens"),
        min_new_tokens=setting.get("min_new_tokens"),
        eos_token_id=pair.stop,
        pad_token_id=pair.stop,
    )
    stops = dict(student_eos_token_id=pair.stop, teacher_eos_token_id=pair.teacher_stop)
    sampler = SpeculativeBlendingSampler(
        pair.teacher,
        epsilon,
        draft_length=setting["draft_length"],
        adaptive_draft_length=setting.get("adaptive_draft_length", False),
        temperature=setting["temperature"],
        **stops,
    )
    torch.manual_seed(1)
    speculative = sampler.generate(pair.student, **batch, **generate)
    torch.manual_seed(2)
    processor, _ = _processor_generate(pair.student, pair.teacher, batch, epsilon, **generate, **stops)
    # The residual path is exercised: a good share of drafts is rejected.
    assert 0.5 < sampler.summary()["acceptance_rate"] < 0.95

    prompt_length = batch["input_ids"].shape[1]
    for group, prompt in enumerate(pair.prompts):
        reference = _reference_joint(pair, prompt, {**setting, "group": group})
        engine_counts = _counts(speculative[group::2], prompt_length, pair.vocab, pair.stop)
        processor_counts = _counts(processor[group::2], prompt_length, pair.vocab, pair.stop)
        assert engine_counts[reference.flatten() == 0].sum() == 0  # banned, truncated or after a stop: never drawn
        # 18 such tests in the file: 1e-4 keeps a false alarm below 0.2% on a platform whose samples differ.
        assert _goodness_of_fit(engine_counts, reference) > 1e-4
        assert _goodness_of_fit(processor_counts, reference) > 1e-4
        assert _same_law(engine_counts, processor_counts) > 1e-4
        # Power: the student's own law (epsilon = 0, same bans and truncation) is rejected.
        student_law = _reference_joint(pair, prompt, {**setting, "epsilon": 0.0, "group": group})
        assert _goodness_of_fit(engine_counts, student_law + 1e-12) < 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# Greedy decoding, stops, finished rows, max_new_tokens


class _StopsFrom(torch.nn.Module):
    """The real tiny teacher, sharpened (its logits x 20, so the blend is far from the near-uniform student), and from
    position `position` on it wants to stop (on its own stop id): rows whose prompts differ in length stop at
    different steps."""

    def __init__(self, teacher, stop_id, position):
        super().__init__()
        self.teacher, self.stop_id, self.position = teacher, stop_id, position
        self.config, self.generation_config = teacher.config, teacher.generation_config

    def get_output_embeddings(self):
        return self.teacher.get_output_embeddings()

    def forward(self, input_ids, position_ids=None, logits_to_keep=0, past_key_values=None, use_cache=True, **kwargs):
        outputs, cache = forward_with_cache(
            self.teacher,
            past_key_values,
            input_ids=input_ids,
            position_ids=position_ids,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        logits = 20.0 * outputs.logits
        late = position_ids[:, -logits.shape[1] :] >= self.position
        logits[..., self.stop_id] += 40.0 * late
        return SimpleNamespace(logits=logits, past_key_values=cache)


@pytest.mark.parametrize("draft_length", [1, 3, 16])
@pytest.mark.parametrize("bans", [False, True])
def test_greedy_is_token_identical_to_the_processor_path(
    student, teacher, tokenizer, left_padded_batch, eos_ids, draft_length, bans
):
    """Left padding, per-row epsilon, a teacher that stops (mapped onto the student's stop id) at a different step
    per row, and generate's bans: the same tokens, pads and per-token statistics as the processor path."""
    endoftext, teacher_stop = eos_ids
    # The student sharpened (logits x 10): the near-uniform random one, its `<|im_end|>` mass merged into its stop,
    # stops at once on most rows, leaving no multi-token rounds to compare.
    student = copy.deepcopy(student)
    student.lm_head.weight.data *= 10
    stopping_teacher = _StopsFrom(teacher, teacher_stop, position=9)
    epsilon = torch.tensor([0.0, 0.5, 3.0, 1e9])
    kwargs = dict(
        do_sample=False,
        temperature=0.8,
        max_new_tokens=12,
        eos_token_id=endoftext,
        pad_token_id=endoftext,
        student_eos_token_id=endoftext,
        teacher_eos_token_id=teacher_stop,
    )
    if bans:
        plain, _ = _processor_generate(student, stopping_teacher, left_padded_batch, epsilon, **kwargs)
        used = plain[:, left_padded_batch["input_ids"].shape[1] :].flatten().unique().tolist()
        used = [t for t in used if t not in (endoftext, teacher_stop)][:6]  # ban tokens greedy decoding actually picks
        kwargs.update(suppress_tokens=used[:2], bad_words_ids=[[t] for t in used[2:4]], begin_suppress_tokens=used[4:])
        kwargs["min_new_tokens"] = 3
    expected, processor = _processor_generate(student, stopping_teacher, left_padded_batch, epsilon, **kwargs)
    sampler = SpeculativeBlendingSampler(
        stopping_teacher,
        epsilon,
        draft_length=draft_length,
        temperature=0.8,
        student_eos_token_id=kwargs.pop("student_eos_token_id"),
        teacher_eos_token_id=kwargs.pop("teacher_eos_token_id"),
    )
    sequences = sampler.generate(student, **left_padded_batch, **kwargs)
    assert torch.equal(sequences, expected)
    completions = expected[:, left_padded_batch["input_ids"].shape[1] :]
    lengths = [(row == endoftext).int().argmax().item() + 1 if (row == endoftext).any() else 12 for row in completions]
    assert len(set(lengths)) > 2 and max(lengths) == completions.shape[1]  # rows finish at different steps
    ours, theirs = sampler.statistics(), processor.statistics()
    assert ours["beta"].numel() == theirs["beta"].numel() == sum(lengths)
    for name in ("beta", "kl_to_student", "kl_to_teacher"):
        torch.testing.assert_close(ours[name].sort().values, theirs[name].sort().values, atol=2e-4, rtol=1e-3)
    assert sampler.teacher_forwards < max(lengths)  # rounds emitted several tokens


@pytest.mark.parametrize("map_stop", [True, False])
def test_teacher_stop_mass_is_mapped_onto_the_student_stop_id(
    student, tokenizer, left_padded_batch, eos_ids, map_stop
):
    endoftext, im_end = eos_ids
    sampler = SpeculativeBlendingSampler(
        StopLovingTeacher(len(tokenizer), im_end),
        1e9,
        draft_length=4,
        student_eos_token_id=endoftext,
        teacher_eos_token_id=im_end if map_stop else [],
    )
    sequences = sampler.generate(
        student, **left_padded_batch, do_sample=True, max_new_tokens=12, eos_token_id=endoftext
    )
    completion = sequences[:, left_padded_batch["input_ids"].shape[1] :]
    if map_stop:
        assert completion.shape[1] == 1 and torch.all(completion[:, 0] == endoftext)
    else:  # without the mapping the student never sees a stop and runs to the length limit
        assert completion.shape[1] == 12 and torch.all(completion == im_end)


def test_finished_rows_are_padded_and_left_out_of_the_statistics(
    student, teacher, tokenizer, left_padded_batch, eos_ids
):
    endoftext, im_end = eos_ids
    pad = tokenizer.convert_tokens_to_ids("w60")  # a pad id distinct from every stop id, to see the padding
    sampler = SpeculativeBlendingSampler(
        _StopsFrom(teacher, im_end, position=8),
        1e9,
        draft_length=6,
        student_eos_token_id=endoftext,
        teacher_eos_token_id=im_end,
    )
    sequences = sampler.generate(
        student, **left_padded_batch, do_sample=True, max_new_tokens=12, eos_token_id=endoftext, pad_token_id=pad
    )
    completion = sequences[:, left_padded_batch["input_ids"].shape[1] :]
    stops = completion == endoftext
    assert stops.any(1).all()  # every row stopped
    first = stops.int().argmax(1)
    after = torch.arange(completion.shape[1]) > first[:, None]
    assert torch.all(completion[after] == pad) and not torch.any(completion[~after] == pad)
    assert len(set(first.tolist())) > 1
    stats = sampler.statistics()
    assert stats["beta"].numel() == int((first + 1).sum())  # each row up to and including its stop
    summary = sampler.summary()
    assert summary["teacher_fraction"] == 1.0 and 0.0 < summary["acceptance_rate"] <= 1.0


@pytest.mark.parametrize(("max_new_tokens", "draft_length"), [(1, 4), (5, 16), (7, 2)])
def test_max_new_tokens_is_exact_and_drafts_never_run_past_it(
    student, teacher, left_padded_batch, max_new_tokens, draft_length
):
    sampler = SpeculativeBlendingSampler(teacher, 0.05, draft_length=draft_length)
    sequences = sampler.generate(
        student, **left_padded_batch, do_sample=True, max_new_tokens=max_new_tokens, eos_token_id=None
    )
    assert sequences.shape[1] == left_padded_batch["input_ids"].shape[1] + max_new_tokens
    # A round drafts at most max_new_tokens - 1 tokens; the first round's student forwards are all a row needs.
    assert sampler.student_forwards <= sampler.teacher_forwards * min(draft_length + 1, max_new_tokens)
    assert sampler.statistics()["beta"].numel() == 4 * max_new_tokens


def test_max_length_counts_the_prompt_like_generate(student, teacher, left_padded_batch):
    prompt_length = left_padded_batch["input_ids"].shape[1]
    sampler = SpeculativeBlendingSampler(teacher, 0.05, draft_length=3)
    sequences = sampler.generate(student, **left_padded_batch, do_sample=False, max_length=prompt_length + 5)
    expected, _ = _processor_generate(
        student, teacher, left_padded_batch, 0.05, do_sample=False, max_length=prompt_length + 5
    )
    assert torch.equal(sequences, expected)


def test_zero_epsilon_is_the_student_and_never_calls_the_teacher(student, teacher, left_padded_batch):
    calls, handle = _count_forwards(teacher)
    try:
        sampler = SpeculativeBlendingSampler(teacher, 0.0, draft_length=4)
        sequences = sampler.generate(student, **left_padded_batch, do_sample=False, max_new_tokens=10)
    finally:
        handle.remove()
    assert torch.equal(sequences, student.generate(**left_padded_batch, do_sample=False, max_new_tokens=10))
    assert calls == [] and sampler.teacher_forwards == 0
    assert sampler.summary()["acceptance_rate"] == 1.0 and sampler.statistics()["beta"].numel() == 0


def test_num_return_sequences_rows_follow_their_prompts(student, teacher, left_padded_batch):
    sampler = SpeculativeBlendingSampler(teacher, 0.05, draft_length=3)
    single = sampler.generate(student, **left_padded_batch, do_sample=True, top_k=1, max_new_tokens=8)
    sampler = SpeculativeBlendingSampler(teacher, 0.05, draft_length=3)
    expanded = sampler.generate(
        student, **left_padded_batch, do_sample=True, top_k=1, max_new_tokens=8, num_return_sequences=2
    )
    assert torch.equal(expanded[::2], single) and torch.equal(expanded[1::2], single)


def test_adaptive_draft_length_drafts_longer_when_more_is_accepted(student, teacher, left_padded_batch):
    """The adaptive rule follows the measured acceptance: long drafts when the blend is close to the student, short
    ones when it is far (and a teacher forward is cheap); greedy output is still the processor path's, and sampling is
    deterministic given the seed."""
    kwargs = dict(do_sample=True, max_new_tokens=40, eos_token_id=None)
    lengths = {}
    for epsilon, cost_ratio in ((1e-4, 4.0), (1e9, 0.5)):
        sampler = SpeculativeBlendingSampler(
            _StopsFrom(teacher, 0, position=10_000),
            epsilon,
            draft_length=12,
            adaptive_draft_length=True,
            cost_ratio=cost_ratio,
        )
        sampler.generate(student, **left_padded_batch, **kwargs)
        lengths[epsilon] = sampler.summary()["mean_draft_length"]
    assert lengths[1e-4] > 8 and lengths[1e9] < 3
    outputs = []
    for _ in range(2):
        torch.manual_seed(5)
        sampler = SpeculativeBlendingSampler(teacher, 0.05, draft_length=12, adaptive_draft_length=True)
        outputs.append(sampler.generate(student, **left_padded_batch, **kwargs))
    assert torch.equal(outputs[0], outputs[1])
    greedy = dict(do_sample=False, max_new_tokens=16)
    expected, _ = _processor_generate(student, teacher, left_padded_batch, 0.3, **greedy)
    sampler = SpeculativeBlendingSampler(teacher, 0.3, draft_length=12, adaptive_draft_length=True)
    assert torch.equal(sampler.generate(student, **left_padded_batch, **greedy), expected)


def test_eager_attention_gives_the_same_tokens(tokenizer, teacher, left_padded_batch):
    """Masked-out rejected drafts in the KV cache work with eager attention as with sdpa."""
    student = build_tiny_qwen3(
        len(tokenizer), hidden_size=32, num_layers=2, eos_token_id=tokenizer.eos_token_id, seed=1
    )
    outputs = []
    for implementation in ("sdpa", "eager"):
        student.config._attn_implementation = implementation
        sampler = SpeculativeBlendingSampler(teacher, 0.3, draft_length=3, temperature=0.7)
        outputs.append(sampler.generate(student, **left_padded_batch, do_sample=False, max_new_tokens=10))
        assert sampler.summary()["acceptance_rate"] < 1.0  # rejections left masked columns behind
    assert torch.equal(outputs[0], outputs[1])


# ---------------------------------------------------------------------------------------------------------------------
# Statistics and the synced (ZeRO-3) mode


def test_statistics_fold_into_the_rollout_metrics(student, teacher, left_padded_batch):
    sampler = SpeculativeBlendingSampler(teacher, 0.3, draft_length=4, temperature=0.7)
    sampler.generate(
        student, **left_padded_batch, do_sample=True, temperature=0.7, max_new_tokens=16, eos_token_id=None
    )
    stats, summary = sampler.statistics(), sampler.summary()
    assert set(stats) == {"beta", "kl_to_student", "kl_to_teacher", "teacher_valid", "draft_accepted", "round_share"}
    assert stats["beta"].numel() == 4 * 16 == summary["num_tokens"]
    # Each running row's tokens of a round share that round's teacher forward.
    row_rounds = stats["round_share"].sum().item()
    assert 4 * 16 / (4 + 1) <= row_rounds <= 4 * sampler.teacher_forwards
    assert summary["tokens_per_teacher_forward"] == pytest.approx(4 * 16 / row_rounds)
    assert 0.0 < summary["acceptance_rate"] < 1.0
    assert summary["kl_to_student/max"] <= 0.3 * (1 + 1e-4)
    rollout = RolloutStatistics("cpu", TRUST_REGION_METRICS + SPECULATIVE_METRICS, prefix="trb")
    rollout.add(stats, teacher_seconds=sampler.teacher_seconds, step=0)
    metrics, _ = rollout.reduce(lambda tensor: tensor)
    assert metrics["trb/speculative/teacher_forwards_per_token"] == pytest.approx(row_rounds / (4 * 16))
    assert metrics["trb/speculative/accepted_draft_fraction"] == pytest.approx(stats["draft_accepted"].float().mean())
    assert metrics["trb/beta/mean"] == pytest.approx(summary["beta/mean"])


@pytest.mark.parametrize("synced", [False, True])
def test_synced_mode_runs_the_rounds_of_the_slowest_process(student, teacher, left_padded_batch, monkeypatch, synced):
    """Synced: one all_reduce per round, and a process that is done keeps running both models (with the draft length
    the others agreed on) until every process is; its output is unchanged. Not synced: no collective at all."""
    reductions, extra_rounds = [], 3

    def all_reduce(flag, op=None):
        if not synced:
            raise AssertionError("the gathered-teacher mode issued a collective")
        reductions.append(flag.tolist())
        if int(flag[0]) == 0 and len(reductions) <= 1000 and sum(r[0] == 0 for r in reductions) <= extra_rounds:
            flag[0], flag[1] = 1, 2  # another process still runs, drafting the configured 2 tokens
        return flag

    torch.manual_seed(3)
    alone = SpeculativeBlendingSampler(teacher, 0.05, draft_length=2)
    expected = alone.generate(student, **left_padded_batch, do_sample=True, max_new_tokens=6)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    torch.manual_seed(3)
    sampler = SpeculativeBlendingSampler(teacher, 0.05, draft_length=2, synced=synced)
    calls, handle = _count_forwards(teacher)
    try:
        sequences = sampler.generate(student, **left_padded_batch, do_sample=True, max_new_tokens=6)
    finally:
        handle.remove()
    assert torch.equal(sequences, expected)
    if synced:
        assert len(reductions) == alone.teacher_forwards + extra_rounds + 1
        assert sampler.teacher_forwards == len(calls) == alone.teacher_forwards + extra_rounds
        assert sampler.student_forwards == alone.student_forwards + extra_rounds * 3
    else:
        assert reductions == [] and sampler.teacher_forwards == alone.teacher_forwards


# ---------------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"repetition_penalty": 1.2}, "repetition_penalty"),
        ({"num_beams": 2}, "num_beams"),
        ({"typical_p": 0.9, "do_sample": True}, "typical_p"),
        ({"no_repeat_ngram_size": 2}, "no_repeat_ngram_size"),
        ({"bad_words_ids": [[5, 6]]}, "single-token bad_words_ids"),
        ({"logits_processor": LogitsProcessorList([lambda ids, scores: scores])}, "logits_processor"),
        ({"do_sample": True, "temperature": 0.5}, "same temperature"),
        ({"output_hidden_states": True}, "output_hidden_states"),
    ],
)
def test_unsupported_generation_settings_are_refused(student, teacher, left_padded_batch, kwargs, message):
    sampler = SpeculativeBlendingSampler(teacher, 0.1)
    with pytest.raises(ValueError, match=message):
        sampler.generate(student, **left_padded_batch, max_new_tokens=4, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epsilon": -1.0}, "epsilon must be >= 0"),
        ({"epsilon": torch.zeros(2, 2)}, "batch_size"),
        ({"epsilon": 0.1, "draft_length": 0}, "draft_length"),
        ({"epsilon": 0.1, "cost_ratio": 0.0}, "cost_ratio"),
        ({"epsilon": 0.1, "temperature": 0.0}, "temperature must be > 0"),
        ({"epsilon": 0.1, "vocab_size": 10_000}, "do not share a vocabulary"),
        ({"epsilon": 0.1, "student_eos_token_id": [], "teacher_eos_token_id": 7}, "student_eos_token_id"),
    ],
)
def test_invalid_arguments(teacher, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeBlendingSampler(teacher, **kwargs)


def test_bad_inputs_are_clear_errors(student, teacher, left_padded_batch):
    ids, mask = left_padded_batch["input_ids"], left_padded_batch["attention_mask"]
    with pytest.raises(ValueError, match="one per generated row"):
        SpeculativeBlendingSampler(teacher, torch.tensor([0.1, 0.2])).generate(student, ids, mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="left-padded"):
        SpeculativeBlendingSampler(teacher, 0.1).generate(student, ids, mask.flip(1), max_new_tokens=2)
    wide = build_tiny_qwen3(ids.max().item() + 9, hidden_size=16, num_layers=1, seed=0)
    with pytest.raises(ValueError, match="pass `vocab_size=len\\(tokenizer\\)`"):
        SpeculativeBlendingSampler(teacher, 0.1).generate(wide, ids, mask, max_new_tokens=2)


# ---------------------------------------------------------------------------------------------------------------------
# Config and trainer


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"trb_rollout_engine": "vllm"}, "trb_rollout_engine must be one of"),
        ({"trb_draft_length": 0}, "trb_draft_length"),
        ({"trb_rollout_engine": "speculative", "rollout_policy": "skd"}, "rollout_policy 'trb' or 'fixed_epsilon'"),
        ({"trb_rollout_engine": "speculative", "trb_epsilon": 0.0}, "trb_epsilon > 0"),
        ({"trb_rollout_engine": "speculative", "use_vllm": True}, "use_vllm=False"),
        ({"trb_rollout_engine": "speculative", "generation_kwargs": {"num_beams": 2}}, "beam search"),
        ({"trb_rollout_engine": "speculative", "repetition_penalty": 1.1}, "repetition_penalty"),
    ],
)
def test_config_refuses_what_the_engine_cannot_sample(kwargs, message):
    from trb_trl import TRBDistillConfig

    with pytest.raises(ValueError, match=message):
        TRBDistillConfig(output_dir="unused", use_cpu=True, report_to="none", **kwargs)


def _train(tiny_pair_dir, tmp_path, **overrides):
    from tiny_config import tiny_prompts, tiny_run_args, tiny_trainer

    trainer = tiny_trainer(tiny_pair_dir, tiny_run_args(tmp_path / "out", **overrides), tiny_prompts(16))
    trainer.train()
    return trainer, [entry for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_warmup_rollouts_run_on_the_speculative_engine(tiny_pair_dir, tmp_path, monkeypatch):
    """The engine replaces the processor during warmup only (the processor never runs), its statistics reach the
    logs with the speculative metrics, and `generate` is the student's own again afterwards."""
    monkeypatch.setattr(
        TrustRegionBlendingProcessor, "__call__", lambda *a: pytest.fail("the processor ran under 'speculative'")
    )
    trainer, logs = _train(
        tiny_pair_dir,
        tmp_path,
        max_steps=3,
        trb_rollout_engine="speculative",
        trb_draft_length=6,
        trb_adaptive_draft_length=True,
    )
    assert [entry["trb/epsilon"] for entry in logs] == pytest.approx([0.05, 0.025, 0.0])
    for entry in logs[:2]:
        assert entry["trb/kl_to_student/max"] <= entry["trb/epsilon"] * (1 + 1e-3) + 2e-5
        assert 0.0 < entry["trb/speculative/teacher_forwards_per_token"] <= 1.0
        assert 0.0 <= entry["trb/speculative/accepted_draft_fraction"] < 1.0
        assert entry["trb/rollout_teacher_seconds"] > 0
    assert "trb/beta/mean" not in logs[2] and "trb/speculative/teacher_forwards_per_token" not in logs[2]
    assert "generate" not in trainer.accelerator.unwrap_model(trainer.model).__dict__


def test_greedy_training_is_the_same_on_both_engines(tiny_pair_dir, tmp_path):
    """Greedy rollouts are token-identical on both engines (Base/instruct stop ids, padded lm_heads, chunked
    generation), so the whole training trajectory is the same."""
    runs = {}
    for engine in ("processor", "speculative"):
        _, logs = _train(
            tiny_pair_dir,
            tmp_path / engine,
            max_steps=2,
            trb_epsilon=0.5,
            trb_rollout_engine=engine,
            trb_draft_length=4,
            rollout_generation_batch_size=2,
            generation_kwargs={"do_sample": False},
        )
        runs[engine] = logs
    for processor, speculative in zip(runs["processor"], runs["speculative"], strict=True):
        for key in ("loss", "trb/beta/mean", "trb/kl_to_student/mean"):
            assert speculative[key] == pytest.approx(processor[key], rel=1e-4, abs=1e-6)


def test_peft_students_draft_through_the_adapter(tiny_pair_dir, tmp_path):
    from peft import LoraConfig
    from tiny_config import tiny_prompts, tiny_run_args
    from transformers import AutoTokenizer

    from trb_trl import TRBDistillTrainer

    trainer = TRBDistillTrainer(
        model=tiny_pair_dir["student"],
        teacher_model=tiny_pair_dir["teacher"],
        args=tiny_run_args(tmp_path / "out", max_steps=2, trb_rollout_engine="speculative", trb_draft_length=3),
        train_dataset=tiny_prompts(16),
        processing_class=AutoTokenizer.from_pretrained(tiny_pair_dir["tokenizer"]),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[0]["trb/speculative/teacher_forwards_per_token"] > 0
    assert "generate" not in trainer.accelerator.unwrap_model(trainer.model).__dict__


# ---------------------------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA): the accelerator paths of the blend and the timers, bf16 models


@pytest.mark.gpu
def test_greedy_matches_the_processor_path_on_cuda(student, teacher, tokenizer, left_padded_batch, eos_ids):
    import copy

    device = torch.device("cuda")
    student, teacher = copy.deepcopy(student).to(device), copy.deepcopy(teacher).to(device)
    batch = {key: value.to(device) for key, value in left_padded_batch.items()}
    epsilon = torch.tensor([0.0, 0.5, 3.0, 1e9], device=device)
    kwargs = dict(do_sample=False, temperature=0.8, max_new_tokens=12, eos_token_id=eos_ids[0])
    expected, _ = _processor_generate(student, teacher, batch, epsilon, **kwargs)
    sampler = SpeculativeBlendingSampler(teacher, epsilon, draft_length=4, temperature=0.8)
    assert torch.equal(sampler.generate(student, **batch, **kwargs), expected)
    assert sampler.teacher_seconds > 0  # CUDA event timing


@pytest.mark.gpu
def test_bf16_rollouts_on_cuda_are_finite_and_respect_the_budget(student, teacher, left_padded_batch):
    import copy

    device = torch.device("cuda")
    student = copy.deepcopy(student).to(device, torch.bfloat16)
    teacher = copy.deepcopy(teacher).to(device, torch.bfloat16)
    batch = {key: value.to(device) for key, value in left_padded_batch.items()}
    sampler = SpeculativeBlendingSampler(teacher, 0.05, draft_length=8)
    sequences = sampler.generate(student, **batch, do_sample=True, max_new_tokens=64, eos_token_id=None)
    assert sequences.shape[1] == batch["input_ids"].shape[1] + 64
    summary = sampler.summary()
    assert summary["kl_to_student/max"] <= 0.05 * (1 + 1e-3) + 1e-5
    assert 0.5 < summary["acceptance_rate"] <= 1.0 and summary["tokens_per_teacher_forward"] > 1.0
