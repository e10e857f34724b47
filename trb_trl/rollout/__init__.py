"""Where rollout prefixes come from: one `LogitsProcessor` per warmup policy, the teacher stepper they share, and
the per-token statistics they report.

- `blending.py`: the trust-region blend mu = pi_S^(1-beta) pi_T^beta and its beta* (pure tensor code).
- `teacher.py`: the teacher decoding next to the student (own KV cache, positions, ZeRO-3 attach).
- `teacher_guided.py`: what teacher-guided processors share (vocabulary, stop alignment, finished rows, records).
- `trust_region.py`: TRB and fixed-epsilon blending. `teacher_injection.py`: SKD. `temperature.py`: temperature
  warmup.
- `teacher_prefix.py`: teacher-generated prefixes (TrOPD's off-policy guidance).
- `speculative.py`: the speculative engine, sampling exactly what the trust-region processor samples with the
  student drafting blocks and the teacher verifying each in one forward.
- `statistics.py`: the per-token statistics and their one cross-process reduction per logged step.
- `warpers.py`: `generate`'s sampling warpers, for the code that samples outside `generate`.
"""

from .speculative import SPECULATIVE_METRICS, Drafter, SpeculativeBlendingSampler, StudentDrafter
from .statistics import RolloutStatistics, TokenMetric
from .teacher import TeacherStepper, output_vocab_size
from .teacher_guided import TeacherGuidedProcessor
from .teacher_injection import TEACHER_INJECTION_METRICS, TeacherInjectionProcessor
from .temperature import RolloutTemperatureProcessor
from .trust_region import TRUST_REGION_METRICS, TrustRegionBlendingProcessor


__all__ = [
    "SPECULATIVE_METRICS",
    "TEACHER_INJECTION_METRICS",
    "TRUST_REGION_METRICS",
    "RolloutStatistics",
    "Drafter",
    "RolloutTemperatureProcessor",
    "SpeculativeBlendingSampler",
    "StudentDrafter",
    "TeacherGuidedProcessor",
    "TeacherInjectionProcessor",
    "TeacherStepper",
    "TokenMetric",
    "TrustRegionBlendingProcessor",
    "output_vocab_size",
]
