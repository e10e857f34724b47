"""SFT warmup: the paper's supervised baseline, run before on-policy distillation (OPD).

Phase 1 fine-tunes the student with TRL's `SFTTrainer` for `sft_warmup_steps` (N) optimizer steps on teacher
responses to exactly the rows the OPD run rolls out in its first N optimizer steps, one teacher response in place of
each rollout (the recipes repeat each prompt 4 times, so this is the paper's 4 teacher responses per prompt, and each
step sees as many sequences as an OPD step). Phase 2 is plain OPD from the resulting checkpoint, from OPD step 0 on
the same data order. `trb-trl train` runs both; this module is phase 1.

The rows come from TRL's own `RepeatSampler`, built as `DistillationTrainer._get_train_sampler` builds it, so they are
the OPD run's rows by construction rather than by a re-implementation of its shuffle.
"""

import gc
import itertools
import json
import os
from dataclasses import fields
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import gather_object
from datasets import Dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    TrainingArguments,
    set_seed,
)
from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

from ._compat import RepeatSampler, SFTConfig, SFTTrainer, is_conversational
from .stop_alignment import as_id_list, cut_at_stop
from .trb_distill_config import SFT_WARMUP_SUBDIR, TRBDistillConfig  # noqa: F401 (SFT_WARMUP_SUBDIR re-exported)


# Written last, by the main process, once the phase-1 model and tokenizer are saved: its presence means "done".
COMPLETION_MARKER = "sft_warmup_complete.json"

# TrainingArguments that describe the OPD run as a whole (where it saves, evaluates, pushes, how long it runs), not
# how it optimizes; the SFT phase sets its own. Every other TrainingArguments field is copied.
_RUN_FIELDS = frozenset(
    {
        "output_dir",
        "run_name",
        "max_steps",
        "num_train_epochs",
        "do_train",
        "do_eval",
        "do_predict",
        "eval_strategy",
        "eval_steps",
        "eval_delay",
        "eval_on_start",
        "load_best_model_at_end",
        "metric_for_best_model",
        "greater_is_better",
        "save_strategy",
        "save_steps",
        "save_total_limit",
        "save_only_model",
        "save_on_each_node",
        "push_to_hub",
        "hub_model_id",
        "hub_strategy",
        "hub_token",
        "hub_private_repo",
        "hub_always_push",
        "hub_revision",
        "resume_from_checkpoint",
        "restore_callback_states_from_checkpoint",
        "remove_unused_columns",  # OPD keeps its prompt columns; SFT keeps only the model inputs (its default)
    }
)
_TRAINING_ARGUMENTS_FIELDS = frozenset(field.name for field in fields(TrainingArguments))


def sft_warmup_dir(args: TRBDistillConfig) -> str:
    """Where phase 1 saves the warmed-up student (and its trainer state): `<output_dir>/sft_warmup`."""
    return args.sft_warmup_dir


def generation_batch_size(args: TRBDistillConfig, num_processes: int) -> int:
    """Rows one OPD optimizer step rolls out: per_device_train_batch_size x processes x gradient_accumulation_steps."""
    return args.per_device_train_batch_size * num_processes * args.gradient_accumulation_steps


def warmup_rows(dataset, args: TRBDistillConfig, num_processes: int = 1) -> list[list[int]]:
    """The dataset indices the OPD trainer rolls out in each of its first `args.sft_warmup_steps` optimizer steps.

    `DistillationTrainer` samples with `RepeatSampler(batch_size=G, repeat_count=gradient_accumulation_steps)`, G the
    generation batch: each block of G indices is repeated once per micro-step and generated for once, so step k's rows
    are the first G indices of the sampler's k-th block. Across processes, each takes a contiguous slice of those G.

    Raises:
        ValueError: if the training set holds fewer than N full generation batches (the sampler drops the last,
            partial one), or cannot be indexed (an `IterableDataset`).
    """
    steps = args.sft_warmup_steps
    if not hasattr(dataset, "__len__"):
        raise ValueError(
            "sft_warmup_steps > 0 needs a map-style training set (its rows are looked up by index), not an "
            f"{type(dataset).__name__}."
        )
    batch = generation_batch_size(args, num_processes)
    available = len(dataset) // batch
    if steps > available:
        raise ValueError(
            f"sft_warmup_steps={steps} needs the rows of {steps} OPD steps ({steps} x {batch} = {steps * batch} rows: "
            f"per_device_train_batch_size={args.per_device_train_batch_size} x {num_processes} processes x "
            f"gradient_accumulation_steps={args.gradient_accumulation_steps}), but the training set has "
            f"{len(dataset)} rows, enough for {available} steps. Lower sft_warmup_steps or train on more prompts "
            "(max_train_prompts, rollouts_per_prompt)."
        )
    sampler = RepeatSampler(
        data_source=dataset,
        mini_repeat_count=1,
        batch_size=batch,
        repeat_count=args.gradient_accumulation_steps,
        shuffle=args.shuffle_dataset,
        seed=args.seed,
    )
    block = batch * args.gradient_accumulation_steps
    indices = list(itertools.islice(iter(sampler), steps * block))
    return [indices[step * block : step * block + batch] for step in range(steps)]


def render_prompts(tokenizer, prompts: list, chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """Prompt token ids exactly as the OPD trainer renders them: the student tokenizer's chat template with the
    generation prompt for conversational prompts, plain tokenization for text."""
    if is_conversational({"prompt": prompts[0]}):
        return tokenizer.apply_chat_template(
            conversation=prompts,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            **(chat_template_kwargs or {}),
        )["input_ids"]
    return tokenizer(text=prompts)["input_ids"]


def student_stop_ids(model_name_or_path: str, tokenizer, **kwargs) -> list[int]:
    """The ids that end a student rollout, as `DistillationTrainer` collects them (the student's generation-config
    eos ids, with the tokenizer's eos first if missing), read without loading the weights."""
    try:
        generation_config = GenerationConfig.from_pretrained(model_name_or_path, **kwargs)
    except OSError:  # no generation_config.json: from_pretrained derives one from the model config
        generation_config = GenerationConfig.from_model_config(
            AutoConfig.from_pretrained(model_name_or_path, **kwargs)
        )
    ids = as_id_list(generation_config.eos_token_id)
    if tokenizer.eos_token_id not in ids:
        ids = [tokenizer.eos_token_id, *ids]
    return ids


def sft_target(completion_ids: list[int], student_stop_ids, teacher_stop_ids) -> list[int]:
    """The SFT target for one teacher completion: cut after its first stop, and a teacher stop id the student does not
    stop on (an instruct teacher's `<|im_end|>` for a Base student) replaced by the student's stop id, so the student
    learns to stop on its own. A completion without a stop (cut at max_completion_length) is kept whole, unterminated.
    """
    return cut_at_stop(completion_ids, student_stop_ids, teacher_stop_ids)[0]


def teacher_responses(teacher, tokenizer, prompts: list, args: TRBDistillConfig, *, student_stop_ids) -> Dataset:
    """One teacher sample per prompt, as a pre-tokenized SFT dataset (`input_ids`, `completion_mask`) in prompt order.

    Sampled with the rollout settings (`temperature`, `top_p`, `top_k`, `min_p`, `repetition_penalty`,
    `generation_kwargs`, `max_new_tokens=max_completion_length`) in batches of `per_device_train_batch_size`, the
    prompts rendered as the OPD trainer renders them. Generation stops on the teacher's and the student's stop ids;
    targets end as [`sft_target`] says. The lm_head's padding rows beyond the tokenizer (no tokens) are never sampled,
    as in the teacher-guided rollouts. Under several processes each generates a contiguous share and the shares are
    gathered, so every process returns the same dataset. The teacher is whole on every process, so its `generate` is
    not synced across processes (transformers would sync it under ZeRO-3): the final gather is the only collective,
    whatever the size of each share.
    """
    state = PartialState()
    teacher_ids = as_id_list(teacher.generation_config.eos_token_id)
    stop_ids = list(dict.fromkeys([*teacher_ids, *as_id_list(student_stop_ids)]))
    generation_kwargs = {
        "max_new_tokens": args.max_completion_length,
        "do_sample": True,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": stop_ids,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "cache_implementation": args.cache_implementation,
        **(args.generation_kwargs or {}),
    }
    padding_rows = range(len(tokenizer), teacher.config.get_text_config().vocab_size)
    if len(padding_rows):
        generation_kwargs["suppress_tokens"] = sorted(
            {*(generation_kwargs.get("suppress_tokens") or []), *padding_rows}
        )
    generation_config = GenerationConfig(**generation_kwargs, disable_compile=True)
    examples = []
    with state.split_between_processes(list(prompts)) as local_prompts:
        for start in range(0, len(local_prompts), args.per_device_train_batch_size):
            batch = render_prompts(
                tokenizer, local_prompts[start : start + args.per_device_train_batch_size], args.chat_template_kwargs
            )
            width = max(len(ids) for ids in batch)
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, ids in enumerate(batch):  # left padding, as the OPD rollouts
                input_ids[row, width - len(ids) :] = torch.tensor(ids)
                attention_mask[row, width - len(ids) :] = 1
            with torch.no_grad():
                sequences = teacher.generate(
                    input_ids=input_ids.to(teacher.device),
                    attention_mask=attention_mask.to(teacher.device),
                    generation_config=generation_config,
                    synced_gpus=False,  # an unsharded teacher: no collective, however many batches this process has
                )
            for ids, completion in zip(batch, sequences[:, width:].tolist(), strict=True):
                target = sft_target(completion, student_stop_ids, teacher_ids)
                examples.append({"input_ids": [*ids, *target], "completion_mask": [0] * len(ids) + [1] * len(target)})
    return Dataset.from_list(gather_object(examples))


def sft_warmup_config(args: TRBDistillConfig) -> SFTConfig:
    """The phase-1 `SFTConfig`: the OPD run's optimization settings (learning rate and schedule, warmup, optimizer,
    weight decay, clipping, precision, seed, batch sizes, gradient accumulation and checkpointing, reporting and
    logging, launcher settings), `max_steps = sft_warmup_steps`, loss on the completions only, no evaluation and no
    intermediate saves, in `<output_dir>/sft_warmup` under the run name suffixed `-sft-warmup`."""
    values = {
        name: value
        for name, value in args.to_dict().items()
        if name in _TRAINING_ARGUMENTS_FIELDS and name not in _RUN_FIELDS
    }
    return SFTConfig(
        **values,
        output_dir=sft_warmup_dir(args),
        run_name=f"{args.run_name or Path(args.output_dir).name}-sft-warmup",
        max_steps=args.sft_warmup_steps,
        eval_strategy="no",
        save_strategy="no",
        model_init_kwargs=args.model_init_kwargs,
        trust_remote_code=args.trust_remote_code,
        completion_only_loss=True,
        max_length=None,  # the sequences are already bounded by the prompt filter and max_completion_length
    )


def run_sft_warmup(model_name_or_path: str, train_dataset, args: TRBDistillConfig) -> str:
    """Phase 1: sample the teacher on the rows of the first `sft_warmup_steps` OPD steps, fine-tune the student on
    those responses with `SFTTrainer`, save model and tokenizer to `<output_dir>/sft_warmup`; return that directory.

    A directory holding the completion marker is returned as is (a resumed run skips phase 1). The teacher is loaded
    unsharded (also under DeepSpeed ZeRO-3: it only generates here) in `teacher_model_init_kwargs`' dtype on this
    process's device, and freed before the student is loaded.
    """
    state = PartialState()
    output_dir = sft_warmup_dir(args)
    steps = args.sft_warmup_steps
    marker = os.path.join(output_dir, COMPLETION_MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            done = json.load(f)
        if done.get("sft_warmup_steps") != steps:
            raise ValueError(
                f"{output_dir} holds a finished SFT warmup of {done.get('sft_warmup_steps')} steps, but "
                f"sft_warmup_steps={steps}. Use a fresh output_dir, or remove {output_dir} to redo phase 1."
            )
        state.print(f"SFT warmup (phase 1 of 2): already done in {output_dir}; skipping to OPD.")
        return output_dir
    rows = warmup_rows(train_dataset, args, state.num_processes)
    indices = [index for step in rows for index in step]
    if args.teacher_model_name_or_path is None:
        raise ValueError("sft_warmup_steps > 0 samples the teacher: set `teacher_model_name_or_path`.")
    state.print(
        f"SFT warmup (phase 1 of 2): {steps} SFT steps on teacher responses to the {len(indices)} rows "
        f"({len(set(indices))} distinct) of the first {steps} OPD steps -> {output_dir}"
    )
    init_kwargs = args.model_init_kwargs or {}
    tokenizer = AutoTokenizer.from_pretrained(
        model_name_or_path,
        revision=init_kwargs.get("revision"),
        trust_remote_code=args.trust_remote_code,
        padding_side="left",
        truncation_side="left",
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    student_stops = student_stop_ids(
        model_name_or_path, tokenizer, revision=init_kwargs.get("revision"), trust_remote_code=args.trust_remote_code
    )
    teacher = load_teacher_unsharded(args)
    set_seed(args.seed + state.process_index)  # each process samples its own share, reproducibly
    dataset = teacher_responses(
        teacher, tokenizer, train_dataset.select(indices)["prompt"], args, student_stop_ids=student_stops
    )
    del teacher
    _release_memory()

    sft_args = sft_warmup_config(args)
    if "wandb" in sft_args.report_to:
        from .report_to import put_wandb_runs_under

        put_wandb_runs_under(args.output_dir)  # both phases' W&B runs next to each other, as the OPD run puts its own
    trainer = SFTTrainer(model=model_name_or_path, args=sft_args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(output_dir)
    trainer.save_state()
    if trainer.accelerator.is_main_process:
        with open(marker, "w") as f:
            json.dump({"sft_warmup_steps": steps, "global_step": trainer.state.global_step, "rows": indices}, f)
    trainer.accelerator.wait_for_everyone()
    _end_phase(trainer, args)
    del trainer
    _release_memory()
    return output_dir


def load_teacher_unsharded(args: TRBDistillConfig):
    """The teacher for phase 1, whole on this process's device in `teacher_model_init_kwargs`' dtype: generation
    needs no collective then, even where ZeRO-3 would otherwise partition it while loading."""
    kwargs = dict(args.teacher_model_init_kwargs or {})
    kwargs.pop("device_map", None)
    dtype = kwargs.get("dtype")
    if isinstance(dtype, str) and dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype)
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    if args.teacher_model_revision is not None:
        kwargs.setdefault("revision", args.teacher_model_revision)
    unset_hf_deepspeed_config()  # from_pretrained would partition the weights under ZeRO-3 (zero.Init)
    try:
        teacher = AutoModelForCausalLM.from_pretrained(args.teacher_model_name_or_path, **kwargs)
    finally:
        _restore_deepspeed_config(args)
    return teacher.to(PartialState().device).eval()


def _restore_deepspeed_config(args: TRBDistillConfig) -> None:
    """Point transformers' DeepSpeed config (what `from_pretrained` reads to load ZeRO-3 partitioned) back at the OPD
    run's, as its `TrainingArguments` set it; building another `TrainingArguments` (the SFT phase's) repoints it."""
    if getattr(args, "hf_deepspeed_config", None) is not None:
        set_hf_deepspeed_config(args.hf_deepspeed_config)
    elif args.deepspeed_plugin is not None:
        args.deepspeed_plugin.set_deepspeed_weakref()


def _end_phase(trainer, args: TRBDistillConfig) -> None:
    """Leave the process as phase 2 expects it: the SFT run's W&B run closed (the OPD run opens its own), the
    accelerator's references to the SFT model and optimizer dropped, no `AcceleratorState` left over (accelerate
    refuses a second DeepSpeed plugin) and transformers' DeepSpeed config the OPD run's again."""
    if "wandb" in trainer.args.report_to and trainer.accelerator.is_main_process:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    trainer.accelerator.free_memory()
    AcceleratorState._reset_state()
    _restore_deepspeed_config(args)


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
