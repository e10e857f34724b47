"""One `generate` call whose rows follow different teachers (multi-teacher OPD): one teacher-guided processor per
teacher over its own rows, each with its own teacher KV cache, all stepped in the same decoding step.

`generate` calls each logits processor with the whole batch; [`RoutedProcessor`] hands each teacher's processor the
rows of that teacher (always the same rows, in the same order, so each processor's teacher cache stays aligned with
its rows) and writes their scores back. A teacher with no row in the call gets no processor and runs nothing.
"""

import torch
from transformers import LogitsProcessor


class RoutedProcessor(LogitsProcessor):
    """Route rows to per-teacher processors.

    Args:
        processors (`dict[str, LogitsProcessor]`): one teacher-guided processor per teacher with rows here, built
            for those rows only (their prompt attention mask).
        rows (`dict[str, torch.Tensor]`): each teacher's row indices in the batch, as `(n,)` int64.
    """

    def __init__(self, processors: dict, rows: dict[str, torch.Tensor]):
        if set(processors) != set(rows):
            raise ValueError(f"processors and rows name different teachers: {sorted(processors)} vs {sorted(rows)}.")
        self.processors = processors
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        output = scores.clone()
        for name, processor in self.processors.items():
            rows = self.rows[name].to(scores.device)
            output[rows] = processor(input_ids[rows], scores[rows]).to(output.dtype)
        return output

    def stop_rows_at(self, max_new_tokens: list[int]) -> None:
        for name, processor in self.processors.items():
            processor.stop_rows_at([max_new_tokens[row] for row in self.rows[name].tolist()])

    def attach_to_student(self, student: torch.nn.Module) -> None:
        raise NotImplementedError(
            "Several teachers cannot be stepped from the student's forward (a ZeRO-3 teacher left sharded); set "
            "gather_teacher_for_generation=True."
        )

    def release(self) -> None:
        for processor in self.processors.values():
            processor.release()

    @property
    def teacher_seconds(self) -> float:
        return sum(processor.teacher_seconds for processor in self.processors.values())

    def statistics_by_teacher(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each teacher's per-token statistics (its processor's `statistics()`)."""
        return {name: processor.statistics() for name, processor in self.processors.items()}

    def statistics(self) -> dict[str, torch.Tensor]:
        """Every row's per-token statistics, all teachers together."""
        by_teacher = list(self.statistics_by_teacher().values())
        return {name: torch.cat([stats[name] for stats in by_teacher]) for name in by_teacher[0]}
