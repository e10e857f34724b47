"""The private TRL API we rely on is checked by name and parameter at import, and TRL's divergence call is bound by
name, so an added parameter does not break the loss drop-ins."""

import pytest

from trb_trl import _compat
from trb_trl._compat import DIVERGENCE_PARAMETERS, bound_by_name, check_private_api


def test_the_installed_trl_passes_the_check():
    check_private_api()


def test_a_renamed_keyword_is_one_sentence_naming_the_tested_version():
    def changed(student_hidden_states, teacher_hidden_states, completion_mask, beta, *, temp=1.0):
        pass

    with pytest.raises(ImportError, match=r"tested with trl 1\.16\.0.*no longer takes \['student_lm_head_weight'"):
        check_private_api({"_chunked_divergence_loss": (changed, DIVERGENCE_PARAMETERS)})
    with pytest.raises(ImportError, match="has no `_generate_single_turn`"):
        check_private_api({"_generate_single_turn": (None, ())})


def _loss_reading_names(**kwargs):
    return kwargs


def test_trl_call_is_bound_by_name_and_an_added_parameter_at_its_default_is_ignored(monkeypatch):
    positional = list(range(6))

    def future_trl(*args, new_option=None, **kwargs):  # a TRL release that adds a parameter
        pass

    import inspect

    original = _compat._distillation_module._chunked_divergence_loss
    parameters = list(inspect.signature(original).parameters.values())
    parameters.insert(6, inspect.Parameter("new_option", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None))
    future_trl.__signature__ = inspect.Signature(parameters)
    monkeypatch.setattr(_compat._distillation_module, "_chunked_divergence_loss", future_trl)

    call = bound_by_name(_loss_reading_names)
    received = call(*positional, num_items_in_batch=7, temperature=0.3)
    assert set(received) == set(DIVERGENCE_PARAMETERS)
    assert received["beta"] == 5 and received["num_items_in_batch"] == 7 and received["temperature"] == 0.3
    assert received["student_logit_scale"] == 1.0  # TRL's default, filled in
    assert call(*positional, new_option=None)["beta"] == 5  # the default, passed explicitly
    parameters[6] = parameters[6].replace(default=1.0)
    future_trl.__signature__ = inspect.Signature(parameters)
    call = bound_by_name(_loss_reading_names)
    assert call(*positional, new_option=float("1.0"))["beta"] == 5  # equal to the default, another object
    with pytest.raises(TypeError, match=r"passes \['new_option'\]"):
        call(*positional, new_option="on")
