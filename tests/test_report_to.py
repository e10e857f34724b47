"""`report_to` backends are checked before any model loads: one line naming the package to install."""

import importlib.util
from types import SimpleNamespace

import pytest

from trb_trl.report_to import BACKEND_PACKAGES, ReportToError, check_report_to, report_to_backends


@pytest.fixture
def uninstalled(monkeypatch):
    """`uninstalled("a", "b")`: `importlib.util.find_spec` finds no module named a or b (or below them)."""
    real_find_spec = importlib.util.find_spec
    missing: set[str] = set()
    looked_up: list[str] = []

    def find_spec(name, *args, **kwargs):
        looked_up.append(name)
        if name in missing or name.split(".")[0] in missing:
            return None
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)

    def remove(*names):
        missing.update(names)
        return looked_up

    return remove


def test_every_backend_transformers_knows_has_its_packages_listed():
    """Against the backends of the transformers the option schema was generated with (a release that adds one is
    not an error: its package is then not checked, and regenerating the schema shows the gap here)."""
    from trb_trl import config_schema

    assert set(config_schema.load_schema()["report_to_backends"]) <= set(BACKEND_PACKAGES)


def test_a_missing_backend_package_is_one_line_naming_the_install(uninstalled):
    uninstalled("tensorboard", "tensorboardX")
    with pytest.raises(ReportToError) as error:
        check_report_to(["wandb", "tensorboard"])
    assert str(error.value) == (
        "report_to includes 'tensorboard' but the package 'tensorboard' is not installed: pip install tensorboard "
        "(or remove it from report_to)"
    )


def test_several_missing_backends_are_named_together(uninstalled):
    uninstalled("wandb", "mlflow")
    with pytest.raises(ReportToError) as error:
        check_report_to(["wandb", "mlflow"])
    assert str(error.value) == (
        "report_to includes 'wandb' and 'mlflow' but the packages 'wandb' and 'mlflow' are not installed: "
        "pip install wandb mlflow (or remove them from report_to)"
    )


def test_either_tensorboard_package_will_do(uninstalled):
    uninstalled("tensorboard")
    if importlib.util.find_spec("tensorboardX") is None:
        pytest.skip("tensorboardX is not installed")
    check_report_to("tensorboard")


def test_a_backend_needing_two_packages_names_both(uninstalled):
    uninstalled("dagshub", "mlflow")
    with pytest.raises(ReportToError) as error:
        check_report_to(["dagshub"])
    assert str(error.value) == (
        "report_to includes 'dagshub' but the packages 'dagshub' and 'mlflow' are not installed: "
        "pip install dagshub mlflow (or remove it from report_to)"
    )


@pytest.mark.parametrize("value", [None, "none", ["none"], "all", ["all"], []])
def test_none_and_all_ask_for_nothing(value, uninstalled):
    looked_up = uninstalled("wandb")
    assert report_to_backends(value) == []
    check_report_to(value, known_backends=BACKEND_PACKAGES)
    assert looked_up == []


def test_a_string_names_one_backend():
    assert report_to_backends("wandb") == ["wandb"]


def test_an_unknown_backend_is_named_with_the_closest_one():
    with pytest.raises(ReportToError, match=r"report_to includes 'wandbb', which is not a logging backend; did you "):
        check_report_to(["wandbb"], known_backends=BACKEND_PACKAGES)
    check_report_to(["wandbb"])  # without the list of backends, an unknown name is left to transformers


def test_the_training_script_checks_report_to_before_loading(uninstalled):
    from trb_trl.scripts.trb_distill import check_logging_backends

    uninstalled("trackio")
    with pytest.raises(ValueError, match="pip install trackio"):
        check_logging_backends(SimpleNamespace(report_to=["trackio"]))


def test_the_training_script_checks_report_to_first(uninstalled):
    """`main` checks the backends before anything else (datasets, models): here nothing else is even given."""
    from trb_trl.scripts.trb_distill import main

    uninstalled("trackio")
    with pytest.raises(ReportToError):
        main(SimpleNamespace(trainer="trb"), SimpleNamespace(report_to=["trackio"]), None, None)
