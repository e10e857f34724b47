"""Per-row token budgets for one `generate` call: each row stops once it has generated its own number of tokens.

TrOPD's guidance continues a teacher prefix of length l with the student within the completion budget, so a row may
generate only `max_completion_length - l` tokens. `generate`'s own limit is one number for the whole batch; a row's
budget is a stopping criterion instead: the row is finished once it has generated its budget (padded from then on,
as after a stop token), and `generate` returns as soon as every row is finished. The criterion reads only the sequence
length, with no collective: under `synced_gpus` a process whose rows are all finished keeps stepping with the others,
exactly as after stop tokens.
"""

from collections.abc import Sequence

import torch
from transformers import StoppingCriteria


class RowBudgetCriteria(StoppingCriteria):
    """Marks row i finished once it has generated `budgets[i]` new tokens after the `prompt_length` prompt columns.

    `generate` always samples one token before it consults stopping criteria, so a budget of 0 finishes the row after
    its first token (which the caller drops).
    """

    def __init__(self, budgets: Sequence[int] | torch.Tensor, prompt_length: int):
        budgets = torch.as_tensor(budgets, dtype=torch.long)
        if budgets.dim() != 1 or bool((budgets < 0).any()):
            raise ValueError(f"budgets must be one integer >= 0 per row, got {budgets.tolist()}.")
        self.budgets = budgets
        self.prompt_length = int(prompt_length)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if input_ids.shape[0] != self.budgets.numel():
            raise ValueError(
                f"{self.budgets.numel()} row budgets for a batch of {input_ids.shape[0]} rows: pass one budget per "
                "generated row (num_return_sequences > 1 is not supported)."
            )
        if self.budgets.device != input_ids.device:
            self.budgets = self.budgets.to(input_ids.device)
        return self.budgets <= input_ids.shape[1] - self.prompt_length
