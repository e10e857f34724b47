"""`report_to`: check, before any model loads, that every logging backend a run asks for is installed.

transformers imports a backend's package only when the trainer is built, after the student and teacher have loaded;
a missing one (`report_to: [wandb]` without wandb) then fails as a traceback. `check_report_to` fails at once, in one
line, looking the packages up with `importlib.util.find_spec` (nothing is imported). Only the standard library is
imported here: `trb-trl train` runs the check before it imports TRL.
"""

import difflib
import importlib.util
import os


# Backend (a `report_to` value, as in transformers' `INTEGRATION_TO_CALLBACK`) -> what it needs: one
# `(modules, pip name)` per package, any of `modules` being importable is enough (transformers' `is_*_available`).
# tests/test_report_to.py checks every backend transformers knows is listed here (kubeflow needs no package: it is
# switched on by its environment).
BACKEND_PACKAGES: dict[str, tuple[tuple[tuple[str, ...], str], ...]] = {
    "azure_ml": ((("azureml.core",), "azureml-core"),),
    "clearml": ((("clearml",), "clearml"),),
    "codecarbon": ((("codecarbon",), "codecarbon"),),
    "comet_ml": ((("comet_ml",), "comet-ml"),),
    "dagshub": ((("dagshub",), "dagshub"), (("mlflow",), "mlflow")),
    "dvclive": ((("dvclive",), "dvclive"),),
    "flyte": ((("flytekit",), "flytekit"), (("flytekitplugins.deck",), "flytekitplugins-deck-standard")),
    "kubeflow": (),
    "mlflow": ((("mlflow",), "mlflow"),),
    "neptune": ((("neptune",), "neptune"),),
    "swanlab": ((("swanlab",), "swanlab"),),
    "tensorboard": ((("tensorboard", "tensorboardX"), "tensorboard"),),
    "trackio": ((("trackio",), "trackio"),),
    "wandb": ((("wandb",), "wandb"),),
}


class ReportToError(ValueError):
    """An unknown or uninstalled `report_to` backend; the message is one line."""


def report_to_backends(value) -> list[str]:
    """The backends a `report_to` value (a string or a list, as in a recipe or `TrainingArguments`) names.

    `"none"` (or `None`) names none; `"all"` names none either, since transformers then uses only what is installed.
    """
    if value is None:
        return []
    values = [value] if isinstance(value, str) else [str(item) for item in value]
    if values in (["none"], ["all"]):
        return []
    return values


def _installed(modules: tuple[str, ...]) -> bool:
    for module in modules:
        try:
            if importlib.util.find_spec(module) is not None:
                return True
        except (ImportError, ValueError):  # a dotted name whose parent is missing
            continue
    return False


def _quoted(names) -> str:
    names = [repr(name) for name in names]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def check_report_to(value, known_backends=None) -> None:
    """Raise `ReportToError` if a backend of `report_to` is unknown or its package is not installed.

    `known_backends`: the backends transformers accepts (its `INTEGRATION_TO_CALLBACK`); `None` skips the unknown-name
    check (names missing from `BACKEND_PACKAGES` are then not checked at all).
    """
    backends = report_to_backends(value)
    if known_backends is not None:
        known = sorted(known_backends)
        for backend in backends:
            if backend not in known:
                close = difflib.get_close_matches(backend, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ReportToError(
                    f"report_to includes {backend!r}, which is not a logging backend{hint} (valid: "
                    f"{', '.join(known)}; or 'all', 'none')"
                )
    missing_backends, missing_packages = [], []
    for backend in dict.fromkeys(backends):
        for modules, package in BACKEND_PACKAGES.get(backend, ()):
            if not _installed(modules):
                missing_backends.append(backend)
                missing_packages.append(package)
    if missing_packages:
        backends = list(dict.fromkeys(missing_backends))
        packages = list(dict.fromkeys(missing_packages))
        one = len(packages) == 1
        raise ReportToError(
            f"report_to includes {_quoted(backends)} but the package{'' if one else 's'} {_quoted(packages)} "
            f"{'is' if one else 'are'} not installed: pip install {' '.join(packages)} (or remove "
            f"{'it' if len(backends) == 1 else 'them'} from report_to)"
        )


_wandb_dir_we_set: str | None = None


def put_wandb_runs_under(output_dir: str) -> None:
    """Point W&B's run directory at `output_dir` (the W&B callback reads `WANDB_DIR`), unless the user set it."""
    global _wandb_dir_we_set
    if os.environ.get("WANDB_DIR") not in (None, _wandb_dir_we_set):
        return
    os.makedirs(output_dir, exist_ok=True)
    _wandb_dir_we_set = os.environ["WANDB_DIR"] = os.path.abspath(output_dir)
