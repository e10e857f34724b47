"""What every teacher-guided rollout processor shares: the teacher stepper, one vocabulary, one stop event, finished
rows and per-token records. A policy (trust-region blending, teacher injection) only says what a step does."""

import torch
from transformers import LogitsProcessor

from .teacher import TeacherStepper, shared_vocab_size, stop_setup, teacher_vocab_size


class TeacherGuidedProcessor(LogitsProcessor):
    """Base of the `LogitsProcessor`s that consult a teacher at every decoding step of `generate`.

    Each call advances a [`TeacherStepper`] by the token just sampled, cuts both models' scores to the shared
    vocabulary, moves each model's mass on the teacher's stop ids that the student does not use onto the student's
    stop id ([`StopAlignment`], merged in the tempered distributions), hands both to `_step` and keeps the per-token
    records `_step` returns for the rows that had not finished. A merged id is never sampled: a rollout ends on the
    student's stop id whichever model wanted to stop. Use one instance per `generate` call and `release()` it when `generate` returns.

    Args:
        teacher_model (`PreTrainedModel`):
            The teacher, on the same device as the student, sharing its tokenizer.
        prompt_attention_mask (`torch.Tensor` of shape `(batch_size, prompt_length)`, *optional*):
            The attention mask passed to `generate` (left padding). Defaults to all ones.
        temperature (`float`, *optional*, defaults to `1.0`):
            The sampling temperature given to `generate` (applied by its warper after this processor).
        vocab_size (`int`, *optional*):
            Number of real tokens (`len(tokenizer)`). Required when the student and teacher output sizes differ
            (padded lm_head rows, e.g. 151936 vs 152064); both are cut to it.
        student_eos_token_id (`int` or `list[int]`, *optional*):
            The student's stop ids; the first is its canonical stop token. Rows that emitted one are finished and left
            out of the statistics. Defaults to the teacher's stop ids (same stop convention, nothing to map).
        teacher_eos_token_id (`int` or `list[int]`, *optional*):
            The teacher's stop ids, defaulting to its generation config.
    """

    # Per-token statistics a subclass records (name -> dtype), returned by `statistics()`.
    STATISTICS: dict[str, torch.dtype] = {}

    def __init__(
        self,
        teacher_model: torch.nn.Module,
        *,
        prompt_attention_mask: torch.Tensor | None = None,
        temperature: float = 1.0,
        vocab_size: int | None = None,
        student_eos_token_id: int | list[int] | None = None,
        teacher_eos_token_id: int | list[int] | None = None,
    ):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.teacher_model = teacher_model
        self.temperature = float(temperature)
        self.prompt_attention_mask = prompt_attention_mask
        self.teacher = TeacherStepper(teacher_model, prompt_attention_mask)

        self.teacher_vocab_size = teacher_vocab_size(teacher_model, vocab_size)
        self.vocab_size = vocab_size
        self.teacher_eos_token_ids, self.student_eos_token_ids, self.stop_alignment = stop_setup(
            teacher_model, student_eos_token_id, teacher_eos_token_id, vocab_size
        )

        self._prompt_length = None
        self._finished = None
        self._shared_vocab = None
        self._student_stop_tensor = None
        self._records: list[dict[str, torch.Tensor]] = []

    @property
    def is_active(self) -> bool:
        """False when the processor is the identity and never calls the teacher."""
        return True

    def _step(
        self, scores: torch.Tensor, teacher_logits: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The policy: from the student's scores `(batch, vocab)` (cut to the shared vocabulary, as `generate` passes
        them) and the teacher's stop-aligned float32 logits over the same ids, the new scores and this step's
        per-token records (one `(batch,)` tensor per `STATISTICS` name)."""
        raise NotImplementedError

    @property
    def _teacher_stop_temperature(self) -> float:
        """The temperature of the teacher distribution the policy uses, at which its stop mass is merged."""
        return self.temperature

    def _resolve_vocab(self, student_vocab: int) -> int:
        return shared_vocab_size(student_vocab, self.teacher_vocab_size, self.vocab_size)

    def stop_rows_at(self, max_new_tokens: list[int]) -> None:
        """Per-row limits on new tokens that `generate` enforces with a stopping criterion (TrOPD's remaining budget
        after a teacher prefix): a row past its limit is finished, its padded steps left out of the statistics."""
        self._row_limits = torch.tensor(max_new_tokens, dtype=torch.long)

    _row_limits: torch.Tensor | None = None

    def _update_finished(self, input_ids: torch.LongTensor) -> None:
        if self._finished is None:
            self._finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            self._prompt_length = input_ids.shape[1]
        generated = input_ids.shape[1] - self._prompt_length
        if self._row_limits is not None:
            self._row_limits = self._row_limits.to(input_ids.device)
            self._finished |= self._row_limits <= generated
        if generated == 0 or not self.student_eos_token_ids:
            return
        if self._student_stop_tensor is None:
            self._student_stop_tensor = torch.tensor(self.student_eos_token_ids, device=input_ids.device)
        self._finished |= torch.isin(input_ids[:, -1], self._student_stop_tensor)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.is_active:
            return scores
        if self._shared_vocab is None:
            self._shared_vocab = self._resolve_vocab(scores.shape[-1])
        vocab = self._shared_vocab
        teacher_logits = self.teacher.next_token_logits(input_ids)[:, :vocab].float()
        self._update_finished(input_ids)
        student_scores = scores[:, :vocab]
        if self.stop_alignment is not None:  # "stop" is one event for both models, at the sampling temperature
            student_scores = self.stop_alignment.apply_to_scores(student_scores, temperature=self.temperature)
            teacher_logits = self.stop_alignment.apply(teacher_logits, temperature=self._teacher_stop_temperature)
        new_scores, records = self._step(student_scores, teacher_logits)
        records["active"] = ~self._finished.clone()
        self._records.append(records)
        output = scores.new_full(scores.shape, float("-inf"))  # padded lm_head rows beyond the vocabulary: never
        output[:, :vocab] = new_scores.to(scores.dtype)
        return output

    def attach_to_student(self, student: torch.nn.Module) -> None:
        """Step the teacher from `student`'s forward (DeepSpeed ZeRO-3 with a sharded teacher); see
        [`TeacherStepper.attach_to_student`]. Call `detach()` or `release()` after `generate`."""
        self.teacher.attach_to_student(student)

    def detach(self) -> None:
        """Remove the hook installed by `attach_to_student`."""
        self.teacher.detach()

    def release(self) -> None:
        """Free the teacher's KV cache and everything else held for decoding; the statistics stay readable."""
        self.teacher.release()

    @property
    def teacher_seconds(self) -> float:
        """Wall time spent in teacher forwards (CUDA event time on GPU; synchronises once when read)."""
        return self.teacher.seconds

    @property
    def teacher_forwards(self) -> int:
        """Number of teacher forwards this processor ran."""
        return self.teacher.forwards

    def statistics(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The per-token records (`STATISTICS`) over rows that had not finished, flattened over steps, on `device`
        (default: where they were computed)."""
        if not self._records:
            return {name: torch.zeros(0, dtype=dtype, device=device) for name, dtype in self.STATISTICS.items()}
        active = torch.stack([record["active"] for record in self._records])
        statistics = {
            name: torch.stack([record[name] for record in self._records])[active] for name in self.STATISTICS
        }
        return {name: value.to(device) if device is not None else value for name, value in statistics.items()}
