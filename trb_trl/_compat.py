"""The one place that imports from TRL, including the private hooks we override.

`TRBDistillTrainer` overrides `DistillationTrainer._generate_single_turn`, a private hook that moved several times
within TRL 1.x (1.10 generated in `_generate_with_model`), and, for a student and teacher with different stop tokens,
substitutes the divergence function that `DistillationTrainer._compute_loss` calls. We test against TRL 1.16 and
refuse other versions rather than silently training without the trust region or the stop alignment.
"""

import contextlib
import dataclasses
import inspect
from importlib.metadata import version

import torch
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
    SFTConfig,
    SFTTrainer,
    TrlParser,
    get_dataset,
    get_peft_config,
    get_quantization_config,
    is_conversational,
)
from trl.distributed import DistributedBackend  # noqa: E402
from trl.models import prepare_deepspeed  # noqa: E402
from trl.models.utils import unwrap_model_for_generation  # noqa: E402
from trl.trainer import distillation_trainer as _distillation_module  # noqa: E402
from trl.trainer.utils import RepeatSampler, create_model_from_path, maybe_gather_lm_head_ctx  # noqa: E402

from .losses.drop_in import TRL_DIVERGENCE_PARAMETERS  # noqa: E402


# What this package relies on in TRL's private API, by name and parameter, checked at import (`inspect.signature`,
# not bytecode): a renamed hook or keyword fails here, in one sentence, not at the first rollout or loss step.
_TESTED = f"trb_trl is tested with trl {TESTED_TRL_RANGE[0]}"
# `_chunked_divergence_loss`'s parameters our loss drop-ins read; TRL's call is bound to these names, so a parameter
# TRL adds later (left at its default) does not break the drop-ins.
DIVERGENCE_PARAMETERS = TRL_DIVERGENCE_PARAMETERS  # written once, in losses/drop_in.py
_DIVERGENCE_FUNCTION = "_chunked_divergence_loss"
_REQUIRED_SIGNATURES = {
    # what we override or call -> the parameters we pass or receive, by name
    "DistillationTrainer._generate_single_turn": (
        getattr(DistillationTrainer, "_generate_single_turn", None),
        ("prompt_ids", "images", "multimodal_fields", "has_tool_images"),
    ),
    "DistillationTrainer._compute_loss": (
        getattr(DistillationTrainer, "_compute_loss", None),
        ("unwrapped_student", "inputs", "num_items_in_batch"),
    ),
    f"trl.trainer.distillation_trainer.{_DIVERGENCE_FUNCTION}": (
        getattr(_distillation_module, _DIVERGENCE_FUNCTION, None),
        DIVERGENCE_PARAMETERS,
    ),
    "RepeatSampler": (
        RepeatSampler,
        ("data_source", "mini_repeat_count", "batch_size", "repeat_count", "shuffle", "seed"),
    ),
}


def check_private_api(required=None) -> None:
    """Raise ImportError, naming what changed and the TRL version tested, when a private TRL function we override or
    call is missing or no longer takes a parameter we use by name."""
    for name, (function, parameters) in (required or _REQUIRED_SIGNATURES).items():
        if function is None:
            raise ImportError(f"{_TESTED}; the installed trl {_installed} has no `{name}`. Install 'trl>=1.16,<1.17'.")
        accepted = inspect.signature(function).parameters
        missing = [parameter for parameter in parameters if parameter not in accepted]
        if missing:
            raise ImportError(
                f"{_TESTED}; in the installed trl {_installed}, `{name}` no longer takes {missing}. Install "
                "'trl>=1.16,<1.17'."
            )


check_private_api()
# `_compute_loss` looks its divergence function up by this module-level name at call time (a name, not a signature:
# the one bytecode check left).
if _DIVERGENCE_FUNCTION not in DistillationTrainer._compute_loss.__code__.co_names:
    raise ImportError(
        f"{_TESTED}; the installed trl {_installed}'s DistillationTrainer._compute_loss no longer calls "
        f"`{_DIVERGENCE_FUNCTION}`, so the stop-aligned and top-k losses could not be applied. Install 'trl>=1.16,<1.17'."
    )
# SFT warmup reproduces the rows of the first OPD steps with the sampler `_get_train_sampler` builds.
if "RepeatSampler" not in DistillationTrainer._get_train_sampler.__code__.co_names:
    raise ImportError(
        f"{_TESTED}; the installed trl {_installed}'s DistillationTrainer._get_train_sampler no longer builds a "
        "`RepeatSampler`, so SFT warmup could not reproduce the rows of the first OPD steps. Install 'trl>=1.16,<1.17'."
    )


# transformers renamed `gradient_checkpointing(_kwargs)` to `activation_checkpointing(_kwargs)` (the old names warn,
# and go in v6). Whether the installed TrainingArguments has the new field decides, not its version number.
HAS_ACTIVATION_CHECKPOINTING = "activation_checkpointing" in {f.name for f in dataclasses.fields(DistillationConfig)}
_CHECKPOINTING_SPELLINGS = (
    ("gradient_checkpointing", "activation_checkpointing"),
    ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
)


def resolve_checkpointing_spelling(args) -> None:
    """Accept both spellings of the checkpointing switch on any transformers, without a deprecation warning: before
    TrainingArguments' `__post_init__` runs, the value set under either name is moved to the name the installed
    version reads (TRL's configs default `gradient_checkpointing` to True, which would otherwise warn every run)."""
    for old, new in _CHECKPOINTING_SPELLINGS:
        if HAS_ACTIVATION_CHECKPOINTING:
            if getattr(args, new) is None and getattr(args, old) is not None:
                setattr(args, new, getattr(args, old))
                setattr(args, old, None)
        elif getattr(args, new, None) is not None:  # an alias field declared by the config (older transformers)
            setattr(args, old, getattr(args, new))


def _is_default(value, default) -> bool:
    """`value` equals the parameter's default (an equal float read from a config counts; a tensor never does)."""
    if value is default:
        return True
    if isinstance(value, torch.Tensor) or isinstance(default, torch.Tensor):
        return False
    try:
        return bool(value == default)
    except (TypeError, ValueError, RuntimeError):
        return False


def bound_by_name(function):
    """`function` (taking the [`DIVERGENCE_PARAMETERS`] by name) callable the way TRL calls `_chunked_divergence_loss`:
    TRL's positional and keyword arguments are bound to its signature, then passed by name. A parameter TRL adds is
    ignored at its default; set to anything else it is an error, since the drop-in would not honour it."""
    signature = inspect.signature(getattr(_distillation_module, _DIVERGENCE_FUNCTION))

    def call(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs)
        arguments.apply_defaults()
        unknown = [
            name
            for name, value in arguments.arguments.items()
            if name not in DIVERGENCE_PARAMETERS and not _is_default(value, signature.parameters[name].default)
        ]
        if unknown:
            raise TypeError(
                f"{_TESTED}; the installed trl {_installed} passes {unknown} to `{_DIVERGENCE_FUNCTION}`, which "
                f"{getattr(function, '__name__', function)} does not implement. Install 'trl>=1.16,<1.17'."
            )
        return function(**{name: arguments.arguments[name] for name in DIVERGENCE_PARAMETERS})

    return call


@contextlib.contextmanager
def divergence_function_replaced(function):
    """Make `DistillationTrainer._compute_loss` call `function` (taking TRL's `_chunked_divergence_loss` parameters
    by name, see [`bound_by_name`]) in place of TRL's divergence for the duration of the block; everything else in
    the loss stays TRL's."""
    original = getattr(_distillation_module, _DIVERGENCE_FUNCTION)
    setattr(_distillation_module, _DIVERGENCE_FUNCTION, bound_by_name(function))
    try:
        yield
    finally:
        setattr(_distillation_module, _DIVERGENCE_FUNCTION, original)


__all__ = [
    "DIVERGENCE_PARAMETERS",
    "DistributedBackend",
    "HAS_ACTIVATION_CHECKPOINTING",
    "DatasetMixtureConfig",
    "DistillationConfig",
    "DistillationTrainer",
    "ModelConfig",
    "RepeatSampler",
    "SFTConfig",
    "SFTTrainer",
    "ScriptArguments",
    "TrlParser",
    "bound_by_name",
    "check_private_api",
    "create_model_from_path",
    "divergence_function_replaced",
    "get_dataset",
    "get_peft_config",
    "get_quantization_config",
    "prepare_deepspeed",
    "is_conversational",
    "maybe_gather_lm_head_ctx",
    "resolve_checkpointing_spelling",
    "unwrap_model_for_generation",
]
