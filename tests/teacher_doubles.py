"""Stand-in teachers for rollout tests: configs and logits fixed by hand, a cache that is only passed along."""

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
