import json

import pytest
from script_modules import load_script


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bench_rollout():
    return load_script("bench_rollout")


def test_the_speculative_rows_split_the_time_into_the_models_and_the_engine(bench_rollout, tmp_path, capsys):
    output = tmp_path / "bench.json"
    arguments = ["--threads", "1", "--batch-size", "1", "--new-tokens", "4", "--repeats", "1"]
    assert bench_rollout.main([*arguments, "--speculative", "0.02:2", "--json", str(output)]) == 0
    entry = json.loads(output.read_text())["results"][0]["speculative"]["spec_eps0.02_g2"]
    student, teacher = entry["student_forwards_over_student"], entry["teacher_forwards_over_student"]
    assert student > 0 and teacher > 0 and entry["engine_rest_over_student"] > 0
    assert student + teacher + entry["engine_rest_over_student"] == pytest.approx(entry["over_student"])
    assert entry["floor"] == 2.0
    assert "models alone" in capsys.readouterr().out


def test_timed_forwards_counts_only_the_model_inside_the_block(bench_rollout):
    import torch

    model = torch.nn.Linear(4, 4)
    with bench_rollout.timed_forwards(model, enabled=True) as timed:
        model(torch.zeros(1, 4))
    model(torch.zeros(1, 4))  # after the block: no hook left
    assert timed["seconds"] > 0 and not model._forward_hooks and not model._forward_pre_hooks
    with bench_rollout.timed_forwards(model, enabled=False) as untimed:
        model(torch.zeros(1, 4))
    assert untimed == {}
