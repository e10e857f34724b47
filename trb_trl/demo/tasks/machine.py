"""`--task machine`: trace a state machine, a task in which one early wrong step derails the rest of the rollout.

A fixed machine (the same for every problem, learned by the models in pretraining) has 16 states `A`..`P` and reads
symbols in three stages of 8 symbols each (`a`..`h`, `i`..`p`, `q`..`x`); in each stage every state accepts 2 of the
stage's symbols and each accepted symbol leads to one next state. A problem is a start state and a word of 24 symbols
(8 per stage) that the machine accepts from it; the completion is the run, the state after each symbol:

```text
prompt:     c f a h ... x q = B
completion: K D M ... F <|endoftext|>          (24 states)
```

A completion is correct if it stops and is exactly the run. What makes the task derail:

- Each state depends on the previous one, so a wrong state is never undone: the rest of the run is computed from it.
- After a wrong state the next symbol is usually one the machine does not accept there (3 times in 4): a situation
  no correct run contains, so the teacher, trained on correct runs only, has never seen it. Its distribution there is
  measured (`report.json`: teacher entropy on the rollouts), not assumed.
- The stages use disjoint symbols, so what is learned about the first stage says nothing about the last: the last
  stage is practised on the right track only by rollouts whose first two stages were right.

The weak student was pretrained on runs of a machine it half-remembers: for 1 entry in 8 (state, symbol) it believes
in a wrong next state and writes it 60% of the time, and where the machine does not accept a symbol it writes a random
state. Fixing a misremembered entry needs rollouts that reach that entry on the right track.
"""

import functools
import random
import string
from dataclasses import dataclass, field
from functools import cached_property

from ..models import PretrainConfig
from .base import DemoTask, TaskDefaults, draw_distinct, split_drawn


EQUALS = "="


@dataclass(frozen=True)
class StateMachine:
    """A random machine, deterministic in `seed`. In each of `num_stages` stages, every state accepts `accepted` of the
    stage's `symbols_per_stage` symbols, each symbol is accepted by the same number of states and sends them to
    distinct states (so two runs that differ stay different), and every state is entered equally often: a random
    accepted word visits every (state, symbol) entry about equally.

    `misremembered` holds the weak student's wrong beliefs: for a `misremembered_fraction` of the entries, a wrong
    next state."""

    num_states: int = 16
    num_stages: int = 3
    symbols_per_stage: int = 8
    accepted: int = 2
    misremembered_fraction: float = 0.125
    seed: int = 0

    def __post_init__(self):
        if self.num_states > 26 or self.num_stages * self.symbols_per_stage > 26:
            raise ValueError("StateMachine names states A..Z and symbols a..z: at most 26 of each.")
        if (
            self.num_states * self.accepted
        ) % self.symbols_per_stage or not 1 <= self.accepted <= self.symbols_per_stage:
            raise ValueError(
                f"num_states * accepted ({self.num_states} * {self.accepted}) must be a multiple of symbols_per_stage "
                f"({self.symbols_per_stage}), with 1 <= accepted <= symbols_per_stage."
            )

    @property
    def state_names(self) -> list[str]:
        return list(string.ascii_uppercase[: self.num_states])

    @property
    def symbol_names(self) -> list[str]:
        return list(string.ascii_lowercase[: self.num_stages * self.symbols_per_stage])

    def stage_symbols(self, stage: int) -> range:
        return range(stage * self.symbols_per_stage, (stage + 1) * self.symbols_per_stage)

    @cached_property
    def table(self) -> dict[tuple[int, int], int]:
        """(state, symbol) -> next state, for the accepted pairs only."""
        rng = random.Random(self.seed)
        per_symbol = self.num_states * self.accepted // self.symbols_per_stage
        table = {}
        for stage in range(self.num_stages):
            sources = self._balanced_chunks(rng, per_symbol)
            targets = self._balanced_chunks(rng, per_symbol)
            for symbol, states, next_states in zip(self.stage_symbols(stage), sources, targets):
                for state, next_state in zip(states, next_states):
                    table[(state, symbol)] = next_state
        return table

    def _balanced_chunks(self, rng: random.Random, size: int) -> list[list[int]]:
        """Every state `accepted` times, shuffled into one chunk of `size` distinct states per symbol."""
        while True:
            slots = [state for state in range(self.num_states) for _ in range(self.accepted)]
            rng.shuffle(slots)
            chunks = [slots[i * size : (i + 1) * size] for i in range(self.symbols_per_stage)]
            if all(len(set(chunk)) == size for chunk in chunks):
                return chunks

    @cached_property
    def misremembered(self) -> dict[tuple[int, int], int]:
        rng = random.Random(self.seed + 1)
        entries = sorted(self.table)
        chosen = rng.sample(entries, round(self.misremembered_fraction * len(entries)))
        return {
            entry: rng.choice([s for s in range(self.num_states) if s != self.table[entry]])
            for entry in sorted(chosen)
        }

    def accepted_symbols(self, state: int, stage: int) -> list[int]:
        return [symbol for symbol in self.stage_symbols(stage) if (state, symbol) in self.table]

    def random_word(self, rng: random.Random, start: int, steps_per_stage: int) -> tuple[int, ...]:
        """A word the machine accepts from `start`: `steps_per_stage` symbols of each stage, each drawn uniformly
        among those the current state accepts."""
        word, state = [], start
        for stage in range(self.num_stages):
            for _ in range(steps_per_stage):
                symbol = rng.choice(self.accepted_symbols(state, stage))
                word.append(symbol)
                state = self.table[(state, symbol)]
        return tuple(word)

    def run(
        self, start: int, word: tuple[int, ...], rng: random.Random | None = None, mistake_probability: float = 0.0
    ) -> list[int]:
        """The state after each symbol. With `mistake_probability > 0` (and `rng`), the weak student's run: at a
        misremembered entry it writes the wrong next state with that probability, and where the machine does not
        accept the symbol (only ever after a mistake) it writes a random state. The run always goes on from the state
        it wrote."""
        states, state = [], start
        for symbol in word:
            if (state, symbol) not in self.table:
                if rng is None:
                    raise ValueError(f"State {self.state_names[state]} does not accept this word's symbol {symbol}.")
                state = rng.randrange(self.num_states)
            elif (
                mistake_probability > 0
                and (state, symbol) in self.misremembered
                and rng.random() < mistake_probability
            ):
                state = self.misremembered[(state, symbol)]
            else:
                state = self.table[(state, symbol)]
            states.append(state)
        return states


@dataclass(frozen=True)
class MachineProblem:
    start: int
    word: tuple[int, ...]
    machine: StateMachine = field(compare=False, repr=False)

    @property
    def prompt(self) -> str:
        """`"c f a ... x = B"`: the word one symbol per token, `=`, the start state."""
        symbols = self.machine.symbol_names
        return " ".join([*(symbols[s] for s in self.word), EQUALS, self.machine.state_names[self.start]])

    @property
    def solution(self) -> str:
        return self.worked_solution()

    @property
    def completion_length(self) -> int:
        """One token per symbol, then the stop token."""
        return len(self.word) + 1

    def worked_solution(self, rng: random.Random | None = None, mistake_probability: float = 0.0) -> str:
        """The run, one state per token; with `mistake_probability > 0`, as the weak student writes it."""
        names = self.machine.state_names
        return " ".join(names[s] for s in self.machine.run(self.start, self.word, rng, mistake_probability))

    def is_correct(self, completion: str, *, stopped: bool = True) -> bool:
        """Exact match of the whole run (every state, like every step of a derivation), and it stopped."""
        return stopped and completion.split() == self.solution.split()


def make_machine_splits(
    machine: StateMachine, *, steps_per_stage: int, num_train: int, num_dev: int, num_eval: int, seed: int = 0
):
    """Distinct problems (start, word), split into train / dev / held-out eval with no problem in two splits."""
    rng = random.Random(seed)

    def draw() -> MachineProblem:
        start = rng.randrange(machine.num_states)
        return MachineProblem(start, machine.random_word(rng, start, steps_per_stage), machine)

    problems = draw_distinct(draw, num_train + num_dev + num_eval, key=lambda p: (p.start, p.word))
    return split_drawn(problems, num_train=num_train, num_dev=num_dev, num_eval=num_eval)


MACHINE_SPEC = StateMachine()
STEPS_PER_STAGE = 8
NUM_TRAIN, NUM_DEV, EVAL_POOL, SPLIT_SEED = 20_000, 256, 1024, 0

# The teacher trains on correct runs until 97% of its sampled dev runs are right. The smaller student trains on the
# runs of the machine it half-remembers (60% of its misremembered entries written wrong) until 12% of its sampled dev
# runs are right: most of its rollouts go wrong somewhere, at an entry that differs from rollout to rollout.
TEACHER = PretrainConfig(
    hidden_size=96, num_layers=2, steps=3000, learning_rate=3e-3, stop_at_dev_accuracy=0.97, check_every=100, seed=0
)
STUDENT = PretrainConfig(
    hidden_size=64,
    num_layers=2,
    steps=3000,
    learning_rate=3e-3,
    mistake_probability=0.6,
    stop_at_dev_accuracy=0.12,
    check_every=100,
    seed=0,
)

_DETAILS = {
    "states": MACHINE_SPEC.num_states,
    "stages": MACHINE_SPEC.num_stages,
    "symbols_per_stage": MACHINE_SPEC.symbols_per_stage,
    "accepted": MACHINE_SPEC.accepted,
    "steps_per_stage": STEPS_PER_STAGE,
    "misremembered_fraction": MACHINE_SPEC.misremembered_fraction,
    "machine_seed": MACHINE_SPEC.seed,
    "train": NUM_TRAIN,
    "dev": NUM_DEV,
    "eval_pool": EVAL_POOL,
}

MACHINE = DemoTask(
    name="machine",
    description=(
        f"state-machine trace: {MACHINE_SPEC.num_states} states, {MACHINE_SPEC.num_stages} stages of "
        f"{STEPS_PER_STAGE} symbols; the completion is the run (one state per symbol), exact match on the whole run"
    ),
    words=(*MACHINE_SPEC.state_names, *MACHINE_SPEC.symbol_names, EQUALS),
    make_splits=functools.cache(
        lambda: make_machine_splits(
            MACHINE_SPEC,
            steps_per_stage=STEPS_PER_STAGE,
            num_train=NUM_TRAIN,
            num_dev=NUM_DEV,
            num_eval=EVAL_POOL,
            seed=SPLIT_SEED,
        )
    ),
    cache_fields={"task": "machine", **_DETAILS, "seed": SPLIT_SEED},
    teacher=TEACHER,
    student=STUDENT,
    eval_pool=EVAL_POOL,
    defaults=TaskDefaults(
        steps=40, eval_every=4, eval_size=512, quick_steps=20, quick_eval_size=256, probe_lengths=(4, 8, 12, 16, 20)
    ),
    details=_DETAILS,
    eval_batch_size=512,
)
