"""Per-token rollout statistics of one process, reduced over processes once per logged step.

A rollout can run a different number of `generate` calls on each rank (TRL's tool loop calls the rollout hook once
per tool round), so a collective per rollout would pair up differently across ranks and hang. Statistics are folded
into running sums here, with no communication, and [`RolloutStatistics.reduce`] runs one `gather` when the trainer
logs, a point every rank reaches the same number of times.
"""

import math

import torch


# Columns of the vector each process contributes to the gather.
_COLUMNS = (
    "tokens",
    "beta_sum",
    "beta_min",
    "beta_max",
    "teacher_tokens",
    "kl_to_student_sum",
    "kl_to_student_max",
    "kl_to_teacher_sum",
    "teacher_invalid_tokens",
    "teacher_seconds",
    "steps",
)


class RolloutStatistics:
    """Running sums of the per-token blend statistics since the last reduction, plus a sample of beta values.

    Args:
        device (`torch.device`):
            Where the sums live (the accelerator's device, so folding a rollout in needs no host sync).
        histogram_samples (`int`, *optional*, defaults to `0`):
            How many beta values this process keeps for a histogram (0: none). They are drawn with a generator of
            their own, so keeping them does not move the training RNG.
        seed (`int`, *optional*, defaults to `0`):
            Seed of that generator.
    """

    def __init__(self, device: torch.device, *, histogram_samples: int = 0, seed: int = 0):
        self.device = torch.device(device)
        self.histogram_samples = histogram_samples
        self._generator = torch.Generator(device="cpu").manual_seed(seed) if histogram_samples else None
        self.reset()

    def reset(self) -> None:
        zero = torch.zeros((), device=self.device)
        self._sums = {name: zero.clone() for name in ("tokens", "beta_sum", "teacher_tokens")}
        self._sums.update({name: zero.clone() for name in ("kl_to_student_sum", "kl_to_teacher_sum")})
        self._sums["teacher_invalid_tokens"] = zero.clone()
        self._beta_min = torch.full((), math.inf, device=self.device)
        self._beta_max = torch.full((), -math.inf, device=self.device)
        self._kl_to_student_max = torch.full((), -math.inf, device=self.device)
        self._teacher_seconds = 0.0
        self._steps: set[int] = set()
        self._beta_sample: list[torch.Tensor] = []

    @property
    def pending(self) -> bool:
        """Whether a rollout was folded in since the last reduction."""
        return bool(self._steps)

    def add(self, statistics: dict[str, torch.Tensor], *, teacher_seconds: float, step: int) -> None:
        """Fold in one `generate` call's per-token statistics (see `TrustRegionBlendingProcessor.statistics`)."""
        self._steps.add(step)
        self._teacher_seconds += teacher_seconds
        beta = statistics["beta"].to(self.device)
        if beta.numel() == 0:
            return
        kl_to_student = statistics["kl_to_student"].to(self.device)
        self._sums["tokens"] += beta.numel()
        self._sums["beta_sum"] += beta.sum()
        self._sums["teacher_tokens"] += (beta >= 1.0).sum()
        self._sums["kl_to_student_sum"] += kl_to_student.sum()
        self._sums["kl_to_teacher_sum"] += statistics["kl_to_teacher"].to(self.device).sum()
        self._sums["teacher_invalid_tokens"] += (~statistics["teacher_valid"].to(self.device)).sum()
        self._beta_min = torch.minimum(self._beta_min, beta.min())
        self._beta_max = torch.maximum(self._beta_max, beta.max())
        self._kl_to_student_max = torch.maximum(self._kl_to_student_max, kl_to_student.max())
        if self.histogram_samples:
            keep = torch.randperm(beta.numel(), generator=self._generator)[: self.histogram_samples]
            self._beta_sample.append(beta[keep.to(beta.device)])

    def local_vector(self) -> torch.Tensor:
        """This process's contribution to the gather, in `_COLUMNS` order."""
        s = self._sums
        values = [
            s["tokens"],
            s["beta_sum"],
            self._beta_min,
            self._beta_max,
            s["teacher_tokens"],
            s["kl_to_student_sum"],
            self._kl_to_student_max,
            s["kl_to_teacher_sum"],
            s["teacher_invalid_tokens"],
            torch.tensor(self._teacher_seconds, device=self.device),
            torch.tensor(float(len(self._steps)), device=self.device),
        ]
        return torch.stack([v.float() for v in values])

    def _local_beta_sample(self) -> torch.Tensor:
        """Exactly `histogram_samples` values (NaN-padded), so every process contributes the same shape."""
        sample = torch.cat(self._beta_sample) if self._beta_sample else torch.zeros(0, device=self.device)
        if sample.numel() > self.histogram_samples:
            keep = torch.randperm(sample.numel(), generator=self._generator)[: self.histogram_samples]
            sample = sample[keep.to(sample.device)]
        padding = torch.full((self.histogram_samples - sample.numel(),), math.nan, device=self.device)
        return torch.cat([sample.to(self.device), padding])

    def reduce(self, gather) -> tuple[dict[str, float], torch.Tensor | None]:
        """One collective over processes (`gather`, e.g. `accelerator.gather`): the `trb/*` metrics, and the beta
        sample of every process when `histogram_samples` is set. Every process must call it; then resets."""
        local = self.local_vector()
        if self.histogram_samples:
            local = torch.cat([local, self._local_beta_sample()])
        gathered = gather(local[None]).view(-1, local.numel())
        self.reset()
        columns = dict(zip(_COLUMNS, gathered[:, : len(_COLUMNS)].T, strict=True))
        steps = max(columns["steps"].max().item(), 1.0)
        metrics = {"trb/rollout_teacher_seconds": (columns["teacher_seconds"].mean() / steps).item()}
        tokens = columns["tokens"].sum().item()
        if tokens > 0:
            metrics.update(
                {
                    "trb/beta/mean": columns["beta_sum"].sum().item() / tokens,
                    "trb/beta/min": columns["beta_min"].min().item(),
                    "trb/beta/max": columns["beta_max"].max().item(),
                    "trb/teacher_fraction": columns["teacher_tokens"].sum().item() / tokens,
                    "trb/kl_to_student/mean": columns["kl_to_student_sum"].sum().item() / tokens,
                    "trb/kl_to_student/max": columns["kl_to_student_max"].max().item(),
                    "trb/kl_to_teacher/mean": columns["kl_to_teacher_sum"].sum().item() / tokens,
                    "trb/teacher_invalid_fraction": columns["teacher_invalid_tokens"].sum().item() / tokens,
                }
            )
        sample = None
        if self.histogram_samples:
            sample = gathered[:, len(_COLUMNS) :].reshape(-1)
            sample = sample[~torch.isnan(sample)].cpu()
        return metrics, sample
