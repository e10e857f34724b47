"""Several teachers behind one student (multi-teacher OPD, MOPD): which teacher each row belongs to, how the teachers
are loaded, and where they live.

Each training row names its teacher in a `teacher_id` column (rows without one, or with `None`, go to the default
teacher). A row is guided and scored by its own teacher only, never by an average. [`TeacherSet`] holds the prepared
teachers, each with its stop ids and stop alignment (teachers may stop on different ids), and with `teacher_offload`
keeps them in CPU memory and moves them to the accelerator only while they are needed ([`TeacherSet.resident`]).
"""

import contextlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .stop_alignment import StopAlignment


TEACHER_ID_COLUMN = "teacher_id"


def teacher_indices(teacher_ids: Iterable, names: Sequence[str], default: str) -> list[int]:
    """Each row's teacher as an index into `names` (`None` or a missing id: `default`). An id that names no teacher is
    a `ValueError` that lists the teachers."""
    position = {name: index for index, name in enumerate(names)}
    indices = []
    for teacher_id in teacher_ids:
        key = default if teacher_id is None or teacher_id == "" else str(teacher_id)
        if key not in position:
            raise ValueError(
                f"A row's {TEACHER_ID_COLUMN} is {teacher_id!r}, which is not one of teacher_models ({list(names)}). "
                f"Fix the dataset's {TEACHER_ID_COLUMN} column, or add that teacher to teacher_models."
            )
        indices.append(position[key])
    return indices


def check_dataset_teacher_ids(dataset, names: Sequence[str], default: str, *, split: str = "train") -> None:
    """Fail before any model loads when a row of `dataset` names an unknown teacher (datasets without a `teacher_id`
    column route every row to `default`)."""
    if dataset is None:
        return
    columns = getattr(dataset, "column_names", None)
    if not columns or TEACHER_ID_COLUMN not in columns:
        return
    try:
        teacher_indices(set(dataset[TEACHER_ID_COLUMN]), names, default)
    except ValueError as error:
        raise ValueError(f"The {split} dataset: {error}") from None


def teacher_load_kwargs(args, name: str) -> dict:
    """`from_pretrained` kwargs of teacher `name`: `teacher_model_init_kwargs`, its own `teacher_models_init_kwargs`
    over them, and TRL's treatment of a string teacher (dtype by name, revision, no device map when distributed,
    `trust_remote_code`)."""
    kwargs = {**(args.teacher_model_init_kwargs or {}), **((args.teacher_models_init_kwargs or {}).get(name) or {})}
    dtype = kwargs.get("dtype")
    kwargs["dtype"] = dtype if dtype in ("auto", None) or isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    if args.teacher_model_revision is not None:
        kwargs.setdefault("revision", args.teacher_model_revision)
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return kwargs


@dataclass
class TeacherSet:
    """The prepared teachers (`{name: model}`, in `teacher_models` order) and what each stops on.

    `offload_device`: with `teacher_offload`, where an idle teacher waits (CPU); `compute_device`: where one runs.
    """

    models: dict[str, torch.nn.Module]
    stop_ids: dict[str, list[int]]
    alignments: dict[str, StopAlignment | None]
    default: str
    compute_device: torch.device | None = None
    offload_device: torch.device | None = None
    resident_names: set[str] = field(default_factory=set)

    @property
    def names(self) -> list[str]:
        return list(self.models)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def indices(self, teacher_ids: Iterable) -> list[int]:
        return teacher_indices(teacher_ids, self.names, self.default)

    def offload_all(self) -> None:
        """Move every teacher to the offload device (a no-op without offload)."""
        if self.offload_device is None:
            return
        for model in self.models.values():
            model.to(self.offload_device)
        self.resident_names.clear()

    @contextlib.contextmanager
    def resident(self, names: Iterable[str]):
        """Within the block, the named teachers are on the compute device (with offload; otherwise they always are)
        and the others off it; on exit they go back."""
        names = [name for name in self.names if name in set(names)]
        if self.offload_device is None:
            yield
            return
        moved = [name for name in names if name not in self.resident_names]
        for name in moved:
            self.models[name].to(self.compute_device)
            self.resident_names.add(name)
        try:
            yield
        finally:
            for name in moved:
                self.models[name].to(self.offload_device)
                self.resident_names.discard(name)


def slice_rows(inputs: Mapping, rows: torch.Tensor, num_rows: int) -> dict:
    """The micro-batch `inputs` restricted to `rows` (every tensor whose first dimension is the batch)."""
    sliced = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == num_rows:
            sliced[key] = value[rows.to(value.device)]
        else:
            sliced[key] = value
    return sliced
