"""Trust-Region behaviour Blending (TRB) for on-policy distillation, as a drop-in TRL trainer.

The public names are imported lazily (PEP 562), so `import trb_trl` is instant and the pure API
(`trust_region_blend` and the rollout processors) works without TRL. Only the config/trainer pairs
(`TRBDistillConfig`/`TRBDistillTrainer`, `TrOPDConfig`/`TrOPDTrainer`) need the tested TRL range, and importing
them raises a clear `ImportError` otherwise.
"""

from typing import TYPE_CHECKING

from ._lazy import lazy_attributes


__version__ = "0.1.0"

# Public name -> the submodule that defines it.
_LAZY_ATTRIBUTES = {
    "BlendResult": ".rollout.blending",
    "trust_region_blend": ".rollout.blending",
    "TrustRegionBlendingProcessor": ".rollout.trust_region",
    "TeacherInjectionProcessor": ".rollout.teacher_injection",
    "RolloutTemperatureProcessor": ".rollout.temperature",
    "SpeculativeBlendingSampler": ".rollout.speculative",
    "TRBDistillConfig": ".trb_distill_config",
    "TRBDistillTrainer": ".trb_distill_trainer",
    "TrOPDConfig": ".tropd_config",
    "TrOPDTrainer": ".tropd_trainer",
}

__all__ = [
    "BlendResult",
    "RolloutTemperatureProcessor",
    "SpeculativeBlendingSampler",
    "TRBDistillConfig",
    "TRBDistillTrainer",
    "TeacherInjectionProcessor",
    "TrOPDConfig",
    "TrOPDTrainer",
    "TrustRegionBlendingProcessor",
    "trust_region_blend",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these come from `__getattr__`
    from .rollout.blending import BlendResult, trust_region_blend
    from .rollout.speculative import SpeculativeBlendingSampler
    from .rollout.teacher_injection import TeacherInjectionProcessor
    from .rollout.temperature import RolloutTemperatureProcessor
    from .rollout.trust_region import TrustRegionBlendingProcessor
    from .trb_distill_config import TRBDistillConfig
    from .trb_distill_trainer import TRBDistillTrainer
    from .tropd_config import TrOPDConfig
    from .tropd_trainer import TrOPDTrainer


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY_ATTRIBUTES)
