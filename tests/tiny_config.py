"""The training arguments of the tiny CPU runs in the tests: a few short steps, no saving, no reporting."""

from trb_trl import TRBDistillConfig


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
        gradient_checkpointing=False,
        seed=0,
    )
    if config_class is TRBDistillConfig:
        defaults.update(trb_epsilon=0.05, trb_warmup_steps=2)
    defaults.update(overrides)
    return config_class(**defaults)
