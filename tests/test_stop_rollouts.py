"""Every stop id the loss merges also stops the rollout: a Base student that writes the teacher's `<|im_end|>` has
stopped, in warmup (processor, speculative engine, SKD), at epsilon 0 and after warmup, and writes its own stop id."""

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from teacher_doubles import with_fixed_stop_head
from tiny_config import tiny_prompts, tiny_run_args
from transformers import AutoModelForCausalLM, AutoTokenizer

from trb_trl import TRBDistillConfig, TRBDistillTrainer, TrustRegionBlendingProcessor
from trb_trl.rollout import SpeculativeBlendingSampler, TeacherInjectionProcessor
from trb_trl.stop_alignment import StopAlignment
from trb_trl.testing import END_OF_TEXT, IM_END, QWEN3_ENDOFTEXT_ID, QWEN3_IM_END_ID, QWEN3_LM_HEAD_ROWS


MAX_NEW = 32


def _merged_reference(logits: np.ndarray, temperature: float, canonical: int, merged: list[int]) -> np.ndarray:
    """float64, from the definition: the tempered distribution with the merged ids' probability added to the
    canonical id's and removed from theirs."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - logsumexp(z, axis=-1, keepdims=True))
    p[..., canonical] += p[..., merged].sum(-1)
    p[..., merged] = 0.0
    return p


@pytest.mark.parametrize(
    "temperature, scale, vocab, dtype",
    [
        (1.0, 1.0, 64, torch.float32),
        (0.1, 1.0, 64, torch.float32),  # low temperature
        (0.1, 30.0, 64, torch.float32),  # peaked and widely spread
        (0.6, 8.0, QWEN3_LM_HEAD_ROWS, torch.float32),  # Qwen3's lm_head width
        (0.7, 4.0, QWEN3_LM_HEAD_ROWS, torch.bfloat16),
    ],
)
def test_merge_in_the_tempered_distribution_matches_the_float64_reference(temperature, scale, vocab, dtype):
    canonical, merged = (QWEN3_ENDOFTEXT_ID, QWEN3_IM_END_ID) if vocab > 1000 else (3, 5)
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, vocab, generator=generator, dtype=torch.float64) * scale).to(dtype)
    logits[0, 7] = float("-inf")  # a banned token stays banned
    logits[1, merged] += 6 * scale  # the student wants the teacher's stop
    aligned = StopAlignment(canonical, (merged,)).apply_to_scores(logits, temperature=temperature)
    assert aligned.dtype == dtype
    probs = torch.softmax(aligned.double() / temperature, -1).numpy()
    expected = _merged_reference(logits.double().numpy(), temperature, canonical, [merged])
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    np.testing.assert_allclose(probs[:, canonical], expected[:, canonical], rtol=tolerance, atol=1e-12)
    assert np.all(probs[:, merged] == 0) and probs[0, 7] == 0
    keep = [i for i in range(vocab) if i not in (canonical, merged)]
    np.testing.assert_allclose(probs[:, keep], expected[:, keep], rtol=tolerance, atol=1e-12)


def test_a_banned_stop_stays_banned_and_unit_temperature_is_the_plain_merge():
    alignment = StopAlignment(3, (5,))
    scores = torch.randn(2, 9)
    scores[0, 3] = float("-inf")  # e.g. min_new_tokens bans the student's stop
    aligned = alignment.apply_to_scores(scores, temperature=0.5)
    assert aligned[0, 3] == float("-inf") and aligned[0, 5] == float("-inf")
    assert torch.isfinite(aligned[1, 3]) and aligned[1, 5] == float("-inf")
    assert torch.equal(alignment.apply(scores, temperature=1.0), alignment.apply(scores))


def _completions(sequences, batch):
    return sequences[:, batch["input_ids"].shape[1] :].tolist()


def _check_rows_stop_early_on_the_students_id(rows, endoftext, im_end):
    for row in rows:
        assert im_end not in row, row
        assert endoftext in row, row  # every row stopped (P(no stop in 32 tokens) ~ 1e-5 per row)
    lengths = [row.index(endoftext) + 1 for row in rows]
    assert sum(lengths) / len(lengths) < MAX_NEW / 4, lengths  # ~3 tokens at a 0.3 stop rate


@pytest.fixture
def stop_writing_student(student, tokenizer):
    """A Base-like student (stops on <|endoftext|>) that puts 0.3 on <|im_end|> at every step."""
    import copy

    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    return with_fixed_stop_head(copy.deepcopy(student), im_end)


@pytest.mark.parametrize("policy", ["trb", "speculative", "skd"])
def test_teacher_guided_rollouts_stop_when_the_student_writes_the_teachers_stop_id(
    stop_writing_student, teacher, tokenizer, left_padded_batch, eos_ids, policy
):
    endoftext, im_end = eos_ids
    kwargs = dict(student_eos_token_id=endoftext, teacher_eos_token_id=[im_end, endoftext], vocab_size=len(tokenizer))
    generate_kwargs = dict(do_sample=True, max_new_tokens=MAX_NEW, eos_token_id=endoftext, pad_token_id=endoftext)
    batch = {name: value.repeat(8, 1) for name, value in left_padded_batch.items()}
    if policy == "speculative":
        sampler = SpeculativeBlendingSampler(teacher, 0.02, draft_length=4, **kwargs)
        sequences = sampler.generate(stop_writing_student, **batch, **generate_kwargs)
        processor = sampler
    else:
        if policy == "trb":
            processor = TrustRegionBlendingProcessor(
                teacher, 0.02, prompt_attention_mask=batch["attention_mask"], **kwargs
            )
        else:
            processor = TeacherInjectionProcessor(teacher, 5, prompt_attention_mask=batch["attention_mask"], **kwargs)
        sequences = stop_writing_student.generate(**batch, **generate_kwargs, logits_processor=[processor])
    _check_rows_stop_early_on_the_students_id(_completions(sequences, batch), endoftext, im_end)
    if policy != "skd":  # the blend is not switched off by the student's mass on <|im_end|>
        assert processor.statistics()["beta"].mean() > 0.05


@pytest.mark.parametrize("engine", ["processor", "speculative"])
def test_trainer_rollouts_stop_on_every_merged_stop_id_in_warmup_at_zero_and_after(tiny_pair_dir, tmp_path, engine):
    """Step 0: TRB at epsilon 0.02; step 1: after warmup (the parent's rollout); a second run at epsilon 0 (the
    speculative engine refuses epsilon 0: that run is the processor one's)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair_dir["tokenizer"])
    endoftext, im_end = tokenizer.convert_tokens_to_ids([END_OF_TEXT, IM_END])
    for epsilon in (0.02, 0.0) if engine == "processor" else (0.02,):
        args = tiny_run_args(
            tmp_path / f"out{epsilon}",
            TRBDistillConfig,
            trb_epsilon=epsilon,
            trb_warmup_steps=1,
            trb_rollout_engine=engine,
            max_steps=2,
            per_device_train_batch_size=8,
            max_completion_length=MAX_NEW,
        )
        student = with_fixed_stop_head(AutoModelForCausalLM.from_pretrained(tiny_pair_dir["student"]), im_end)
        trainer = TRBDistillTrainer(
            model=student,
            teacher_model=tiny_pair_dir["teacher"],
            args=args,
            train_dataset=tiny_prompts(),
            processing_class=tokenizer,
        )
        rollouts = {}
        original = trainer._generate_single_turn

        def record(*pargs, trainer=trainer, original=original, rollouts=rollouts, **kwargs):
            completions = original(*pargs, **kwargs)
            rollouts.setdefault(trainer.state.global_step, []).extend(completions)
            return completions

        trainer._generate_single_turn = record
        trainer.train()
        assert sorted(rollouts) == [0, 1]
        for rows in rollouts.values():
            _check_rows_stop_early_on_the_students_id(rows, endoftext, im_end)
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        if epsilon > 0:
            assert logs[0]["trb/beta/mean"] > 0.05  # TRB stays on for rows whose student writes <|im_end|>
        assert all(entry["completions/clipped_ratio"] < 0.1 for entry in logs)


def test_vllm_completions_are_cut_at_the_teachers_stop_id(tiny_pair_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair_dir["tokenizer"])
    endoftext, im_end = tokenizer.convert_tokens_to_ids([END_OF_TEXT, IM_END])
    args = tiny_run_args(tmp_path / "out", TRBDistillConfig, trb_epsilon=0.0, max_steps=1)
    trainer = TRBDistillTrainer(
        model=tiny_pair_dir["student"],
        teacher_model=tiny_pair_dir["teacher"],
        args=args,
        train_dataset=tiny_prompts(),
        processing_class=tokenizer,
    )
    assert im_end in trainer.generation_config.eos_token_id and im_end in trainer.eos_token_ids

    class StubVLLM:  # a vLLM that did not stop on <|im_end|>
        def sync_weights(self):
            pass

        def generate(self, prompts, **kwargs):
            return None, [[5, 6, im_end, 7, 8] for _ in prompts], None, None

    trainer.use_vllm, trainer.vllm_generation, trainer._last_loaded_step = True, StubVLLM(), -1
    assert trainer._generate_single_turn([[4, 5]] * 3, None, {}) == [[5, 6, endoftext]] * 3
