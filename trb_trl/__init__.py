"""Trust-Region behaviour Blending (TRB) for on-policy distillation, as a drop-in TRL trainer."""

from .blending import BlendResult, trust_region_blend
from .logits_processor import TrustRegionBlendingProcessor
from .trb_distill_config import TRBDistillConfig
from .trb_distill_trainer import TRBDistillTrainer


__version__ = "0.1.0"

__all__ = [
    "BlendResult",
    "TRBDistillConfig",
    "TRBDistillTrainer",
    "TrustRegionBlendingProcessor",
    "trust_region_blend",
]
