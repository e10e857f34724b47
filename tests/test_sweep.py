"""`trb-trl sweep`: the paper's grids, and one valid recipe per point written from a base recipe."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from trb_trl import TRBDistillConfig, TrOPDConfig
from trb_trl.cli import main as cli_main
from trb_trl.scripts.trb_distill import make_parser, trainer_name
from trb_trl.sweep import METHOD_KEYS, PAPER_GRIDS, method_points, parse_methods, sweep_points, write_sweep


RECIPES = Path(__file__).resolve().parents[1] / "recipes"
EPSILONS = {0.001, 0.005, 0.01, 0.02, 0.05}
# arXiv 2605.31159, Appendix A.2 (reference notes §1.6): each method's swept values, written out independently.
PAPER = {
    "opd": [{}],
    "trb": [{"trb_epsilon": e, "trb_warmup_steps": k} for e in EPSILONS for k in (15, 25, 50)],
    "fixed_epsilon": [{"trb_epsilon": e} for e in EPSILONS],
    "skd": [{"skd_top_k": k, "skd_teacher_temperature": t} for k in (15, 25, 50) for t in (0.2, 0.6, 1.0)],
    "temperature": [
        {"temperature_warmup_start": t, "temperature_warmup_steps": n} for t in (0.8, 0.9, 0.95) for n in (15, 25)
    ],
    "sft_warmup": [{"sft_warmup_steps": n} for n in (15, 25, 50)],
    "veto": [{"veto_beta_start": b} for b in (0.2, 0.4, 0.6, 0.8)],
}
# arXiv 2606.01249, the math ablation table's rows: (objective, outlier, detection, guidance).
TROPD_ROWS = {
    ("k1", "fkl", "adaptive", False),  # OPD
    ("fkl", "fkl", "adaptive", False),  # FKL alone
    ("jsd", "fkl", "adaptive", False),  # JSD
    ("entropy_top", "fkl", "adaptive", False),  # Entropy OPD 20%
    ("trust_region", "clip", "threshold", False),  # Clip Outlier
    ("trust_region", "mask", "threshold", False),  # Mask Outlier
    ("trust_region", "fkl", "adaptive", False),  # FKL Outlier
    ("trust_region", "clip", "threshold", True),  # TrOPD-Clip
    ("trust_region", "mask", "threshold", True),  # TrOPD-Mask
    ("trust_region", "fkl", "adaptive", True),  # TrOPD
}
TROPD_KEYS = ("tropd_objective", "tropd_outlier", "tropd_outlier_detection", "tropd_guidance")
POLICY = {"fixed_epsilon": "fixed_epsilon", "skd": "skd", "temperature": "temperature", "trb": "trb"}


def _swept(overrides: dict) -> dict:
    fixed = ("rollout_policy", "trb_schedule", "loss_top_k", "loss_top_k_estimator")
    return {key: value for key, value in overrides.items() if key not in fixed}


def test_grids_are_the_papers():
    assert set(PAPER_GRIDS) == {*PAPER, "tropd", "tropd_baselines"}
    sizes = {method: len(method_points(method)) for method in PAPER_GRIDS}
    assert sizes == {
        "opd": 1,
        "trb": 15,
        "fixed_epsilon": 5,
        "skd": 9,
        "temperature": 6,
        "sft_warmup": 3,
        "veto": 4,
        "tropd": 10,
        "tropd_baselines": 3,
    }
    for method, expected in PAPER.items():
        points = method_points(method)
        assert sorted(map(str, (_swept(p.overrides) for p in points))) == sorted(map(str, expected)), method
        assert all(p.overrides["rollout_policy"] == POLICY.get(method, "student") for p in points)
        assert all(p.overrides["loss_top_k"] == 16 for p in points)  # the TRB paper's loss for every method
        assert all(p.overrides["loss_top_k_estimator"] == "policy_gradient" for p in points)  # in its own form
    tropd = method_points("tropd")
    assert {tuple(p.overrides[key] for key in TROPD_KEYS) for p in tropd} == TROPD_ROWS and len(tropd) == 10
    assert all(p.overrides["trainer"] == "tropd" and "loss_top_k" not in p.overrides for p in tropd)
    baselines = {p.name: p.overrides for p in method_points("tropd_baselines")}
    assert {name: (o["tropd_objective"], o.get("reopold_schedule")) for name, o in baselines.items()} == {
        "tropd_baselines-eopd": ("eopd", None),
        "tropd_baselines-reopold": ("reopold", "single"),
        "tropd_baselines-reopold_2stage": ("reopold", "two_stage"),
    }
    assert not any(o["tropd_guidance"] for o in baselines.values())
    assert baselines["tropd_baselines-eopd"]["eopd_top_k"] == 16
    assert len(sweep_points()) == 56
    assert {p.overrides["trb_schedule"] for p in method_points("trb")} == {"linear"}
    assert {p.overrides["trb_schedule"] for p in method_points("fixed_epsilon")} == {"constant"}


def test_point_names_say_the_point():
    names = [point.name for point in sweep_points()]
    assert len(set(names)) == len(names)
    assert {"opd", "trb-e0.02-k50", "fixed_epsilon-e0.001", "skd-k15-tauT0.2", "skd-k50-tauT1.0"} <= set(names)
    assert {"temperature-tau0.95-end15", "sft_warmup-n25", "veto-beta0.8"} <= set(names)
    assert "tropd-tropd" in names and "tropd-mask_guided" in names
    for point in sweep_points():  # every swept value appears in the name, in the order of the grid's axes
        assert point.name.split("-")[0] in PAPER_GRIDS
        if point.name.startswith("tropd"):  # ablation and baseline rows are named, not swept
            continue
        assert all(f"{value:g}" in point.name for value in _swept(point.overrides).values()), point


def test_parse_methods():
    assert parse_methods("skd, trb,skd") == ["skd", "trb"]
    assert parse_methods("all") == list(PAPER_GRIDS)
    with pytest.raises(ValueError, match="unknown method.*'sdk'.*opd, trb"):
        parse_methods("trb,sdk")
    with pytest.raises(ValueError, match="no method"):
        parse_methods(" , ")


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    output = tmp_path_factory.mktemp("sweep")
    return output, write_sweep(RECIPES / "qwen3_1p7b.yaml", output)


def _parse(path: Path):
    return make_parser(trainer=trainer_name(["--config", str(path)])).parse_args_and_config(
        ["--config", str(path), "--use_cpu", "true"],  # no GPU here: bf16 recipes need use_cpu to parse
        return_remaining_strings=True,
        separate_remaining_strings=True,
    )


def test_every_generated_recipe_is_a_valid_config_of_its_point(sweep_dir, monkeypatch):
    """Each file parses with the training script's TrlParser into a TRBDistillConfig that is the base's in every
    field but the point's method keys (others at their defaults) and output_dir / run_name."""
    monkeypatch.setenv("WANDB_PROJECT", "")  # parsing sets it; monkeypatch restores it after the test
    output, paths = sweep_dir
    points = sweep_points()
    assert [path.name for path in paths] == [f"qwen3_1p7b-{point.name}.yaml" for point in points]
    assert sorted(output.iterdir()) == sorted(paths)
    base = _parse(RECIPES / "qwen3_1p7b.yaml")
    ignored = set(METHOD_KEYS) | {"output_dir", "run_name", "logging_dir", "trainer"}
    for path, point in zip(paths, points, strict=True):
        *parsed, config_remaining, cli_remaining = _parse(path)
        assert cli_remaining == [] and config_remaining == base[-2]  # the same accelerate keys
        script_args, args = parsed[:2]
        config_class = TrOPDConfig if point.overrides.get("trainer") == "tropd" else TRBDistillConfig
        assert type(args) is config_class and script_args.trainer == point.overrides.get("trainer", "trb")
        assert (args.run_name, args.output_dir) == (path.stem, f"outputs/{path.stem}")
        defaults = {field.name: field.default for field in dataclasses.fields(config_class)}
        for key in METHOD_KEYS:
            if key in defaults:
                expected = point.overrides.get(key, defaults[key])
                if key == "trb_epsilon" and expected is None:  # TrOPDConfig's: 0 with a policy that never blends
                    expected = 0.0
                assert getattr(args, key) == expected, (path.name, key)
        for ours, theirs in zip(parsed, base[:-2], strict=True):
            for field in dataclasses.fields(theirs):  # the TRB base's fields; TrOPD's own are method keys
                if field.name not in ignored:
                    assert getattr(ours, field.name) == getattr(theirs, field.name), (path.name, field.name)


def test_generated_recipe_keeps_the_base_text_and_says_it_was_generated(sweep_dir):
    output, _ = sweep_dir
    base = (RECIPES / "qwen3_1p7b.yaml").read_text()
    text = (output / "qwen3_1p7b-skd-k15-tauT0.2.yaml").read_text()
    assert text.startswith("# Generated by `trb-trl sweep` from ")
    assert "skd-k15-tauT0.2" in text.splitlines()[1] and f"trb-trl train {output}/qwen3_1p7b-skd-k15-tauT0.2" in text
    # The base's own comments stay (data, trainer); its header and its TRB block's comment do not.
    assert "# Data: OpenThoughts3 math prompts." in text and "# Trainer: 8 GPUs x 8 per device" in text
    assert "TRB distillation:" not in text and "# TRB: epsilon_0" not in text
    # Every other line of the base is kept, in order: all but its method keys, their comment and the naming keys.
    body = base.split("\n\n", 1)[1].splitlines()
    method_start = next(i for i, line in enumerate(body) if line.startswith("# TRB: epsilon_0"))
    method_end = next(i for i, line in enumerate(body) if line.startswith("# Trainer:"))
    resources = [
        line for line in body[method_start:method_end] if line.startswith(("gather_teacher", "rollout_generation"))
    ]
    rest = [line for line in body[method_end:] if not line.startswith(("output_dir:", "run_name:"))]
    lines = iter(text.splitlines())
    for line in [*body[:method_start], *resources, *rest]:
        assert line in lines, line  # consumes the iterator: a subsequence, in order


def test_methods_filter_prefix_and_a_base_without_naming_keys(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("# a header\n\nmodel_name_or_path: m\nteacher_model_name_or_path: t\nveto_beta_start: 0.4\n")
    paths = write_sweep(base, tmp_path / "out", ["skd"], prefix="pair")
    assert [path.name for path in paths][:2] == ["pair-skd-k15-tauT0.2.yaml", "pair-skd-k15-tauT0.6.yaml"]
    config = yaml.safe_load(paths[0].read_text())
    assert "veto_beta_start" not in config  # another method's key in the base never leaks into a point
    assert config == {
        "model_name_or_path": "m",
        "teacher_model_name_or_path": "t",
        "rollout_policy": "skd",
        "skd_top_k": 15,
        "skd_teacher_temperature": 0.2,
        "loss_top_k": 16,
        "loss_top_k_estimator": "policy_gradient",
        "output_dir": "outputs/pair-skd-k15-tauT0.2",
        "run_name": "pair-skd-k15-tauT0.2",
    }


def test_a_base_whose_method_key_spans_lines_is_refused_and_nothing_is_written(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("model_name_or_path: m\nrollout_policy:\n  trb\n")
    with pytest.raises(ValueError, match="`rollout_policy` must be a one-line value"):
        write_sweep(base, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_sweep_prints_what_it_wrote(tmp_path, capsys):
    output = tmp_path / "grid"
    assert cli_main(["sweep", str(RECIPES / "qwen3_0p6b.yaml"), "--output-dir", str(output), "--methods", "veto"]) == 0
    out = capsys.readouterr().out
    written = sorted(output.iterdir())
    assert [path.name for path in written] == [f"qwen3_0p6b-veto-beta{b}.yaml" for b in ("0.2", "0.4", "0.6", "0.8")]
    assert all(f"wrote {path}" in out for path in written) and "4 recipes" in out

    assert cli_main(["sweep", str(RECIPES / "qwen3_0p6b.yaml"), "--output-dir", str(output), "--methods", "x"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert cli_main(["sweep", str(tmp_path / "missing.yaml"), "--output-dir", str(output)]) == 2
    assert "recipe not found" in capsys.readouterr().err


def test_the_tropd_papers_whole_comparison_for_the_deepseek_pair(tmp_path, monkeypatch):
    """`--methods tropd,tropd_baselines` on the DeepSeek recipe: the ablation table and the main table's other
    baselines, 13 TrOPD configs on the recipe's own data and budget."""
    paths = write_sweep(RECIPES / "deepseek_r1_1p5b_tropd.yaml", tmp_path, ["tropd", "tropd_baselines"])
    assert len(paths) == 13
    objectives = set()
    for path in paths:
        monkeypatch.setenv("WANDB_PROJECT", "")
        script_args, args = _parse(path)[:2]
        assert isinstance(args, TrOPDConfig) and args.max_steps == 200 and script_args.dataset_domain == "math"
        objectives.add((args.tropd_objective, args.reopold_schedule, args.tropd_guidance))
    assert {("eopd", "single", False), ("entropy_top", "single", False), ("reopold", "two_stage", False)} <= objectives
