"""The training arguments of the tiny CPU runs in the tests: a few short steps, no saving, no reporting."""

from trb_trl import TRBDistillConfig
from trb_trl._compat import HAS_ACTIVATION_CHECKPOINTING


# TRL's own configs take only the spelling the installed transformers has.
CHECKPOINTING = "activation_checkpointing" if HAS_ACTIVATION_CHECKPOINTING else "gradient_checkpointing"


def tiny_run_args(output_dir, config_class=TRBDistillConfig, **overrides):
    defaults = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        max_completion_length=8,
        learning_rate=1e-3,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,
        save_strategy="no",
        seed=0,
        **{CHECKPOINTING: False},
    )
    if config_class is TRBDistillConfig:
        defaults.update(trb_epsilon=0.05, trb_warmup_steps=2)
    defaults.update(overrides)
    return config_class(**defaults)


def tiny_prompts(num_prompts: int = 64):
    """Conversational prompts over the tiny word tokenizer's vocabulary."""
    from datasets import Dataset

    return Dataset.from_list(
        [{"prompt": [{"role": "user", "content": f"w{i} w{i + 1} w{i + 2}"}]} for i in range(num_prompts)]
    )


def tiny_trainer(tiny_pair_dir, args, prompts, trainer_class=None):
    """A trainer on the tiny student/teacher pair saved by the `tiny_pair_dir` fixture."""
    from transformers import AutoTokenizer

    from trb_trl import TRBDistillTrainer

    return (trainer_class or TRBDistillTrainer)(
        model=tiny_pair_dir["student"],
        teacher_model=tiny_pair_dir["teacher"],
        args=args,
        train_dataset=prompts,
        processing_class=AutoTokenizer.from_pretrained(tiny_pair_dir["tokenizer"]),
    )
