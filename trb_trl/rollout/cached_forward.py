"""One decoder forward that reads and extends a KV cache, whichever keyword the installed transformers takes.

transformers 5.25 renamed the cache argument of causal LMs' `forward` from `past_key_values` to `cache` (the old name
warns and goes in 5.40) and returns it as `outputs.cache`. The teacher stepper and the speculative engine call models
directly, so they ask the model which spelling its `forward` takes, not which version is installed.
"""

import functools
import inspect

import torch


@functools.cache
def _cache_keyword_of(forward) -> str:
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):  # a builtin or C-implemented callable: the long-standing name
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def cache_keyword(model: torch.nn.Module) -> str:
    """`"cache"` when `model.forward` (or, for a PEFT wrapper, its base model's) takes it, else `"past_key_values"`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_keyword_of(getattr(type(base), "forward", base.forward))


def forward_with_cache(model: torch.nn.Module, cache, **inputs):
    """`model(**inputs, use_cache=True)` fed `cache`; returns `(outputs, the extended cache)`."""
    outputs = model(**inputs, use_cache=True, **{cache_keyword(model): cache})
    new_cache = getattr(outputs, "cache", None)
    if new_cache is None:
        new_cache = getattr(outputs, "past_key_values", None)
    return outputs, new_cache
