"""The teacher stepper: a teacher decoding next to the student inside `generate`, one token per step."""

import time
from typing import NamedTuple

import torch

from ..stop_alignment import StopAlignment, as_id_list
from .cached_forward import forward_with_cache


def output_vocab_size(model: torch.nn.Module) -> int:
    """Number of rows of the model's output projection (may exceed the tokenizer length: padded lm_head rows)."""
    embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is not None and weight.dim() == 2 and weight.numel() > 0:  # ZeRO-3 partitioned weights have numel 0
        return int(weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def shared_vocab_size(student_vocab: int, teacher_vocab: int, vocab_size: int | None) -> int:
    """The vocabulary both models' scores are cut to: `vocab_size` (`len(tokenizer)`) when given, else the models'
    common output size. A clear error when the two cannot share one."""
    if vocab_size is not None:
        if vocab_size > student_vocab:
            raise ValueError(
                f"vocab_size={vocab_size} but the student only scores {student_vocab} tokens: the student and teacher "
                "do not share a vocabulary."
            )
        return vocab_size
    if student_vocab != teacher_vocab:
        raise ValueError(
            f"The student scores {student_vocab} tokens and the teacher {teacher_vocab}. If they share a tokenizer and "
            "only the lm_head is padded, pass `vocab_size=len(tokenizer)`; otherwise the models cannot be combined."
        )
    return student_vocab


class StopSetup(NamedTuple):
    """The stop ids of a teacher-guided rollout and their alignment (None: both models stop on the same ids)."""

    teacher_eos_token_ids: list[int]
    student_eos_token_ids: list[int]
    stop_alignment: StopAlignment | None


def stop_setup(teacher_model, student_eos_token_id, teacher_eos_token_id, vocab_size: int | None) -> StopSetup:
    """Resolve both models' stop ids (the teacher's default to its generation config; the student's, when not given,
    to the teacher's: the same stop convention, nothing to map) and the alignment that makes them one event, with a
    clear error for stop ids outside the shared vocabulary."""
    if teacher_eos_token_id is None:
        teacher_eos_token_id = getattr(getattr(teacher_model, "generation_config", None), "eos_token_id", None)
    teacher_ids = as_id_list(teacher_eos_token_id)
    student_ids = as_id_list(student_eos_token_id) if student_eos_token_id is not None else list(teacher_ids)
    try:
        alignment = StopAlignment.between(student_ids, teacher_ids)
    except ValueError as error:
        raise ValueError(f"{error} (`student_eos_token_id` is empty)") from None
    if alignment is not None and vocab_size is not None:
        outside = [i for i in (alignment.canonical_id, *alignment.merged_ids) if i >= vocab_size]
        if outside:
            raise ValueError(f"Stop ids {outside} are outside the shared vocabulary of {vocab_size} tokens.")
    return StopSetup(teacher_ids, student_ids, alignment)


def teacher_vocab_size(teacher_model, vocab_size: int | None) -> int:
    """The teacher's output size, checked against the tokenizer length `vocab_size` when given."""
    size = output_vocab_size(teacher_model)
    if vocab_size is not None and vocab_size > size:
        raise ValueError(
            f"The tokenizer has {vocab_size} tokens but the teacher only scores {size}: the student and teacher do "
            "not share a vocabulary. Use a teacher with the student's tokenizer."
        )
    return size


class TeacherStepper:
    """Runs the teacher incrementally over the sequences `generate` is extending, with its own KV cache.

    The first call feeds the prompts, each later call only the newly sampled token, with positions taken from
    `prompt_attention_mask` (left padding) extended by ones, exactly as `generate` does for the student, so the
    logits at every step equal a full teacher forward over the sequence so far. Every call must extend every
    sequence of the previous one by one token (beam search, which reorders its beams, is rejected). Use one stepper
    per `generate` call and `release()` it when `generate` returns, to free the cache.

    Under DeepSpeed ZeRO-3 with a sharded teacher, `attach_to_student` moves the teacher step into the student's
    forward (see there); `next_token_logits` then only reads its result.

    Args:
        teacher_model (`PreTrainedModel`):
            The teacher, on the student's device.
        prompt_attention_mask (`torch.Tensor` of shape `(batch_size, prompt_length)`, *optional*):
            The attention mask passed to `generate`. Defaults to all ones. Rows expanded by `num_return_sequences`
            are matched to their prompt's mask.
    """

    def __init__(self, teacher_model: torch.nn.Module, prompt_attention_mask: torch.Tensor | None = None):
        self.teacher_model = teacher_model
        self.prompt_attention_mask = prompt_attention_mask
        self.prompt_length: int | None = None
        self._cache = None
        self._attention_mask = None
        self._next_position = None
        self._length = None
        self._student_hook = None
        self._stashed_logits = None
        self._previous_input_ids = None
        self._seconds = 0.0
        self._forwards = 0
        self._cuda_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @torch.no_grad()
    def advance(self, new_tokens: torch.LongTensor) -> torch.Tensor:
        """Feed the teacher the tokens it has not seen (the prompt first, then one token per step) and return its
        next-token logits, (batch, vocab)."""
        start = self._timer_start(new_tokens.device)
        if self._cache is None:
            mask = self.prompt_attention_mask
            if mask is None:
                mask = torch.ones_like(new_tokens)
            mask = self._mask_for(mask.to(device=new_tokens.device, dtype=torch.long), new_tokens)
            position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            self._length = 0
            self.prompt_length = new_tokens.shape[1]
        else:
            mask = torch.cat([self._attention_mask, self._attention_mask.new_ones(new_tokens.shape)], dim=1)
            position_ids = self._next_position + torch.arange(new_tokens.shape[1], device=new_tokens.device)
        outputs, self._cache = forward_with_cache(
            self.teacher_model,
            self._cache,
            input_ids=new_tokens,
            attention_mask=mask,
            position_ids=position_ids,
            logits_to_keep=1,
        )
        self._attention_mask = mask
        self._next_position = position_ids[:, -1:] + 1
        self._length += new_tokens.shape[1]
        self._timer_stop(new_tokens.device, start)
        return outputs.logits[:, -1, :]

    @staticmethod
    def _mask_for(mask: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The (batch, prompt_length) mask of `input_ids`, expanded like `generate` expands its inputs."""
        if mask.dim() != 2:
            raise ValueError(
                f"prompt_attention_mask must be the 2-D (batch, prompt_length) padding mask given to `generate`, got "
                f"shape {tuple(mask.shape)}; expanded 4-D attention masks (packed sequences) are not supported."
            )
        rows, length = input_ids.shape
        if mask.shape[1] != length or rows % mask.shape[0] != 0:
            raise ValueError(
                f"prompt_attention_mask has shape {tuple(mask.shape)} but generation started from input_ids of "
                f"shape {(rows, length)}; pass the attention mask given to `generate`."
            )
        # num_return_sequences (and num_beams) repeat each prompt consecutively.
        return mask.repeat_interleave(rows // mask.shape[0], dim=0)

    def _check_continuation(self, input_ids: torch.LongTensor) -> None:
        """Each call must extend every sequence of the previous call by one token: the teacher's cache follows them."""
        previous = self._previous_input_ids
        self._previous_input_ids = input_ids
        if previous is None:
            return
        if input_ids.shape[1] != previous.shape[1] + 1 or not torch.equal(input_ids[:, :-1], previous):
            raise ValueError(
                "Teacher-guided rollouts need every sequence to extend the previous step's by one token, but the "
                "sequences were reordered or replaced (beam search does this). Use sampling or greedy search "
                "(num_beams=1), or plain student rollouts."
            )

    def next_token_logits(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """The teacher's next-token logits for the sequences `input_ids` (the ones `generate` passes its logits
        processors), advancing the cache by the one token added since the previous call."""
        self._check_continuation(input_ids)
        if self._student_hook is not None:  # the student's forward already advanced the teacher for this step
            if self._stashed_logits is None or self._length != input_ids.shape[1]:
                raise RuntimeError(
                    "The teacher step attached to the student's forward is out of step with generation; attach the "
                    "processor to the model that `generate` runs."
                )
            return self._stashed_logits
        if self._cache is None:
            return self.advance(input_ids)
        if input_ids.shape[1] != self._length + 1:
            raise RuntimeError(
                "Teacher-guided processors expect one new token per call (plain sampling or greedy search, one "
                f"instance per generate call); the teacher saw length {self._length} and now {input_ids.shape[1]}."
            )
        return self.advance(input_ids[:, -1:])

    def attach_to_student(self, student: torch.nn.Module) -> None:
        """Run the teacher step from `student`'s forward instead of from the processor call.

        Under DeepSpeed ZeRO-3, `generate(synced_gpus=True)` keeps calling the student's forward on ranks that have
        finished (every rank runs the same number of forwards) but skips the logits processors there. A sharded
        teacher, whose forward gathers parameters with collectives, must therefore step where the student steps:
        this forward pre-hook runs the teacher on every rank at every synced step, and the processor only reads the
        result. Call `detach()` after `generate`.
        """
        if self._student_hook is not None:
            raise RuntimeError("The teacher is already attached to a student.")

        def step_teacher(module, args, kwargs):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is None:
                raise ValueError("The teacher step needs the student's `input_ids` (inputs_embeds are not supported).")
            self._stashed_logits = self.advance(input_ids)

        self._student_hook = student.register_forward_pre_hook(step_teacher, with_kwargs=True)

    def detach(self) -> None:
        """Remove the hook installed by `attach_to_student`."""
        if self._student_hook is not None:
            self._student_hook.remove()
            self._student_hook = None

    def release(self) -> None:
        """Free the KV cache and everything else held for decoding (the timings stay readable)."""
        self.detach()
        self._cache = self._attention_mask = self._stashed_logits = self._previous_input_ids = None

    def _timer_start(self, device: torch.device):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            return start
        return time.perf_counter()

    def _timer_stop(self, device: torch.device, start) -> None:
        self._forwards += 1
        if device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._cuda_events.append((start, end))
        else:
            self._seconds += time.perf_counter() - start

    @property
    def seconds(self) -> float:
        """Wall time spent in teacher forwards (CUDA event time on GPU; synchronises once when read)."""
        if self._cuda_events:
            torch.cuda.synchronize()
            self._seconds += sum(s.elapsed_time(e) for s, e in self._cuda_events) / 1000.0
            self._cuda_events.clear()
        return self._seconds

    @property
    def forwards(self) -> int:
        """Number of teacher forwards run."""
        return self._forwards
