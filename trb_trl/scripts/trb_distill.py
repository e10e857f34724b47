"""
On-policy distillation with Trust-Region behaviour Blending (TRB) warmup.

# Qwen3-1.7B-Base <- Qwen3-8B on 8 GPUs with DeepSpeed ZeRO-3
```bash
accelerate launch --config_file recipes/accelerate/zero3.yaml -m trb_trl.scripts.trb_distill \
    --config recipes/qwen3_1p7b.yaml
```

# Same, through the CLI (accelerate settings from the recipe's `accelerate_config`)
```bash
trb-trl train recipes/qwen3_1p7b.yaml --trb_epsilon 0.01 --trb_warmup_steps 25
```

# SFT warmup baseline: 25 SFT steps on teacher responses to the rows of the first 25 OPD steps, then OPD from there
```bash
trb-trl train recipes/qwen3_1p7b_opd.yaml --sft_warmup_steps 25
```

# TrOPD (trust-region K1 with outlier FKL and teacher-prefix guidance): the recipe sets `trainer: tropd`
```bash
trb-trl train recipes/qwen3_1p7b_tropd.yaml
```

# Tiny CPU run on locally built models (no GPU, no Hub)
```bash
python scripts/make_tiny_models.py outputs/tiny && trb-trl train recipes/tiny_cpu.yaml
```
"""

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from trb_trl import recipe_check
from trb_trl._compat import (
    DatasetMixtureConfig,
    ModelConfig,
    ScriptArguments,
    TrlParser,
    get_dataset,
    get_peft_config,
    get_quantization_config,
)
from trb_trl.recipe_check import trainer_name  # noqa: F401  (the `trainer` a command line asks for; re-exported)
from trb_trl.report_to import check_report_to
from trb_trl.trb_distill_config import TRBDistillConfig


@dataclass
class TRBScriptArguments(ScriptArguments):
    r"""
    Script arguments for `trb_distill.py`: TRL's [`~trl.ScriptArguments`] plus how prompts are read.

    Parameters:
        trainer (`str`, *optional*, defaults to `"trb"`):
            `"trb"`: [`TRBDistillTrainer`] with a [`TRBDistillConfig`]. `"tropd"`: [`TrOPDTrainer`] with a
            [`TrOPDConfig`] (its `tropd_*` options become available). Read before the other options are parsed.
        dataset_name (`str`, *optional*):
            Hub dataset name, or a local `.jsonl` / `.json` / `.parquet` / `.csv` prompt file.
        prompt_column (`str`, *optional*, defaults to `"prompt"`):
            Column holding the prompt (a string or chat messages). OpenThoughts-style `conversations` and
            `problem` / `question` columns are recognised when it is absent.
        system_prompt (`str`, *optional*):
            System message prepended to every prompt.
        dataset_domain (`str`, *optional*):
            Keep only rows whose `domain` column is this domain, or one of these comma-separated domains
            (OpenThoughts3: `"math"`, `"code"`, `"science"`; `"math,code,science"` is TrOPD's multi-domain prompt
            set). The kept rows are drawn from in their dataset proportions; a domain no row has is an error.
        teacher_id_column (`str`, *optional*):
            With `teacher_models` (several teachers): the column whose value names each row's teacher, e.g.
            OpenThoughts3's `domain` (`math`, `code`, `science`) with teachers of those names. `None` reads a
            `teacher_id` column when the dataset has one (rows without it go to `default_teacher`).
        max_train_prompts (`int`, *optional*):
            Train on a random subset (seeded by `seed`) of exactly this many prompts, drawn after `dataset_domain`
            and `max_prompt_tokens` have filtered the split; an error if fewer remain.
        max_prompt_tokens (`int`, *optional*):
            Drop prompts longer than this many tokens (the student's tokenizer, chat template applied) instead of
            truncating them; applied to the evaluation prompts too.
        rollouts_per_prompt (`int`, *optional*, defaults to `1`):
            Repeat every training prompt this many times. TRL samples one completion per prompt, so this is how the
            paper's 4 rollouts per prompt are expressed. The trainer shuffles the copies like any other rows, so the
            copies of one prompt usually land in different optimizer steps (there is no per-prompt group here).
    """

    trainer: str = field(
        default="trb",
        metadata={
            "help": "Which trainer runs: 'trb' (TRBDistillTrainer: TRL's loss, the warmup rollout policies) or "
            "'tropd' (TrOPDTrainer: TrOPD's loss and teacher-prefix guidance, the tropd_* options).",
            "choices": ["trb", "tropd"],
        },
    )
    prompt_column: str = field(default="prompt", metadata={"help": "Column holding the prompt (text or messages)."})
    system_prompt: str | None = field(default=None, metadata={"help": "System message prepended to every prompt."})
    dataset_domain: str | None = field(
        default=None,
        metadata={
            "help": "Keep only rows whose 'domain' column is this, or one of these comma-separated domains (e.g. "
            "'math', or 'math,code,science')."
        },
    )
    teacher_id_column: str | None = field(
        default=None,
        metadata={
            "help": "With teacher_models: the dataset column whose value names each row's teacher (e.g. 'domain'); "
            "None reads a 'teacher_id' column when there is one."
        },
    )
    max_train_prompts: int | None = field(
        default=None,
        metadata={
            "help": "Train on a random subset of exactly this many prompts, drawn after dataset_domain and "
            "max_prompt_tokens have filtered the split (an error if fewer remain)."
        },
    )
    max_prompt_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Drop prompts longer than this many tokens (student tokenizer, chat template applied), before "
            "max_train_prompts draws its subset."
        },
    )
    rollouts_per_prompt: int = field(
        default=1, metadata={"help": "Repeat every training prompt this many times (one completion per copy)."}
    )


def load_datasets(script_args, training_args, model_args, dataset_args):
    """The training and (when `eval_strategy` is not `"no"`) evaluation prompt datasets, as chat prompts.

    Training prompts: `dataset_domain` filter, then prompts longer than `max_prompt_tokens` are dropped, then exactly
    `max_train_prompts` are drawn at random (`seed`), then each is repeated `rollouts_per_prompt` times. Evaluation
    prompts come from `dataset_test_split`; asking for evaluation on a split the dataset lacks is an error raised
    here, before any model is loaded (OpenThoughts3, for one, has only `train`).
    """
    from datasets import concatenate_datasets

    from trb_trl.prompt_data import (
        available_splits,
        load_prompt_dataset,
        missing_split_message,
        prompt_length_filter,
        select_prompts,
    )

    evaluate = training_args.eval_strategy != "no"
    tokenizer = keep = None
    if script_args.max_prompt_tokens is not None:  # prompts are measured with the student's tokenizer
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(
            model_args.model_name_or_path,
            revision=model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,
        )
        keep = prompt_length_filter(tokenizer, script_args.max_prompt_tokens)
    select_options = dict(
        keep=keep,
        seed=training_args.seed,
        prompt_column=script_args.prompt_column,
        teacher_id_column=script_args.teacher_id_column,
        system_prompt=script_args.system_prompt,
        max_prompt_tokens=script_args.max_prompt_tokens,
    )
    eval_dataset = None
    if dataset_args.datasets:
        splits = get_dataset(dataset_args)
        for split in [script_args.dataset_train_split] + ([script_args.dataset_test_split] if evaluate else []):
            if split not in splits:
                raise ValueError(missing_split_message("The dataset mixture", split, list(splits)))
        train_dataset = select_prompts(
            splits[script_args.dataset_train_split],
            num_prompts=script_args.max_train_prompts,
            description="the dataset mixture",
            **select_options,
        )
        if evaluate:
            eval_dataset = select_prompts(splits[script_args.dataset_test_split], **select_options)
    elif script_args.dataset_name:
        load_options = dict(
            config=script_args.dataset_config,
            prompt_column=script_args.prompt_column,
            teacher_id_column=script_args.teacher_id_column,
            system_prompt=script_args.system_prompt,
            domain=script_args.dataset_domain,
            max_prompt_tokens=script_args.max_prompt_tokens,
            tokenizer=tokenizer,
            seed=training_args.seed,
        )
        if evaluate:  # fail before the (possibly long) training-set download and filtering
            splits = available_splits(script_args.dataset_name, script_args.dataset_config)
            if splits is not None and script_args.dataset_test_split not in splits:
                raise ValueError(
                    missing_split_message(script_args.dataset_name, script_args.dataset_test_split, splits)
                )
        train_dataset = load_prompt_dataset(
            script_args.dataset_name,
            split=script_args.dataset_train_split,
            max_samples=script_args.max_train_prompts,
            **load_options,
        )
        if evaluate:
            eval_dataset = load_prompt_dataset(
                script_args.dataset_name, split=script_args.dataset_test_split, **load_options
            )
    else:
        raise ValueError("Set `dataset_name` (a Hub dataset or a local prompt file) or `datasets`.")
    if script_args.rollouts_per_prompt > 1:
        train_dataset = concatenate_datasets([train_dataset] * script_args.rollouts_per_prompt)
    return train_dataset, eval_dataset


def config_class(name: str):
    """The config class of the named trainer."""
    if name == "tropd":
        from trb_trl.tropd_config import TrOPDConfig

        return TrOPDConfig
    if name == "trb":
        return TRBDistillConfig
    raise ValueError(f"trainer must be 'trb' or 'tropd', got {name!r}.")


def check_logging_backends(training_args) -> None:
    """Every `report_to` backend is one transformers knows and its package is installed (a one-line `ValueError`
    otherwise): checked before any dataset or model loads, rather than failing when the trainer is built."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    check_report_to(training_args.report_to, INTEGRATION_TO_CALLBACK)


def check_unknown_keys(parser, config_remaining: list[str], cli_remaining: list[str], recipe: str | None) -> None:
    """A one-line `ValueError` for a recipe key that neither this script nor `accelerate launch` knows (a recipe may
    carry the launcher's keys, which `trb-trl train` hands to `accelerate launch`), or any argument left over."""
    from accelerate.commands.launch import launch_command_parser

    launcher = [option for action in launch_command_parser()._actions for option in action.option_strings]
    recipe_check.check_unknown_arguments(parser, launcher, config_remaining, cli_remaining, recipe, launched=True)


def main(script_args, training_args, model_args, dataset_args):
    check_logging_backends(training_args)
    if script_args.trainer == "tropd":
        from trb_trl.tropd_trainer import TrOPDTrainer as trainer_class
    else:
        from trb_trl.trb_distill_trainer import TRBDistillTrainer as trainer_class

    if training_args.teacher_model_name_or_path is None and not training_args.teacher_models:
        raise ValueError(
            "A teacher model is required. Set `teacher_model_name_or_path` (or `teacher_models` for several teachers) "
            "in the recipe or CLI."
        )
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    teacher_init_kwargs = dict(
        model_init_kwargs, revision=training_args.teacher_model_revision
    )  # the teacher is deliberately not quantized
    training_args.teacher_model_init_kwargs = {
        **teacher_init_kwargs,
        **(training_args.teacher_model_init_kwargs or {}),
    }

    if training_args.sft_warmup_steps > 0 and model_args.use_peft:
        raise ValueError(
            "sft_warmup_steps > 0 does not support use_peft: phase 2 starts from the full fine-tuned checkpoint of "
            "phase 1. Set sft_warmup_steps=0 or use_peft=false."
        )

    train_dataset, eval_dataset = load_datasets(script_args, training_args, model_args, dataset_args)
    if training_args.teacher_models:  # an unknown teacher_id fails now, before any model loads
        from trb_trl.teachers import check_dataset_teacher_ids

        for split, dataset in (("train", train_dataset), ("evaluation", eval_dataset)):
            check_dataset_teacher_ids(dataset, training_args.teacher_names, training_args.routing_teacher, split=split)

    student = model_args.model_name_or_path
    if training_args.sft_warmup_steps > 0:  # phase 1, then OPD from its checkpoint on the same data order
        from accelerate import PartialState

        from trb_trl.sft_warmup import run_sft_warmup

        student = run_sft_warmup(student, train_dataset, training_args)
        PartialState().print(f"OPD (phase 2 of 2): on-policy distillation from the SFT-warmed student in {student}")

    trainer = trainer_class(
        model=student,
        teacher_model=training_args.teacher_model_name_or_path,  # None with teacher_models (read from the config)
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: the log history (incl. in-training evaluations) for `trb-trl eval --compare`
    # The final model gets a card as every checkpoint does: base model = the student (its Hub id), the TRB paper.
    trainer.create_model_card(model_name=Path(training_args.output_dir).name, dataset_name=script_args.dataset_name)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.end()
    return trainer


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None, trainer: str = "trb"):
    dataclass_types = (TRBScriptArguments, config_class(trainer), ModelConfig, DatasetMixtureConfig)
    if subparsers is not None:
        return subparsers.add_parser("train", help="Run TRB distillation", dataclass_types=dataclass_types)
    return TrlParser(dataclass_types, prog=prog, allow_abbrev=False)  # `--trb_epsilo` is a typo, not `--trb_epsilon`


if __name__ == "__main__":
    import sys

    from torch.distributed.elastic.multiprocessing.errors import record

    try:
        parser = make_parser(trainer=trainer_name(sys.argv[1:]))
    except ValueError as error:
        raise SystemExit(f"trb-trl: error: {error}") from None
    argv = sys.argv[1:]
    recipe = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None
    try:
        *parsed, config_remaining, cli_remaining = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
        script_args, training_args, model_args, dataset_args = parsed
        check_unknown_keys(parser, config_remaining, cli_remaining, recipe)
        check_logging_backends(training_args)  # before any model loads
    except ValueError as error:  # a config error (e.g. from `TRBDistillConfig.__post_init__`): one line, no traceback
        parser.exit(2, f"trb-trl: error: {' '.join(str(error).split())}\n")
    # Under torchrun (multi-GPU, ZeRO), `record` hands this process's error to the launcher, so `trb-trl train`
    # reports it last instead of torchrun's summary; in a single process it only re-raises.
    record(main)(script_args, training_args, model_args, dataset_args)
