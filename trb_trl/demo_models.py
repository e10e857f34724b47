"""The demo's teacher and weak student: tiny Qwen3 models pretrained on the task with plain next-token training,
cached on disk, and scored by greedy generation + exact match on held-out problems."""

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, Qwen3ForCausalLM

from .demo_task import AdditionProblem, completion_length, is_correct
from .tiny_models import build_tiny_qwen3


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
    # Probability of "forgetting" each carry in the training solutions (0: clean data). The weak student is pretrained
    # on such sloppy worked solutions, so its rollouts drop carries that the teacher would write.
    drop_carry_probability: float = 0.0
    # Stop early once accuracy on the dev problems reaches this (checked every `check_every` steps); None: never.
    stop_at_dev_accuracy: float | None = None
    check_every: int = 100


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "trb_trl" / "demo"


def cache_key(name: str, config: PretrainConfig, task: dict) -> str:
    """`<name>-<hash>`: the hash covers the task (digits, splits) and the model's architecture and training budget."""
    payload = json.dumps({"version": CACHE_VERSION, "task": task, "model": asdict(config)}, sort_keys=True)
    return f"{name}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def supervised_batch(
    tokenizer: PreTrainedTokenizerBase,
    problems: list[AdditionProblem],
    *,
    rng: random.Random | None = None,
    drop_carry_probability: float = 0.0,
) -> dict[str, torch.Tensor]:
    """prompt + worked solution + EOS, right-padded; labels only on the completion (the prompt digits are random)."""
    rows = []
    for problem in problems:
        prompt = tokenizer(problem.prompt)["input_ids"]
        solution = problem.worked_solution(rng, drop_carry_probability)
        completion = [*tokenizer(solution)["input_ids"], tokenizer.eos_token_id]
        rows.append((prompt, completion))
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


@torch.no_grad()
def greedy_accuracy(
    model: Qwen3ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[AdditionProblem],
    *,
    batch_size: int = 256,
) -> float:
    """Exact-match accuracy of greedy completions of `problems` (left-padded batches, stop at EOS)."""
    was_training = model.training
    model.eval()
    num_digits = problems[0].num_digits
    correct = 0
    try:
        for start in range(0, len(problems), batch_size):
            chunk = problems[start : start + batch_size]
            inputs = tokenizer([p.prompt for p in chunk], return_tensors="pt", padding=True).to(model.device)
            output = model.generate(
                **inputs,
                do_sample=False,
                max_new_tokens=completion_length(num_digits),
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            for problem, row in zip(chunk, output[:, inputs["input_ids"].shape[1] :].tolist()):
                stopped = tokenizer.eos_token_id in row
                if stopped:
                    row = row[: row.index(tokenizer.eos_token_id)]
                correct += is_correct(problem, tokenizer.decode(row), stopped=stopped)
    finally:
        model.train(was_training)
    return correct / len(problems)


def pretrain(
    model: Qwen3ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    train: list[AdditionProblem],
    config: PretrainConfig,
    *,
    dev: list[AdditionProblem] | None = None,
    description: str = "pretraining",
) -> Qwen3ForCausalLM:
    """Plain next-token training on worked solutions: AdamW, 5% linear warmup then cosine decay, grad clip 1."""
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.01)
    warmup = max(1, config.steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    progress = tqdm(range(config.steps), desc=description, unit="step", leave=False)
    for step in progress:
        problems = rng.sample(train, config.batch_size)
        batch = supervised_batch(tokenizer, problems, rng=rng, drop_carry_probability=config.drop_carry_probability)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if (step + 1) % config.check_every == 0:
            postfix = {"loss": f"{loss.item():.4f}"}
            if dev is not None and config.stop_at_dev_accuracy is not None:
                accuracy = greedy_accuracy(model, tokenizer, dev)
                postfix["dev_acc"] = f"{accuracy:.3f}"
                if accuracy >= config.stop_at_dev_accuracy:
                    progress.set_postfix(postfix)
                    break
            progress.set_postfix(postfix)
    progress.close()
    return model.eval()


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

    Returns the model (eval mode), its greedy exact-match accuracy on the held-out `splits.eval`, and whether it came
    from the cache.
    """
    path = Path(cache_dir) / cache_key(name, config, task)
    meta_file = path / "demo_meta.json"
    if meta_file.is_file():
        model = Qwen3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return model, json.loads(meta_file.read_text())["eval_accuracy"], True
    model = build_tiny_qwen3(
        len(tokenizer),
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        eos_token_id=tokenizer.eos_token_id,
        seed=config.seed,
    )
    pretrain(model, tokenizer, splits.train, config, dev=splits.dev, description=f"training the {name}")
    accuracy = greedy_accuracy(model, tokenizer, splits.eval)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        model.save_pretrained(staging)
        meta = {"name": name, "task": task, "config": asdict(config), "eval_accuracy": accuracy}
        (staging / "demo_meta.json").write_text(json.dumps(meta, indent=2))
        if path.exists():  # a concurrent run finished first; keep its copy
            shutil.rmtree(staging)
        else:
            staging.rename(path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return model, accuracy, False
