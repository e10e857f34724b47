"""The repository's scripts/ imported as modules, for the tests that call their functions."""

import importlib.util
from pathlib import Path


def load_script(name: str):
    """Import `scripts/<name>.py` as a module: the scripts are no package, and their tests call their functions."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
