"""Several teachers behind one student (MOPD): config errors, routing before any model loads, the routed rollout and
loss against their single-teacher equivalents, per-teacher metrics and offload, and the proof on CPU that a student
trained on routed prompts matches each teacher on its own family (and a single-teacher run does not)."""

import pytest
import torch
from datasets import Dataset
from tiny_config import tiny_run_args
from transformers import LogitsProcessorList

from trb_trl import TRBDistillTrainer, TrustRegionBlendingProcessor
from trb_trl.rollout.routed import RoutedProcessor
from trb_trl.teachers import teacher_indices
from trb_trl.testing import END_OF_TEXT, IM_END, build_constant_teacher, build_tiny_qwen3, build_word_tokenizer


WORDS = [f"w{i}" for i in range(48)]
X, Y = "w40", "w41"  # the answers teacher "a" and teacher "b" want


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(WORDS)


@pytest.fixture(scope="module")
def constant_teachers(tokenizer):
    """Teacher "a" always says X and stops on <|endoftext|>; teacher "b" always says Y and stops on <|im_end|>."""
    vocab = len(tokenizer)
    eos, im_end = tokenizer.convert_tokens_to_ids([END_OF_TEXT, IM_END])
    x, y = tokenizer.convert_tokens_to_ids([X, Y])
    return {
        "a": build_constant_teacher(vocab, x, eos_token_id=eos),
        "b": build_constant_teacher(vocab, y, eos_token_id=im_end),
    }


def _student(tokenizer, seed=3):
    eos = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    return build_tiny_qwen3(len(tokenizer), hidden_size=32, eos_token_id=eos, seed=seed)


def _families(count: int, offset: int = 0) -> Dataset:
    """Family "a" prompts start with w0, family "b" prompts with w1; each row routed to its family's teacher."""
    rows = []
    for i in range(offset, offset + count):
        family = "ab"[i % 2]
        rows.append({"prompt": f"w{i % 2} w{2 + i % 30} w{3 + (7 * i) % 30}", "teacher_id": family})
    return Dataset.from_list(rows)


def _trainer(tokenizer, teachers, tmp_path, dataset=None, **overrides):
    options = dict(rollout_policy="student", trb_epsilon=0.0, max_completion_length=4, per_device_train_batch_size=8)
    args = tiny_run_args(tmp_path / "out", **{**options, **overrides})
    return TRBDistillTrainer(
        model=_student(tokenizer),
        args=args,
        train_dataset=dataset if dataset is not None else _families(64),
        processing_class=tokenizer,
        teacher_models=teachers,
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"teacher_models": {}}, "teacher_models must be a non-empty mapping"),
        ({"teacher_models": {"a/b": "m"}}, "names must be non-empty strings without '/'"),
        ({"teacher_models": {"a": "m"}, "default_teacher": "b"}, r"default_teacher='b' is not one of teacher_models"),
        ({"teacher_models": {"a": "m"}, "teacher_model_name_or_path": "t"}, "are both set"),
        ({"teacher_models": {"a": "m"}, "teacher_models_init_kwargs": {"c": {}}}, r"names \['c'\]"),
        ({"teacher_models": {"a": "m"}, "sft_warmup_steps": 5}, "sft_warmup_steps > 0 is not supported yet"),
        (
            {"teacher_models": {"a": "m"}, "rollout_policy": "trb", "trb_rollout_engine": "speculative"},
            "trb_rollout_engine='speculative' is not supported yet",
        ),
    ],
)
def test_config_refuses_what_several_teachers_cannot_do(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_run_args(tmp_path, **overrides)


def test_config_takes_json_from_the_command_line(tmp_path):
    args = tiny_run_args(tmp_path, teacher_models='{"math": "org/math-7b", "code": "org/code-7b"}')
    assert args.teacher_names == ["math", "code"] and args.routing_teacher == "math"
    assert tiny_run_args(tmp_path, teacher_models={"m": "x", "c": "y"}, default_teacher="c").routing_teacher == "c"


def test_each_row_goes_to_its_teacher_and_an_unknown_id_is_an_error():
    assert teacher_indices(["b", None, "a", ""], ["a", "b"], "b") == [1, 1, 0, 1]
    with pytest.raises(
        ValueError, match=r"teacher_id is 'physics', which is not one of teacher_models \(\['a', 'b'\]\)"
    ):
        teacher_indices(["a", "physics"], ["a", "b"], "a")


def test_the_multi_teacher_knobs_without_teachers_are_an_error(tokenizer, tmp_path):
    for options in ({"teacher_offload": True}, {"default_teacher": "a"}):
        args = tiny_run_args(tmp_path / "out", rollout_policy="student", **options)
        with pytest.raises(ValueError, match="applies to several teachers, but no teacher_models were given"):
            TRBDistillTrainer(
                model="no/such-student", args=args, train_dataset=_families(4), processing_class=tokenizer
            )


def test_an_unknown_teacher_id_fails_before_any_model_loads(tokenizer, tmp_path):
    """The student and teachers named here do not exist: the error must be the dataset's, raised before loading."""
    dataset = Dataset.from_list([{"prompt": "w1 w2", "teacher_id": "a"}, {"prompt": "w2 w3", "teacher_id": "chem"}])
    args = tiny_run_args(tmp_path / "out", teacher_models={"a": "no/such-teacher"}, rollout_policy="student")
    with pytest.raises(ValueError, match="The train dataset: A row's teacher_id is 'chem'"):
        TRBDistillTrainer(model="no/such-student", args=args, train_dataset=dataset, processing_class=tokenizer)


def test_routed_rollout_equals_each_teacher_guiding_its_own_rows_alone(tokenizer):
    """A TRB rollout of a batch mixing two teachers' rows is, row for row, the rollout of each group on its own."""
    vocab = len(tokenizer)
    eos, im_end = tokenizer.convert_tokens_to_ids([END_OF_TEXT, IM_END])
    student = _student(tokenizer)
    teachers = {
        "a": build_tiny_qwen3(vocab, hidden_size=48, eos_token_id=eos, seed=11),
        "b": build_tiny_qwen3(vocab, hidden_size=40, num_heads=4, eos_token_id=im_end, seed=12),
    }
    stops = {"a": [eos], "b": [im_end]}
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, vocab, (5, 6), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, :2] = 0  # left padding in one row
    routing = {"a": torch.tensor([0, 2, 3]), "b": torch.tensor([1, 4])}

    def processor(name, rows):
        return TrustRegionBlendingProcessor(
            teachers[name],
            0.3,
            prompt_attention_mask=mask[rows],
            vocab_size=vocab,
            student_eos_token_id=[eos],
            teacher_eos_token_id=stops[name],
        )

    def greedy(ids, attention, processors):
        return student.generate(
            ids, attention_mask=attention, logits_processor=LogitsProcessorList(processors), do_sample=False,
            max_new_tokens=6, pad_token_id=eos, eos_token_id=[eos, im_end],
        )  # fmt: skip

    routed = RoutedProcessor({name: processor(name, rows) for name, rows in routing.items()}, routing)
    together = greedy(input_ids, mask, [routed])
    for name, rows in routing.items():
        alone = greedy(input_ids[rows], mask[rows], [processor(name, rows)])
        width = min(alone.shape[1], together.shape[1])
        assert torch.equal(together[rows, :width], alone[:, :width]), name
    statistics = routed.statistics_by_teacher()
    assert set(statistics) == {"a", "b"} and all(len(s["beta"]) > 0 for s in statistics.values())
    assert (routed.statistics()["beta"] > 0).any()  # the teachers really moved the blend


def test_the_routed_loss_with_one_teacher_twice_trains_exactly_like_that_teacher_alone(tokenizer, tmp_path):
    """Splitting each micro-batch by teacher and summing the parts is the unsplit loss (same teacher behind both
    names): the trained weights agree to float32 summation order."""
    teacher = build_tiny_qwen3(len(tokenizer), hidden_size=48, eos_token_id=tokenizer.eos_token_id, seed=5)
    options = dict(max_steps=2, rollout_policy="student", trb_epsilon=0.0, max_completion_length=4)
    options.update(per_device_train_batch_size=8, shuffle_dataset=False)
    single = TRBDistillTrainer(
        model=_student(tokenizer),
        teacher_model=teacher,
        args=tiny_run_args(tmp_path / "one", **options),
        train_dataset=_families(16),
        processing_class=tokenizer,
    )
    single.train()  # each trainer seeds the RNG when it is built, so each is built right before it trains
    routed = TRBDistillTrainer(
        model=_student(tokenizer),
        args=tiny_run_args(tmp_path / "two", **options),
        train_dataset=_families(16),
        processing_class=tokenizer,
        teacher_models={"a": teacher, "b": teacher},
    )
    routed.train()
    for (name, p), (_, q) in zip(single.model.named_parameters(), routed.model.named_parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=2e-5, msg=name)
    logs = [entry for entry in routed.state.log_history if "loss" in entry]
    assert all(entry["mopd/a/rows"] + entry["mopd/b/rows"] == 8 for entry in logs)


def test_two_teachers_log_per_teacher_metrics_and_offload_keeps_one_teacher_per_loss(
    tokenizer, constant_teachers, tmp_path
):
    trainer = _trainer(
        tokenizer,
        constant_teachers,
        tmp_path,
        rollout_policy="trb",
        trb_epsilon=0.05,
        trb_warmup_steps=2,
        max_steps=3,
        teacher_offload=True,
    )
    assert trainer.teacher_set.offload_device is not None and not trainer.teacher_set.resident_names
    resident = []
    original = trainer._loss_with

    def spy(divergence, *args):
        resident.append(set(trainer.teacher_set.resident_names))
        return original(divergence, *args)

    trainer._loss_with = spy
    trainer.train()
    assert resident and all(len(names) == 1 for names in resident)  # one teacher at a time in the loss
    assert not trainer.teacher_set.resident_names  # and none between steps
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    for step, entry in enumerate(logs):
        assert entry["mopd/a/rows"] + entry["mopd/b/rows"] == 8 and entry["mopd/a/rows"] > 0
        assert torch.isfinite(torch.tensor([entry["loss"], entry["mopd/a/loss"], entry["mopd/b/loss"]])).all()
        if step < 2:  # TRB warmup: each teacher's rows blended with that teacher
            assert 0 < entry["trb/beta/mean/a"] <= 1 and 0 < entry["trb/beta/mean/b"] <= 1
            assert entry["trb/beta/mean/a"] != entry["trb/beta/mean/b"]
        else:
            assert "trb/beta/mean/a" not in entry
    # Each teacher's stop ids end the rollouts: b's <|im_end|> is merged into the student's stop.
    assert trainer.teacher_set.alignments["a"] is None and trainer.teacher_set.alignments["b"] is not None


def _agreement(model, tokenizer, dataset: Dataset) -> dict[str, float]:
    """Per family, the share of the student's greedy tokens that are that family's teacher's answer."""
    wanted = dict(zip("ab", tokenizer.convert_tokens_to_ids([X, Y]), strict=True))
    scores = {}
    model.eval()
    for family in "ab":
        rows = [row["prompt"] for row in dataset if row["teacher_id"] == family]
        ids = tokenizer(rows, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, do_sample=False, max_new_tokens=4, pad_token_id=tokenizer.pad_token_id)
        new = out[:, ids["input_ids"].shape[1] :]
        scores[family] = (new == wanted[family]).float().mean().item()
    return scores


def test_the_student_matches_each_teacher_on_its_own_family_and_a_single_teacher_run_does_not(
    tokenizer, constant_teachers, tmp_path
):
    """The proof on CPU: teacher a wants X after every prompt, teacher b wants Y. Trained on routed prompts (family a
    to a, family b to b), the student says X on family a and Y on family b; trained on the same prompts with
    teacher a alone, it says X on both."""
    held_out = _families(16, offset=1000)
    options = dict(max_steps=25, learning_rate=1e-2, per_device_train_batch_size=8)
    routed = _trainer(tokenizer, constant_teachers, tmp_path / "routed", **options)
    before = _agreement(routed.model, tokenizer, held_out)
    routed.train()
    after = _agreement(routed.model, tokenizer, held_out)
    single = TRBDistillTrainer(  # the same prompts, every row scored by teacher a (the teacher_id column unused)
        model=_student(tokenizer),
        teacher_model=constant_teachers["a"],
        args=tiny_run_args(tmp_path / "single", rollout_policy="student", trb_epsilon=0.0, max_completion_length=4,
                           **options),
        train_dataset=_families(64),
        processing_class=tokenizer,
    )  # fmt: skip
    single.train()
    control = _agreement(single.model, tokenizer, held_out)
    assert before["a"] < 0.5 and before["b"] < 0.5
    assert after["a"] >= 0.9 and after["b"] >= 0.9, after
    assert control["a"] >= 0.9 and control["b"] <= 0.1, control


def test_tropd_guidance_takes_each_rows_prefix_from_its_own_teacher(tokenizer, constant_teachers, tmp_path):
    """TrOPD with two teachers: at step 0 ("max" sampling) every completion is a teacher prefix, X on teacher a's rows
    and Y on teacher b's; the loss runs per teacher and its records cover every row."""
    from trb_trl import TrOPDConfig, TrOPDTrainer

    args = tiny_run_args(
        tmp_path / "out",
        TrOPDConfig,
        max_steps=1,
        max_completion_length=4,
        per_device_train_batch_size=8,
        tropd_prefix_sampling="max",
        tropd_prefix_steps=2,
    )
    trainer = TrOPDTrainer(
        model=_student(tokenizer),
        args=args,
        train_dataset=_families(16),
        processing_class=tokenizer,
        teacher_models=constant_teachers,
    )
    outputs = []
    original = trainer._generate_and_score_completions

    def spy(inputs):
        output = original(inputs)
        outputs.append(output)
        return output

    trainer._generate_and_score_completions = spy
    trainer.train()
    (output,) = outputs
    x, y = tokenizer.convert_tokens_to_ids([X, Y])
    for ids, prefix, teacher in zip(
        output["completion_ids"], output["tropd_prefix_mask"], output["teacher_index"], strict=True
    ):
        assert prefix.all() and set(ids.tolist()) == {(x, y)[int(teacher)]}
    (entry,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert entry["tropd/prefix_fraction"] == 1.0 and entry["mopd/a/rows"] == entry["mopd/b/rows"] == 4
