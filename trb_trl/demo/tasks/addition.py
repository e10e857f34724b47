"""`--task addition`: column addition written out digit by digit, with carries.

A problem is two `num_digits`-digit numbers; the prompt spells them out one digit per token, and the solution walks
the columns from the right, writing each column's sum digit and outgoing carry, then the answer:

```text
prompt:     3 4 7 + 5 8 9 =
completion: 6 c1 3 c1 9 c0 | 9 3 6 <|endoftext|>
```

(7+9 = 16: write 6, carry 1; 4+8+1 = 13: write 3, carry 1; 3+5+1 = 9: write 9, carry 0; answer 936.) The answer is
checked exactly: the completion must stop on the end-of-text token and the digits after its last `|` must be the sum.
The weak student learns from solutions that forget carries. Every rollout visits every decision (the format is fixed
and 12 tokens long) and a wrong carry does not take the teacher off its training distribution, so this task cannot
show TRB's mechanism (docs/demo.md); `--task machine` is built to.
"""

import functools
import random
from dataclasses import dataclass

from transformers import PreTrainedTokenizerFast

from ...testing import build_word_tokenizer
from ..models import PretrainConfig
from .base import DemoTask, ProblemSplits, TaskDefaults


DIGITS = [str(d) for d in range(10)]
PLUS, EQUALS, ANSWER_MARK = "+", "=", "|"
CARRY_TOKENS = ["c0", "c1"]
TASK_WORDS = [*DIGITS, PLUS, EQUALS, ANSWER_MARK, *CARRY_TOKENS]


@dataclass(frozen=True)
class AdditionProblem:
    a: int
    b: int
    num_digits: int

    @property
    def prompt(self) -> str:
        """`"3 4 7 + 5 8 9 ="`: both operands one digit per token, zero-padded to `num_digits`."""
        return " ".join([*self._digits(self.a), PLUS, *self._digits(self.b), EQUALS])

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    @property
    def solution(self) -> str:
        """The worked completion (without the stop token): column steps right to left, `|`, the answer digits."""
        return self.worked_solution()

    @property
    def completion_length(self) -> int:
        return completion_length(self.num_digits)

    def worked_solution(self, rng: random.Random | None = None, drop_carry_probability: float = 0.0) -> str:
        """The column-by-column solution. With `drop_carry_probability > 0`, each carry of 1 is "forgotten" with that
        probability: written as `c0` and not added to the next column, and the answer is the digits as written (the
        classic sloppy-addition mistake; used to pretrain the weak student)."""
        steps, written, carry = [], [], 0
        for x, y in zip(reversed(self._digits(self.a)), reversed(self._digits(self.b))):
            carry, digit = divmod(int(x) + int(y) + carry, 10)
            if carry and drop_carry_probability > 0 and rng.random() < drop_carry_probability:
                carry = 0
            steps += [str(digit), f"c{carry}"]
            written.append(str(digit))
        answer = str(int("".join([str(carry), *reversed(written)])))
        return " ".join([*steps, ANSWER_MARK, *answer])

    def is_correct(self, completion: str, *, stopped: bool = True) -> bool:
        return is_correct(self, completion, stopped=stopped)

    def _digits(self, number: int) -> list[str]:
        return list(str(number).zfill(self.num_digits))


def task_description(num_digits: int) -> str:
    return (
        f"{num_digits}-digit + {num_digits}-digit addition, written column by column (sum digit and carry per column, "
        "then the answer), exact match on the answer"
    )


def completion_length(num_digits: int) -> int:
    """Tokens of the longest completion, stop token included: 2 per column, `|`, up to num_digits + 1 digits, EOS."""
    return 2 * num_digits + 1 + (num_digits + 1) + 1


def build_task_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the task's symbols (digits, `+`, `=`, `|`, carries) plus the Qwen-style specials."""
    return build_word_tokenizer(TASK_WORDS)


def make_splits(num_digits: int, *, num_train: int, num_dev: int, num_eval: int, seed: int = 0) -> ProblemSplits:
    """Draw `num_train + num_dev + num_eval` distinct problems (operands with exactly `num_digits` digits) and split
    them; no (a, b) pair occurs in two splits. Deterministic in `seed`."""
    low, high = 10 ** (num_digits - 1), 10**num_digits - 1
    total = num_train + num_dev + num_eval
    if total > (high - low + 1) ** 2:
        raise ValueError(
            f"Only {(high - low + 1) ** 2} distinct {num_digits}-digit problems exist; asked for {total}."
        )
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    problems = []
    while len(problems) < total:
        pair = (rng.randint(low, high), rng.randint(low, high))
        if pair not in seen:
            seen.add(pair)
            problems.append(AdditionProblem(*pair, num_digits))
    # The evaluation set is drawn first, so it does not change when the training pool grows.
    return ProblemSplits(
        eval=problems[:num_eval],
        dev=problems[num_eval : num_eval + num_dev],
        train=problems[num_eval + num_dev :],
    )


def extract_answer(completion: str) -> str | None:
    """The digits after the last `|` of a decoded completion (special tokens already stripped), or None."""
    tokens = completion.split()
    if ANSWER_MARK not in tokens:
        return None
    last_mark = len(tokens) - 1 - tokens[::-1].index(ANSWER_MARK)
    answer = tokens[last_mark + 1 :]
    if not answer or not all(token in DIGITS for token in answer):
        return None
    return "".join(answer)


def is_correct(problem: AdditionProblem, completion: str, *, stopped: bool = True) -> bool:
    """Exact match: the completion stopped (emitted the stop token) and its answer equals a + b."""
    return stopped and extract_answer(completion) == problem.answer


# The problem pools. The held-out evaluation pool is drawn first and never used for training; a smaller
# `--eval-size` uses a prefix of it, so the cached models do not depend on it.
NUM_DIGITS = 3
NUM_TRAIN, NUM_DEV, EVAL_POOL, SPLIT_SEED = 20_000, 256, 1024, 0

# The teacher trains on clean worked solutions until 97% of its sampled dev answers are right. The smaller student
# trains on sloppy ones that forget 60% of the carries, until 25% of its sampled dev answers are right: it has learned
# the format and the digit sums, but not to carry reliably.
TEACHER = PretrainConfig(
    hidden_size=96, num_layers=2, steps=3000, learning_rate=3e-3, stop_at_dev_accuracy=0.97, check_every=100, seed=0
)
STUDENT = PretrainConfig(
    hidden_size=64,
    num_layers=2,
    steps=3000,
    learning_rate=3e-3,
    mistake_probability=0.6,
    stop_at_dev_accuracy=0.25,
    check_every=100,
    seed=0,
)

ADDITION = DemoTask(
    name="addition",
    description=task_description(NUM_DIGITS),
    words=tuple(TASK_WORDS),
    make_splits=functools.cache(
        lambda: make_splits(NUM_DIGITS, num_train=NUM_TRAIN, num_dev=NUM_DEV, num_eval=EVAL_POOL, seed=SPLIT_SEED)
    ),
    # Exactly the key the demo used before it had several tasks, so models cached then are still found.
    cache_fields={"num_digits": NUM_DIGITS, "train": NUM_TRAIN, "dev": NUM_DEV, "eval": EVAL_POOL, "seed": SPLIT_SEED},
    teacher=TEACHER,
    student=STUDENT,
    eval_pool=EVAL_POOL,
    defaults=TaskDefaults(
        steps=60, eval_every=3, eval_size=512, quick_steps=30, quick_eval_size=256, probe_lengths=(2, 4, 6, 8)
    ),
    details={"num_digits": NUM_DIGITS, "train": NUM_TRAIN, "dev": NUM_DEV, "eval_pool": EVAL_POOL},
)
