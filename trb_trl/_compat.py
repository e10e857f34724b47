"""The one place that imports from TRL, including the private hooks we override.

`TRBDistillTrainer` overrides `DistillationTrainer._generate_single_turn`, a private hook that moved several times
within TRL 1.x (1.10 generated in `_generate_with_model`). We test against TRL 1.16 and refuse other versions rather
than silently training without the trust region.
"""

from importlib.metadata import version

from packaging.version import Version


TESTED_TRL_RANGE = (Version("1.16.0"), Version("1.17.0"))
_installed = Version(version("trl"))
if not TESTED_TRL_RANGE[0] <= _installed < TESTED_TRL_RANGE[1]:
    raise ImportError(
        f"trb_trl supports trl>={TESTED_TRL_RANGE[0]},<{TESTED_TRL_RANGE[1]} (found {_installed}): it overrides "
        "DistillationTrainer._generate_single_turn, whose contract changes between TRL releases. Install "
        "'trl>=1.16,<1.17'."
    )

from trl import (  # noqa: E402
    DatasetMixtureConfig,
    DistillationConfig,
    DistillationTrainer,
    ModelConfig,
    ScriptArguments,
    TrlParser,
    get_dataset,
    get_peft_config,
    get_quantization_config,
)
from trl.distributed import DistributedBackend  # noqa: E402


# The rollout hook `TRBDistillTrainer` wraps; checked at import so a TRL refactor fails loudly, not silently.
if not hasattr(DistillationTrainer, "_generate_single_turn"):
    raise ImportError("trl.DistillationTrainer has no `_generate_single_turn`; this TRL version is not supported.")

__all__ = [
    "DistributedBackend",
    "DatasetMixtureConfig",
    "DistillationConfig",
    "DistillationTrainer",
    "ModelConfig",
    "ScriptArguments",
    "TrlParser",
    "get_dataset",
    "get_peft_config",
    "get_quantization_config",
]
