"""One "stop" event for a student and a teacher that stop on different token ids.

A Qwen3-Base student stops on `<|endoftext|>` (151643), an instruct teacher on `<|im_end|>` (151645). Compared id by
id, the teacher's wish to stop lands on a token the student's generation does not stop on, so a student trained
toward it learns to emit `<|im_end|>` and keeps going. The TRB paper (§1.4 of the reference notes) moves each model's
stop mass onto one shared coordinate before building the behaviour policy *and* before computing the KL, and masks the
duplicate. [`StopAlignment`] is that map; the rollout processor and the loss both use it.

Pure tensor code: no transformers imports.
"""

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import torch


def as_id_list(token_ids: int | Iterable[int] | torch.Tensor | None) -> list[int]:
    """Normalise a stop-id setting (None, an int, a list or a tensor) to a list of ints."""
    if token_ids is None:
        return []
    if isinstance(token_ids, torch.Tensor):
        return [int(t) for t in token_ids.flatten().tolist()]
    if isinstance(token_ids, int):
        return [token_ids]
    return [int(t) for t in token_ids]


@functools.cache
def _stop_ids_on(canonical_id: int, merged_ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The canonical id then the merged ids, as an index tensor on `device`, built once per alignment and device."""
    return torch.tensor([canonical_id, *merged_ids], device=device)


@dataclass(frozen=True)
class StopAlignment:
    """Merge the probability mass of `merged_ids` into `canonical_id`; the merged ids get none.

    Args:
        canonical_id (`int`):
            The student's stop id: the one coordinate that means "stop" after alignment.
        merged_ids (`tuple[int, ...]`):
            The teacher's stop ids that the student does not stop on.
    """

    canonical_id: int
    merged_ids: tuple[int, ...]

    @classmethod
    def between(cls, student_stop_ids, teacher_stop_ids) -> "StopAlignment | None":
        """The alignment for a student and teacher with these stop ids, or `None` when no teacher stop id is
        foreign to the student (nothing to map: the distributions are compared as they are)."""
        student_ids, teacher_ids = as_id_list(student_stop_ids), as_id_list(teacher_stop_ids)
        foreign = tuple(t for t in teacher_ids if t not in student_ids)
        if not foreign:
            return None
        if not student_ids:
            raise ValueError(
                f"The teacher stops on token ids {list(foreign)} but no student stop id is known; pass the student's "
                "stop id (its `eos_token_id`) so that the teacher's stop mass can be mapped onto it."
            )
        return cls(student_ids[0], foreign)

    def apply(self, logits: torch.Tensor, *, fill: float = float("-inf"), temperature: float = 1.0) -> torch.Tensor:
        """Return logits (..., V) whose softmax has the stop mass on `canonical_id` and `fill` at the merged ids.

        Only the last dimension is touched, out of place. `fill=-inf` removes the merged ids from the support; a
        finite, very negative `fill` gives them exactly zero probability in float32 while keeping every log-prob
        finite (what a divergence with gradients needs: no `0 * inf`). `temperature`: the logits are scores that will
        still be divided by it (`generate`'s temperature warper, the blend), so the mass is merged in the tempered
        distribution: the canonical score becomes `temperature * logsumexp(scores / temperature)` over the stop ids.
        """
        ids = _stop_ids_on(self.canonical_id, self.merged_ids, logits.device)
        merged_logit = temperature * torch.logsumexp(logits.index_select(-1, ids) / temperature, dim=-1)
        aligned = logits.clone()  # the one copy: this runs at every decoding step, for both models
        aligned.index_fill_(-1, ids[1:], fill)
        return aligned.index_copy_(-1, ids[:1], merged_logit.unsqueeze(-1).to(aligned.dtype))

    def apply_to_scores(self, scores: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
        """The student's sampling scores (..., V) with its own mass on the merged ids moved onto its stop id, so that
        writing an instruct teacher's `<|im_end|>` is the student's stop, not a token after which it writes on. A
        stop that earlier processors banned (`-inf` at `canonical_id`, e.g. `min_new_tokens`) stays banned."""
        aligned = self.apply(scores, temperature=temperature)
        banned = torch.isneginf(scores[..., self.canonical_id])  # no host sync: this runs at every decoding step
        aligned[..., self.canonical_id] = aligned[..., self.canonical_id].masked_fill(banned, float("-inf"))
        return aligned


def cut_at_stop(tokens: list[int], student_stop_ids, teacher_stop_ids) -> tuple[list[int], bool]:
    """`tokens` up to and including the first stop, with a teacher stop id the student does not stop on (an instruct
    teacher's `<|im_end|>` for a Base student) replaced by the student's stop id; and whether a stop was found."""
    student_ids, teacher_ids = as_id_list(student_stop_ids), as_id_list(teacher_stop_ids)
    for position, token in enumerate(tokens):
        if token in student_ids:
            return [*tokens[:position], token], True
        if token in teacher_ids:
            return [*tokens[:position], student_ids[0] if student_ids else token], True
    return list(tokens), False
