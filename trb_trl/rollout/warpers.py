"""`generate`'s sampling warpers, built in one place for the rollout code that samples outside `generate` (SKD's
student draw, the speculative engine's drafts), so that both truncate exactly as `generate` would."""

from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def sampling_warpers(
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
) -> LogitsProcessorList:
    """The warpers `generate` applies with `do_sample=True` and one beam, in its order: temperature (unless 1),
    top-k (unless 0 or None), top-p (below 1), min-p (when set)."""
    warpers = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    if min_p is not None:
        warpers.append(MinPLogitsWarper(min_p=min_p, min_tokens_to_keep=1))
    return warpers
