"""A `transformers.LogitsProcessor` that samples from the trust-region blend of the student and a teacher."""

import time

import torch
from transformers import LogitsProcessor

from .blending import trust_region_blend
from .stop_alignment import StopAlignment, as_id_list


def output_vocab_size(model: torch.nn.Module) -> int:
    """Number of rows of the model's output projection (may exceed the tokenizer length: padded lm_head rows)."""
    embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is not None and weight.dim() == 2 and weight.numel() > 0:  # ZeRO-3 partitioned weights have numel 0
        return int(weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


class TrustRegionBlendingProcessor(LogitsProcessor):
    r"""Samples each token from mu* proportional to pi_S^(1-beta*) pi_T^beta*, the trust-region blend of the student
    (the model being generated from) and a teacher, with beta* the largest weight keeping KL(mu* || pi_S) <= epsilon.

    The teacher runs incrementally next to the student with its own KV cache: the first call feeds the prompt, each
    later call only the newly sampled token, with positions taken from `prompt_attention_mask` (left padding)
    extended by ones, exactly as `generate` does for the student. Use one instance per `generate` call; call
    `release()` when it returns to free the teacher's cache (the statistics stay).

    Temperature: transformers applies its temperature, top-k and top-p warpers *after* custom processors. This
    processor blends the distributions tempered by `temperature` and returns `temperature * log mu*`, so after the
    temperature warper of `generate(do_sample=True, temperature=temperature)` tokens are drawn from exactly mu*; top-k
    and top-p then truncate mu* as they would truncate pi_S, and greedy decoding takes argmax mu*. Pass the same
    temperature here and to `generate`.

    Banned tokens (scores already at `-inf`, e.g. from `min_new_tokens` or `suppress_tokens`) keep zero mass; the
    teacher is renormalised over the allowed tokens. Rows of the student scores beyond `vocab_size` (padded lm_head
    rows) are set to `-inf`.

    Args:
        teacher_model (`PreTrainedModel`):
            The teacher, on the same device as the student, sharing its tokenizer.
        epsilon (`float` or `torch.Tensor` of shape `(batch_size,)`):
            KL budget per token. `0` returns the scores untouched and never calls the teacher.
        prompt_attention_mask (`torch.Tensor` of shape `(batch_size, prompt_length)`, *optional*):
            The attention mask passed to `generate` (left padding). Defaults to all ones.
        temperature (`float`, *optional*, defaults to `1.0`):
            The sampling temperature given to `generate`.
        vocab_size (`int`, *optional*):
            Number of real tokens (`len(tokenizer)`). Required when the student and teacher output sizes differ
            (padded lm_head rows, e.g. 151936 vs 152064); both are cut to it.
        student_eos_token_id (`int` or `list[int]`, *optional*):
            The student's stop ids; the first is its canonical stop token. Rows that emitted one are finished and left
            out of the statistics. Defaults to the teacher's stop ids (same stop convention, nothing to map).
        teacher_eos_token_id (`int` or `list[int]`, *optional*):
            The teacher's stop ids, defaulting to its generation config. The teacher's mass on stop ids the student
            does not use is moved onto the student's canonical stop id before blending ([`StopAlignment`]), so
            that a Base student (`<|endoftext|>`) and an instruct teacher (`<|im_end|>`) agree on "stop".

    Sequences must extend the previous step's by one token: beam search, which reorders its beams, is rejected at
    the first reordering. Rows expanded by `num_return_sequences` are matched to their prompt's mask.

    Example:

    ```python
    >>> processor = TrustRegionBlendingProcessor(
    ...     teacher, epsilon=0.02, prompt_attention_mask=inputs["attention_mask"], temperature=0.7,
    ...     vocab_size=len(tokenizer), student_eos_token_id=tokenizer.eos_token_id,
    ... )
    >>> out = student.generate(**inputs, do_sample=True, temperature=0.7, logits_processor=[processor])
    >>> processor.summary()["beta/mean"]
    ```
    """

    def __init__(
        self,
        teacher_model: torch.nn.Module,
        epsilon: float | torch.Tensor,
        *,
        prompt_attention_mask: torch.Tensor | None = None,
        temperature: float = 1.0,
        vocab_size: int | None = None,
        student_eos_token_id: int | list[int] | None = None,
        teacher_eos_token_id: int | list[int] | None = None,
    ):
        if isinstance(epsilon, torch.Tensor):
            if epsilon.dim() > 1:
                raise ValueError(
                    f"epsilon must be a float or a (batch_size,) tensor, got shape {tuple(epsilon.shape)}."
                )
        elif not epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}.")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.teacher_model = teacher_model
        self.epsilon = epsilon
        self.temperature = float(temperature)
        self.prompt_attention_mask = prompt_attention_mask

        self.teacher_vocab_size = output_vocab_size(teacher_model)
        if vocab_size is not None and vocab_size > self.teacher_vocab_size:
            raise ValueError(
                f"The tokenizer has {vocab_size} tokens but the teacher only scores {self.teacher_vocab_size}: the "
                "student and teacher do not share a vocabulary. Use a teacher with the student's tokenizer."
            )
        self.vocab_size = vocab_size

        if teacher_eos_token_id is None:
            generation_config = getattr(teacher_model, "generation_config", None)
            teacher_eos_token_id = getattr(generation_config, "eos_token_id", None)
        self.teacher_eos_token_ids = as_id_list(teacher_eos_token_id)
        # Without explicit student stop ids, the student is assumed to stop where the teacher does (no mapping).
        self.student_eos_token_ids = (
            as_id_list(student_eos_token_id) if student_eos_token_id is not None else list(self.teacher_eos_token_ids)
        )
        try:
            self.stop_alignment = StopAlignment.between(self.student_eos_token_ids, self.teacher_eos_token_ids)
        except ValueError as error:
            raise ValueError(f"{error} (`student_eos_token_id` is empty)") from None
        if self.stop_alignment is not None and vocab_size is not None:
            outside = [
                i for i in (self.stop_alignment.canonical_id, *self.stop_alignment.merged_ids) if i >= vocab_size
            ]
            if outside:
                raise ValueError(f"Stop ids {outside} are outside the shared vocabulary of {vocab_size} tokens.")

        self._cache = None
        self._attention_mask = None
        self._next_position = None
        self._length = None
        self._prompt_length = None
        self._finished = None
        self._shared_vocab = None
        self._student_stop_tensor = None
        self._student_hook = None
        self._stashed_logits = None
        self._previous_input_ids = None
        self._records: list[tuple[torch.Tensor, ...]] = []
        self._teacher_seconds = 0.0
        self._teacher_forwards = 0
        self._cuda_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @property
    def is_active(self) -> bool:
        """False when epsilon is the float 0: the processor is then the identity and never calls the teacher."""
        return isinstance(self.epsilon, torch.Tensor) or self.epsilon > 0

    def _resolve_vocab(self, student_vocab: int) -> int:
        if self.vocab_size is not None:
            if self.vocab_size > student_vocab:
                raise ValueError(
                    f"vocab_size={self.vocab_size} but the student only scores {student_vocab} tokens: the student "
                    "and teacher do not share a vocabulary."
                )
            return self.vocab_size
        if student_vocab != self.teacher_vocab_size:
            raise ValueError(
                f"The student scores {student_vocab} tokens and the teacher {self.teacher_vocab_size}. If they share a "
                "tokenizer and only the lm_head is padded, pass `vocab_size=len(tokenizer)`; otherwise the models "
                "cannot be blended."
            )
        return student_vocab

    @torch.no_grad()
    def _advance_teacher(self, new_tokens: torch.LongTensor) -> torch.Tensor:
        """Feed the teacher the tokens it has not seen (the prompt first, then one token per step) and return its
        next-token logits, (batch, vocab)."""
        start = self._timer_start(new_tokens.device)
        if self._cache is None:
            mask = self.prompt_attention_mask
            if mask is None:
                mask = torch.ones_like(new_tokens)
            mask = self._mask_for(mask.to(device=new_tokens.device, dtype=torch.long), new_tokens)
            position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            self._finished = torch.zeros(new_tokens.shape[0], dtype=torch.bool, device=new_tokens.device)
            self._length = 0
            self._prompt_length = new_tokens.shape[1]
        else:
            mask = torch.cat([self._attention_mask, self._attention_mask.new_ones(new_tokens.shape)], dim=1)
            position_ids = self._next_position + torch.arange(new_tokens.shape[1], device=new_tokens.device)
        outputs = self.teacher_model(
            input_ids=new_tokens,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=self._cache,
            use_cache=True,
            logits_to_keep=1,
        )
        self._cache = outputs.past_key_values
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
                "TrustRegionBlendingProcessor needs every sequence to extend the previous step's by one token, but "
                "the sequences were reordered or replaced (beam search does this). Use sampling or greedy search "
                "(num_beams=1) with trust-region blending, or set epsilon to 0."
            )

    def _teacher_logits(self, input_ids: torch.LongTensor) -> torch.Tensor:
        if self._student_hook is not None:  # the student's forward already advanced the teacher for this step
            if self._stashed_logits is None or self._length != input_ids.shape[1]:
                raise RuntimeError(
                    "The teacher step attached to the student's forward is out of step with generation; attach the "
                    "processor to the model that `generate` runs."
                )
            return self._stashed_logits
        if self._cache is None:
            return self._advance_teacher(input_ids)
        if input_ids.shape[1] != self._length + 1:
            raise RuntimeError(
                "TrustRegionBlendingProcessor expects one new token per call (plain sampling or greedy search, "
                f"one instance per generate call); it saw length {self._length} and now {input_ids.shape[1]}."
            )
        return self._advance_teacher(input_ids[:, -1:])

    def attach_to_student(self, student: torch.nn.Module) -> None:
        """Run the teacher step from `student`'s forward instead of from the processor call.

        Under DeepSpeed ZeRO-3, `generate(synced_gpus=True)` keeps calling the student's forward on ranks that have
        finished (every rank runs the same number of forwards) but skips the logits processors there. A sharded
        teacher, whose forward gathers parameters with collectives, must therefore step where the student steps:
        this forward pre-hook runs the teacher on every rank at every synced step, and the processor only reads the
        result. Call `detach()` after `generate`.
        """
        if self._student_hook is not None:
            raise RuntimeError("The processor is already attached to a student.")

        def step_teacher(module, args, kwargs):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is None:
                raise ValueError("The teacher step needs the student's `input_ids` (inputs_embeds are not supported).")
            self._stashed_logits = self._advance_teacher(input_ids)

        self._student_hook = student.register_forward_pre_hook(step_teacher, with_kwargs=True)

    def detach(self) -> None:
        """Remove the hook installed by `attach_to_student`."""
        if self._student_hook is not None:
            self._student_hook.remove()
            self._student_hook = None

    def _update_finished(self, input_ids: torch.LongTensor) -> None:
        if self._finished is None or input_ids.shape[1] <= self._prompt_length or not self.student_eos_token_ids:
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
        self._check_continuation(input_ids)
        self._update_finished(input_ids)

        teacher_logits = self._teacher_logits(input_ids)[:, :vocab].float()
        if self.stop_alignment is not None:
            teacher_logits = self.stop_alignment.apply(teacher_logits)
        epsilon = self.epsilon
        if isinstance(epsilon, torch.Tensor):
            epsilon = epsilon.to(scores.device)
        blend = trust_region_blend(scores[:, :vocab], teacher_logits, epsilon, temperature=self.temperature)
        self._records.append(
            (blend.beta, blend.kl_to_student, blend.kl_to_teacher, blend.teacher_valid, ~self._finished.clone())
        )
        blended = scores.new_full(scores.shape, float("-inf"))
        blended[:, :vocab] = (blend.logprobs * self.temperature).to(scores.dtype)
        return blended

    def _timer_start(self, device: torch.device):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            return start
        return time.perf_counter()

    def _timer_stop(self, device: torch.device, start) -> None:
        self._teacher_forwards += 1
        if device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._cuda_events.append((start, end))
        else:
            self._teacher_seconds += time.perf_counter() - start

    @property
    def teacher_seconds(self) -> float:
        """Wall time spent in teacher forwards (CUDA event time on GPU; synchronises once when read)."""
        if self._cuda_events:
            torch.cuda.synchronize()
            self._teacher_seconds += sum(s.elapsed_time(e) for s, e in self._cuda_events) / 1000.0
            self._cuda_events.clear()
        return self._teacher_seconds

    @property
    def teacher_forwards(self) -> int:
        """Number of teacher forwards this processor ran."""
        return self._teacher_forwards

    def release(self) -> None:
        """Free the teacher's KV cache and everything else held for decoding; the statistics stay readable."""
        self.detach()
        self._cache = self._attention_mask = self._stashed_logits = self._previous_input_ids = None

    def statistics(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Per-token statistics over rows that had not finished, flattened over steps: `beta`, `kl_to_student`,
        `kl_to_teacher` (float32) and `teacher_valid` (bool), on `device` (default: where they were computed)."""
        if not self._records:
            empty = torch.zeros(0, device=device)
            return {
                "beta": empty,
                "kl_to_student": empty,
                "kl_to_teacher": empty,
                "teacher_valid": empty.bool(),
            }
        beta, kl_student, kl_teacher, teacher_valid, active = (torch.stack(x) for x in zip(*self._records))
        statistics = {
            "beta": beta[active],
            "kl_to_student": kl_student[active],
            "kl_to_teacher": kl_teacher[active],
            "teacher_valid": teacher_valid[active],
        }
        return {name: value.to(device) if device is not None else value for name, value in statistics.items()}

    def summary(self) -> dict[str, float]:
        """Aggregates for logging: beta mean/min/max, the fraction of tokens drawn from the teacher (beta* = 1),
        KL(mu||pi_S) mean/max, KL(mu||pi_T) mean, the fraction of tokens whose teacher logits were invalid (NaN or
        no finite mass; those tokens were drawn from the student), the number of blended tokens and the teacher
        time."""
        stats = self.statistics()
        beta = stats["beta"]
        num_tokens = int(beta.numel())
        if num_tokens == 0:
            return {"num_tokens": 0, "teacher_seconds": self.teacher_seconds}
        return {
            "beta/mean": beta.mean().item(),
            "beta/min": beta.min().item(),
            "beta/max": beta.max().item(),
            "teacher_fraction": (beta >= 1.0).float().mean().item(),
            "kl_to_student/mean": stats["kl_to_student"].mean().item(),
            "kl_to_student/max": stats["kl_to_student"].max().item(),
            "kl_to_teacher/mean": stats["kl_to_teacher"].mean().item(),
            "teacher_invalid_fraction": (~stats["teacher_valid"]).float().mean().item(),
            "num_tokens": num_tokens,
            "teacher_seconds": self.teacher_seconds,
        }
