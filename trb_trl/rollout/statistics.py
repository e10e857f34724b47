"""Per-token rollout statistics of one process, reduced over processes once per logged step.

A rollout can run a different number of `generate` calls on each rank (TRL's tool loop calls the rollout hook once
per tool round), so a collective per rollout would pair up differently across ranks and hang. Statistics are folded
into running sums here, with no communication, and [`RolloutStatistics.reduce`] runs one `gather` when the trainer
logs, a point every rank reaches the same number of times. Which statistics a policy reports is data
([`TokenMetric`]), so every policy shares this one reduction.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenMetric:
    """One logged number: `reduction` ("mean", "min" or "max") over rollout tokens of `value(statistics)`, a
    per-token tensor computed from a processor's `statistics()`."""

    name: str
    reduction: str
    value: Callable[[dict[str, torch.Tensor]], torch.Tensor]


class RolloutStatistics:
    """Running reductions of per-token rollout statistics since the last reduction, plus an optional sample of one
    per-token value for a histogram.

    Args:
        device (`torch.device`):
            Where the sums live (the accelerator's device, so folding a rollout in needs no host sync).
        metrics (`Sequence[TokenMetric]`):
            What to report, logged as `f"{prefix}/{metric.name}"` once any token was seen.
        prefix (`str`):
            Metric prefix of the policy (`"trb"`, `"skd"`); `f"{prefix}/rollout_teacher_seconds"` is always logged.
        histogram (`Callable`, *optional*):
            The per-token value to sample for a histogram.
        histogram_samples (`int`, *optional*, defaults to `0`):
            How many values this process keeps for the histogram (0: none). They are drawn with a generator of their
            own, so keeping them does not move the training RNG.
        seed (`int`, *optional*, defaults to `0`):
            Seed of that generator.
        suffix (`str`, *optional*, defaults to `""`):
            Appended to every metric name (`"/<teacher>"`: one teacher's rows of a multi-teacher run).
    """

    def __init__(
        self,
        device: torch.device,
        metrics: Sequence[TokenMetric],
        *,
        prefix: str,
        histogram: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
        histogram_samples: int = 0,
        seed: int = 0,
        suffix: str = "",
    ):
        for metric in metrics:
            if metric.reduction not in ("mean", "min", "max"):
                raise ValueError(f"Unknown reduction {metric.reduction!r} of metric {metric.name!r}.")
        self.device = torch.device(device)
        self.metrics = tuple(metrics)
        self.prefix = prefix
        self.suffix = suffix
        self.histogram = histogram
        self.histogram_samples = histogram_samples if histogram is not None else 0
        self._generator = torch.Generator(device="cpu").manual_seed(seed) if self.histogram_samples else None
        self.reset()

    def reset(self) -> None:
        initial = {"mean": 0.0, "min": math.inf, "max": -math.inf}
        self._tokens = torch.zeros((), device=self.device)
        self._values = [torch.full((), initial[m.reduction], device=self.device) for m in self.metrics]
        self._teacher_seconds = 0.0
        self._steps: set[int] = set()
        self._sample: list[torch.Tensor] = []

    @property
    def pending(self) -> bool:
        """Whether a rollout was folded in since the last reduction."""
        return bool(self._steps)

    def add(self, statistics: dict[str, torch.Tensor], *, teacher_seconds: float, step: int) -> None:
        """Fold in one `generate` call's per-token statistics (a processor's `statistics()`)."""
        self._steps.add(step)
        self._teacher_seconds += teacher_seconds
        statistics = {name: value.to(self.device) for name, value in statistics.items()}
        num_tokens = next(iter(statistics.values())).numel() if statistics else 0
        if num_tokens == 0:
            return
        self._tokens += num_tokens
        for i, metric in enumerate(self.metrics):
            value = metric.value(statistics).float()
            if metric.reduction == "mean":
                self._values[i] = self._values[i] + value.sum()
            elif metric.reduction == "min":
                self._values[i] = torch.minimum(self._values[i], value.min())
            else:
                self._values[i] = torch.maximum(self._values[i], value.max())
        if self.histogram_samples:
            value = self.histogram(statistics).float()
            keep = torch.randperm(value.numel(), generator=self._generator)[: self.histogram_samples]
            self._sample.append(value[keep.to(value.device)])

    def local_vector(self) -> torch.Tensor:
        """This process's contribution to the gather: tokens, one column per metric, teacher seconds, steps."""
        values = [
            self._tokens,
            *self._values,
            torch.tensor(self._teacher_seconds, device=self.device),
            torch.tensor(float(len(self._steps)), device=self.device),
        ]
        return torch.stack([v.float() for v in values])

    def _local_sample(self) -> torch.Tensor:
        """Exactly `histogram_samples` values (NaN-padded), so every process contributes the same shape."""
        sample = torch.cat(self._sample) if self._sample else torch.zeros(0, device=self.device)
        if sample.numel() > self.histogram_samples:
            keep = torch.randperm(sample.numel(), generator=self._generator)[: self.histogram_samples]
            sample = sample[keep.to(sample.device)]
        padding = torch.full((self.histogram_samples - sample.numel(),), math.nan, device=self.device)
        return torch.cat([sample.to(self.device), padding])

    def reduce(self, gather) -> tuple[dict[str, float], torch.Tensor | None]:
        """One collective over processes (`gather`, e.g. `accelerator.gather`): the metrics, and the histogram sample
        of every process when `histogram_samples` is set. Every process must call it; then resets."""
        local = self.local_vector()
        width = local.numel()
        if self.histogram_samples:
            local = torch.cat([local, self._local_sample()])
        gathered = gather(local[None]).view(-1, local.numel())
        self.reset()
        tokens_column, *metric_columns = gathered[:, : width - 2].T
        seconds_column, steps_column = gathered[:, width - 2 : width].T
        steps = max(steps_column.max().item(), 1.0)
        metrics = {f"{self.prefix}/rollout_teacher_seconds{self.suffix}": (seconds_column.mean() / steps).item()}
        tokens = tokens_column.sum().item()
        if tokens > 0:
            for metric, column in zip(self.metrics, metric_columns, strict=True):
                if metric.reduction == "mean":
                    value = column.sum().item() / tokens
                elif metric.reduction == "min":
                    value = column.min().item()
                else:
                    value = column.max().item()
                metrics[f"{self.prefix}/{metric.name}{self.suffix}"] = value
        sample = None
        if self.histogram_samples:
            sample = gathered[:, width:].reshape(-1)
            sample = sample[~torch.isnan(sample)].cpu()
        return metrics, sample
