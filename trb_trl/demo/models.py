"""The demo's teacher and weak student: tiny Qwen3 models pretrained on a task with plain next-token training and
cached on disk, and the held-out scorer (generate, greedy or sampled, then check the completions exactly).

Problems are duck-typed (`tasks.base.Problem`): each gives its prompt, writes its worked solution (clean, or with the
task's typical mistake for the weak student), knows its rollout budget and checks a completion."""

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase, Qwen3ForCausalLM

from ..testing import build_tiny_qwen3


# Bump when the pretraining code changes in a way that changes the weights, to invalidate old caches.
CACHE_VERSION = 1


@dataclass(frozen=True)
class PretrainConfig:
    """Architecture and supervised-training budget of one demo model."""

    hidden_size: int
    num_layers: int
    num_heads: int = 4
    num_kv_heads: int = 2
    steps: int = 800
    batch_size: int = 64
    learning_rate: float = 3e-3
    seed: int = 0
    # Probability of the task's typical mistake in the training solutions (0: clean data); the task says what the
    # mistake is (addition: a forgotten carry; machine: a misremembered transition). The weak student is pretrained on
    # such sloppy worked solutions, so its rollouts make mistakes that the teacher would not.
    mistake_probability: float = 0.0
    # Stop early once accuracy on the dev problems, sampled at temperature 1 (OPD matches the teacher's sampling
    # distribution, not its argmax), reaches this; checked every `check_every` steps. None: never stop early.
    stop_at_dev_accuracy: float | None = None
    check_every: int = 100


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "trb_trl" / "demo"


def cache_key(name: str, config: PretrainConfig, task: dict) -> str:
    """`<name>-<hash>`: the hash covers the task (its problems and splits) and the model's architecture and training
    budget."""
    model = asdict(config)
    # Version 1 named the mistake probability after the addition task's mistake; hashing it under that name keeps the
    # addition models cached before the demo had several tasks.
    model["drop_carry_probability"] = model.pop("mistake_probability")
    payload = json.dumps({"version": CACHE_VERSION, "task": task, "model": model}, sort_keys=True)
    return f"{name}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def supervised_batch(
    tokenizer: PreTrainedTokenizerBase,
    problems: list,
    *,
    rng: random.Random | None = None,
    mistake_probability: float = 0.0,
) -> dict[str, torch.Tensor]:
    """prompt + worked solution + EOS, right-padded; labels only on the completion (the prompts are random)."""
    solutions = [problem.worked_solution(rng, mistake_probability) for problem in problems]  # the rng's order
    # One batched call per side: per-string calls were most of pretraining's Python time (~180k calls a demo).
    prompts = tokenizer([problem.prompt for problem in problems])["input_ids"]
    completions = [[*ids, tokenizer.eos_token_id] for ids in tokenizer(solutions)["input_ids"]]
    rows = list(zip(prompts, completions, strict=True))
    length = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id)
    labels = torch.full((len(rows), length), -100)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        end = len(prompt) + len(completion)
        input_ids[i, :end] = torch.tensor(prompt + completion)
        labels[i, len(prompt) : end] = torch.tensor(completion)
        attention_mask[i, :end] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def exact_match_accuracy(problems: list, completions: list[str], stopped: list[bool]) -> float:
    """Fraction of `problems` whose decoded completion is correct (`stopped[i]`: completion i emitted the stop token)."""
    if not (len(problems) == len(completions) == len(stopped)) or not problems:
        raise ValueError("Need as many completions and stop flags as problems (and at least one problem).")
    correct = sum(p.is_correct(c, stopped=s) for p, c, s in zip(problems, completions, stopped))
    return correct / len(problems)


@torch.no_grad()
def heldout_accuracy(
    model: Qwen3ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    problems: list,
    *,
    temperature: float = 0.0,
    sampling_seed: int = 0,
    batch_size: int = 256,
    make_logits_processor: Callable[[torch.Tensor], LogitsProcessor] | None = None,
) -> float:
    """Exact-match accuracy of one completion per problem: greedy (`temperature=0`) or sampled at `temperature`
    (pass@1 from one sample). Sampling uses its own seeded random stream (the global RNG is saved and restored), so
    evaluating never perturbs a training run, and repeated evaluations share their random numbers.

    `make_logits_processor(attention_mask)`, if given, builds a logits processor for each batch (used to score the
    rollouts of a trust-region blend instead of the model's own)."""
    was_training = model.training
    model.eval()
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    else:
        sampling = {"do_sample": False}
    completions, stopped = [], []
    devices = [model.device] if model.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(sampling_seed)
            for start in range(0, len(problems), batch_size):
                chunk = problems[start : start + batch_size]
                inputs = tokenizer([p.prompt for p in chunk], return_tensors="pt", padding=True).to(model.device)
                processors = LogitsProcessorList()
                if make_logits_processor is not None:
                    processors.append(make_logits_processor(inputs["attention_mask"]))
                output = model.generate(
                    **inputs,
                    max_new_tokens=problems[0].completion_length,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                    logits_processor=processors,
                    **sampling,
                )
                for row in output[:, inputs["input_ids"].shape[1] :].tolist():
                    stopped.append(tokenizer.eos_token_id in row)
                    if stopped[-1]:
                        row = row[: row.index(tokenizer.eos_token_id)]
                    completions.append(tokenizer.decode(row))
    finally:
        model.train(was_training)
    return exact_match_accuracy(problems, completions, stopped)


def pretrain(
    model: Qwen3ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    train: list,
    config: PretrainConfig,
    *,
    dev: list | None = None,
    description: str = "pretraining",
) -> int:
    """Plain next-token training on worked solutions (AdamW, linear warmup then constant lr, grad clip 1), in place.
    Returns the number of steps trained (fewer than `config.steps` when the dev accuracy target is reached)."""
    from tqdm.auto import tqdm  # an optional dependency (`trb-trl[demo]`), checked up front by `trb-trl demo`

    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    warmup = 50

    def lr_factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    progress = tqdm(range(config.steps), desc=description, unit="step")
    steps_trained = 0
    for step in progress:
        problems = rng.sample(train, config.batch_size)
        batch = supervised_batch(tokenizer, problems, rng=rng, mistake_probability=config.mistake_probability)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        steps_trained = step + 1
        if steps_trained % config.check_every == 0:
            postfix = {"loss": f"{loss.item():.4f}"}
            if dev is not None and config.stop_at_dev_accuracy is not None:
                accuracy = heldout_accuracy(model, tokenizer, dev, temperature=1.0)
                postfix["dev_acc"] = f"{accuracy:.3f}"
                if accuracy >= config.stop_at_dev_accuracy:
                    progress.set_postfix(postfix)
                    break
            progress.set_postfix(postfix)
    progress.close()
    model.eval()
    return steps_trained


def load_or_pretrain(
    name: str,
    config: PretrainConfig,
    tokenizer: PreTrainedTokenizerBase,
    splits,
    *,
    task: dict,
    cache_dir: str | Path,
) -> tuple[Qwen3ForCausalLM, float, bool]:
    """Load `name` from `cache_dir` if this task + config was trained before, else pretrain and cache it.

    Returns the model (eval mode), its sampled (temperature 1) exact-match accuracy on the held-out `splits.eval`, and
    whether it came from the cache.
    """
    path = Path(cache_dir) / cache_key(name, config, task)
    meta_file = path / "demo_meta.json"
    if meta_file.is_file():
        model = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return model, json.loads(meta_file.read_text())["eval_accuracy_sampled"], True
    model = build_tiny_qwen3(
        len(tokenizer),
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        eos_token_id=tokenizer.eos_token_id,
        seed=config.seed,
    )
    start = time.perf_counter()
    steps = pretrain(model, tokenizer, splits.train, config, dev=splits.dev, description=f"training the {name}")
    seconds = time.perf_counter() - start
    accuracy = heldout_accuracy(model, tokenizer, splits.eval, temperature=1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        model.save_pretrained(staging)
        meta = {
            "name": name,
            "task": task,
            "config": asdict(config),
            "steps_trained": steps,
            "seconds": round(seconds, 1),
            "eval_accuracy_sampled": accuracy,
        }
        (staging / "demo_meta.json").write_text(json.dumps(meta, indent=2))
        if path.exists():  # a concurrent run finished first; keep its copy
            shutil.rmtree(staging)
        else:
            staging.rename(path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return model, accuracy, False
