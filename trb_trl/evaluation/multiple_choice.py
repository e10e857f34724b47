r"""Multiple-choice benchmarks (GPQA-Diamond, MMLU-Redux): lettered options in a seeded order, and the letter of the
completion's answer graded against the gold letter.

- **Rows.** Two layouts (`BenchmarkSpec.answer_format`): `"text"` (GPQA: the answer column holds the correct option,
  `extra_columns` the incorrect ones, so the correct option always comes first in the data) and `"index"` (MMLU: the
  answer column holds the 0-based index, or the letter, of the correct option in the list column `extra_columns[0]`).
  Option texts are stripped of surrounding white space.
- **Order.** With `shuffle_options` (GPQA), each problem's options are shown in a permutation drawn from a random
  stream seeded by `SHUFFLE_SEED` and the problem id: every sample of a problem, every rerun and every model sees the
  same order, and the gold letter is wherever the correct option landed. Without it (MMLU-Redux), the data's order.
- **Prompt.** The question, a blank line, one `A) option` line per option, a blank line, and an instruction to put the
  letter of the correct option within `\boxed{}` (the user turn; `graders.SYSTEM_PROMPTS` has the system turn).
- **Answer.** The letter in the completion's last `\boxed{}` (`\boxed{C}`, `\boxed{(c)}`, `\boxed{\text{C}}`,
  `\boxed{C. option text}`, `\boxed{Option C}`), else the last "Answer: C" / "The answer is (C)" / "the correct answer
  is C." line; case-insensitive (a lower-case letter in running text only when in parentheses or before punctuation, so
  "the answer is a prime" names no letter). Only letters of the offered options count; none found is wrong.
- **Flagged questions.** With a `flag_column` (MMLU-Redux's `error_type`), rows flagged other than `"ok"` are left out
  (`flagged="exclude"`, the usual protocol). `flagged="corrected"` also keeps the flawed rows whose annotators give the
  right answer in `correct_answer`: `wrong_groundtruth` with a letter, a 0-based index or an option's text (the gold
  moves there), and `no_correct_answer` with the missing answer's text (it replaces the labelled option's text).
  Other flawed rows (unclear question or options, several correct answers, expert-only) are left out in both modes.

Standard library only at import time.
"""

import random
import re
import string
from collections.abc import Mapping, Sequence

from .benchmarks import BenchmarkSpec, Problem
from .grading import Verdict, extract_boxed
from .sampling import derive_seed


LETTERS = string.ascii_uppercase
SHUFFLE_SEED = 0  # the option order is a property of the benchmark, not of the run
FLAG_OK = "ok"
FLAGGED_MODES = ("exclude", "corrected")
CORRECTED_COLUMN = "correct_answer"  # MMLU-Redux: the annotators' correction, where they give one
CORRECTABLE_FLAGS = ("wrong_groundtruth", "no_correct_answer")
ANSWER_FORMATS = ("text", "index")

# Inside a box: markup around the letter.
_BOX_MARKUP = re.compile(
    r"\\(?:text|textbf|textrm|textsf|texttt|mathrm|mathbf|mathsf|mbox|operatorname)\s*\{([^{}]*)\}"
)
_BOX_LETTER = re.compile(
    r"(?:(?:option|choice|answer)\s*(?:is\s*)?:?\s*)?"  # "Option C", "Answer: C"
    r"(?:\(\s*([A-Za-z])\s*\)|\[\s*([A-Za-z])\s*\]|([A-Za-z])(?=\s*(?:$|[.:)\]]|\s-\s)))",
    re.IGNORECASE,
)
# In running text: "Answer: C", "**Answer:** (C)", "The answer is C.", "the correct answer is option (b)".
_ANSWER_LINE = re.compile(
    r"(?i:answer)(?:\s+(?i:is))?\s*:?\s*(?:\*\*|__)?\s*:?\s*(?:(?i:option|choice)\s*)?(?:\*\*|__|\$)?\s*"
    r"(?:\(\s*([A-Za-z])\s*\)|\[\s*([A-Za-z])\s*\]|([A-Z])(?![A-Za-z0-9])|([a-z])(?=\s*(?:[.,;:!)*$]|$)))",
    re.MULTILINE,
)


def option_order(problem_id: str, num_options: int, seed: int = SHUFFLE_SEED) -> tuple[int, ...]:
    """The shown order of a problem's options (original indices, first shown first): a permutation drawn from a random
    stream seeded by `seed` and the problem id alone, so it is the same for every sample and every run."""
    order = list(range(num_options))
    random.Random(derive_seed(seed, "options", problem_id)).shuffle(order)
    return tuple(order)


def render_question(question: str, options: Sequence[str]) -> str:
    """The user turn: the question, the lettered options, and how to answer."""
    letters = LETTERS[: len(options)]
    lines = "\n".join(f"{letter}) {option}" for letter, option in zip(letters, options))
    choices = f"{', '.join(letters[:-1])} or {letters[-1]}" if len(letters) > 1 else letters
    return f"{question.strip()}\n\n{lines}\n\nPut the letter of the correct option ({choices}) within \\boxed{{}}."


def rows_to_score(dataset, spec: BenchmarkSpec) -> list[int]:
    """The indices of the rows `spec` scores: every row without a `flag_column`; with one, the rows flagged "ok" (or
    unflagged), plus, with `flagged="corrected"`, the flawed rows whose correction is usable."""
    if spec.flagged not in FLAGGED_MODES:
        raise ValueError(f"Unknown flagged={spec.flagged!r} for {spec.name!r}; use one of {', '.join(FLAGGED_MODES)}.")
    if spec.flag_column is None or spec.flag_column not in dataset.column_names:
        return list(range(len(dataset)))
    flags = dataset[spec.flag_column]
    if spec.flagged == "exclude":
        return [index for index, flag in enumerate(flags) if _is_ok(flag)]
    if CORRECTED_COLUMN not in dataset.column_names:
        raise ValueError(
            f"{spec.dataset} has no {CORRECTED_COLUMN!r} column, which flagged='corrected' reads; its columns are "
            f"{list(dataset.column_names)}."
        )
    return [
        index
        for index, flag in enumerate(flags)
        if _is_ok(flag) or (flag in CORRECTABLE_FLAGS and _corrected(dataset[index], spec) is not None)
    ]


def _is_ok(flag) -> bool:
    return flag is None or str(flag).strip() in ("", FLAG_OK)


def problem_from_row(row: Mapping, problem_id: str, spec: BenchmarkSpec) -> Problem:
    """One row as a `Problem`: the rendered question with its options in the shown order, the gold letter as its
    answer, and `{"order": original indices as shown, "correct_index": the correct option's original index}` as its
    metadata."""
    where = f"{spec.dataset}, problem {problem_id}"
    question = row[spec.problem_column]
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: the {spec.problem_column!r} column holds no question ({question!r}).")
    options, correct = _options(row, spec, where)
    corrected = _corrected(row, spec) if spec.flagged == "corrected" else None
    if corrected is not None:
        options, correct = corrected
    if len(options) < 2 or len(options) > len(LETTERS):
        raise ValueError(f"{where}: a multiple-choice question needs 2 to {len(LETTERS)} options, got {len(options)}.")
    if any(not option for option in options):
        raise ValueError(f"{where}: an option is empty ({options!r}).")
    order = option_order(problem_id, len(options)) if spec.shuffle_options else tuple(range(len(options)))
    shown = [options[index] for index in order]
    gold = LETTERS[order.index(correct)]
    return Problem(problem_id, render_question(question, shown), gold, {"order": order, "correct_index": correct})


def _options(row: Mapping, spec: BenchmarkSpec, where: str) -> tuple[list[str], int]:
    """The options in the data's order and the index of the correct one."""
    if spec.answer_format == "text":
        options = [_text(row[spec.answer_column]), *(_text(row[column]) for column in spec.extra_columns)]
        return options, 0
    if spec.answer_format == "index":
        choices = row[spec.extra_columns[0]]
        if not isinstance(choices, (list, tuple)):
            raise ValueError(f"{where}: the {spec.extra_columns[0]!r} column holds no list of options ({choices!r}).")
        options = [_text(choice) for choice in choices]
        correct = _option_index(row[spec.answer_column], options)
        if correct is None:
            raise ValueError(
                f"{where}: the {spec.answer_column!r} column ({row[spec.answer_column]!r}) names none of the "
                f"{len(options)} options (a 0-based index or a letter)."
            )
        return options, correct
    raise ValueError(
        f"Unknown answer_format {spec.answer_format!r} for multiple-choice {spec.name!r}; use "
        f"{' or '.join(map(repr, ANSWER_FORMATS))}."
    )


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def _option_index(value, options: Sequence[str], *, by_text: bool = False) -> int | None:
    """The option `value` names: a 0-based index (int or digits), a letter (optionally in parentheses), or, with
    `by_text`, an option's exact text; None when it names none."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return value if 0 <= value < len(options) else None
    text = str(value).strip().strip("()").strip()
    if text.isdigit():
        return int(text) if int(text) < len(options) else None
    if len(text) == 1 and text.upper() in LETTERS[: len(options)]:
        return LETTERS.index(text.upper())
    if by_text:
        matches = [index for index, option in enumerate(options) if option.strip() == str(value).strip()]
        return matches[0] if len(matches) == 1 else None
    return None


def _corrected(row: Mapping, spec: BenchmarkSpec) -> tuple[list[str], int] | None:
    """The options and correct index after the annotators' correction of a flawed row, or None if it gives none."""
    flag = str(row.get(spec.flag_column) or "").strip() if spec.flag_column else ""
    correction = row.get(CORRECTED_COLUMN)
    if flag not in CORRECTABLE_FLAGS or correction is None or not str(correction).strip():
        return None
    try:
        options, correct = _options(row, spec, where="")
    except ValueError:
        return None
    if flag == "wrong_groundtruth":
        index = _option_index(correction, options, by_text=True)
        return (options, index) if index is not None else None
    # no_correct_answer: the annotators' answer replaces the labelled option's text
    text = _text(correction)
    if _option_index(text, options) is not None:  # a bare letter or index is no option text
        return None
    return [*options[:correct], text, *options[correct + 1 :]], correct


def extract_letter(completion: str, num_options: int) -> tuple[str | None, str | None]:
    r"""The letter a completion answers with (upper case, among the first `num_options`) and where it was found
    (`"boxed"` or `"answer_line"`), or `(None, None)`: the last `\boxed{}` first, then the last answer line."""
    if not isinstance(completion, str):
        return None, None
    valid = LETTERS[:num_options]
    boxed = extract_boxed(completion)
    if boxed is not None:
        letter = _letter_in_box(boxed, valid)
        if letter is not None:
            return letter, "boxed"
    for match in reversed(list(_ANSWER_LINE.finditer(completion))):
        letter = next(group for group in match.groups() if group).upper()
        if letter in valid:
            return letter, "answer_line"
    return None, None


def _letter_in_box(content: str, valid: str) -> str | None:
    text = content
    for _ in range(3):  # \text{\textbf{C}}
        text = _BOX_MARKUP.sub(r"\1", text)
    text = text.replace("$", "").replace("*", "").strip()
    match = _BOX_LETTER.match(text)
    if match is None:
        return None
    letter = next(group for group in match.groups() if group).upper()
    return letter if letter in valid else None


class MultipleChoiceGrader:
    """The multiple_choice kind: the completion's letter (`extract_letter`) against the gold letter. No summary
    metrics; `details` says where the letter was found."""

    def check(self, problem: Problem, completion: str) -> Verdict:
        num_options = len(problem.metadata.get("order", ())) or len(LETTERS)
        letter, found_in = extract_letter(completion, num_options)
        if letter is None:
            return Verdict(None, False)
        return Verdict(letter, letter == problem.answer, {"found_in": found_in})

    def summary_metrics(self, verdicts: list[Verdict]) -> dict[str, float]:
        return {}

    def close(self) -> None:
        pass
