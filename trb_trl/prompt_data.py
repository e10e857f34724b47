"""Prompt datasets for on-policy distillation: a Hub dataset or a local JSONL/JSON/parquet file, as chat prompts.

The trainer only needs a `prompt` column. This module turns the common layouts into one: a plain `prompt` column
(string or chat messages), OpenThoughts3-style `conversations` (first human turn), or a `problem` / `question`
column; optionally keeps one `domain` (OpenThoughts3 mixes math, code and science) and prepends a system prompt.
"""

from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset


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


def to_chat_prompt(example: dict, prompt_column: str = "prompt", system_prompt: str | None = None) -> dict:
    """Return {"prompt": [messages]} for one example, with `system_prompt` first when given."""
    text = _user_text(example, prompt_column)
    messages = list(text) if isinstance(text, list) else [{"role": "user", "content": text}]
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return {"prompt": messages}


def load_prompt_dataset(
    name_or_path: str,
    *,
    config: str | None = None,
    split: str = "train",
    prompt_column: str = "prompt",
    system_prompt: str | None = None,
    domain: str | None = None,
    max_samples: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Load prompts from a local file (`.jsonl`, `.json`, `.parquet`, `.csv`) or a Hub dataset as chat prompts."""
    suffix = Path(name_or_path).suffix.lower()
    if suffix in LOCAL_FORMATS:
        if not Path(name_or_path).is_file():
            raise FileNotFoundError(f"Prompt file {name_or_path} does not exist.")
        dataset = load_dataset(LOCAL_FORMATS[suffix], data_files=name_or_path, split="train")
    else:
        dataset = load_dataset(name_or_path, name=config, split=split)
    if isinstance(dataset, DatasetDict):  # pragma: no cover - load_dataset with split returns a Dataset
        dataset = dataset[split]
    if domain is not None:
        if "domain" not in dataset.column_names:
            raise ValueError(f"dataset_domain={domain!r} but the dataset has no 'domain' column.")
        dataset = dataset.filter(lambda example: example["domain"] == domain)
    if max_samples is not None:
        dataset = dataset.shuffle(seed=seed).select(range(min(max_samples, len(dataset))))
    return dataset.map(
        to_chat_prompt,
        fn_kwargs={"prompt_column": prompt_column, "system_prompt": system_prompt},
        remove_columns=dataset.column_names,
    )


def drop_long_prompts(dataset: Dataset, tokenizer_name_or_path: str, max_tokens: int) -> Dataset:
    """Keep prompts whose tokenized form (chat template applied for chat prompts) has at most `max_tokens` tokens."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_name_or_path)

    def short_enough(example: dict) -> bool:
        prompt = example["prompt"]
        if isinstance(prompt, str):
            return len(tokenizer(prompt)["input_ids"]) <= max_tokens
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        return len(ids["input_ids"]) <= max_tokens

    return dataset.filter(short_enough)
