"""What every demo task provides: problems that write their own worked solutions and check completions exactly,
disjoint problem splits, and the task's two models and run defaults."""

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from transformers import PreTrainedTokenizerFast

from ...testing import build_word_tokenizer
from ..models import PretrainConfig


class Problem(Protocol):
    """One problem of a demo task. `solution` is the reference completion (without the stop token);
    `completion_length` is the rollout budget in tokens, stop token included."""

    @property
    def prompt(self) -> str: ...

    @property
    def solution(self) -> str: ...

    @property
    def completion_length(self) -> int: ...

    def worked_solution(self, rng: random.Random | None = None, mistake_probability: float = 0.0) -> str:
        """The solution as written by a model with the task's typical mistake made at rate `mistake_probability`."""

    def is_correct(self, completion: str, *, stopped: bool = True) -> bool:
        """Exact check of a decoded completion (special tokens stripped) that did (`stopped`) or did not stop."""


@dataclass(frozen=True)
class ProblemSplits:
    """Disjoint problem sets: `train` (supervised pretraining and distillation prompts), `dev` (early stopping of the
    pretraining), and `eval` (held-out: only ever used to measure accuracy)."""

    train: list
    dev: list
    eval: list


@dataclass(frozen=True)
class TaskDefaults:
    """What a plain `trb-trl demo --task NAME` runs (and `--quick`), where the flags leave it open."""

    steps: int
    eval_every: int
    eval_size: int
    quick_steps: int
    quick_eval_size: int
    probe_lengths: tuple[int, ...] = ()


@dataclass(frozen=True)
class DemoTask:
    """A demo task: its problems, tokenizer vocabulary, the teacher's and the weak student's pretraining, and its run
    defaults.

    `cache_fields` identifies the problems (and everything else that shapes the pretraining data) in the cache key of
    the two models, so models trained on one task or split are never loaded for another."""

    name: str
    description: str
    words: tuple[str, ...]
    make_splits: Callable[[], ProblemSplits]
    cache_fields: dict
    teacher: PretrainConfig
    student: PretrainConfig
    eval_pool: int
    defaults: TaskDefaults
    details: dict = field(default_factory=dict)  # recorded in report.json["settings"]["task"]
    eval_batch_size: int = 256

    def tokenizer(self) -> PreTrainedTokenizerFast:
        """Word-level tokenizer over the task's symbols plus the Qwen-style specials."""
        return build_word_tokenizer(list(self.words))

    def splits(self) -> ProblemSplits:
        """The task's splits (deterministic; the tasks cache them, so callers must not modify the lists)."""
        return self.make_splits()


def draw_distinct(draw, total: int, key=lambda problem: problem) -> list:
    """`total` problems from `draw()` with no two equal under `key`, in the order drawn."""
    seen, problems = set(), []
    while len(problems) < total:
        problem = draw()
        if key(problem) not in seen:
            seen.add(key(problem))
            problems.append(problem)
    return problems


def split_drawn(problems: list, *, num_train: int, num_dev: int, num_eval: int) -> ProblemSplits:
    """The evaluation set is drawn first, so it does not change when the training pool grows."""
    return ProblemSplits(
        eval=problems[:num_eval],
        dev=problems[num_eval : num_eval + num_dev],
        train=problems[num_eval + num_dev : num_eval + num_dev + num_train],
    )
