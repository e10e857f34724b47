"""Exact speculative sampling from the trust-region blend mu*: the student drafts, the teacher verifies blocks.

mu* is within KL epsilon of the student, so the student is an excellent draft model for it. Each round the student
drafts `gamma` tokens from its own sampling distribution q (its tempered, truncated scores, exactly what `generate`
would sample from the student alone, with its mass on the teacher's stop ids merged into its stop id), the teacher runs once over the whole block, and mu* is formed at every drafted
position from the two models' logits there, exactly as [`TrustRegionBlendingProcessor`] forms it (same vocabulary cut,
stop alignment, temperature and banned tokens), then truncated by top-k/top-p/min-p exactly as `generate`'s warpers
truncate the processor's scores: the target p. Drafted token t is accepted with probability min(1, p_t(x_t) / q_t(x_t))
in order; the first rejection is replaced by a sample from norm(max(0, p_t - q_t)); if all are accepted one more token
is drawn from p (the bonus). Every emitted token is then distributed exactly as under the processor path (Leviathan et
al. 2023, Chen et al. 2023), at an acceptance of 1 - TV(p, q) per token (>= 1 - sqrt(epsilon / 2) before truncation),
while the teacher runs once per block, in its parallel (prefill-like) regime, instead of once per token.

Rows accept different numbers of tokens. The batch never splits: both models append the same columns to their KV
caches every round (the pending token and the drafts), rejected drafts stay in the caches but are masked out of the
shared 2-D attention mask, and every row carries its own positions. Finished rows keep running (their outputs are
ignored) and are padded with `pad_token_id`, as in `generate`.
"""

import time
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import torch
from transformers import GenerationConfig

from ..memory_preflight import count_parameters
from ..stop_alignment import as_id_list
from .blending import trust_region_blend
from .cached_forward import forward_with_cache
from .statistics import TokenMetric
from .teacher import output_vocab_size, shared_vocab_size, stop_setup, teacher_vocab_size
from .trust_region import TrustRegionBlendingProcessor, blend_summary, check_epsilon
from .warpers import sampling_warpers


# Logged next to `TRUST_REGION_METRICS` (prefix `trb/`) for speculative rollouts, over the same tokens. Each row-round
# emits one token that is not an accepted draft (the correction or the bonus), so the first is 1 - the second up to
# rows cut short by a stop id or `max_new_tokens`; tokens per teacher forward is 1 / the second.
SPECULATIVE_METRICS = (
    TokenMetric("speculative/accepted_draft_fraction", "mean", lambda s: s["draft_accepted"]),
    TokenMetric("speculative/teacher_forwards_per_token", "mean", lambda s: s["round_share"]),
)

# The adaptive draft length starts from the acceptance floor 1 - sqrt(epsilon / 2), worth this many draft tests.
_PRIOR_TESTS = 16.0

# Generation settings that add a logits processor other than token bans, or change the search; the engine refuses
# them instead of silently sampling something else. Name -> whether the setting is active.
_UNSUPPORTED_SETTINGS: dict[str, Callable[[GenerationConfig], bool]] = {
    "num_beams": lambda c: (c.num_beams or 1) > 1,
    "num_beam_groups": lambda c: (c.num_beam_groups or 1) > 1,
    "penalty_alpha": lambda c: c.penalty_alpha is not None and c.penalty_alpha > 0,
    "dola_layers": lambda c: c.dola_layers is not None,
    "prompt_lookup_num_tokens": lambda c: c.prompt_lookup_num_tokens is not None,
    "repetition_penalty": lambda c: c.repetition_penalty not in (None, 1.0),
    "encoder_repetition_penalty": lambda c: c.encoder_repetition_penalty not in (None, 1.0),
    "no_repeat_ngram_size": lambda c: bool(c.no_repeat_ngram_size),
    "encoder_no_repeat_ngram_size": lambda c: bool(c.encoder_no_repeat_ngram_size),
    "sequence_bias": lambda c: c.sequence_bias is not None,
    "guidance_scale": lambda c: c.guidance_scale not in (None, 1.0),
    "forced_bos_token_id": lambda c: c.forced_bos_token_id is not None,
    "forced_eos_token_id": lambda c: c.forced_eos_token_id is not None,
    "exponential_decay_length_penalty": lambda c: c.exponential_decay_length_penalty is not None,
    "remove_invalid_values": lambda c: bool(c.remove_invalid_values),
    "watermarking_config": lambda c: c.watermarking_config is not None,
    "typical_p": lambda c: c.typical_p is not None and c.typical_p < 1.0,
    "epsilon_cutoff": lambda c: c.epsilon_cutoff is not None and 0.0 < c.epsilon_cutoff < 1.0,
    "eta_cutoff": lambda c: c.eta_cutoff is not None and 0.0 < c.eta_cutoff < 1.0,
    "top_h": lambda c: getattr(c, "top_h", None) is not None,
    "stop_strings": lambda c: c.stop_strings is not None,
    "max_time": lambda c: c.max_time is not None,
    "return_dict_in_generate": lambda c: bool(c.return_dict_in_generate),
    "cache_implementation": lambda c: c.cache_implementation not in (None, "dynamic"),
}


class DraftBlock(NamedTuple):
    """What a [`Drafter`] proposes in one round.

    Args:
        tokens (`torch.LongTensor` of shape `(batch, num_tokens)`): the drafted tokens.
        logits (`torch.Tensor` of shape `(batch, num_tokens + 1, vocab)`): the drafter's raw float32 logits at each
            drafted position and at the one after the last draft (for the bonus token).
        probs (`torch.Tensor` of shape `(batch, num_tokens, vocab)`, *optional*): the distributions the drafts were
            sampled from (what `choose` returned); `None` for greedy decoding.
    """

    tokens: torch.LongTensor
    logits: torch.Tensor
    probs: torch.Tensor | None


# choose(step, logits) -> (tokens, probs): the engine's draft rule for drafted position `step` (bans, warpers, sampling).
DraftRule = Callable[[int, torch.Tensor], tuple[torch.LongTensor, torch.Tensor | None]]


class Drafter(Protocol):
    """The student side of the engine: drafts tokens over the engine's cache layout. Replaceable (e.g. by a vLLM
    drafter) as long as `propose` returns the full distributions the drafts were drawn from: exactness needs q."""

    def propose(
        self,
        pending_ids: torch.LongTensor,
        attention_mask: torch.LongTensor,
        position_ids: torch.LongTensor,
        num_tokens: int,
        choose: DraftRule,
    ) -> DraftBlock:
        """Feed `pending_ids` (the tokens the drafter has not seen, `(batch, P)`), then draft `num_tokens` tokens,
        each drawn with `choose`, and feed the last one too (its logits serve the bonus token). `attention_mask`
        covers every column fed so far plus the pending ones, `(batch, C + P)`, 0 on padding and rejected drafts;
        the drafts' own columns are 1. `position_ids` are the pending tokens' positions; drafts continue from the
        last one."""
        ...

    def release(self) -> None:
        """Free the KV cache."""
        ...


def sample_categorical(weights: torch.Tensor) -> torch.LongTensor:
    """One draw per row from the categorical law proportional to `weights` `(N, V)` (non-negative, a positive sum),
    by inverting the float64 cumulative sum. Same law as `torch.multinomial(weights, 1)`, which on CPU costs about 6x
    more at V = 4096 and 20x more at V = 151,936: the engine samples once per draft. A token of zero weight is never
    drawn (its interval is empty), and float64 keeps the intervals of tokens far below 1e-7 exact to ~1e-16."""
    cumulative = weights.cumsum(-1, dtype=torch.float64)
    total = cumulative[:, -1:].contiguous()
    draw = torch.rand(weights.shape[0], 1, dtype=torch.float64, device=weights.device) * total
    # A draw that rounds up to the total would land past the end: it belongs to the last token of positive weight.
    last = torch.searchsorted(cumulative, total, right=False)
    return torch.minimum(torch.searchsorted(cumulative, draw, right=True), last).squeeze(1)


def _forward(model, cache, input_ids, attention_mask, position_ids, logits_to_keep):
    outputs, cache = forward_with_cache(
        model,
        cache,
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=logits_to_keep,
    )
    return outputs.logits, cache


class StudentDrafter:
    """Drafts with a Hugging Face causal LM (the student) and its own KV cache, one token per forward."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.cache = None

    def propose(self, pending_ids, attention_mask, position_ids, num_tokens, choose) -> DraftBlock:
        ids, mask, positions = pending_ids, attention_mask, position_ids
        logits, tokens, probs = [], [], []
        for step in range(num_tokens + 1):
            step_logits, self.cache = _forward(self.model, self.cache, ids, mask, positions, 1)
            logits.append(step_logits[:, -1].float())
            if step == num_tokens:
                break
            token, prob = choose(step, logits[-1])
            tokens.append(token)
            probs.append(prob)
            ids = token[:, None]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            positions = positions[:, -1:] + 1
        drafted = torch.stack(tokens, 1) if tokens else pending_ids.new_zeros(pending_ids.shape[0], 0)
        sampled = torch.stack(probs, 1) if probs and probs[0] is not None else None
        return DraftBlock(drafted, torch.stack(logits, 1), sampled)

    def release(self) -> None:
        self.cache = None


class _Timer:
    """Wall time of the teacher's forwards: CUDA events on GPU (read once, at the end), `perf_counter` on CPU."""

    def __init__(self):
        self.seconds_so_far = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def start(self, device: torch.device):
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def stop(self, device: torch.device, start) -> None:
        if device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((start, end))
        else:
            self.seconds_so_far += time.perf_counter() - start

    @property
    def seconds(self) -> float:
        if self.events:
            torch.cuda.synchronize()
            self.seconds_so_far += sum(start.elapsed_time(end) for start, end in self.events) / 1000.0
            self.events.clear()
        return self.seconds_so_far


class _Plan(NamedTuple):
    """What `generate` would do with one generation config, resolved once per call."""

    do_sample: bool
    warpers: list
    max_new_tokens: int
    stop_ids: torch.Tensor  # generate's eos ids: they end a row, and min_length/min_new_tokens ban them
    min_new_tokens: int  # the EOS ban holds while fewer new tokens than this were generated (min_length folded in)
    static_bans: torch.Tensor  # suppress_tokens and single-token bad words
    begin_bans: torch.Tensor  # begin_suppress_tokens: banned at the first new token only
    pad_token_id: int
    num_return_sequences: int


class SpeculativeBlendingSampler:
    r"""Samples rollouts from exactly the distribution of [`TrustRegionBlendingProcessor`] inside `generate`, with
    the student drafting `draft_length` tokens per round and the teacher verifying each block in one forward.

    Construct one per `generate` call, like the processor; `generate(model, input_ids, attention_mask,
    generation_config)` then returns what `model.generate(..., logits_processor=[processor])` would return (the same
    shape, finished rows padded with `pad_token_id`), sampled from the same distribution, and greedy decoding
    (`do_sample=False`) gives the same tokens up to float rounding in near ties. `statistics()` and `summary()` report
    the processor's per-token statistics over the emitted tokens, plus the acceptance rate and tokens per teacher
    forward.

    Supported generation settings: sampling or greedy search, temperature, top-k, top-p, min-p, `max_new_tokens` /
    `max_length`, `min_new_tokens` / `min_length`, `suppress_tokens`, `begin_suppress_tokens`, single-token
    `bad_words_ids`, `num_return_sequences`, `renormalize_logits`. Anything that adds another logits processor or
    changes the search (repetition penalties, beam search, typical-p, custom `logits_processor`, ...) is refused.

    Args:
        teacher_model (`PreTrainedModel`):
            The teacher, on the student's device, sharing its tokenizer.
        epsilon (`float` or `torch.Tensor` of shape `(batch_size,)`):
            KL budget per token, one per generated row if a tensor. The float `0` never calls the teacher.
        draft_length (`int`, *optional*, defaults to `8`):
            gamma, the number of student tokens drafted per round (the last round of a row drafts fewer); with
            `adaptive_draft_length`, the largest. A round costs gamma + 1 student forwards and one teacher forward over
            gamma + 1 tokens and emits E = (1 - alpha^(gamma + 1)) / (1 - alpha) tokens per row on average at
            acceptance alpha.
        adaptive_draft_length (`bool`, *optional*, defaults to `False`):
            Choose gamma every round to maximise expected tokens per unit of cost, E(gamma) / (gamma + 1 + c), from
            the acceptance measured so far in this call (starting from the floor 1 - sqrt(epsilon / 2), worth 16
            tests) and the cost c of a teacher forward in student forwards (`cost_ratio`). Still exact: gamma is
            fixed before each round's drafts are drawn. Deterministic given the seed (no timing enters).
        cost_ratio (`float`, *optional*):
            c above. Defaults to the teacher's parameter count over the student's: the ratio of the weights each
            reads per forward, which is the cost ratio of memory-bound (GPU) decoding.
        temperature, vocab_size, student_eos_token_id, teacher_eos_token_id:
            As for [`TrustRegionBlendingProcessor`]. With sampling, `temperature` must equal the generation config's.
        synced (`bool`, *optional*, defaults to `False`):
            DeepSpeed ZeRO-3 with a sharded model: every process runs the same number of rounds, with the same draft
            length, until all are done (one `all_reduce` per round; finished processes keep running both models on
            their finished rows). Without it no collective is ever issued.
        drafter_factory (`Callable[[PreTrainedModel], Drafter]`, *optional*):
            Builds the drafter from the model given to `generate`. Defaults to [`StudentDrafter`].

    Example:

    ```python
    >>> sampler = SpeculativeBlendingSampler(teacher, 0.02, draft_length=8, vocab_size=len(tokenizer),
    ...                                      student_eos_token_id=tokenizer.eos_token_id)
    >>> out = sampler.generate(student, **inputs, do_sample=True, max_new_tokens=256)
    >>> sampler.summary()["acceptance_rate"]
    ```
    """

    STATISTICS = {
        **TrustRegionBlendingProcessor.STATISTICS,
        "draft_accepted": torch.bool,
        "round_share": torch.float32,
    }

    def __init__(
        self,
        teacher_model: torch.nn.Module,
        epsilon: float | torch.Tensor,
        *,
        draft_length: int = 8,
        adaptive_draft_length: bool = False,
        cost_ratio: float | None = None,
        temperature: float = 1.0,
        vocab_size: int | None = None,
        student_eos_token_id: int | list[int] | None = None,
        teacher_eos_token_id: int | list[int] | None = None,
        synced: bool = False,
        drafter_factory: Callable[[torch.nn.Module], Drafter] | None = None,
    ):
        check_epsilon(epsilon)
        if not isinstance(draft_length, int) or draft_length < 1:
            raise ValueError(f"draft_length must be an integer >= 1 (tokens drafted per round), got {draft_length}.")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        if cost_ratio is not None and not cost_ratio > 0:
            raise ValueError(f"cost_ratio must be > 0 (teacher forward cost in student forwards), got {cost_ratio}.")
        self.teacher_model = teacher_model
        self.adaptive_draft_length = adaptive_draft_length
        self.cost_ratio = cost_ratio
        self.epsilon = epsilon
        self.draft_length = draft_length
        self.temperature = float(temperature)
        self.synced = synced
        self.drafter_factory = drafter_factory or StudentDrafter

        self.teacher_vocab_size = teacher_vocab_size(teacher_model, vocab_size)
        self.vocab_size = vocab_size
        self.teacher_eos_token_ids, self.student_eos_token_ids, self.stop_alignment = stop_setup(
            teacher_model, student_eos_token_id, teacher_eos_token_id, vocab_size
        )

        self._records: list[dict[str, torch.Tensor]] = []
        self._timer = _Timer()
        self._teacher_forwards = 0
        self._student_forwards = 0
        self._rounds = 0
        self._draft_tests = 0
        self._drafts_accepted = 0
        self._row_rounds = 0
        self._tokens = 0
        self._teacher_cache = None
        self._drafter = None
        self._recorded_rows: torch.Tensor | None = None  # rows whose tokens are recorded (None: all)
        self._prior_acceptance = 1.0
        self._draft_lengths: list[int] = []

    @property
    def is_active(self) -> bool:
        """False when epsilon is the float 0: mu* is the student and the teacher is never called."""
        return isinstance(self.epsilon, torch.Tensor) or self.epsilon > 0

    # ----------------------------------------------------------------------------------------------------------------
    # Settings

    def _plan(self, model, generation_config, kwargs, prompt_length: int, device: torch.device) -> _Plan:
        config = _resolve_generation_config(model, generation_config, kwargs)
        used = [name for name, is_set in _UNSUPPORTED_SETTINGS.items() if is_set(config)]
        if used:
            raise ValueError(
                f"The speculative rollout engine does not support the generation settings {used}: they add logits "
                "processors or a search it does not reproduce. Remove them from the generation config (or "
                "`generation_kwargs`), or use trb_rollout_engine='processor'."
            )
        if getattr(model.config, "is_encoder_decoder", False):
            raise ValueError("The speculative rollout engine needs a decoder-only student.")
        do_sample = bool(config.do_sample)
        if do_sample and config.temperature is not None and abs(config.temperature - self.temperature) > 1e-12:
            raise ValueError(
                f"The sampler blends at temperature={self.temperature} but the generation config samples at "
                f"temperature={config.temperature}; pass the same temperature to both."
            )
        stop_ids = as_id_list(config.eos_token_id)
        pad = config.pad_token_id
        if pad is None:
            pad = stop_ids[0] if stop_ids else 0  # what generate does when pad_token_id is unset
        if config.max_new_tokens is not None:
            max_new = int(config.max_new_tokens)
        else:
            max_new = int(config.max_length) - prompt_length
        if max_new < 1:
            raise ValueError(
                f"Nothing to generate: max_new_tokens={config.max_new_tokens}, max_length={config.max_length}, "
                f"prompt length {prompt_length}. Set max_new_tokens >= 1."
            )
        min_new = max(int(config.min_new_tokens or 0), int(config.min_length or 0) - prompt_length)
        bans = as_id_list(config.suppress_tokens)
        for sequence in config.bad_words_ids or []:
            sequence = as_id_list(sequence)
            if len(sequence) != 1:
                raise ValueError(
                    f"The speculative rollout engine supports single-token bad_words_ids only, got {sequence}; ban "
                    "single tokens or use trb_rollout_engine='processor'."
                )
            if sequence[0] not in stop_ids:  # NoBadWordsLogitsProcessor never bans a stop id
                bans += sequence
        warpers = []
        if do_sample:  # generate's warpers, in generate's order, with its settings
            warpers = list(sampling_warpers(config.temperature, config.top_k, config.top_p, config.min_p))
        return _Plan(
            do_sample=do_sample,
            warpers=warpers,
            max_new_tokens=max_new,
            stop_ids=torch.tensor(stop_ids, dtype=torch.long, device=device),
            min_new_tokens=min_new,
            static_bans=torch.tensor(sorted(set(bans)), dtype=torch.long, device=device),
            begin_bans=torch.tensor(as_id_list(config.begin_suppress_tokens), dtype=torch.long, device=device),
            pad_token_id=int(pad),
            num_return_sequences=int(config.num_return_sequences or 1),
        )

    def _resolve_vocab(self, student_vocab: int) -> int:
        return shared_vocab_size(student_vocab, self.teacher_vocab_size, self.vocab_size)

    # ----------------------------------------------------------------------------------------------------------------
    # Scores

    @staticmethod
    def _banned(plan: _Plan, scores: torch.Tensor, new_counts: torch.Tensor, vocab: int) -> torch.Tensor:
        """The student's scores as `generate`'s earlier processors leave them, in place: `scores` `(N, V)` with
        `-inf` on banned ids and on padded lm_head rows, where `new_counts` `(N,)` is how many tokens the row had
        generated before this position."""
        if vocab < scores.shape[-1]:
            scores[..., vocab:] = float("-inf")
        if plan.static_bans.numel():
            scores[..., plan.static_bans] = float("-inf")
        if plan.begin_bans.numel():
            first = (new_counts == 0)[..., None]
            scores[..., plan.begin_bans] = scores[..., plan.begin_bans].masked_fill(first, float("-inf"))
        if plan.min_new_tokens > 0 and plan.stop_ids.numel():
            early = (new_counts < plan.min_new_tokens)[..., None]
            scores[..., plan.stop_ids] = scores[..., plan.stop_ids].masked_fill(early, float("-inf"))
        return scores

    def _student_scores(self, plan: _Plan, scores: torch.Tensor, new_counts: torch.Tensor, vocab: int):
        """The student's scores as the processor sees them: banned in place ([`_banned`]), then with its own mass on
        the teacher's stop ids moved onto its stop id, as the processor merges it (drafts and mu* alike)."""
        scores = self._banned(plan, scores, new_counts, vocab)
        if self.stop_alignment is None:
            return scores
        return self.stop_alignment.apply_to_scores(scores, temperature=self.temperature)

    @staticmethod
    def _warp(plan: _Plan, scores: torch.Tensor) -> torch.Tensor:
        """`generate`'s warpers on `(N, V)` scores (they ignore `input_ids`)."""
        for warper in plan.warpers:
            scores = warper(None, scores)
        return scores

    def _target_scores(self, plan, student_scores, teacher_logits, epsilon, vocab) -> tuple[torch.Tensor, dict]:
        """mu* exactly as the processor forms it, returned as the scores the processor hands the warpers
        (`temperature * log mu*`, `-inf` beyond the shared vocabulary), with the blend's per-token records."""
        teacher = teacher_logits[:, :vocab].float()
        if self.stop_alignment is not None:
            teacher = self.stop_alignment.apply(teacher, temperature=self.temperature)
        blend = trust_region_blend(student_scores[:, :vocab], teacher, epsilon, temperature=self.temperature)
        target = student_scores.new_full(student_scores.shape, float("-inf"))
        target[:, :vocab] = blend.logprobs * self.temperature
        records = {
            "beta": blend.beta,
            "kl_to_student": blend.kl_to_student,
            "kl_to_teacher": blend.kl_to_teacher,
            "teacher_valid": blend.teacher_valid,
        }
        return target, records

    # ----------------------------------------------------------------------------------------------------------------
    # Generation

    @torch.no_grad()
    def generate(
        self,
        model: torch.nn.Module,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None = None,
        generation_config: GenerationConfig | None = None,
        *,
        row_max_new_tokens: Sequence[int] | torch.Tensor | None = None,
        **kwargs,
    ) -> torch.LongTensor:
        """`model.generate(input_ids, attention_mask, generation_config, **kwargs)` with the processor's mu* as the
        sampling distribution: returns the `(batch * num_return_sequences, prompt_length + new)` sequences.
        `row_max_new_tokens` (one per generated row) stops each row at its own length within `max_new_tokens`, as a
        per-row stopping criterion stops it in `generate` (at least one token per row, as `generate` samples)."""
        for name in ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model"):
            if kwargs.pop(name, None):
                raise ValueError(
                    f"The speculative rollout engine does not take `{name}`: it samples mu* itself and reproduces "
                    "only generate's token bans and sampling warpers."
                )
        kwargs.pop("synced_gpus", None)  # the engine's own `synced` setting decides
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, prompt_length), got shape {tuple(input_ids.shape)}.")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must be the 2-D (batch, prompt_length) padding mask of input_ids {tuple(input_ids.shape)}, "
                f"got shape {tuple(attention_mask.shape)}."
            )
        prompt_length = input_ids.shape[1]
        plan = self._plan(model, generation_config, kwargs, prompt_length, input_ids.device)
        attention_mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
        if not bool(attention_mask[:, -1].all()):
            raise ValueError(
                "The speculative rollout engine needs left-padded prompts (every row's last token real); pad on the "
                "left (`tokenizer.padding_side = 'left'`)."
            )
        if plan.num_return_sequences > 1:
            input_ids = input_ids.repeat_interleave(plan.num_return_sequences, dim=0)
            attention_mask = attention_mask.repeat_interleave(plan.num_return_sequences, dim=0)
        rows = input_ids.shape[0]
        limits = torch.full((rows,), plan.max_new_tokens, dtype=torch.long, device=input_ids.device)
        self._recorded_rows = None
        if row_max_new_tokens is not None:
            budgets = torch.as_tensor(row_max_new_tokens, dtype=torch.long).reshape(-1).to(input_ids.device)
            if budgets.numel() != rows:
                raise ValueError(f"row_max_new_tokens has {budgets.numel()} entries for {rows} generated rows.")
            limits = budgets.clamp(1, plan.max_new_tokens)  # generate samples one token before any criterion
            # ... which the processor path leaves out of its statistics (the row is finished from the start): so here.
            self._recorded_rows = budgets > 0
        epsilon = self.epsilon
        if isinstance(epsilon, torch.Tensor):
            if epsilon.numel() not in (1, rows):
                raise ValueError(
                    f"epsilon has {epsilon.numel()} entries but {rows} rows are generated; pass one per generated row."
                )
            epsilon = epsilon.to(device=input_ids.device, dtype=torch.float32).reshape(-1).expand(rows)
        vocab = self._resolve_vocab(output_vocab_size(model))
        if self.adaptive_draft_length:
            mean_epsilon = float(epsilon.mean()) if isinstance(epsilon, torch.Tensor) else float(epsilon)
            self._prior_acceptance = min(max(1.0 - (mean_epsilon / 2.0) ** 0.5, 0.5), 0.999)
            if self.cost_ratio is None:
                self.cost_ratio = count_parameters(self.teacher_model) / max(count_parameters(model), 1)
        self._drafter = self.drafter_factory(model)
        try:
            generated = self._run(plan, input_ids, attention_mask, epsilon, vocab, limits)
        finally:
            self.release()
        return torch.cat([input_ids, generated], dim=1)

    def _run(self, plan: _Plan, input_ids, prompt_mask, epsilon, vocab, limits) -> torch.LongTensor:
        """Draft/verify rounds until every row stopped or generated its `limits` entry (new tokens, at most
        `plan.max_new_tokens`); the returned width is the longest row's."""
        device = input_ids.device
        rows = input_ids.shape[0]
        max_new = plan.max_new_tokens
        arange_rows = torch.arange(rows, device=device)
        generated = torch.full((rows, max_new + self.draft_length + 1), plan.pad_token_id, device=device)
        num_generated = torch.zeros(rows, dtype=torch.long, device=device)
        unfinished = torch.ones(rows, dtype=torch.bool, device=device)
        committed_mask = prompt_mask.new_zeros(rows, 0)
        pending_ids, pending_mask = input_ids, prompt_mask
        pending_positions = (prompt_mask.cumsum(-1) - 1).clamp_min(0)
        while True:
            gamma = self._next_draft_length(unfinished, num_generated, limits)
            if gamma is None:
                break
            self._rounds += 1
            self._draft_lengths.append(gamma)
            new_counts = num_generated[:, None] + torch.arange(gamma + 1, device=device)  # (rows, gamma + 1)

            def choose(step, logits, new_counts=new_counts):
                # Banning in place leaves the drafter's stored logits as generate's processors would (idempotent).
                scores = self._student_scores(plan, logits, new_counts[:, step], vocab)
                if not plan.do_sample:
                    return scores.argmax(-1), None
                probs = torch.softmax(self._warp(plan, scores), dim=-1)
                return sample_categorical(probs), probs

            mask = torch.cat([committed_mask, pending_mask], dim=1)
            block = self._drafter.propose(pending_ids, mask, pending_positions, gamma, choose)
            self._student_forwards += gamma + 1
            drafts = block.tokens
            last_position = pending_positions[:, -1:]
            draft_positions = last_position + torch.arange(1, gamma + 1, device=device)
            # Positions whose token may be emitted: rows still running, within their limit.
            needed = unfinished[:, None] & (new_counts < limits[:, None])
            flat_needed = needed.flatten()
            index = flat_needed.nonzero().squeeze(1)
            student_scores = self._student_scores(
                plan, block.logits.flatten(0, 1)[index], new_counts.flatten()[index], vocab
            )
            records = None
            if self.is_active and index.numel():
                teacher_logits = self._verify(
                    torch.cat([pending_ids, drafts], dim=1),
                    torch.cat([mask, mask.new_ones(rows, gamma)], dim=1),
                    torch.cat([pending_positions, draft_positions], dim=1),
                    gamma + 1,
                ).flatten(0, 1)[index]
                row_epsilon = epsilon[index // (gamma + 1)] if isinstance(epsilon, torch.Tensor) else epsilon
                target, records = self._target_scores(plan, student_scores, teacher_logits, row_epsilon, vocab)
            elif self.is_active and self.synced:  # keep the teacher's forward count in step with other processes
                self._verify(
                    torch.cat([pending_ids, drafts], dim=1),
                    torch.cat([mask, mask.new_ones(rows, gamma)], dim=1),
                    torch.cat([pending_positions, draft_positions], dim=1),
                    gamma + 1,
                )
                target = student_scores
            else:
                target = student_scores  # epsilon = 0: mu* is the student, every draft is accepted
            # Where each needed (row, position) sits among the blended rows.
            slot = torch.full((rows * (gamma + 1),), -1, dtype=torch.long, device=device)
            slot[index] = torch.arange(index.numel(), device=device)
            slot = slot.view(rows, gamma + 1)

            accepted, extra = self._accept(plan, target, block, drafts, slot, gamma)
            # The round's tokens: the accepted drafts, then the correction (or bonus) at the first rejected position.
            round_tokens = torch.cat([drafts, drafts.new_full((rows, 1), plan.pad_token_id)], dim=1)
            round_tokens[arange_rows, accepted] = extra
            count = accepted + 1
            steps = torch.arange(gamma + 1, device=device)
            if plan.stop_ids.numel():
                is_stop = torch.isin(round_tokens, plan.stop_ids) & (steps < count[:, None])
                first_stop = torch.where(is_stop.any(1), is_stop.int().argmax(1), gamma + 1)
                count = torch.minimum(count, first_stop + 1)
                stopped = is_stop.any(1) & (first_stop < count)
            else:
                stopped = torch.zeros_like(unfinished)
            count = torch.minimum(count, limits - num_generated)
            count = torch.where(unfinished, count, 0)
            emitted = steps < count[:, None]
            columns = torch.where(emitted, num_generated[:, None] + steps, max_new + steps)
            generated.scatter_(1, columns, round_tokens)
            self._record(records, slot, emitted, accepted, count, unfinished)

            num_generated = num_generated + count
            still = unfinished & ~stopped & (num_generated < limits)
            # Columns fed this round: the pending ones (valid as fed) and the drafts, valid up to the last accepted one.
            draft_valid = (steps[:gamma] < accepted[:, None]) & still[:, None]
            committed_mask = torch.cat([mask, draft_valid.long()], dim=1)
            pending_ids = torch.where(still, extra, plan.pad_token_id)[:, None]
            pending_mask = still.long()[:, None]
            pending_positions = last_position + accepted[:, None] + 1
            unfinished = still
        width = int(num_generated.max())
        return generated[:, :width]

    def _next_draft_length(self, unfinished, num_generated, limits) -> int | None:
        """This round's draft length (never drafting past the longest remaining row's limit), or None when generation
        is over. Synced: the largest over processes, and over only when every process is done."""
        remaining = torch.where(unfinished, limits - num_generated, 0).max()
        if not self.synced or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            remaining = int(remaining)
            return None if remaining <= 0 else self._choose_draft_length(remaining - 1)
        flag = torch.stack([remaining, torch.clamp(remaining - 1, 0, self.draft_length)])
        if self.adaptive_draft_length:
            flag[1] = self._choose_draft_length(int(flag[1]))
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        any_running, gamma = (int(x) for x in flag.tolist())
        if gamma > self.draft_length:
            raise RuntimeError(
                f"Another process drafts {gamma} tokens per round, this one at most {self.draft_length}: every process "
                "must use the same draft_length in synced mode."
            )
        return None if any_running <= 0 else gamma

    def _choose_draft_length(self, most: int) -> int:
        """`draft_length`, or with `adaptive_draft_length` the gamma <= `most` maximising E(gamma) / (gamma + 1 + c),
        at the acceptance measured so far (shrunk toward the floor 1 - sqrt(epsilon / 2))."""
        most = min(self.draft_length, most)
        if not self.adaptive_draft_length or not self.is_active or most <= 1:
            return max(most, 0)
        alpha = (self._drafts_accepted + _PRIOR_TESTS * self._prior_acceptance) / (self._draft_tests + _PRIOR_TESTS)
        alpha = min(alpha, 1.0 - 1e-6)

        def tokens_per_cost(gamma: int) -> float:
            return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha) / (gamma + 1 + self.cost_ratio)

        return max(range(1, most + 1), key=tokens_per_cost)

    def _verify(self, input_ids, attention_mask, position_ids, num_logits) -> torch.Tensor:
        """One teacher forward over the block; its logits at the last `num_logits` positions."""
        start = self._timer.start(input_ids.device)
        logits, self._teacher_cache = _forward(
            self.teacher_model, self._teacher_cache, input_ids, attention_mask, position_ids, num_logits
        )
        self._timer.stop(input_ids.device, start)
        self._teacher_forwards += 1
        return logits[:, -num_logits:]

    def _accept(self, plan, target, block: DraftBlock, drafts, slot, gamma):
        """The speculative acceptance rule. Returns, per row, how many drafts were accepted and the next token: the
        correction drawn from norm(max(0, p - q)) at the first rejection, or the bonus drawn from p. Positions a row
        cannot emit (`slot` -1) accept their draft; they are cut off afterwards."""
        rows = drafts.shape[0]
        arange_rows = torch.arange(rows, device=drafts.device)
        if target.shape[0] == 0:  # synced, and every row here has finished: nothing to emit
            return torch.zeros_like(arange_rows), torch.full_like(arange_rows, plan.pad_token_id)
        valid = slot[:, :gamma] >= 0
        draft_slot = slot[:, :gamma].clamp_min(0)
        if plan.do_sample:
            p = torch.softmax(self._warp(plan, target), dim=-1)
            p_draft = p[draft_slot, drafts]
            q_draft = block.probs.gather(2, drafts[..., None]).squeeze(2) if gamma else p_draft
            # Accept with probability min(1, p / q), written without the division: u q < p.
            accept = torch.rand(rows, gamma, device=drafts.device) * q_draft < p_draft
        else:
            choice = target.argmax(-1)
            accept = choice[draft_slot] == drafts
        accepted = (accept | ~valid).long().cumprod(1).sum(1)  # leading accepts
        valid_drafts = valid.sum(1)
        self._drafts_accepted += int(torch.minimum(accepted, valid_drafts).sum())
        self._draft_tests += int(torch.minimum(accepted + 1, valid_drafts).sum())
        final_slot = slot[arange_rows, accepted]
        if plan.do_sample:
            p_final = p[final_slot.clamp_min(0)]
            q_final = torch.zeros_like(p_final)
            rejected = accepted < gamma
            if bool(rejected.any()):
                q_final[rejected] = block.probs[arange_rows[rejected], accepted[rejected]]
            residual = (p_final - q_final).clamp_min_(0.0)
            # Where p = q up to rounding there is no residual (and the rejection had probability ~0): draw from p.
            residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_final)
            extra = sample_categorical(residual)
        else:
            extra = choice[final_slot.clamp_min(0)]
        # A row whose next position is past its end emits no extra token (it is cut before it).
        return accepted, torch.where(final_slot >= 0, extra, plan.pad_token_id)

    def _record(self, records, slot, emitted, accepted, count, unfinished) -> None:
        """Per-token records of the emitted tokens of rows that were running, like the processor's."""
        if self._recorded_rows is not None:  # a row whose budget was 0 generated its one token unrecorded
            emitted = emitted & self._recorded_rows[:, None]
        if not bool(emitted.any()):
            return
        steps = torch.arange(emitted.shape[1], device=emitted.device)
        draft_accepted = (steps[None, :] < accepted[:, None])[emitted]
        share = (1.0 / count.clamp_min(1).float())[:, None].expand_as(emitted)[emitted]
        self._row_rounds += int(unfinished.sum())
        self._tokens += int(emitted.sum())
        if records is None:  # epsilon = 0: the student, as the processor's identity reports nothing
            return
        where = slot[emitted]
        entry = {name: value[where] for name, value in records.items()}
        entry["draft_accepted"] = draft_accepted
        entry["round_share"] = share
        self._records.append(entry)

    # ----------------------------------------------------------------------------------------------------------------
    # Results

    def release(self) -> None:
        """Free both KV caches (the statistics stay readable)."""
        if self._drafter is not None:
            self._drafter.release()
            self._drafter = None
        self._teacher_cache = None

    @property
    def teacher_seconds(self) -> float:
        """Wall time spent in teacher forwards (CUDA event time on GPU; synchronises once when read)."""
        return self._timer.seconds

    @property
    def teacher_forwards(self) -> int:
        """Number of teacher forwards run (one per round)."""
        return self._teacher_forwards

    @property
    def student_forwards(self) -> int:
        """Number of student forwards run (draft length + 1 per round)."""
        return self._student_forwards

    def statistics(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The per-token records (`STATISTICS`) over the emitted tokens of rows that had not finished, on `device`
        (default: where they were computed)."""
        if not self._records:
            return {name: torch.zeros(0, dtype=dtype, device=device) for name, dtype in self.STATISTICS.items()}
        statistics = {name: torch.cat([record[name] for record in self._records]) for name in self.STATISTICS}
        return {name: value.to(device) if device is not None else value for name, value in statistics.items()}

    def summary(self) -> dict[str, float]:
        """The processor's `summary()` aggregates, plus `acceptance_rate` (accepted drafts / drafts tested, the
        estimate of 1 - TV(p, q)), `tokens_per_teacher_forward` (tokens a running row emits per round), the round
        and forward counts."""
        speculative = {
            "acceptance_rate": self._drafts_accepted / self._draft_tests if self._draft_tests else 1.0,
            "tokens_per_teacher_forward": self._tokens / self._row_rounds if self._row_rounds else 0.0,
            "rounds": self._rounds,
            "mean_draft_length": sum(self._draft_lengths) / len(self._draft_lengths) if self._draft_lengths else 0.0,
            "teacher_forwards": self._teacher_forwards,
            "student_forwards": self._student_forwards,
            "teacher_seconds": self.teacher_seconds,
        }
        return {**blend_summary(self.statistics()), **speculative}


def _resolve_generation_config(model, generation_config, kwargs) -> GenerationConfig:
    """The generation config `model.generate(generation_config=..., **kwargs)` would run with: the model's defaults
    under the given config, the kwargs on top (transformers' own merge). Extra model kwargs are refused."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    config, model_kwargs = base._prepare_generation_config(generation_config, **kwargs)
    if model_kwargs:
        raise ValueError(
            f"The speculative rollout engine takes input_ids, attention_mask and generation settings only; got "
            f"{sorted(model_kwargs)}."
        )
    return config


__all__ = [
    "SPECULATIVE_METRICS",
    "DraftBlock",
    "Drafter",
    "SpeculativeBlendingSampler",
    "StudentDrafter",
    "sample_categorical",
]
