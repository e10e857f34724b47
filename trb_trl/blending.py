"""Deprecated location of the trust-region blend: it lives in `trb_trl.rollout.blending` (where rollout prefixes come
from). `trb_trl.trust_region_blend` and `trb_trl.BlendResult` are unchanged."""

import warnings

from .rollout.blending import BlendResult, trust_region_blend


__all__ = ["BlendResult", "trust_region_blend"]

warnings.warn(
    "trb_trl.blending moved to trb_trl.rollout.blending; import from there (or use trb_trl.trust_region_blend).",
    FutureWarning,
    stacklevel=2,
)
