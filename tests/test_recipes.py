"""Every recipe parses into the script's dataclasses; leftover keys may only be `accelerate launch` options."""

from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import launch_command_parser

from trb_trl.scripts.trb_distill import make_parser


RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TRAINING_RECIPES = sorted(RECIPES.glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((RECIPES / "accelerate").glob("*.yaml"))


def _accelerate_options() -> set[str]:
    """`accelerate launch` options, plus `--accelerate_config` (a recipe's name for `--config_file`)."""
    options = {option for action in launch_command_parser()._actions for option in action.option_strings}
    return options | {"--accelerate_config"}


def test_the_promised_recipes_exist():
    names = {path.name for path in TRAINING_RECIPES}
    assert {
        "qwen3_1p7b.yaml",
        "qwen3_0p6b.yaml",
        "qwen3_1p7b_opd.yaml",
        "qwen3_0p6b_opd.yaml",
        "tiny_cpu.yaml",
    } <= names
    configs = {path.name for path in ACCELERATE_CONFIGS}
    assert {"zero3.yaml", "zero2.yaml", "ddp.yaml", "single_gpu.yaml", "cpu.yaml"} <= configs


@pytest.mark.parametrize("recipe", TRAINING_RECIPES, ids=lambda path: path.name)
def test_recipe_parses_with_no_unknown_keys(recipe, monkeypatch):
    for key in yaml.safe_load(recipe.read_text()).get("env", {}):
        monkeypatch.delenv(key, raising=False)  # parsing sets the recipe's env; undo it after the test
    parser = make_parser()
    *dataclasses, config_remaining, cli_remaining = parser.parse_args_and_config(
        ["--config", str(recipe), "--use_cpu", "true"],  # no GPU here: bf16 recipes need use_cpu to parse
        return_remaining_strings=True,
        separate_remaining_strings=True,
    )
    assert cli_remaining == []
    leftover = [arg for arg in config_remaining if arg.startswith("--")]
    assert set(leftover) <= _accelerate_options(), f"unknown keys in {recipe.name}: {leftover}"
    script_args, training_args, model_args, _ = dataclasses
    assert model_args.model_name_or_path and training_args.teacher_model_name_or_path
    if "--accelerate_config" in config_remaining:
        name = config_remaining[config_remaining.index("--accelerate_config") + 1]
        assert (RECIPES / "accelerate" / f"{name}.yaml").is_file()


@pytest.mark.parametrize(
    ("recipe", "student", "teacher", "epsilon"),
    [
        ("qwen3_1p7b.yaml", "Qwen/Qwen3-1.7B-Base", "Qwen/Qwen3-8B", 0.02),
        ("qwen3_1p7b_opd.yaml", "Qwen/Qwen3-1.7B-Base", "Qwen/Qwen3-8B", 0.0),
        ("qwen3_0p6b.yaml", "Qwen/Qwen3-0.6B-Base", "Qwen/Qwen3-4B", 0.02),
        ("qwen3_0p6b_opd.yaml", "Qwen/Qwen3-0.6B-Base", "Qwen/Qwen3-4B", 0.0),
    ],
)
def test_qwen3_recipes_carry_the_paper_settings(recipe, student, teacher, epsilon, monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    script_args, args, model_args, _ = make_parser().parse_args_and_config(
        ["--config", str(RECIPES / recipe), "--use_cpu", "true"], return_remaining_strings=True
    )[:4]
    assert (model_args.model_name_or_path, args.teacher_model_name_or_path) == (student, teacher)
    assert (args.trb_epsilon, args.trb_warmup_steps, args.trb_schedule) == (epsilon, 50, "linear")
    assert script_args.system_prompt == "Please reason step by step, and put your final answer within \\boxed{}."
    assert script_args.dataset_domain == "math" and script_args.max_prompt_tokens == 1024
    assert args.max_completion_length == 7168 and args.temperature == 1.0
    assert args.learning_rate == 1e-5 and args.warmup_steps == 15 and args.weight_decay == 0.01
    assert args.max_grad_norm == 1.0 and args.bf16 and args.report_to == ["wandb"]
    sequences_per_step = 8 * args.per_device_train_batch_size * args.gradient_accumulation_steps
    assert sequences_per_step == 64 * script_args.rollouts_per_prompt == 256


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda path: path.name)
def test_accelerate_configs_load(config):
    loaded = ClusterConfig.from_yaml_file(str(config))
    assert loaded.num_processes >= 1
