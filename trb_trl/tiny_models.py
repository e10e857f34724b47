"""Tiny random-weight Qwen3 students/teachers and a word-level tokenizer, built locally (no Hub).

Used by the tests, the rollout benchmark, the tiny CPU recipe and the demo.
"""

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM


END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [END_OF_TEXT, IM_START, IM_END]
CHAT_TEMPLATE = (
    "{% for message in messages %}" + IM_START + " {{ message['role'] }} {{ message['content'] }} " + IM_END + " "
    "{% endfor %}{% if add_generation_prompt %}" + IM_START + " assistant {% endif %}"
)


def build_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A whitespace-split word-level tokenizer over `SPECIAL_TOKENS + words`, Qwen-style specials, left padding."""
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=END_OF_TEXT))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        additional_special_tokens=[IM_START, IM_END],
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_qwen3(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    eos_token_id: int | list[int] = 0,
    seed: int = 0,
) -> Qwen3ForCausalLM:
    """A randomly initialised Qwen3 causal LM (untied embeddings, float32)."""
    import torch

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=eos_token_id,
        pad_token_id=0,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = 0
    return model.eval()


def write_tiny_pair(output_dir: str | Path, *, num_words: int = 256, seed: int = 0) -> dict[str, str]:
    """Write a tokenizer, a 2-layer student and a 3-layer teacher to `output_dir`; return their paths.

    The student stops on `<|endoftext|>` and the teacher on `<|im_end|>` (like a Qwen3-Base student and an instruct
    teacher); their lm_heads are padded to 8 rows more than the tokenizer, like Qwen3 checkpoints.
    """
    output_dir = Path(output_dir)
    tokenizer = build_word_tokenizer([f"w{i}" for i in range(num_words)])
    vocab = len(tokenizer)
    eos, im_end = tokenizer.convert_tokens_to_ids([END_OF_TEXT, IM_END])
    student = build_tiny_qwen3(vocab + 8, hidden_size=64, num_layers=2, eos_token_id=eos, seed=seed)
    teacher = build_tiny_qwen3(
        vocab + 8, hidden_size=96, num_layers=3, num_heads=6, num_kv_heads=2, eos_token_id=[im_end, eos], seed=seed + 1
    )
    paths = {name: str(output_dir / name) for name in ("tokenizer", "student", "teacher")}
    for name, obj in (("tokenizer", tokenizer), ("student", student), ("teacher", teacher)):
        obj.save_pretrained(paths[name])
        if name != "tokenizer":
            tokenizer.save_pretrained(paths[name])
    return paths
