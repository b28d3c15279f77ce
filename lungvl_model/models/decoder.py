"""Report decoder: a ``transformers`` GPT-2 built from :class:`TextConfig`, cross-attending to visual tokens.

The decoder is built from config (never downloaded); a local pretrained directory is loaded when
``TextConfig.pretrained_dir`` is set. Cross-attention weights are only materialised by the eager attention
implementation, so training runs with ``"sdpa"`` and explanations switch to ``"eager"``
(:func:`set_attention_implementation`, :func:`attention_implementation`). :meth:`ReportDecoder.generate`
does that by itself and returns, per generated token, the chosen token's probability, the predictive
entropy and the cross-attention over the visual tokens (the raw material of per-token heatmaps and of
per-sentence confidence).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

from lungvl_model.models.config import TextConfig

ATTN_IMPLEMENTATIONS: tuple[str, ...] = ("eager", "sdpa")


@dataclass
class DecoderOutput:
    """Output of :meth:`ReportDecoder.forward`.

    Attributes:
        logits: (B, T, V) next-token logits.
        last_hidden: (B, T, E) final hidden states (after the last layer norm).
        loss: scalar causal LM loss (mean over label positions that are not -100) when labels were given.
        cross_attentions: per layer (B, H, T, N) attention of the text to the visual tokens; only with
            visual tokens, ``output_attentions=True`` and the eager implementation, else None.
    """

    logits: Tensor
    last_hidden: Tensor
    loss: Tensor | None = None
    cross_attentions: tuple[Tensor, ...] | None = None


@dataclass
class Generation:
    """Output of :meth:`ReportDecoder.generate` (``<bos>`` not included; T = steps actually run).

    Attributes:
        tokens: (B, T) long generated ids, ``<eos>`` included, ``<pad>`` after it.
        token_probs: (B, T) model probability of each chosen token (1 after ``<eos>``).
        entropy: (B, T) entropy in nats of the model's predictive distribution at each step (0 after
            ``<eos>``). Both use the untempered, unfiltered distribution, whatever the sampling.
        cross_attention: (B, T, N) cross-attention of the step that chose each token (the query at the
            previous position, as in teacher forcing where position t predicts t + 1) to the visual
            tokens, averaged over heads and layers; rows sum to 1 (0 after ``<eos>``; N = 0 without
            visual tokens).
        mask: (B, T) bool, True for generated tokens up to and including ``<eos>``; a sentence that
            repeated an earlier one of its row is masked out (and the row stopped there).
        finished: (B,) bool, True where ``<eos>`` was generated.
        repeat_stopped: (B,) bool, True where generation stopped because a sentence repeated (None when
            not tracked).
    """

    tokens: Tensor
    token_probs: Tensor
    entropy: Tensor
    cross_attention: Tensor
    mask: Tensor
    finished: Tensor
    repeat_stopped: Tensor | None = None


def _lm_of(model: nn.Module) -> GPT2LMHeadModel:
    lm = model.lm if isinstance(model, ReportDecoder) else model
    if not isinstance(lm, GPT2LMHeadModel):
        raise TypeError(f"expected a GPT2LMHeadModel or ReportDecoder, got {type(model).__name__}")
    return lm


def set_attention_implementation(model: nn.Module, implementation: str) -> str:
    """Switch the attention implementation of a decoder at run time.

    Args:
        model: a :class:`ReportDecoder` or the ``GPT2LMHeadModel`` from :func:`build_decoder`.
        implementation: ``"eager"`` (attention weights available) or ``"sdpa"`` (fast, none).

    Returns:
        The implementation that was set before.

    Raises:
        ValueError: for an unknown implementation, or when the switch did not take.
    """
    if implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {ATTN_IMPLEMENTATIONS}, "
                         f"got {implementation!r}")  # fmt: skip
    lm = _lm_of(model)
    previous = lm.config._attn_implementation
    if previous != implementation:
        lm.set_attn_implementation(implementation)
    got = lm.transformer.h[0].attn.config._attn_implementation if len(lm.transformer.h) else implementation
    if lm.config._attn_implementation != implementation or got != implementation:
        raise ValueError(f"could not switch attention to {implementation!r}: model reports {got!r}")
    return previous


@contextmanager
def attention_implementation(model: nn.Module, implementation: str) -> Iterator[None]:
    """Context manager: ``implementation`` inside the block, the previous one restored afterwards."""
    previous = set_attention_implementation(model, implementation)
    try:
        yield
    finally:
        set_attention_implementation(model, previous)


def build_decoder(config: TextConfig, tokenizer: PreTrainedTokenizerBase) -> GPT2LMHeadModel:
    """GPT-2 LM with cross-attention in every block, sized by ``config`` and the tokenizer.

    The vocabulary is ``len(tokenizer)`` (it wins over ``config.vocab_size``) and bos/eos/pad ids are the
    tokenizer's. With ``config.pretrained_dir`` the local directory is loaded instead (cross-attention
    layers are added, randomly initialised, if it had none; embeddings are resized to the tokenizer).

    Raises:
        ValueError: when the tokenizer lacks bos/eos/pad, or a pretrained model's width differs from
            ``config.n_embd`` (the visual tokens are projected to ``config.n_embd``).
    """
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    if None in ids.values():
        raise ValueError(f"tokenizer must define bos/eos/pad tokens, got {ids}")
    vocab = len(tokenizer)
    drop = {"resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout}
    if config.pretrained_dir:
        directory = Path(config.pretrained_dir)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"TextConfig.pretrained_dir {directory} has no config.json")
        lm = GPT2LMHeadModel.from_pretrained(
            str(directory), local_files_only=True, add_cross_attention=True,
            attn_implementation=config.attn_implementation, **drop, **ids,
        )  # fmt: skip
        if lm.config.n_embd != config.n_embd:
            raise ValueError(f"pretrained decoder in {directory} has n_embd={lm.config.n_embd}, "
                             f"TextConfig.n_embd={config.n_embd}")  # fmt: skip
        if lm.config.vocab_size != vocab:
            lm.resize_token_embeddings(vocab)
        for k, v in ids.items():
            setattr(lm.config, k, v)
    else:
        gcfg = GPT2Config(
            vocab_size=vocab, n_positions=config.n_positions, n_embd=config.n_embd, n_layer=config.n_layer,
            n_head=config.n_head, add_cross_attention=True, use_cache=False, **drop, **ids,
        )  # fmt: skip
        lm = GPT2LMHeadModel(gcfg)
    if lm.generation_config is not None:
        for k, v in ids.items():
            setattr(lm.generation_config, k, v)
    set_attention_implementation(lm, config.attn_implementation)
    return lm


class ReportDecoder(nn.Module):
    """The report decoder: causal LM over report tokens with cross-attention to visual tokens.

    Args:
        config: the text config (sizes, attention implementation, optional pretrained directory).
        tokenizer: the report tokenizer (vocabulary size and special ids).
    """

    def __init__(self, config: TextConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__()
        self.config = config
        self.lm = build_decoder(config, tokenizer)
        self.bos_id: int = tokenizer.bos_token_id
        self.eos_id: int = tokenizer.eos_token_id
        self.pad_id: int = tokenizer.pad_token_id
        self.tokenizer = tokenizer
        self.sentence_end_ids: frozenset[int] = sentence_end_ids(tokenizer)

    @property
    def n_embd(self) -> int:
        """Hidden size E (the width visual tokens must have)."""
        return int(self.lm.config.n_embd)

    @property
    def vocab_size(self) -> int:
        """Vocabulary size V."""
        return int(self.lm.config.vocab_size)

    def save_pretrained(self, directory: str | Path) -> None:
        """Save the GPT-2 weights and config (load back with ``TextConfig(pretrained_dir=directory)``)."""
        self.lm.save_pretrained(str(directory))

    def _check(self, input_ids: Tensor, visual_tokens: Tensor | None) -> None:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.lm.config.n_positions:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens > "
                             f"n_positions={self.lm.config.n_positions}")  # fmt: skip
        if visual_tokens is not None and (
            visual_tokens.ndim != 3 or visual_tokens.shape[0] != input_ids.shape[0]
            or visual_tokens.shape[2] != self.n_embd
        ):  # fmt: skip
            raise ValueError(f"visual_tokens must be (B={input_ids.shape[0]}, N, E={self.n_embd}), "
                             f"got {tuple(visual_tokens.shape)}")  # fmt: skip

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        visual_tokens: Tensor | None = None,
        labels: Tensor | None = None,
        output_attentions: bool = False,
        visual_mask: Tensor | None = None,
        prefix: Tensor | None = None,
    ) -> DecoderOutput:
        """Teacher-forced pass.

        Args:
            input_ids: (B, T) token ids (right padded).
            attention_mask: (B, T) 1 for tokens, 0 for padding.
            visual_tokens: (B, N, E) tokens to cross-attend to; None for text only (cross-attention is then
                skipped by every block).
            labels: (B, T) targets, -100 ignored; shifted here (position t predicts label t + 1).
            output_attentions: return the cross-attention weights (needs the eager implementation).
            visual_mask: (B, N) 1 for real visual tokens, 0 for padding (default: all real).
            prefix: (B, E) vector added to the embedding of the first token (``<bos>``): what the sequence
                is about (a finding slot and the kind of sentence), seen by every later token.

        Returns:
            :class:`DecoderOutput`.
        """
        self._check(input_ids, visual_tokens)
        want = output_attentions and visual_tokens is not None
        out = self._transformer(input_ids, attention_mask, visual_tokens, visual_mask, want, prefix)
        hidden = out.last_hidden_state
        logits = self.lm.lm_head(hidden)
        loss = None if labels is None else causal_lm_loss(logits, labels)
        cross = out.cross_attentions if want else None
        if not cross or any(a is None for a in cross):  # sdpa yields () or Nones
            cross = None
        return DecoderOutput(logits=logits, last_hidden=hidden, loss=loss, cross_attentions=cross)

    def _transformer(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        visual_tokens: Tensor | None,
        visual_mask: Tensor | None,
        output_attentions: bool,
        prefix: Tensor | None,
    ) -> Any:
        """The GPT-2 body; with ``prefix`` (B, E) added to the first token's embedding."""
        if prefix is None:
            return self.lm.transformer(
                input_ids, attention_mask=attention_mask, encoder_hidden_states=visual_tokens,
                encoder_attention_mask=visual_mask, output_attentions=output_attentions,
            )  # fmt: skip
        b, t = input_ids.shape
        if prefix.shape != (b, self.n_embd):
            raise ValueError(f"prefix must be (B={b}, E={self.n_embd}), got {tuple(prefix.shape)}")
        emb = self.lm.transformer.wte(input_ids)
        emb = torch.cat([emb[:, :1] + prefix[:, None].to(emb.dtype), emb[:, 1:]], dim=1)
        # (B, T) position ids: per-sample gradients of wpe under DP-SGD need the batch dimension
        positions = torch.arange(t, device=input_ids.device).repeat(b, 1)
        return self.lm.transformer(
            inputs_embeds=emb, position_ids=positions, attention_mask=attention_mask,
            encoder_hidden_states=visual_tokens, encoder_attention_mask=visual_mask,
            output_attentions=output_attentions,
        )  # fmt: skip

    def text_embedding(self, input_ids: Tensor, attention_mask: Tensor, pooling: str = "mean") -> Tensor:
        """Report embedding from the decoder alone (no visual tokens).

        Args:
            input_ids: (B, T) token ids, right padded.
            attention_mask: (B, T) 1 for tokens, 0 for padding.
            pooling: ``"mean"`` over the tokens, or ``"last"`` (the hidden state of the last token, which
                has attended to the whole report).

        Returns:
            (B, E) embedding.
        """
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        self._check(input_ids, None)
        hidden = self.lm.transformer(input_ids, attention_mask=attention_mask).last_hidden_state
        return pool_hidden(hidden, attention_mask, pooling)

    def _repeats(self, sentence_ids: list[int], seen: set[str]) -> bool:
        """Whether a finished sentence repeats one already in ``seen`` (case and spacing ignored); adds it."""
        sentence = " ".join(str(self.tokenizer.decode(sentence_ids)).lower().split())
        if sentence in seen:
            return True
        seen.add(sentence)
        return False

    @torch.no_grad()
    def generate(
        self,
        visual_tokens: Tensor | None,
        *,
        max_new_tokens: int,
        bos_id: int | None = None,
        eos_id: int | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        generator: torch.Generator | None = None,
        visual_mask: Tensor | None = None,
        batch_size: int = 1,
        no_repeat_ngram: int = 3,
        stop_repeated_sentence: bool = True,
        prefix: Tensor | None = None,
        forced: Sequence[Sequence[int]] | None = None,
    ) -> Generation:
        """Write reports token by token (greedy when ``temperature == 0``, else sampling).

        Runs in eval mode with eager attention; both are restored afterwards. No key/value cache: reports
        are short and every step re-reads the prefix. Against repetition loops ("2. 2. 2. ..."): a token
        that would repeat an n-gram already generated in its row is never chosen
        (:func:`no_repeat_ngram_bans`; ``<eos>`` is never banned), and a row whose new sentence repeats
        an earlier sentence of the row (same text, case and spacing ignored) stops, the repeat masked out.
        A sentence ends at a sentence-end token that is not a decimal point: a ``.`` between two digits
        ("1. 1.4 cm") is decided at the next token, so a list number followed by a decimal size is no repeat.
        Probabilities and entropies stay those of the model's unfiltered distribution.

        Args:
            visual_tokens: (B, N, E) visual tokens, or None for text-only generation of ``batch_size``.
            max_new_tokens: most tokens to generate (``1 + max_new_tokens <= n_positions``).
            bos_id: start token (default the tokenizer's ``<bos>``).
            eos_id: stop token (default the tokenizer's ``<eos>``).
            temperature: 0 for greedy decoding, > 0 to sample from ``softmax(logits / temperature)``.
            top_k: sample among the k most likely tokens only (0: all).
            generator: random generator for sampling (reproducible generation).
            visual_mask: (B, N) 1 for real visual tokens.
            batch_size: B when ``visual_tokens`` is None.
            no_repeat_ngram: n of the n-gram blocking (0 switches it off; 1 would ban every used token).
            stop_repeated_sentence: stop a row when a sentence repeats.
            prefix: (B, E) vector added to the ``<bos>`` embedding (see :meth:`forward`).
            forced: per row, the ids of its first generated tokens (constrained decoding: a row goes on
                from them by the rule above); their probabilities and entropies are still the model's.
                The forced ids are exempt from the n-gram ban but count for later steps.

        Returns:
            :class:`Generation`.
        """
        if no_repeat_ngram < 0:
            raise ValueError(f"no_repeat_ngram must be >= 0, got {no_repeat_ngram}")
        if max_new_tokens < 1 or 1 + max_new_tokens > self.lm.config.n_positions:
            raise ValueError(f"max_new_tokens must be in 1..{self.lm.config.n_positions - 1}, "
                             f"got {max_new_tokens}")  # fmt: skip
        if temperature < 0 or top_k < 0:
            raise ValueError(f"temperature and top_k must be >= 0, got {temperature}, {top_k}")
        bos = self.bos_id if bos_id is None else bos_id
        eos = self.eos_id if eos_id is None else eos_id
        device = next(self.parameters()).device
        b = batch_size if visual_tokens is None else visual_tokens.shape[0]
        force = [list(f) for f in forced] if forced is not None else [[] for _ in range(b)]
        vocab = self.lm.config.vocab_size
        if len(force) != b or any(not 0 <= t < vocab for f in force for t in f):
            raise ValueError(f"forced must hold one list of ids in [0, {vocab}) per row ({b}), got {forced!r}")
        if max(map(len, force), default=0) > max_new_tokens:
            raise ValueError(f"forced ids ({max(map(len, force))}) exceed max_new_tokens={max_new_tokens}")
        ids = torch.full((b, 1), bos, dtype=torch.long, device=device)
        self._check(ids, visual_tokens)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        repeated = torch.zeros(b, dtype=torch.bool, device=device)
        cut = [-1] * b  # per row: first step of a masked-out repeated sentence
        rows: list[list[int]] = [[] for _ in range(b)]  # generated ids per row
        sentence_start = [0] * b
        pending = [-1] * b  # per row: index of a sentence-end token whose sentence is decided at the next token
        seen: list[set[str]] = [set() for _ in range(b)]
        steps: dict[str, list[Tensor]] = {"tok": [], "p": [], "h": [], "att": [], "mask": []}
        was_training = self.training
        self.eval()
        try:
            with attention_implementation(self, "eager"):
                for step in range(max_new_tokens):
                    out = self._transformer(ids, None, visual_tokens, visual_mask, visual_tokens is not None, prefix)
                    logits = self.lm.lm_head(out.last_hidden_state[:, -1]).float()  # (B, V)
                    logp = F.log_softmax(logits, dim=-1)
                    choice = logits
                    if no_repeat_ngram > 0:
                        choice = logits.clone()
                        for r in range(b):
                            bans = [t for t in no_repeat_ngram_bans(rows[r], no_repeat_ngram) if t != eos]
                            if bans:
                                choice[r, bans] = float("-inf")
                    tok = _choose(choice, temperature, top_k, generator)
                    for r, f in enumerate(force):
                        if step < len(f):
                            tok[r] = f[step]
                    live = ~done
                    tok = torch.where(live, tok, torch.full_like(tok, self.pad_id))
                    p = logp.gather(1, tok[:, None])[:, 0].exp()
                    h = (-(logp.exp() * logp).sum(-1)).clamp_min(0.0)
                    if visual_tokens is not None:
                        att = torch.stack([a[:, :, -1, :] for a in out.cross_attentions]).mean(dim=(0, 2))
                    else:
                        att = logits.new_zeros(b, 0)
                    steps["tok"].append(tok)
                    steps["p"].append(torch.where(live, p, torch.ones_like(p)))
                    steps["h"].append(torch.where(live, h, torch.zeros_like(h)))
                    steps["att"].append(att * live[:, None])
                    steps["mask"].append(live)
                    done = done | (live & (tok == eos))
                    for r in range(b):
                        if not bool(live[r]):
                            continue
                        t = int(tok[r])
                        rows[r].append(t)
                        if not stop_repeated_sentence:
                            continue
                        if pending[r] >= 0:  # the previous token ended a sentence unless it was a decimal point
                            end, pending[r] = pending[r], -1
                            before = str(self.tokenizer.decode(rows[r][sentence_start[r] : end + 1]))
                            after = str(self.tokenizer.decode(rows[r][sentence_start[r] :]))[len(before) :]
                            if not (before[-2:-1].isdigit() and after[:1].isdigit()):
                                if self._repeats(rows[r][sentence_start[r] : end + 1], seen[r]):
                                    cut[r], repeated[r], done[r] = sentence_start[r], True, True  # row index == step
                                    continue
                                sentence_start[r] = end + 1
                        if t in self.sentence_end_ids:
                            pending[r] = len(rows[r]) - 1
                            if bool(done[r]) or step == max_new_tokens - 1:  # no next token: decide now
                                pending[r] = -1
                                if self._repeats(rows[r][sentence_start[r] :], seen[r]):
                                    cut[r], repeated[r], done[r] = sentence_start[r], True, True
                                sentence_start[r] = len(rows[r])
                    ids = torch.cat([ids, tok[:, None]], dim=1)
                    if bool(done.all()):
                        break
        finally:
            self.train(was_training)
        gen = Generation(
            tokens=torch.stack(steps["tok"], 1), token_probs=torch.stack(steps["p"], 1),
            entropy=torch.stack(steps["h"], 1), cross_attention=torch.stack(steps["att"], 1),
            mask=torch.stack(steps["mask"], 1), finished=done & ~repeated, repeat_stopped=repeated,
        )  # fmt: skip
        for r, start in enumerate(cut):
            if start >= 0:  # mask out the repeated sentence
                gen.tokens[r, start:] = self.pad_id
                gen.token_probs[r, start:] = 1.0
                gen.entropy[r, start:] = 0.0
                gen.cross_attention[r, start:] = 0.0
                gen.mask[r, start:] = False
        return gen


def no_repeat_ngram_bans(ids: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in ``ids`` (the last ``n - 1`` ids + token).

    Args:
        ids: the ids generated so far in one row.
        n: n-gram length (>= 1; ``n = 1`` bans every id already used).

    Returns:
        The banned ids, sorted, without duplicates (empty when ``len(ids) < n - 1``).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if len(ids) < n - 1:
        return []
    prefix = tuple(ids[len(ids) - (n - 1) :]) if n > 1 else ()
    bans = {ids[i + n - 1] for i in range(len(ids) - n + 1) if tuple(ids[i : i + n - 1]) == prefix}
    return sorted(bans)


def sentence_end_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids of the tokens whose text ends a sentence (ends with ``.``, ``!`` or ``?`` once stripped)."""
    special = set(tokenizer.all_special_ids)
    ends = set()
    for token, i in tokenizer.get_vocab().items():
        if i in special:
            continue
        text = tokenizer.convert_tokens_to_string([token]).strip()
        if text.endswith((".", "!", "?")):
            ends.add(i)
    return frozenset(ends)


def _choose(logits: Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> Tensor:
    """Next token (B,) from logits (B, V): argmax, or a sample after temperature and top-k."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    scaled = logits / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return torch.multinomial(scaled.softmax(-1), 1, generator=generator)[:, 0]


def causal_lm_loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross-entropy: logits (B, T, V) at t against labels (B, T) at t + 1, -100 ignored.

    ``reduction="mean"`` averages over counted tokens (0 when there are none), ``"sum"`` sums and
    ``"none"`` gives (B,) per-sequence means.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    target = labels[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), target, ignore_index=-100, reduction="none"
    )  # (B, T-1)
    count = (target != -100).sum(-1)
    if reduction == "none":
        return nll.sum(-1) / count.clamp_min(1)
    if reduction == "sum":
        return nll.sum()
    return nll.sum() / count.sum().clamp_min(1)


def pool_hidden(hidden: Tensor, attention_mask: Tensor, pooling: str = "mean") -> Tensor:
    """Pool (B, T, E) hidden states over the real tokens of a right-padded mask (B, T) -> (B, E)."""
    mask = attention_mask.to(hidden.dtype)
    if pooling == "last":
        last = (attention_mask.sum(-1) - 1).clamp_min(0).long()
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
