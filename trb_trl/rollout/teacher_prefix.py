"""Teacher prefixes: TrOPD's off-policy guidance, where a training trajectory starts with teacher tokens.

A trajectory is a teacher-generated prefix of length l followed by the student's own continuation from it; the loss
imitates the teacher on the prefix and distils on-policy on the continuation. The paper (TrOPD, arXiv 2606.01249,
§2.4 of the reference notes) anneals the longest prefix to 0 but does not say how l is drawn per sample: we draw it
uniformly from {0, ..., l_max} by default (a range of prefix lengths, as the paper's Fig. 2 suggests) and offer
`"max"` (every sample gets l_max).
"""

import random

import torch
from transformers import GenerationConfig

from ..stop_alignment import cut_at_stop


PREFIX_SAMPLING = ("uniform", "max")


def draw_prefix_lengths(max_length: int, count: int, sampling: str, rng: random.Random) -> list[int]:
    """One prefix length per sample: uniform on {0, ..., max_length}, or max_length for every sample."""
    if sampling not in PREFIX_SAMPLING:
        raise ValueError(f"prefix sampling must be one of {list(PREFIX_SAMPLING)}, got {sampling!r}.")
    if max_length <= 0:
        return [0] * count
    if sampling == "max":
        return [max_length] * count
    return [rng.randint(0, max_length) for _ in range(count)]


def teacher_generation_config(
    base: GenerationConfig,
    *,
    max_new_tokens: int,
    stop_ids: list[int],
    pad_token_id: int,
    suppress_tokens: list[int] | None = None,
) -> GenerationConfig:
    """`base` (the student's rollout sampling settings) for a teacher sample: the teacher's and student's stop ids,
    `max_new_tokens`, and the lm_head's padding rows suppressed (they are no tokens)."""
    config = GenerationConfig.from_dict(base.to_dict())
    config.max_new_tokens = max_new_tokens
    config.min_new_tokens = None
    config.eos_token_id = list(dict.fromkeys(stop_ids))
    config.pad_token_id = pad_token_id
    if suppress_tokens:
        config.suppress_tokens = sorted({*(config.suppress_tokens or []), *suppress_tokens})
    return config


@torch.no_grad()
def generate_teacher_prefixes(
    teacher: torch.nn.Module,
    prompt_ids: list[list[int]],
    lengths: list[int],
    generation_config: GenerationConfig,
    *,
    student_stop_ids,
    teacher_stop_ids,
    synced_gpus: bool = False,
) -> tuple[list[list[int]], list[bool]]:
    """Sample the teacher's first `lengths[i]` tokens after each prompt, in one left-padded `generate` call.

    Returns each prefix (cut at the teacher's first stop, mapped to the student's stop id) and whether it ended the
    response. Rows of length 0 are still generated (one token, discarded) so that every process runs the same call,
    which `synced_gpus` (a sharded ZeRO-3 teacher) requires.
    """
    pad_token_id = generation_config.pad_token_id
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    device = next(teacher.parameters()).device
    sequences = teacher.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        generation_config=generation_config,
        synced_gpus=synced_gpus,
    )
    prefixes, ended = [], []
    for completion, length in zip(sequences[:, width:].tolist(), lengths, strict=True):
        prefix, stopped = cut_at_stop(completion[:length], student_stop_ids, teacher_stop_ids)
        prefixes.append(prefix)
        ended.append(stopped)
    return prefixes, ended
