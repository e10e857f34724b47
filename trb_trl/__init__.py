"""Trust-Region behaviour Blending (TRB) for on-policy distillation, as a drop-in TRL trainer."""

from .blending import BlendResult, trust_region_blend
from .logits_processor import TrustRegionBlendingProcessor


__version__ = "0.1.0"

__all__ = ["BlendResult", "TrustRegionBlendingProcessor", "trust_region_blend"]
