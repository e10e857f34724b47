"""Which tokens a loss trains on: the top fraction of eligible tokens by a score (an entropy), over the batch or
within each sequence.

Entropy OPD 20% and REOPOLD's dynamic sampling train only on the highest-entropy tokens. The rule is that of "Beyond
the 80/20 Rule" (arXiv 2506.01939), whose code pools the response tokens of the (micro-)batch and keeps the top
ceil(fraction x n); `scope="sequence"` keeps the top ceil(fraction x n_i) of each sequence instead (the TrOPD paper
does not say which it used). Ties are broken by position (the earlier token first), so a selection is reproducible.
"""

import math

import torch


SELECTION_SCOPES = ("batch", "sequence")


def kept_count(fraction: float, count: int) -> int:
    """ceil(fraction x count), without float noise (0.7 x 10 is 7, not 8)."""
    return math.ceil(round(fraction * count, 9))


def top_fraction_mask(
    scores: torch.Tensor,
    fraction: float,
    *,
    eligible: torch.Tensor,
    sequence_ids: torch.Tensor | None = None,
    scope: str = "batch",
) -> torch.Tensor:
    """`(N,)` bool: the ceil(`fraction` x n) eligible tokens of highest `scores`, n counted over the whole batch
    (`scope="batch"`) or per sequence (`scope="sequence"`, `sequence_ids` `(N,)` says which sequence each token is in).

    Args:
        scores (`torch.Tensor`): `(N,)` the score of each token (no gradient is taken).
        fraction (`float`): in (0, 1]; 1 keeps every eligible token.
        eligible (`torch.Tensor`): `(N,)` bool, the tokens that can be selected (e.g. not teacher prefix).
    """
    if scope not in SELECTION_SCOPES:
        raise ValueError(f"scope must be one of {list(SELECTION_SCOPES)}, got {scope!r}.")
    if not (isinstance(fraction, int | float) and not isinstance(fraction, bool) and 0 < fraction <= 1):
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}.")
    if scores.dim() != 1 or eligible.shape != scores.shape:
        raise ValueError(f"scores and eligible must both be (N,), got {tuple(scores.shape)}, {tuple(eligible.shape)}.")
    eligible = eligible.bool()
    num_tokens = scores.shape[0]
    if scope == "batch":
        groups = torch.zeros(num_tokens, dtype=torch.long, device=scores.device)
    else:
        if sequence_ids is None or sequence_ids.shape != scores.shape:
            raise ValueError("scope='sequence' needs sequence_ids of shape (N,): the sequence of each token.")
        groups = sequence_ids.long()
    if num_tokens == 0:
        return eligible.clone()
    # Order the tokens by (group, eligible first, score descending, position): stable sorts from the last key.
    order = torch.arange(num_tokens, device=scores.device)
    keyed = scores.detach().float().masked_fill(~eligible, float("-inf"))
    order = order[torch.sort(keyed[order], descending=True, stable=True).indices]
    order = order[torch.sort((~eligible[order]).long(), stable=True).indices]
    order = order[torch.sort(groups[order], stable=True).indices]
    sorted_groups = groups[order]
    # Rank of each token within its group, and how many of its group are kept.
    starts = torch.ones_like(sorted_groups, dtype=torch.bool)
    starts[1:] = sorted_groups[1:] != sorted_groups[:-1]
    group_start = torch.cummax(torch.where(starts, torch.arange(num_tokens, device=scores.device), 0), 0).values
    rank = torch.arange(num_tokens, device=scores.device) - group_start
    counts = torch.zeros(int(groups.max()) + 1, dtype=torch.long, device=scores.device)
    counts.scatter_add_(0, groups, eligible.long())
    kept_per_group = torch.tensor(
        [kept_count(fraction, count) for count in counts.tolist()], dtype=torch.long, device=scores.device
    )
    selected = torch.zeros_like(eligible)
    selected[order] = rank < kept_per_group[sorted_groups]
    return selected & eligible
