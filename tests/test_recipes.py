"""Every recipe parses into the script's dataclasses; leftover keys may only be `accelerate launch` options. The
recipes' comments match their values, and the script loads prompts as documented."""

import dataclasses
import json
import os
from pathlib import Path

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import launch_command_parser

from trb_trl.scripts.trb_distill import make_parser, trainer_name
from trb_trl.sweep import METHOD_KEYS, sweep_points


RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TRAINING_RECIPES = sorted(RECIPES.glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((RECIPES / "accelerate").glob("*.yaml"))
QWEN3_PAIRS = ("qwen3_1p7b", "qwen3_0p6b")
# Each baseline recipe at the paper's setting: the config values its method block must give (Appendix A.2).
BASELINES = {
    "fixed_epsilon": {"rollout_policy": "fixed_epsilon", "trb_epsilon": 0.01, "trb_schedule": "constant"},
    "skd": {"rollout_policy": "skd", "skd_top_k": 15, "skd_teacher_temperature": 0.2, "skd_steps": None},
    "temperature": {"rollout_policy": "temperature", "temperature_warmup_start": 0.9, "temperature_warmup_steps": 25},
    "sft_warmup": {"rollout_policy": "student", "sft_warmup_steps": 25},
    "veto": {"rollout_policy": "student", "veto_beta_start": 0.4, "veto_decay_steps": None},
}
# The paper trains every method with reverse KL over the student's top-16 tokens (Appendix A), in its reference code's
# policy-gradient form.
for _method in BASELINES.values():
    _method["loss_top_k"] = 16
    _method["loss_top_k_estimator"] = "policy_gradient"


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
    assert {f"{pair}_{method}.yaml" for pair in QWEN3_PAIRS for method in BASELINES} <= names
    configs = {path.name for path in ACCELERATE_CONFIGS}
    assert {"zero3.yaml", "zero2.yaml", "ddp.yaml", "single_gpu.yaml", "cpu.yaml"} <= configs


@pytest.mark.parametrize("recipe", TRAINING_RECIPES, ids=lambda path: path.name)
def test_recipe_parses_with_no_unknown_keys(recipe, monkeypatch):
    for key in yaml.safe_load(recipe.read_text()).get("env", {}):
        monkeypatch.setenv(key, "")  # parsing sets the recipe's env; monkeypatch restores it after the test
    parser = make_parser(trainer=trainer_name(["--config", str(recipe)]))
    *dataclasses, config_remaining, cli_remaining = parser.parse_args_and_config(
        ["--config", str(recipe), "--use_cpu", "true"],  # no GPU here: bf16 recipes need use_cpu to parse
        return_remaining_strings=True,
        separate_remaining_strings=True,
    )
    assert cli_remaining == []
    leftover = [arg for arg in config_remaining if arg.startswith("--")]
    assert set(leftover) <= _accelerate_options(), f"unknown keys in {recipe.name}: {leftover}"
    script_args, training_args, model_args, _ = dataclasses
    assert model_args.model_name_or_path and (training_args.teacher_model_name_or_path or training_args.teacher_models)
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
    monkeypatch.setenv("WANDB_PROJECT", "")  # parsing sets it; monkeypatch restores it after the test
    script_args, args, model_args, _ = make_parser().parse_args_and_config(
        ["--config", str(RECIPES / recipe), "--use_cpu", "true"], return_remaining_strings=True
    )[:4]
    assert (model_args.model_name_or_path, args.teacher_model_name_or_path) == (student, teacher)
    assert (args.trb_epsilon, args.trb_warmup_steps, args.trb_schedule) == (epsilon, 50, "linear")
    assert args.loss_top_k == 16 and args.beta == 1.0  # reverse KL over the student's top-16 tokens
    assert args.loss_top_k_estimator == "policy_gradient"  # the paper's form
    assert yaml.safe_load((RECIPES / recipe).read_text())["loss_top_k_estimator"] == "policy_gradient"  # explicit
    assert script_args.system_prompt == "Please reason step by step, and put your final answer within \\boxed{}."
    assert script_args.dataset_domain == "math" and script_args.max_prompt_tokens == 1024
    assert args.max_completion_length == 7168 and args.temperature == 1.0
    assert args.learning_rate == 1e-5 and args.warmup_steps == 15 and args.weight_decay == 0.01
    assert args.max_grad_norm == 1.0 and args.bf16 and args.report_to == ["wandb"]
    sequences_per_step = 8 * args.per_device_train_batch_size * args.gradient_accumulation_steps
    assert sequences_per_step == 64 * script_args.rollouts_per_prompt == 256


def _parse_recipe(path: Path):
    return make_parser().parse_args_and_config(
        ["--config", str(path), "--use_cpu", "true"], return_remaining_strings=True
    )[:3]


@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("pair", QWEN3_PAIRS)
def test_baseline_recipes_carry_the_paper_setting_and_nothing_of_another_method(pair, method, monkeypatch):
    from trb_trl import TRBDistillConfig

    monkeypatch.setenv("WANDB_PROJECT", "")  # parsing sets it; monkeypatch restores it after the test
    _, args, _ = _parse_recipe(RECIPES / f"{pair}_{method}.yaml")
    assert isinstance(args, TRBDistillConfig)
    defaults = {field.name: field.default for field in dataclasses.fields(TRBDistillConfig)}
    for key in METHOD_KEYS:
        if key in defaults:  # TrOPD's method keys are not TRBDistillConfig fields
            assert getattr(args, key) == BASELINES[method].get(key, defaults[key]), key


@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("pair", QWEN3_PAIRS)
def test_baseline_recipe_differs_from_its_trb_recipe_only_in_the_method(pair, method, monkeypatch):
    """A clean comparison: same loss, budget, seed and data as the TRB recipe of the pair. Its method keys are one
    point of the paper's sweep grid (`trb-trl sweep`), and its run is named for that point."""
    trb = yaml.safe_load((RECIPES / f"{pair}.yaml").read_text())
    baseline = yaml.safe_load((RECIPES / f"{pair}_{method}.yaml").read_text())
    differing = {key for key in trb.keys() | baseline.keys() if trb.get(key) != baseline.get(key)}
    assert differing <= set(METHOD_KEYS) | {"output_dir", "run_name"}
    assert {"output_dir", "run_name"} <= differing  # its own checkpoints and W&B run

    point = next(point for point in sweep_points([method]) if baseline["run_name"].endswith(f"-{point.name}"))
    assert {key: value for key, value in baseline.items() if key in METHOD_KEYS} == point.overrides
    assert baseline["output_dir"] == f"outputs/{baseline['run_name']}"

    # The parsed arguments agree too: every non-method field of the three dataclasses is the TRB recipe's.
    monkeypatch.setenv("WANDB_PROJECT", "")
    parsed = [_parse_recipe(RECIPES / name) for name in (f"{pair}.yaml", f"{pair}_{method}.yaml")]
    ignored = set(METHOD_KEYS) | {"output_dir", "run_name", "logging_dir"}
    for trb_args, baseline_args in zip(*parsed, strict=True):
        for field in dataclasses.fields(trb_args):
            if field.name not in ignored:
                assert getattr(trb_args, field.name) == getattr(baseline_args, field.name), field.name


def test_tropd_recipes_carry_the_papers_settings(monkeypatch):
    """The TrOPD paper's math pair (200 steps, constant lr 5e-6, 128 prompts x 4 rollouts, k = 64, beta = 1e-3, the
    full method with guidance) and the Qwen3 pair that differs from the TRB recipe only in the method."""
    from trb_trl import TrOPDConfig

    monkeypatch.setenv("WANDB_PROJECT", "")
    argv = ["--config", str(RECIPES / "deepseek_r1_1p5b_tropd.yaml"), "--use_cpu", "true"]
    script_args, args, model_args = make_parser(trainer="tropd").parse_args_and_config(
        argv, return_remaining_strings=True
    )[:3]
    assert isinstance(args, TrOPDConfig) and script_args.trainer == "tropd"
    assert model_args.model_name_or_path == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert args.teacher_model_name_or_path == "Skywork/Skywork-OR1-Math-7B"
    assert args.max_steps == 200 and args.learning_rate == 5e-6 and args.lr_scheduler_type == "constant"
    assert 8 * args.per_device_train_batch_size * args.gradient_accumulation_steps == 128 * 4
    assert script_args.rollouts_per_prompt == 4 and script_args.max_train_prompts == 128 * 200
    assert (args.tropd_objective, args.tropd_outlier, args.tropd_outlier_detection) == (
        "trust_region",
        "fkl",
        "adaptive",
    )
    assert args.tropd_top_k == 64 and args.tropd_guidance and args.tropd_guidance_weight == 1e-3
    assert args.rollout_policy == "student" and args.loss_top_k is None
    assert args.prefix_max_length == args.max_completion_length and args.prefix_anneal_steps == 200

    trb = yaml.safe_load((RECIPES / "qwen3_1p7b.yaml").read_text())
    tropd = yaml.safe_load((RECIPES / "qwen3_1p7b_tropd.yaml").read_text())
    differing = {key for key in trb.keys() | tropd.keys() if trb.get(key) != tropd.get(key)}
    tropd_keys = {key for key in tropd if key.startswith("tropd_")}
    loss_keys = {"loss_top_k", "loss_top_k_estimator"}  # the TRB paper's loss, which TrOPD replaces
    assert differing == {"trainer", "rollout_policy", "output_dir", "run_name"} | loss_keys | tropd_keys | {
        "trb_epsilon",
        "trb_schedule",
        "trb_warmup_steps",
    }
    point = next(point for point in sweep_points(["tropd"]) if point.name == "tropd-tropd")
    assert {key: value for key, value in tropd.items() if key in METHOD_KEYS} == point.overrides


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda path: path.name)
def test_accelerate_configs_load(config):
    loaded = ClusterConfig.from_yaml_file(str(config))
    assert loaded.num_processes >= 1


def test_recipes_only_evaluate_on_a_split_they_have():
    """OpenThoughts3 has only a `train` split: the Qwen3 recipes must not ask for evaluation (eval_strategy 'no')."""
    for recipe in TRAINING_RECIPES:
        config = yaml.safe_load(recipe.read_text())
        if config.get("dataset_name", "").startswith("open-thoughts/OpenThoughts3"):
            assert config.get("eval_strategy", "no") == "no", recipe.name
            assert config.get("dataset_train_split", "train") == "train", recipe.name


@pytest.mark.parametrize("recipe", TRAINING_RECIPES, ids=lambda path: path.name)
def test_every_recipe_names_its_wandb_project(recipe, monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "")  # parsing sets it; monkeypatch restores it after the test
    env = yaml.safe_load(recipe.read_text()).get("env", {})
    assert env.get("WANDB_PROJECT"), f"{recipe.name} sets no env: {{WANDB_PROJECT: ...}}"
    parser = make_parser(trainer=trainer_name(["--config", str(recipe)]))
    parser.parse_args_and_config(["--config", str(recipe), "--use_cpu", "true"], return_remaining_strings=True)
    assert os.environ["WANDB_PROJECT"] == env["WANDB_PROJECT"]  # TrlParser exports the recipe's env


def test_qwen3_recipe_comments_match_their_arithmetic():
    """The recipes' comments state 256 sequences per step, 400 steps = one pass over 25,600 prompts x 4 copies, and
    chunks of 8 sequences per TRB `generate` call; check the numbers against the values."""
    names = sorted(path.name for path in RECIPES.glob("qwen3_*.yaml"))
    assert len(names) == 2 * (2 + len(BASELINES)) + 3  # + qwen3_1p7b_tropd.yaml and the two MOPD recipes
    for name in names:
        text = (RECIPES / name).read_text()
        config = yaml.safe_load(text)
        processes = 8  # recipes/accelerate/zero3.yaml
        per_step = processes * config["per_device_train_batch_size"] * config["gradient_accumulation_steps"]
        assert per_step == 256 and "256 sequences per optimizer step" in text
        assert config["max_train_prompts"] * config["rollouts_per_prompt"] == config["max_steps"] * per_step
        assert "25,600" in text and f"{config['max_steps']} steps" in text
        if config.get("rollout_policy", "trb") == "trb" and config["trb_epsilon"] > 0:
            generation_batch = config["per_device_train_batch_size"] * config["gradient_accumulation_steps"]
            assert generation_batch // config["rollout_generation_batch_size"] == 4 and "4 generate calls" in text


# ---------------------------------------------------------------------------------------------------------------
# Data loading of `trb_distill.main` (load_datasets): a local JSONL and a word tokenizer saved to disk, no Hub.

LONG = " ".join(f"w{i}" for i in range(40))


def _short(i: int) -> str:
    return f"w{i // 10} w{10 + i % 10}"  # distinct for the 30 rows with i % 10 < 3


@pytest.fixture
def prompt_setup(tmp_path):
    """A JSONL of 30 short and 70 long prompts (interleaved) and a word-level tokenizer saved to disk."""
    from trb_trl.testing import build_word_tokenizer

    tokenizer_dir = tmp_path / "tokenizer"
    build_word_tokenizer([f"w{i}" for i in range(64)]).save_pretrained(tokenizer_dir)
    rows = [{"prompt": _short(i) if i % 10 < 3 else LONG, "id": i} for i in range(100)]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return prompts, tokenizer_dir


def _parse(prompts, tokenizer_dir, *extra):
    from trb_trl.scripts.trb_distill import make_parser

    args = ["--config", str(RECIPES / "tiny_cpu.yaml"), "--dataset_name", str(prompts)]
    args += ["--model_name_or_path", str(tokenizer_dir), "--output_dir", str(tokenizer_dir.parent / "out"), *extra]
    return make_parser().parse_args_and_config(args, return_remaining_strings=True)[:4]


def _num_tokens(tokenizer, prompt):
    return len(
        tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    )


def test_prompt_subset_is_drawn_after_long_prompts_are_dropped(prompt_setup, monkeypatch):
    """max_train_prompts=20 with 30 short prompts among 100: exactly 20 short prompts. Drawing 20 of the 100 first and
    then dropping the long ones (the old order) would have kept about 6."""
    from transformers import AutoTokenizer

    from trb_trl.scripts.trb_distill import load_datasets

    monkeypatch.setenv("WANDB_PROJECT", "")  # parsing the tiny recipe sets it; monkeypatch restores it
    prompts, tokenizer_dir = prompt_setup
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    limit = 16
    assert _num_tokens(tokenizer, [{"role": "user", "content": _short(0)}]) <= limit
    assert _num_tokens(tokenizer, [{"role": "user", "content": LONG}]) > limit
    options = ("--max_prompt_tokens", str(limit), "--system_prompt", "")
    train, eval_dataset = load_datasets(*_parse(prompts, tokenizer_dir, "--max_train_prompts", "20", *options))
    assert eval_dataset is None
    assert len(train) == 20
    texts = [row["prompt"][-1]["content"] for row in train]
    shorts = [_short(i) for i in range(100) if i % 10 < 3]
    assert set(texts) <= set(shorts) and len(set(texts)) == 20
    assert all(_num_tokens(tokenizer, row["prompt"]) <= limit for row in train)
    assert texts != shorts[:20]  # a seeded random draw, not the first 20 in file order

    # The subset depends on the seed only, and rollouts_per_prompt repeats it afterwards.
    again, _ = load_datasets(*_parse(prompts, tokenizer_dir, "--max_train_prompts", "20", *options))
    assert again["prompt"] == train["prompt"]
    repeated, _ = load_datasets(
        *_parse(prompts, tokenizer_dir, "--max_train_prompts", "20", "--rollouts_per_prompt", "4", *options)
    )
    assert len(repeated) == 80 and repeated["prompt"][:20] == train["prompt"]

    # Every short prompt is used when asked for all 30; 31 is more than there are: a clear error.
    everything, _ = load_datasets(*_parse(prompts, tokenizer_dir, "--max_train_prompts", "30", *options))
    assert len(everything) == 30
    with pytest.raises(ValueError, match=r"max_train_prompts=31.*only 30 prompts.*longer than 16 tokens"):
        load_datasets(*_parse(prompts, tokenizer_dir, "--max_train_prompts", "31", *options))
    # Without a length limit or a subset, every row is a prompt, with the recipe's system prompt first.
    full, _ = load_datasets(*_parse(prompts, tokenizer_dir))
    assert len(full) == 100 and full[0]["prompt"][0] == {"role": "system", "content": "Please reason step by step."}


def test_evaluation_on_a_missing_split_fails_before_anything_is_loaded(prompt_setup, monkeypatch):
    import datasets

    from trb_trl import prompt_data
    from trb_trl.scripts.trb_distill import load_datasets

    monkeypatch.setenv("WANDB_PROJECT", "")  # parsing the tiny recipe sets it; monkeypatch restores it
    prompts, tokenizer_dir = prompt_setup
    # A local file has one split, 'train': evaluation on 'test' is an error, not a silent re-use of the train file.
    with pytest.raises(ValueError, match=r"has no split 'test' \(it has: train\).*eval_strategy: no"):
        load_datasets(*_parse(prompts, tokenizer_dir, "--eval_strategy", "steps", "--eval_steps", "2"))
    # Evaluating on the training file is possible when asked for explicitly.
    _, eval_dataset = load_datasets(
        *_parse(prompts, tokenizer_dir, "--eval_strategy", "steps", "--dataset_test_split", "train")
    )
    assert len(eval_dataset) == 100

    # A Hub dataset with only a train split (OpenThoughts3): the error comes before any download.
    def no_download(*args, **kwargs):
        raise AssertionError("load_dataset must not run")

    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda name, config_name=None: ["train"])
    monkeypatch.setattr(prompt_data, "load_dataset", no_download)
    hub = ("--dataset_name", "open-thoughts/OpenThoughts3-1.2M", "--dataset_domain", "math")
    with pytest.raises(ValueError, match=r"OpenThoughts3-1.2M has no split 'test' \(it has: train\)"):
        load_datasets(*_parse(prompts, tokenizer_dir, *hub, "--eval_strategy", "steps"))


def test_dataset_domain_keeps_the_named_domains_in_their_proportions(tmp_path, monkeypatch):
    """OpenThoughts3-style rows (`conversations`, `domain`): one domain, several comma-separated ones (TrOPD's
    multi-domain prompts), and a domain no row has (a clear error naming the domains there are)."""
    from trb_trl.prompt_data import load_prompt_dataset, parse_domains

    domains = ["math", "code", "science", "puzzle"]
    rows = [
        {"conversations": [{"from": "human", "value": f"{domains[i % 4]} question {i}"}], "domain": domains[i % 4]}
        for i in range(40)
    ]
    path = tmp_path / "ot3.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def domains_of(dataset):
        return {row["prompt"][-1]["content"].split()[0] for row in dataset}

    assert domains_of(load_prompt_dataset(str(path), domain="math")) == {"math"}
    mixed = load_prompt_dataset(str(path), domain="math, code,science", max_samples=30, seed=3)
    assert len(mixed) == 30 and domains_of(mixed) == {"math", "code", "science"}
    assert len(load_prompt_dataset(str(path), domain=["code", "science"])) == 20
    assert parse_domains("math,math,code") == ["math", "code"] and parse_domains(None) == []
    with pytest.raises(ValueError, match=r"names \['chemistry'\], which no row.*'code', 'math', 'puzzle', 'science'"):
        load_prompt_dataset(str(path), domain="math,chemistry")
    with pytest.raises(ValueError, match="names no domain"):
        load_prompt_dataset(str(path), domain=" , ")


def test_the_multi_teacher_recipe_and_its_control_route_by_domain(monkeypatch):
    """Two teachers sharing Qwen3's tokenizer, rows routed by OpenThoughts3's `domain`; the control differs only in
    TRB's warmup."""
    monkeypatch.setenv("WANDB_PROJECT", "")
    parsed = {}
    for name in ("qwen3_1p7b_mopd.yaml", "qwen3_1p7b_mopd_opd.yaml"):
        argv = ["--config", str(RECIPES / name), "--use_cpu", "true"]
        parsed[name] = make_parser().parse_args_and_config(argv, return_remaining_strings=True)[:2]
    script_args, args = parsed["qwen3_1p7b_mopd.yaml"]
    assert args.teacher_models == {"math": "Qwen/Qwen3-8B", "code": "TIGER-Lab/Critique-Coder-8B"}
    assert args.teacher_model_name_or_path is None and args.routing_teacher == "math"
    assert script_args.dataset_domain == "math,code" and script_args.teacher_id_column == "domain"
    assert args.uses_trust_region and args.gather_teacher_for_generation
    assert not parsed["qwen3_1p7b_mopd_opd.yaml"][1].uses_trust_region
    mopd = yaml.safe_load((RECIPES / "qwen3_1p7b_mopd.yaml").read_text())
    control = yaml.safe_load((RECIPES / "qwen3_1p7b_mopd_opd.yaml").read_text())
    differing = {key for key in mopd.keys() | control.keys() if mopd.get(key) != control.get(key)}
    assert differing == {"trb_epsilon", "rollout_generation_batch_size", "output_dir", "run_name"}


def test_the_tropd_multi_domain_recipe_is_the_math_recipe_with_its_teacher_and_domains(monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "")
    single = yaml.safe_load((RECIPES / "deepseek_r1_1p5b_tropd.yaml").read_text())
    multi = yaml.safe_load((RECIPES / "deepseek_r1_1p5b_tropd_multi_domain.yaml").read_text())
    assert multi["teacher_model_name_or_path"] == "Skywork/Skywork-OR1-7B"
    assert multi["dataset_domain"] == "math,code,science" and "system_prompt" not in multi
    differing = {key for key in single.keys() | multi.keys() if single.get(key) != multi.get(key)}
    assert differing == {
        "teacher_model_name_or_path",
        "dataset_domain",
        "system_prompt",
        "math_eval_benchmarks",
        "output_dir",
        "run_name",
    }
    argv = ["--config", str(RECIPES / "deepseek_r1_1p5b_tropd_multi_domain.yaml"), "--use_cpu", "true"]
    args = make_parser(trainer="tropd").parse_args_and_config(argv, return_remaining_strings=True)[1]
    assert args.math_eval_benchmarks == ["aime24", "aime25", "amc23", "gpqa_diamond"]
