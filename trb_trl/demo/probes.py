"""What the rollouts look like to the teacher: the measurements behind the paper's Fig. 3 and Fig. 4, at demo scale.

- `with_teacher_entropy(trainer_class)`: a trainer that records, at every optimizer step, the teacher's mean per-token
  entropy on the rollouts it trains on (the prefixes the loss visits). Fig. 3 of the paper: lower under TRB during the
  warmup when the student's own rollouts wander where the teacher is unsure.
- `rollout_diagnostics`: before any training, the rollouts of the student (vanilla OPD's first rollouts), of the
  trust-region blend at epsilon_0 (TRB's) and of the teacher: how many tokens sit on prefixes that already left the
  reference solution ("derailed"), and the teacher's entropy on the prefixes still on track vs the derailed ones.
- `continuation_probe`: Fig. 4. Truncate those step-0 rollouts after t tokens, let the teacher or the student
  continue from there, and score the result exactly.

All sampling runs in its own seeded random stream, so the probes never perturb a training run.
"""

import contextlib

import torch
from transformers import LogitsProcessorList


def _teacher_entropy(teacher, input_ids, attention_mask, completion_mask, temperature: float) -> torch.Tensor:
    """Per-token entropy (nats) of the teacher's next-token distribution at `temperature` on every completion
    position, shape `completion_mask.shape` (0 where the mask is 0)."""
    completion_length = completion_mask.shape[1]
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = teacher(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logits = logits[:, -completion_length - 1 : -1].float() / temperature
    entropy = torch.special.entr(logits.softmax(-1)).sum(-1)  # entr(0) = 0: a -inf logit adds nothing
    return entropy * completion_mask


@torch.no_grad()
def mean_teacher_entropy(teacher, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=1.0) -> float:
    """The teacher's mean per-token entropy over the completion tokens of a batch (left-padded prompts, right-padded
    completions, masks 1 on real tokens, the stop token included)."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    was_training = teacher.training
    teacher.eval()
    try:
        entropy = _teacher_entropy(teacher, input_ids, attention_mask, completion_mask, temperature)
    finally:
        teacher.train(was_training)
    return float(entropy.sum() / completion_mask.sum().clamp(min=1))


def with_teacher_entropy(trainer_class: type) -> type:
    """A subclass of `trainer_class` (a TRL `DistillationTrainer`) that appends, for each rollout it trains on, the
    teacher's mean per-token entropy on it to `self.rollout_teacher_entropy` (one entry per optimizer step with
    gradient accumulation 1). It reads the batch the loss gets; training is unchanged."""

    class TeacherEntropyRecorder(trainer_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.rollout_teacher_entropy: list[float] = []

        def _prepare_inputs(self, generation_batch):
            inputs = super()._prepare_inputs(generation_batch)
            if self.model.training:
                self.rollout_teacher_entropy.append(
                    mean_teacher_entropy(
                        self.accelerator.unwrap_model(self.teacher_model),
                        inputs["prompt_ids"],
                        inputs["prompt_mask"],
                        inputs["completion_ids"],
                        inputs["completion_mask"],
                        self.temperature,
                    )
                )
            return inputs

    TeacherEntropyRecorder.__name__ = TeacherEntropyRecorder.__qualname__ = (
        f"{trainer_class.__name__}WithTeacherEntropy"
    )
    return TeacherEntropyRecorder


@contextlib.contextmanager
def _seeded(seed: int, model):
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _completion_mask(completions: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """1 up to and including each row's first stop token, 0 after it."""
    is_eos = completions == eos_token_id
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
    return (~after_eos).long()


@torch.no_grad()
def sample_completions(
    model, tokenizer, prompt_ids, prompt_mask, max_new_tokens: int, *, temperature: float, make_processor=None
) -> torch.Tensor:
    """Completions (right-padded with the stop token, always `max_new_tokens` wide) sampled from `model` at
    `temperature` after left-padded prompts, optionally through `make_processor(attention_mask)`."""
    processors = LogitsProcessorList([make_processor(prompt_mask)] if make_processor is not None else [])
    output = model.generate(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        logits_processor=processors,
    )
    completions = output[:, prompt_ids.shape[1] :]
    padding = max_new_tokens - completions.shape[1]
    if padding:
        completions = torch.nn.functional.pad(completions, (0, padding), value=tokenizer.eos_token_id)
    return completions


def _decode(tokenizer, row: list[int]) -> tuple[str, bool]:
    stopped = tokenizer.eos_token_id in row
    if stopped:
        row = row[: row.index(tokenizer.eos_token_id)]
    return tokenizer.decode(row), stopped


def _reference_ids(tokenizer, problems) -> list[list[int]]:
    return [[*tokenizer(p.solution)["input_ids"], tokenizer.eos_token_id] for p in problems]


def on_track_lengths(completions: torch.Tensor, references: list[list[int]]) -> list[int]:
    """Per row, how many leading completion tokens agree with the reference solution (its stop token included)."""
    lengths = []
    for row, reference in zip(completions.tolist(), references):
        n = 0
        while n < len(row) and n < len(reference) and row[n] == reference[n]:
            n += 1
        lengths.append(n)
    return lengths


def _behaviour(name: str, teacher, student, tokenizer, epsilon: float, temperature: float):
    """(model, make_processor) of a step-0 behaviour policy: the student, the TRB blend at epsilon, or the teacher."""
    if name == "trb":
        from ..rollout import TrustRegionBlendingProcessor

        def make_processor(attention_mask):
            return TrustRegionBlendingProcessor(
                teacher,
                epsilon,
                prompt_attention_mask=attention_mask,
                temperature=temperature,
                vocab_size=len(tokenizer),
                student_eos_token_id=tokenizer.eos_token_id,
            )

        return student, make_processor
    return {"student": student, "teacher": teacher}[name], None


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float | None:
    count = int(mask.sum())
    return float((values * mask).sum() / count) if count else None


@torch.no_grad()
def rollout_diagnostics(
    teacher, student, tokenizer, problems, *, epsilon: float, temperature: float = 1.0, seed: int = 0
) -> dict:
    """Step-0 rollouts of the student, the TRB blend at `epsilon` and the teacher on `problems`: accuracy, the
    fraction of completion tokens whose prefix already left the reference solution, and the teacher's mean entropy
    on all tokens, on the tokens whose prefix is still on track, and on the derailed ones (None if there are none)."""
    prompts = tokenizer([p.prompt for p in problems], return_tensors="pt", padding=True)
    references = _reference_ids(tokenizer, problems)
    max_new_tokens = problems[0].completion_length
    results = {}
    for name in ("student", "trb", "teacher"):
        model, make_processor = _behaviour(name, teacher, student, tokenizer, epsilon, temperature)
        with _seeded(seed, model):
            completions = sample_completions(
                model,
                tokenizer,
                prompts["input_ids"],
                prompts["attention_mask"],
                max_new_tokens,
                temperature=temperature,
                make_processor=make_processor,
            )
        mask = _completion_mask(completions, tokenizer.eos_token_id)
        input_ids = torch.cat([prompts["input_ids"], completions], dim=1)
        attention_mask = torch.cat([prompts["attention_mask"], mask], dim=1)
        entropy = _teacher_entropy(teacher, input_ids, attention_mask, mask, temperature)
        on_track = on_track_lengths(completions, references)
        # Token t's prefix (the t completion tokens before it) is on track if the first t tokens match.
        positions = torch.arange(completions.shape[1]).unsqueeze(0)
        clean = (positions <= torch.tensor(on_track).unsqueeze(1)).long() * mask
        derailed = mask - clean
        decoded = [_decode(tokenizer, row) for row in completions.tolist()]
        correct = sum(p.is_correct(text, stopped=stopped) for p, (text, stopped) in zip(problems, decoded))

        results[name] = {
            "accuracy": correct / len(problems),
            "derailed_token_fraction": float(derailed.sum() / mask.sum()),
            "teacher_entropy": _masked_mean(entropy, mask),
            "teacher_entropy_on_track": _masked_mean(entropy, clean),
            "teacher_entropy_derailed": _masked_mean(entropy, derailed),
        }
    return results


@torch.no_grad()
def continuation_probe(
    teacher,
    student,
    tokenizer,
    problems,
    *,
    lengths: list[int],
    epsilon: float,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict:
    """The paper's Fig. 4 at step 0. For each prefix source (the student: vanilla OPD's rollouts; the TRB blend at
    `epsilon`: TRB's first rollouts), sample one rollout per problem, keep its first t tokens for each t in `lengths`,
    let the teacher and the student continue from there (sampled at `temperature`) and score the completions exactly.
    A rollout that stopped within its first t tokens is scored as it is. Also records the fraction of the t-token
    prefixes still on the reference solution (a derailed prefix cannot be completed correctly)."""
    prompts = tokenizer([p.prompt for p in problems], return_tensors="pt", padding=True)
    references = _reference_ids(tokenizer, problems)
    budget = problems[0].completion_length
    lengths = [t for t in lengths if 0 < t < budget]
    result = {"lengths": lengths, "problems": len(problems), "epsilon": epsilon, "prefixes": {}}
    for source in ("student", "trb"):
        model, make_processor = _behaviour(source, teacher, student, tokenizer, epsilon, temperature)
        with _seeded(seed, model):
            rollouts = sample_completions(
                model,
                tokenizer,
                prompts["input_ids"],
                prompts["attention_mask"],
                budget,
                temperature=temperature,
                make_processor=make_processor,
            )
        on_track = on_track_lengths(rollouts, references)
        entry = {"on_track": [sum(n >= t for n in on_track) / len(problems) for t in lengths]}
        for name, continuer in (("teacher", teacher), ("student", student)):
            scores = []
            for index, t in enumerate(lengths):
                prefix = rollouts[:, :t]
                finished = (prefix == tokenizer.eos_token_id).any(dim=1)
                with _seeded(seed + 1 + index, continuer):
                    continuation = sample_completions(
                        continuer,
                        tokenizer,
                        torch.cat([prompts["input_ids"], prefix], dim=1),
                        torch.cat([prompts["attention_mask"], torch.ones_like(prefix)], dim=1),
                        budget - t,
                        temperature=temperature,
                    )
                completions = torch.where(finished.unsqueeze(1), rollouts, torch.cat([prefix, continuation], dim=1))
                decoded = [_decode(tokenizer, row) for row in completions.tolist()]
                correct = sum(p.is_correct(text, stopped=stopped) for p, (text, stopped) in zip(problems, decoded))
                scores.append(correct / len(problems))
            entry[f"{name}_continues"] = scores
        result["prefixes"][source] = entry
    return result
