"""Prompt datasets for on-policy distillation: a Hub dataset or a local JSONL/JSON/parquet file, as chat prompts.

The trainer only needs a `prompt` column. This module turns the common layouts into one: a plain `prompt` column
(string or chat messages), OpenThoughts3-style `conversations` (first human turn), or a `problem` / `question`
column; optionally keeps some `domain`s (OpenThoughts3 mixes math, code and science) and prepends a system prompt.
Long prompts are dropped *before* a random subset is drawn, so a subset has exactly the size asked for.
"""

from pathlib import Path

from datasets import Dataset, DatasetDict, concatenate_datasets, load_dataset


LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
QUESTION_COLUMNS = ("problem", "question", "query", "instruction")


def _user_text(example: dict, prompt_column: str) -> str | list:
    if prompt_column in example and example[prompt_column] is not None:
        return example[prompt_column]
    if "conversations" in example:
        for turn in example["conversations"]:
            if turn.get("from", turn.get("role")) in ("human", "user"):
                return turn.get("value", turn.get("content"))
    for column in QUESTION_COLUMNS:
        if column in example:
            return example[column]
    raise ValueError(
        f"No prompt found: expected a {prompt_column!r} column, OpenThoughts-style 'conversations', or one of "
        f"{QUESTION_COLUMNS}; got columns {sorted(example)}. Set `prompt_column`."
    )


def to_chat_prompt(
    example: dict,
    prompt_column: str = "prompt",
    system_prompt: str | None = None,
    teacher_id_column: str | None = None,
) -> dict:
    """Return {"prompt": [messages]} for one example, with `system_prompt` first when given; with several teachers,
    also its `teacher_id` (the value of `teacher_id_column`, or of a `teacher_id` column when the row has one)."""
    text = _user_text(example, prompt_column)
    messages = list(text) if isinstance(text, list) else [{"role": "user", "content": text}]
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    row = {"prompt": messages}
    column = teacher_id_column or "teacher_id"
    if column in example:
        row["teacher_id"] = example[column]
    elif teacher_id_column is not None:
        raise ValueError(
            f"teacher_id_column={teacher_id_column!r}, but the rows have no such column ({sorted(example)})."
        )
    return row


def parse_domains(domain: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """`"math"`, `"math,code,science"` or a list -> the domain names, in order, without repeats ([] for None)."""
    if domain is None:
        return []
    parts = domain.split(",") if isinstance(domain, str) else list(domain)
    names = [str(part).strip() for part in parts if str(part).strip()]
    if not names:
        raise ValueError(f"dataset_domain={domain!r} names no domain; e.g. 'math' or 'math,code,science'.")
    return list(dict.fromkeys(names))


def load_prompt_dataset(
    name_or_path: str,
    *,
    config: str | None = None,
    split: str = "train",
    prompt_column: str = "prompt",
    system_prompt: str | None = None,
    domain: str | list[str] | tuple[str, ...] | None = None,
    max_samples: int | None = None,
    max_prompt_tokens: int | None = None,
    tokenizer=None,
    seed: int = 0,
    teacher_id_column: str | None = None,
) -> Dataset:
    """Load prompts from a local file (`.jsonl`, `.json`, `.parquet`, `.csv`) or a Hub dataset as chat prompts.

    Rows are kept in this order: `domain` filter, then prompts longer than `max_prompt_tokens` tokens are dropped
    (measured with `tokenizer`, a tokenizer or its name/path), then `max_samples` prompts are drawn at random
    (`seed`) from those that remain: exactly `max_samples`, or a `ValueError` if fewer remain. A local file has a
    single split, `"train"`; asking it for another split is an error, as it is for a Hub dataset that lacks it.
    """
    dataset = load_raw_split(name_or_path, config=config, split=split)
    domains = parse_domains(domain)
    if domains:
        if "domain" not in dataset.column_names:
            raise ValueError(f"dataset_domain={domain!r} but the dataset has no 'domain' column.")
        present = set(dataset.unique("domain"))
        missing = [name for name in domains if name not in present]
        if missing:
            raise ValueError(
                f"dataset_domain names {missing}, which no row of {name_or_path} has; its domains are "
                f"{sorted(present, key=str)}."
            )
        wanted = set(domains)
        dataset = dataset.filter(lambda value: value in wanted, input_columns="domain")
    keep = None
    if max_prompt_tokens is not None:
        if tokenizer is None:
            raise ValueError("max_prompt_tokens needs a tokenizer to measure the prompts.")
        keep = prompt_length_filter(tokenizer, max_prompt_tokens)
    where = f"{name_or_path} (split {split!r}" + (f", domains {', '.join(domains)})" if domains else ")")
    return select_prompts(
        dataset,
        num_prompts=max_samples,
        keep=keep,
        seed=seed,
        prompt_column=prompt_column,
        system_prompt=system_prompt,
        description=where,
        max_prompt_tokens=max_prompt_tokens,
        teacher_id_column=teacher_id_column,
    )


def load_raw_split(name_or_path: str, *, config: str | None = None, split: str = "train") -> Dataset:
    """One split of a local prompt file or Hub dataset, rows as stored. Unknown splits raise a clear `ValueError`."""
    suffix = Path(name_or_path).suffix.lower()
    if suffix in LOCAL_FORMATS:
        if not Path(name_or_path).is_file():
            raise FileNotFoundError(f"Prompt file {name_or_path} does not exist.")
        if split != "train":
            raise ValueError(
                f"{name_or_path} is a local prompt file: its only split is 'train', not {split!r}. Evaluation on a "
                "local file needs a separate file; set `eval_strategy: no` to train without evaluation."
            )
        return load_dataset(LOCAL_FORMATS[suffix], data_files=name_or_path, split="train")
    available = available_splits(name_or_path, config)
    if available is not None and split not in available:
        raise ValueError(missing_split_message(name_or_path, split, available))
    try:
        dataset = load_dataset(name_or_path, name=config, split=split)
    except ValueError as error:  # datasets: 'Unknown split "test". Should be one of [...]'
        if "Unknown split" in str(error):
            raise ValueError(missing_split_message(name_or_path, split, None) + f" ({error})") from error
        raise
    if isinstance(dataset, DatasetDict):  # pragma: no cover - load_dataset with split returns a Dataset
        dataset = dataset[split]
    return dataset


def available_splits(name_or_path: str, config: str | None = None) -> list[str] | None:
    """The split names of a local prompt file (`["train"]`) or Hub dataset; `None` when they cannot be read (offline
    without a cached copy, say), in which case loading the split itself reports a missing one."""
    if Path(name_or_path).suffix.lower() in LOCAL_FORMATS:
        return ["train"]
    from datasets import get_dataset_split_names

    try:
        return list(get_dataset_split_names(name_or_path, config_name=config))
    except Exception:  # network, authentication, a script dataset: leave the verdict to load_dataset
        return None


def missing_split_message(name_or_path: str, split: str, available: list[str] | None) -> str:
    has = f" (it has: {', '.join(available)})" if available else ""
    return (
        f"{name_or_path} has no split {split!r}{has}. Set `dataset_test_split` to an existing split, or "
        "`eval_strategy: no` to train without evaluation."
    )


def prompt_length_filter(tokenizer, max_tokens: int):
    """A predicate on chat-prompt examples: at most `max_tokens` tokens, chat template and generation prompt applied
    (plain-string prompts are tokenized as they are). `tokenizer` is a tokenizer or its name/path."""
    if isinstance(tokenizer, str | Path):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)

    def short_enough(example: dict) -> bool:
        prompt = example["prompt"]
        if isinstance(prompt, str):
            return len(tokenizer(prompt)["input_ids"]) <= max_tokens
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        return len(ids["input_ids"]) <= max_tokens

    return short_enough


def select_prompts(
    dataset: Dataset,
    *,
    num_prompts: int | None = None,
    keep=None,
    seed: int = 0,
    prompt_column: str = "prompt",
    system_prompt: str | None = None,
    description: str = "the dataset",
    max_prompt_tokens: int | None = None,
    teacher_id_column: str | None = None,
) -> Dataset:
    """Turn raw rows into chat prompts, keep those `keep` accepts, and (with `num_prompts`) draw exactly that many.

    The draw shuffles the rows with `seed` and takes the first `num_prompts` that pass `keep`: a uniform random
    subset of the rows that pass, the same for any window size. Rows are converted and filtered in windows, so a
    25,600-prompt subset of a million-row dataset never tokenizes the whole dataset.
    """

    def convert(rows: Dataset) -> Dataset:
        rows = rows.map(
            to_chat_prompt,
            fn_kwargs={
                "prompt_column": prompt_column,
                "system_prompt": system_prompt,
                "teacher_id_column": teacher_id_column,
            },
            remove_columns=rows.column_names,
        )
        return rows.filter(keep) if keep is not None else rows

    if num_prompts is None:
        return convert(dataset)
    if num_prompts < 1:
        raise ValueError(f"max_train_prompts must be >= 1, got {num_prompts}.")
    dataset = dataset.shuffle(seed=seed)
    parts, kept, start = [], 0, 0
    window = num_prompts
    while kept < num_prompts and start < len(dataset):
        stop = min(len(dataset), start + window)
        part = convert(dataset.select(range(start, stop)))
        parts.append(part)
        kept += len(part)
        # Size the next window from the pass rate so far (at least 5%), with 10% slack.
        pass_rate = max(kept / stop, 0.05)
        window = max(64, int(1.1 * (num_prompts - kept) / pass_rate))
        start = stop
    if kept < num_prompts:
        dropped = f" after dropping prompts longer than {max_prompt_tokens} tokens" if max_prompt_tokens else ""
        raise ValueError(
            f"max_train_prompts={num_prompts}, but {description} has only {kept} prompts{dropped} (of {len(dataset)} "
            "rows). Lower `max_train_prompts`" + (" or raise `max_prompt_tokens`." if max_prompt_tokens else ".")
        )
    return concatenate_datasets(parts).select(range(num_prompts))


def drop_long_prompts(dataset: Dataset, tokenizer_name_or_path, max_tokens: int) -> Dataset:
    """Keep prompts whose tokenized form (chat template applied for chat prompts) has at most `max_tokens` tokens."""
    return dataset.filter(prompt_length_filter(tokenizer_name_or_path, max_tokens))
