"""The KV-cache keyword is read off the model's `forward`, not the transformers version."""

import inspect
import warnings

import torch
from teacher_doubles import StopLovingTeacher

from trb_trl.rollout.cached_forward import cache_keyword, forward_with_cache
from trb_trl.testing import build_tiny_qwen3


def test_the_keyword_follows_the_forward_signature():
    model = build_tiny_qwen3(32, hidden_size=16, num_layers=1)
    takes_cache = "cache" in inspect.signature(type(model).forward).parameters
    assert cache_keyword(model) == ("cache" if takes_cache else "past_key_values")
    assert cache_keyword(StopLovingTeacher(32, 3)) == "past_key_values"  # an older-style forward


def test_incremental_forward_matches_a_full_forward_without_deprecation_warnings():
    model = build_tiny_qwen3(32, hidden_size=16, num_layers=1)
    ids = torch.randint(0, 32, (2, 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        _, cache = forward_with_cache(model, None, input_ids=ids[:, :5])
        outputs, cache = forward_with_cache(model, cache, input_ids=ids[:, 5:], logits_to_keep=1)
    assert cache is not None
    torch.testing.assert_close(outputs.logits[:, -1], model(input_ids=ids).logits[:, -1], atol=1e-5, rtol=1e-5)


def test_a_peft_wrapper_is_asked_about_its_base_model():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_tiny_qwen3(32, hidden_size=16, num_layers=1), LoraConfig(target_modules=["q_proj"]))
    assert cache_keyword(model) == cache_keyword(model.get_base_model())
