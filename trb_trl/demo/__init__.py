"""`trb-trl demo`: a CPU toy comparison of TRB with the paper's baselines, end to end.

```bash
trb-trl demo --output-dir demo_out                       # every method, the default seeds (see docs/demo.md)
trb-trl demo --output-dir demo_out --methods opd,trb     # any subset, side by side
trb-trl demo --output-dir demo_out --quick               # 1 seed, fewer steps, 256 eval problems
trb-trl demo --output-dir demo_out --task addition       # the column-addition task (mistakes do not derail)
trb-trl demo --output-dir demo_out --report-to wandb     # also write offline W&B runs under demo_out/wandb
```

What it does (no GPU, no Hub):

1. Builds a synthetic task (`tasks/`, `--task`): tracing a state machine over 24 steps (`machine`, the default: one
   wrong state derails the rest of the rollout), or column addition written out digit by digit with carries
   (`addition`), checked by exact match, with a local word-level tokenizer.
2. Pretrains (`models.py`, cached on disk per task) a tiny Qwen3 teacher on correct worked solutions, and a smaller
   student on sloppy ones (a half-remembered machine; forgotten carries), so the student's early rollouts are mostly
   wrong.
3. Measures, before training, what the rollouts look like to the teacher (`probes.py`): how much of the student's
   and of TRB's first rollouts is derailed, the teacher's entropy there, and the continuation probe of the paper's
   Fig. 4.
4. Distils the student with each method (`methods.py`: vanilla OPD, TRB, fixed-ε, SKD, temperature warmup, Veto,
   SFT warmup), every one from the same checkpoint with identical budgets and seeds, evaluating exact-match accuracy
   on held-out problems every few steps (`runner.py`; pass@1 of one sample at temperature 1, as in the paper; greedy
   with `--eval-temperature 0`) and recording the teacher's entropy on every training rollout (the paper's Fig. 3).
5. Writes `report.json` (curves, what each method did per step, the probes, each method's paired difference from
   vanilla OPD with a t-interval over seeds (`comparison.py`), the run's settings, library versions, timings), prints
   a summary table, then writes `report.png` (`report.py`).

Its optional dependencies (matplotlib, tqdm: `pip install "trb-trl[demo]"`; wandb/trackio with `--report-to`) are
checked before any work starts.
"""

from .runner import main


__all__ = ["main"]
