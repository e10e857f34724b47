from types import SimpleNamespace

import numpy as np
import pytest
import torch
from reference import blend_row_reference
from scipy.stats import chisquare
from teacher_doubles import StopLovingTeacher
from transformers import LogitsProcessor, LogitsProcessorList

from trb_trl import TrustRegionBlendingProcessor
from trb_trl.testing import END_OF_TEXT, IM_END


def _generate(model, batch, processor=None, **kwargs):
    kwargs.setdefault("max_new_tokens", 12)
    processors = LogitsProcessorList([processor] if processor is not None else [])
    return model.generate(**batch, logits_processor=processors, **kwargs)


def _count_forwards(model):
    calls = []
    handle = model.register_forward_hook(lambda module, args, kwargs_, output: calls.append(output), with_kwargs=True)
    return calls, handle


def test_zero_epsilon_is_the_identity_and_never_calls_the_teacher(student, teacher, tokenizer, left_padded_batch):
    calls, handle = _count_forwards(teacher)
    try:
        processor = TrustRegionBlendingProcessor(
            teacher, 0.0, prompt_attention_mask=left_padded_batch["attention_mask"]
        )
        scores = torch.randn(4, len(tokenizer))
        assert processor(left_padded_batch["input_ids"], scores) is scores
        plain = _generate(student, left_padded_batch, do_sample=False)
        blended = _generate(student, left_padded_batch, processor, do_sample=False)
    finally:
        handle.remove()
    assert torch.equal(plain, blended)
    assert calls == [] and processor.teacher_forwards == 0


def test_huge_epsilon_reproduces_the_teacher_greedy_output(student, teacher, left_padded_batch, tokenizer):
    processor = TrustRegionBlendingProcessor(
        teacher,
        1e9,
        prompt_attention_mask=left_padded_batch["attention_mask"],
        student_eos_token_id=tokenizer.eos_token_id,
    )
    blended = _generate(student, left_padded_batch, processor, do_sample=False)
    teacher_greedy = _generate(teacher, left_padded_batch, do_sample=False)
    student_greedy = _generate(student, left_padded_batch, do_sample=False)
    assert torch.equal(blended, teacher_greedy)
    assert not torch.equal(blended, student_greedy)  # the test would be vacuous if the models agreed
    assert processor.summary()["teacher_fraction"] == 1.0


def test_teacher_logits_match_a_full_forward_at_every_step(student, teacher, left_padded_batch, tokenizer):
    calls, handle = _count_forwards(teacher)
    try:
        processor = TrustRegionBlendingProcessor(
            teacher, 0.05, prompt_attention_mask=left_padded_batch["attention_mask"], temperature=0.9
        )
        sequences = _generate(student, left_padded_batch, processor, do_sample=True, temperature=0.9)
    finally:
        handle.remove()
    prompt_length = left_padded_batch["input_ids"].shape[1]
    new_tokens = sequences.shape[1] - prompt_length
    assert len(calls) == new_tokens == 12
    mask = torch.cat([left_padded_batch["attention_mask"], torch.ones(4, new_tokens, dtype=torch.long)], dim=1)
    with torch.no_grad():
        full = teacher(input_ids=sequences, attention_mask=mask).logits
    for step, output in enumerate(calls):
        torch.testing.assert_close(output.logits[:, -1], full[:, prompt_length - 1 + step], atol=1e-5, rtol=1e-5)


class _FixedScores(LogitsProcessor):
    """Replays fixed student scores (keeping earlier bans) so the test knows exactly what the blend sees."""

    def __init__(self, scores):
        self.scores = scores

    def __call__(self, input_ids, scores):
        return torch.where(scores == float("-inf"), scores, self.scores.expand_as(scores))


def _sample_first_tokens(
    student, teacher, prompt, student_logits, epsilon, temperature, num_samples, **generate_kwargs
):
    """`num_samples` first tokens of `prompt` through the blending processor, with the student's scores fixed to
    `student_logits` and the teacher sharpened 20x (as `student_logits` were), so the blend is far from both."""
    batch = {key: value.expand(num_samples, -1) for key, value in prompt.items()}
    teacher.lm_head.weight.data *= 20
    try:
        processor = TrustRegionBlendingProcessor(
            teacher, epsilon, prompt_attention_mask=batch["attention_mask"], temperature=temperature
        )
        return student.generate(
            **batch,
            do_sample=True,
            temperature=temperature,
            max_new_tokens=1,
            logits_processor=LogitsProcessorList([_FixedScores(student_logits), processor]),
            **generate_kwargs,
        )
    finally:
        teacher.lm_head.weight.data /= 20


def test_sampled_tokens_follow_the_reference_blend(student, teacher, tokenizer):
    """First tokens sampled with temperature 0.7 and suppressed tokens follow mu* from the float64 reference."""
    temperature, epsilon, num_samples = 0.7, 0.05, 40_000
    suppressed = [3, 4, 5, 10]
    prompt = tokenizer(["w1 w2 w3"], return_tensors="pt")
    with torch.no_grad():
        student_logits = student(**prompt).logits[0, -1]
        teacher_logits = teacher(**prompt).logits[0, -1]
    # Sharpen the tiny random models so the blend is far from both the student and uniform.
    student_logits, teacher_logits = student_logits * 20, teacher_logits * 20
    sequences = _sample_first_tokens(
        student,
        teacher,
        prompt,
        student_logits,
        epsilon,
        temperature,
        num_samples,
        top_k=0,
        suppress_tokens=suppressed,
    )
    student_row = student_logits.double().numpy().copy()
    student_row[suppressed] = -np.inf
    ref_logprobs, ref_beta, _, _ = blend_row_reference(
        student_row, teacher_logits.double().numpy(), epsilon, temperature
    )
    assert 0.0 < ref_beta < 1.0
    counts = np.bincount(sequences[:, -1].numpy(), minlength=len(tokenizer))
    assert counts[suppressed].sum() == 0
    expected = np.exp(ref_logprobs) * num_samples
    keep = expected > 5  # pool the rare tokens for a valid chi-square test
    observed = np.append(counts[keep], counts[~keep].sum())
    expected = np.append(expected[keep], expected[~keep].sum())
    assert chisquare(observed, expected).pvalue > 1e-3
    # And the pure student distribution is clearly rejected, so the test has power.
    student_probs = torch.softmax(torch.tensor(student_row) / temperature, -1).numpy() * num_samples
    pooled = np.append(student_probs[keep], student_probs[~keep].sum())
    assert chisquare(observed, pooled * observed.sum() / pooled.sum()).pvalue < 1e-6


@pytest.mark.parametrize("map_stop", [True, False])
def test_teacher_stop_mass_is_mapped_onto_the_student_stop_id(student, tokenizer, left_padded_batch, map_stop):
    endoftext, im_end = tokenizer.convert_tokens_to_ids([END_OF_TEXT, IM_END])
    teacher = StopLovingTeacher(len(tokenizer), im_end)
    processor = TrustRegionBlendingProcessor(
        teacher,
        1e9,
        prompt_attention_mask=left_padded_batch["attention_mask"],
        student_eos_token_id=endoftext,
        teacher_eos_token_id=im_end if map_stop else [],
    )
    sequences = _generate(student, left_padded_batch, processor, do_sample=False, eos_token_id=endoftext)
    completion = sequences[:, left_padded_batch["input_ids"].shape[1] :]
    if map_stop:
        assert completion.shape[1] == 1 and torch.all(completion[:, 0] == endoftext)
    else:  # without the mapping the student never sees a stop and runs to the length limit
        assert completion.shape[1] == 12 and torch.all(completion == im_end)


class _ForceStop(LogitsProcessor):
    """Forces `row` to emit `stop_id` at generation step `step`."""

    def __init__(self, prompt_length, row, step, stop_id):
        self.prompt_length, self.row, self.step, self.stop_id = prompt_length, row, step, stop_id

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_length == self.step:
            scores[self.row] = float("-inf")
            scores[self.row, self.stop_id] = 0.0
        return scores


def test_statistics_cover_only_unfinished_rows(student, teacher, tokenizer, left_padded_batch):
    eos = tokenizer.eos_token_id
    student.generation_config.eos_token_id = eos
    prompt_length = left_padded_batch["input_ids"].shape[1]
    processor = TrustRegionBlendingProcessor(
        teacher,
        torch.tensor([0.0, 0.01, 0.1, 1e9]),
        prompt_attention_mask=left_padded_batch["attention_mask"],
        student_eos_token_id=eos,
        teacher_eos_token_id=eos,
    )
    force = _ForceStop(prompt_length, row=1, step=2, stop_id=eos)
    sequences = student.generate(
        **left_padded_batch,
        do_sample=True,
        max_new_tokens=10,
        suppress_tokens=[eos],  # only the forced stop may end a row...
        logits_processor=LogitsProcessorList([force, processor]),
    )
    completion = sequences[:, prompt_length:]
    assert completion.shape[1] == 10 and completion[1, 2] == eos
    stats = processor.statistics()
    # Row 1 contributes its 3 tokens (the last one the stop), the other rows 10 each.
    assert stats["beta"].numel() == 3 + 3 * 10
    summary = processor.summary()
    assert summary["kl_to_student/max"] <= 1e9
    assert summary["beta/min"] == 0.0 and summary["beta/max"] == 1.0
    assert 0.0 < summary["teacher_fraction"] < 1.0
    assert summary["teacher_seconds"] > 0.0 and processor.teacher_forwards == 10


def test_padded_lm_head_rows_are_cut_to_the_tokenizer(tiny_pair_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_pair_dir["tokenizer"])
    student = AutoModelForCausalLM.from_pretrained(tiny_pair_dir["student"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_pair_dir["teacher"])
    batch = tokenizer(["w1 w2", "w3"], return_tensors="pt", padding=True)
    processor = TrustRegionBlendingProcessor(
        teacher,
        0.5,
        prompt_attention_mask=batch["attention_mask"],
        vocab_size=len(tokenizer),
        student_eos_token_id=tokenizer.eos_token_id,
    )
    sequences = _generate(student, batch, processor, do_sample=True, max_new_tokens=20)
    assert sequences.max() < len(tokenizer)
    assert processor.summary()["num_tokens"] > 0


def test_vocabulary_mismatch_is_a_clear_error(student, teacher, tokenizer, left_padded_batch):
    with pytest.raises(ValueError, match="do not share a vocabulary"):
        TrustRegionBlendingProcessor(teacher, 0.1, vocab_size=len(tokenizer) + 1)
    processor = TrustRegionBlendingProcessor(teacher, 0.1, prompt_attention_mask=left_padded_batch["attention_mask"])
    with pytest.raises(ValueError, match="pass `vocab_size=len\\(tokenizer\\)`"):
        processor(left_padded_batch["input_ids"], torch.randn(4, len(tokenizer) + 8))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epsilon": -1.0}, "epsilon must be >= 0"),
        ({"epsilon": 0.1, "temperature": 0.0}, "temperature must be > 0"),
        ({"epsilon": torch.zeros(2, 2)}, "batch_size"),
    ],
)
def test_invalid_arguments(teacher, kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrustRegionBlendingProcessor(teacher, **kwargs)


def test_teacher_stop_ids_need_a_student_stop_id(teacher):
    with pytest.raises(ValueError, match="student_eos_token_id"):
        TrustRegionBlendingProcessor(teacher, 0.1, student_eos_token_id=[], teacher_eos_token_id=7)


def test_beam_search_is_rejected_because_it_reorders_sequences(student, teacher, left_padded_batch):
    mask = left_padded_batch["attention_mask"]
    # The same processor set-up works with one beam; with four, the first beam reordering is refused.
    _generate(student, left_padded_batch, TrustRegionBlendingProcessor(teacher, 0.1, prompt_attention_mask=mask))
    processor = TrustRegionBlendingProcessor(teacher, 0.1, prompt_attention_mask=mask)
    with pytest.raises(ValueError, match="beam search"):
        _generate(student, left_padded_batch, processor, num_beams=4, do_sample=False)


def test_expanded_attention_masks_are_rejected(student, teacher, left_padded_batch):
    mask = left_padded_batch["attention_mask"]
    expanded = mask[:, None, None, :].expand(-1, 1, mask.shape[1], -1)  # a 4-D attention mask
    processor = TrustRegionBlendingProcessor(teacher, 0.1, prompt_attention_mask=expanded)
    with pytest.raises(ValueError, match="2-D"):
        processor(left_padded_batch["input_ids"], torch.randn(4, 64))


def test_num_return_sequences_rows_follow_their_prompts_mask(student, teacher, tokenizer, left_padded_batch):
    """Rows expanded by num_return_sequences get their own prompt's padding: greedy rows equal the unexpanded ones."""
    kwargs = dict(
        prompt_attention_mask=left_padded_batch["attention_mask"], student_eos_token_id=tokenizer.eos_token_id
    )
    greedy = dict(do_sample=True, top_k=1)  # num_return_sequences needs sampling; top_k=1 takes argmax mu
    single = _generate(student, left_padded_batch, TrustRegionBlendingProcessor(teacher, 0.05, **kwargs), **greedy)
    expanded = _generate(
        student,
        left_padded_batch,
        TrustRegionBlendingProcessor(teacher, 0.05, **kwargs),
        num_return_sequences=2,
        **greedy,
    )
    assert torch.equal(expanded[::2], single) and torch.equal(expanded[1::2], single)


def test_release_frees_the_teacher_cache_and_keeps_the_statistics(student, teacher, left_padded_batch):
    processor = TrustRegionBlendingProcessor(teacher, 0.1, prompt_attention_mask=left_padded_batch["attention_mask"])
    _generate(student, left_padded_batch, processor, max_new_tokens=4)
    assert processor.teacher._cache is not None
    before = processor.statistics()
    processor.release()
    assert processor.teacher._cache is None and processor.teacher._previous_input_ids is None
    assert torch.equal(processor.statistics()["beta"], before["beta"]) and before["beta"].numel() > 0


class _BrokenTeacher(StopLovingTeacher):
    """Returns NaN logits for row 0 and finite ones elsewhere."""

    def forward(self, input_ids, past_key_values=None, **kwargs):
        logits = self.logits.expand(input_ids.shape[0], 1, -1).clone()
        logits[0] = float("nan")
        return SimpleNamespace(logits=logits, past_key_values=past_key_values or "cache")


def test_invalid_teacher_rows_are_counted_and_sampled_from_the_student(student, tokenizer, left_padded_batch):
    teacher = _BrokenTeacher(len(tokenizer), tokenizer.eos_token_id)
    processor = TrustRegionBlendingProcessor(teacher, 1e9, prompt_attention_mask=left_padded_batch["attention_mask"])
    scores = torch.randn(4, len(tokenizer))
    blended = processor(left_padded_batch["input_ids"], scores)
    assert not torch.isnan(blended).any()
    torch.testing.assert_close(blended[0].log_softmax(-1), scores[0].log_softmax(-1))  # row 0: the student
    summary = processor.summary()
    assert summary["teacher_invalid_fraction"] == pytest.approx(0.25)
    assert summary["teacher_fraction"] == pytest.approx(0.75)  # the invalid row is not "sampled from the teacher"


def test_empty_statistics_are_on_the_requested_device(teacher):
    processor = TrustRegionBlendingProcessor(teacher, 0.1)
    stats = processor.statistics(device="meta")
    assert all(value.device.type == "meta" and value.numel() == 0 for value in stats.values())


def test_teacher_step_driven_by_the_student_forward_gives_identical_rollouts(
    student, teacher, tokenizer, left_padded_batch
):
    """The ZeRO-3 path (teacher stepped from the student's forward) samples exactly what the processor path samples."""
    outputs, forwards = [], []
    for attach in (False, True):
        calls, handle = _count_forwards(teacher)
        processor = TrustRegionBlendingProcessor(
            teacher,
            torch.tensor([0.01, 0.05, 0.2, 1e9]),
            prompt_attention_mask=left_padded_batch["attention_mask"],
            temperature=0.8,
            student_eos_token_id=tokenizer.eos_token_id,
        )
        if attach:
            processor.attach_to_student(student)
        torch.manual_seed(123)
        try:
            outputs.append(_generate(student, left_padded_batch, processor, do_sample=True, temperature=0.8))
        finally:
            processor.detach()
            handle.remove()
        forwards.append(len(calls))
        assert processor.summary()["num_tokens"] > 0
    assert torch.equal(outputs[0], outputs[1])
    assert forwards[0] == forwards[1] == 12
    assert not student._forward_pre_hooks  # detached


def test_top_k_truncates_the_blend_not_the_student(student, teacher, tokenizer):
    """top_k keeps the k most likely tokens under mu*, which differ from the student's top k here."""
    temperature, epsilon, k = 0.7, 0.5, 3
    for text in [f"w{i} w{i + 1}" for i in range(40)]:  # find a prefix where the two top-k sets differ
        prompt = tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            student_logits = student(**prompt).logits[0, -1] * 20
            teacher_logits = teacher(**prompt).logits[0, -1] * 20
        ref_logprobs, _, _, _ = blend_row_reference(
            student_logits.double().numpy(), teacher_logits.double().numpy(), epsilon, temperature
        )
        blend_top = set(np.argsort(-ref_logprobs)[:k].tolist())
        if blend_top != set(torch.topk(student_logits, k).indices.tolist()):
            break
    else:
        pytest.fail("no prefix where the blend's top-k differs from the student's")
    sequences = _sample_first_tokens(student, teacher, prompt, student_logits, epsilon, temperature, 2000, top_k=k)
    sampled = set(sequences[:, -1].tolist())
    assert sampled <= blend_top and len(sampled) > 1
