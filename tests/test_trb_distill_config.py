import pytest

from trb_trl import TRBDistillConfig


def _config(**kwargs):
    return TRBDistillConfig(output_dir="unused", use_cpu=True, report_to="none", **kwargs)


def test_defaults_are_the_paper_settings():
    config = _config()
    assert (config.trb_epsilon, config.trb_warmup_steps, config.trb_schedule) == (0.02, 50, "linear")
    assert config.trb_gather_teacher_for_generation is True


def test_every_trb_field_has_help():
    from dataclasses import fields

    for field in fields(TRBDistillConfig):
        if field.name.startswith("trb_"):
            assert field.metadata.get("help"), field.name


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"trb_epsilon": -0.1}, "trb_epsilon"),
        ({"trb_epsilon": float("nan")}, "trb_epsilon"),
        ({"trb_epsilon": float("inf")}, "trb_epsilon"),
        ({"trb_warmup_steps": 0}, "trb_warmup_steps"),
        ({"trb_warmup_steps": -3}, "trb_warmup_steps"),
        ({"trb_schedule": "cosine"}, "trb_schedule"),
        ({"generation_kwargs": {"num_beams": 4}}, "num_beams"),
        ({"temperature": 0.0}, "temperature"),
    ],
)
def test_invalid_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        _config(**kwargs)


def test_beam_search_is_fine_when_trb_is_off():
    assert _config(trb_epsilon=0.0, generation_kwargs={"num_beams": 4}).trb_epsilon == 0.0
