"""Stand-in models for rollout tests: configs and logits fixed by hand, a cache that is only passed along; real tiny
models whose output head is replaced by a fixed distribution."""

from types import SimpleNamespace

import torch


class StopLovingTeacher(torch.nn.Module):
    """A teacher that always puts almost all its mass on its own stop token (an instruct teacher's `<|im_end|>`), at
    every position it is fed (one decoding step or a whole block)."""

    def __init__(self, vocab_size, stop_id):
        super().__init__()
        self.config = SimpleNamespace(get_text_config=lambda: SimpleNamespace(vocab_size=vocab_size))
        self.generation_config = SimpleNamespace(eos_token_id=stop_id)
        self.logits = torch.zeros(vocab_size)
        self.logits[stop_id] = 12.0

    def forward(self, input_ids, past_key_values=None, **kwargs):
        logits = self.logits.expand(input_ids.shape[0], input_ids.shape[1], -1)
        return SimpleNamespace(logits=logits, past_key_values=past_key_values or "cache")


def with_fixed_stop_head(model, stop_id, stop_probability=0.3):
    """`model` (a real tiny causal LM, changed in place and returned) with its output replaced by a fixed
    distribution: `stop_id` with `stop_probability` at every position, the rest uniform. With the teacher's
    `<|im_end|>` it is an instruct teacher that wants to end its turn, or a Base student that writes `<|im_end|>` after
    a chat-format prompt (its own stop id being `<|endoftext|>`)."""
    vocab, hidden = model.lm_head.weight.shape
    head = torch.nn.Linear(hidden, vocab, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[stop_id] = torch.log(torch.tensor(stop_probability * (vocab - 1) / (1 - stop_probability)))
    model.lm_head = head
    return model
