import pytest

from trb_trl import TRBDistillConfig


def _config(**kwargs):
    return TRBDistillConfig(output_dir="unused", use_cpu=True, report_to="none", **kwargs)


def test_defaults_are_the_paper_settings():
    config = _config()
    assert (config.trb_epsilon, config.trb_warmup_steps, config.trb_schedule) == (0.02, 50, "linear")
    assert config.gather_teacher_for_generation is True


def test_every_field_of_ours_has_help_and_a_docstring_entry():
    from dataclasses import fields

    from trb_trl._compat import DistillationConfig

    parent = {field.name for field in fields(DistillationConfig)}
    ours = [field for field in fields(TRBDistillConfig) if field.name not in parent]
    assert len(ours) >= 15
    for field in ours:
        assert field.metadata.get("help"), field.name
        assert f"{field.name} (`" in TRBDistillConfig.__doc__, field.name


def test_fixed_epsilon_is_the_constant_schedule():
    assert _config(rollout_policy="fixed_epsilon").trb_schedule == "constant"


def test_which_policies_consult_the_teacher():
    assert _config().needs_teacher_in_rollout
    assert _config(rollout_policy="skd", trb_epsilon=0.0).needs_teacher_in_rollout
    assert not _config(trb_epsilon=0.0).needs_teacher_in_rollout
    assert not _config(rollout_policy="temperature").needs_teacher_in_rollout
    assert not _config(rollout_policy="student").uses_trust_region


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
        ({"rollout_policy": "vanilla"}, "rollout_policy"),
        ({"rollout_policy": "skd", "generation_kwargs": {"num_beams": 2}}, "num_beams"),
        ({"rollout_policy": "temperature", "temperature": 0.0}, "temperature"),
        ({"skd_top_k": 0}, "skd_top_k"),
        ({"skd_teacher_temperature": 0.0}, "skd_teacher_temperature"),
        ({"skd_steps": 0}, "skd_steps"),
        ({"temperature_warmup_start": -0.9}, "temperature_warmup_start"),
        ({"temperature_warmup_steps": 0}, "temperature_warmup_steps"),
        ({"veto_beta_start": -0.2}, "veto_beta_start"),
        ({"veto_beta_start": float("nan")}, "veto_beta_start"),
        ({"veto_beta_start": 0.4, "max_steps": -1}, "veto_decay_steps"),
        ({"veto_decay_steps": 0}, "veto_decay_steps"),
        ({"sft_warmup_steps": -1}, "sft_warmup_steps"),
        ({"loss_top_k_estimator": "renormalised"}, "loss_top_k_estimator"),
        ({"loss_top_k": 16, "beta": 0.5}, "loss_top_k_estimator='policy_gradient' .* needs beta=1.0"),
    ],
)
def test_invalid_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        _config(**kwargs)


def test_beam_search_is_fine_when_no_warmup_policy_samples():
    assert _config(trb_epsilon=0.0, generation_kwargs={"num_beams": 4}).trb_epsilon == 0.0
    assert _config(rollout_policy="student", generation_kwargs={"num_beams": 4}).rollout_policy == "student"


def test_the_top_k_loss_is_the_papers_policy_gradient_form_unless_asked_otherwise():
    assert _config(loss_top_k=16).loss_top_k_estimator == "policy_gradient"
    # TRL's generalized JSD on the top-k needs the renormalised form; without loss_top_k the estimator is unused.
    assert _config(loss_top_k=16, loss_top_k_estimator="renormalized", beta=0.5).beta == 0.5
    assert _config(beta=0.5).loss_top_k is None


@pytest.mark.parametrize("spelling", ["gradient_checkpointing", "activation_checkpointing", None])
def test_either_checkpointing_spelling_works_without_a_deprecation_warning(tmp_path, spelling):
    import warnings

    kwargs = {spelling: False} if spelling else {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = TRBDistillConfig(str(tmp_path), use_cpu=True, **kwargs)
    assert args.gradient_checkpointing is (spelling is None)  # TRL's default is True
    assert args.activation_checkpointing is args.gradient_checkpointing


@pytest.mark.parametrize(
    ("old", "new", "value", "conflicting"),
    [
        ("trb_generation_batch_size", "rollout_generation_batch_size", 4, 8),
        ("trb_gather_teacher_for_generation", "gather_teacher_for_generation", True, False),
        ("trb_memory_preflight", "rollout_memory_preflight", "warn", "off"),
    ],
)
def test_the_old_names_of_the_shared_rollout_knobs_still_work_with_a_warning(old, new, value, conflicting):
    with pytest.warns(FutureWarning, match=f"{old} is deprecated; use {new}"):
        config = _config(**{old: value})
    assert getattr(config, new) == value and getattr(config, old) is None
    with pytest.raises(ValueError, match=f"{old}=.* and {new}=.* both set"):
        _config(**{old: value, new: conflicting})


def test_a_code_benchmark_in_training_needs_the_opt_in_before_any_model_loads():
    with pytest.raises(
        ValueError, match=r"livecodebench_v6: grading code runs .* math_eval_allow_code_execution=True"
    ):
        _config(math_eval_benchmarks=["aime24", "livecodebench_v6"])
    allowed = _config(math_eval_benchmarks=["livecodebench_v6"], math_eval_allow_code_execution=True)
    assert allowed.math_eval_benchmarks == ["livecodebench_v6"]
