"""Text-only warm-up of the report decoder on report corpora.

Two objectives, one forward pass per step:

* causal LM loss on the original reports, without visual tokens (GPT-2 blocks skip their
  cross-attention when ``encoder_hidden_states`` is None, so the cross-attention weights stay untouched
  and no dummy visual token is needed);
* report coherence: a :class:`CoherenceHead` tells an original report (label 1) from a corrupted one
  (label 0: two sentences swapped, or a sentence of another report inserted), from the pooled hidden
  state. Corruptions are made in place on the sentence spans (:func:`sentence_offsets`), so layout and
  spacing give no cue. Corrupted rows do not contribute to the LM loss.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from lungvl_model.models.decoder import ReportDecoder, causal_lm_loss, pool_hidden
from lungvl_model.text.report_sections import decoder_target
from lungvl_model.text.tokenizer import encode_reports, sentence_offsets

POOLINGS: tuple[str, ...] = ("last", "mean", "both")


class CoherenceHead(nn.Module):
    """Linear classifier "is this report coherent?" on pooled decoder hidden states.

    Args:
        n_embd: decoder hidden size E.
        pooling: ``"last"`` (last token, which has read the whole report), ``"mean"``, or ``"both"``
            (the two concatenated).
    """

    def __init__(self, n_embd: int, pooling: str = "both") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if n_embd < 1:
            raise ValueError(f"n_embd must be >= 1, got {n_embd}")
        self.pooling = pooling
        width = 2 * n_embd if pooling == "both" else n_embd
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, 1)

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """Coherence logits.

        Args:
            hidden: (B, T, E) decoder hidden states.
            attention_mask: (B, T) 1 for tokens (right padded).

        Returns:
            (B,) logits (> 0: coherent).
        """
        if self.pooling == "both":
            pooled = torch.cat([pool_hidden(hidden, attention_mask, "last"),
                                pool_hidden(hidden, attention_mask, "mean")], dim=-1)  # fmt: skip
        else:
            pooled = pool_hidden(hidden, attention_mask, self.pooling)
        return self.proj(self.norm(pooled))[:, 0]


def corrupt_report(text: str, others: Sequence[str], rng: random.Random) -> str | None:
    """An incoherent version of ``text``: two sentences swapped, or a sentence of another report inserted.

    Args:
        text: the report.
        others: other reports to borrow a sentence from.
        rng: random source.

    Returns:
        The corrupted text, or None when no corruption that changes the text exists.
    """
    spans = sentence_offsets(text)
    sents = [text[s:e] for s, e in spans]
    swappable = [(i, j) for i in range(len(sents)) for j in range(i + 1, len(sents)) if sents[i] != sents[j]]
    foreign = [o[a:b] for o in others if o != text for a, b in sentence_offsets(o) if o[a:b] not in sents]
    use_swap = bool(swappable) and (not foreign or rng.random() < 0.5)
    if use_swap:
        i, j = rng.choice(swappable)
        (si, ei), (sj, ej) = spans[i], spans[j]
        return text[:si] + sents[j] + text[ei:sj] + sents[i] + text[ej:]
    if not foreign:
        return None
    new = rng.choice(foreign)
    p = rng.randrange(len(spans) + 1)
    if p == len(spans):
        end = spans[-1][1] if spans else len(text)
        return text[:end] + (" " if spans else "") + new + text[end:]
    return text[: spans[p][0]] + new + " " + text[spans[p][0] :]


def coherence_pairs(texts: Sequence[str], rng: random.Random, pool: Sequence[str] | None = None
                    ) -> tuple[list[str], list[int]]:  # fmt: skip
    """Each text (label 1) followed by a corruption of it (label 0) when one exists.

    Args:
        texts: reports to pair.
        rng: random source.
        pool: reports to borrow inserted sentences from (default ``texts``).
    """
    rows, labels = [], []
    for t in texts:
        rows.append(t)
        labels.append(1)
        bad = corrupt_report(t, pool if pool is not None else texts, rng)
        if bad is not None and bad != t:
            rows.append(bad)
            labels.append(0)
    return rows, labels


def _batch_step(decoder: ReportDecoder, head: CoherenceHead, tok: PreTrainedTokenizerBase,
                rows: list[str], labels: list[int]) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """LM loss on label-1 rows, coherence BCE and the coherence logits for one batch of rows."""
    device = next(decoder.parameters()).device
    enc = {k: v.to(device) for k, v in encode_reports(tok, rows, decoder.lm.config.n_positions).items()}
    y = torch.tensor(labels, dtype=torch.float32, device=device)
    lm_labels = enc["labels"].masked_fill(y[:, None] == 0, -100)
    out = decoder(enc["input_ids"], enc["attention_mask"], labels=lm_labels)
    logits = head(out.last_hidden, enc["attention_mask"])
    assert out.loss is not None
    return out.loss, F.binary_cross_entropy_with_logits(logits.float(), y), logits


def report_corpus(texts: Sequence[str]) -> list[str]:
    """What the decoder learns of each report: its FINDINGS and IMPRESSION sections, empty ones dropped.

    Args:
        texts: report texts (:func:`~lungvl_model.text.report_sections.decoder_target` cuts each).

    Returns:
        The non-empty cut reports, in order.
    """
    return [c for c in (decoder_target(t) for t in texts if t and t.strip()) if c]


@torch.no_grad()
def report_lm_loss(decoder: ReportDecoder, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
                   batch_size: int) -> float:  # fmt: skip
    """Token-weighted causal LM loss of ``decoder`` on ``texts``, without visual tokens, in eval mode.

    Each text is scored as given (cut it first with :func:`report_corpus` to score what the decoder
    learns); the decoder's train/eval mode is restored afterwards.

    Args:
        decoder: the decoder.
        tokenizer: the report tokenizer.
        texts: the reports (tokenised in batches of ``batch_size``: (B, T) ids, cut to ``n_positions``).
        batch_size: reports per forward pass.

    Returns:
        The mean negative log-likelihood per predicted token (0.0 when ``texts`` has none).

    Raises:
        ValueError: ``batch_size < 1``.
    """
    if batch_size < 1:
        raise ValueError(f"report_lm_loss batch_size must be >= 1, got {batch_size}")
    device = next(decoder.parameters()).device
    was_training = decoder.training
    decoder.eval()
    nll, count = 0.0, 0
    try:
        for i in range(0, len(texts), batch_size):
            enc = {k: v.to(device) for k, v in encode_reports(tokenizer, list(texts[i : i + batch_size]),
                                                              decoder.lm.config.n_positions).items()}  # fmt: skip
            logits = decoder(enc["input_ids"], enc["attention_mask"]).logits
            nll += float(causal_lm_loss(logits, enc["labels"], reduction="sum"))
            count += int((enc["labels"][:, 1:] != -100).sum())
    finally:
        decoder.train(was_training)
    return nll / max(count, 1)


@torch.no_grad()
def _evaluate(decoder: ReportDecoder, head: CoherenceHead, tok: PreTrainedTokenizerBase, texts: list[str],
              pairs: tuple[list[str], list[int]], batch_size: int) -> tuple[float, float]:  # fmt: skip
    """(token-weighted LM loss on ``texts``, coherence accuracy on ``pairs``) in eval mode."""
    lm = report_lm_loss(decoder, tok, texts, batch_size)
    rows, labels = pairs
    correct = 0
    for i in range(0, len(rows), 2 * batch_size):
        chunk = slice(i, i + 2 * batch_size)
        _, _, logits = _batch_step(decoder, head, tok, rows[chunk], labels[chunk])
        correct += int(((logits > 0).long().cpu() == torch.tensor(labels[chunk])).sum())
    return lm, correct / max(len(rows), 1)


def pretrain_reports(
    texts: Sequence[str],
    tokenizer: PreTrainedTokenizerBase,
    decoder: ReportDecoder,
    *,
    steps: int,
    batch_size: int = 8,
    lr: float = 3e-4,
    coherence_weight: float = 0.5,
    seed: int = 0,
    head: CoherenceHead | None = None,
    eval_size: int = 64,
    progress: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, float]:
    """Warm the decoder up on reports: causal LM + report coherence (deterministic given ``seed``).

    Args:
        texts: the report corpus (at least 2 non-empty reports); each is cut to its FINDINGS and IMPRESSION
            sections (:func:`~lungvl_model.text.report_sections.decoder_target`).
        tokenizer: the report tokenizer.
        decoder: the decoder to train (in place; its train/eval mode is restored afterwards).
        steps: optimisation steps.
        batch_size: reports per step (each with its corruption: up to ``2 * batch_size`` rows).
        lr: AdamW learning rate (linear warm-up over the first 10% of the steps).
        coherence_weight: weight of the coherence loss (0: LM only).
        seed: seeds batch sampling, corruptions, dropout and the head's initialisation.
        head: a coherence head to train (default: a new :class:`CoherenceHead`).
        eval_size: reports used for the before/after evaluation (0: no evaluation; its metrics are then NaN).
        progress: called after each step with ``(step, {"lm_loss", "coherence_loss", "loss"})``.

    Returns:
        ``initial_lm_loss``, ``final_lm_loss`` (token-weighted, on the evaluation reports),
        ``initial_perplexity``, ``perplexity``, ``initial_coherence_accuracy``, ``coherence_accuracy``
        (held-out corruptions of the evaluation reports), ``train_coherence_accuracy`` (last 10 steps),
        ``steps``; the evaluation's six are NaN with ``eval_size=0``.

    Raises:
        ValueError: on fewer than 2 reports or invalid arguments.
    """
    # the decoder learns what it writes: FINDINGS + IMPRESSION (no exam/patient header lines)
    corpus = report_corpus(texts)
    if len(corpus) < 2:
        raise ValueError(f"pretrain_reports needs at least 2 non-empty reports, got {len(corpus)}")
    if steps < 0 or batch_size < 1 or lr <= 0 or coherence_weight < 0 or eval_size < 0:
        raise ValueError(f"invalid steps={steps}, batch_size={batch_size}, lr={lr}, "
                         f"coherence_weight={coherence_weight}, eval_size={eval_size}")  # fmt: skip
    device = next(decoder.parameters()).device
    rng = random.Random(seed)
    eval_texts = corpus[:eval_size]
    eval_pairs = coherence_pairs(eval_texts, random.Random(seed + 7919), pool=corpus) if eval_size else ([], [])
    nan = float("nan")
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    was_training = decoder.training
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        head = (head or CoherenceHead(decoder.n_embd)).to(device)
        decoder.eval()
        head.eval()
        init_lm, init_acc = nan, nan
        if eval_size:
            init_lm, init_acc = _evaluate(decoder, head, tokenizer, eval_texts, eval_pairs, batch_size)
        params = [p for p in (*decoder.parameters(), *head.parameters()) if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
        warmup = max(1, steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
        decoder.train()
        head.train()
        order: list[int] = []
        recent: list[float] = []
        for step in range(steps):
            if len(order) < batch_size:
                order += rng.sample(range(len(corpus)), len(corpus))
            batch, order = [corpus[i] for i in order[:batch_size]], order[batch_size:]
            rows, labels = coherence_pairs(batch, rng, pool=corpus)
            lm_loss, coh_loss, logits = _batch_step(decoder, head, tokenizer, rows, labels)
            loss = lm_loss + coherence_weight * coh_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            hits = (logits.detach() > 0).long().cpu() == torch.tensor(labels)
            recent = (recent + [float(hits.float().mean())])[-10:]
            if progress is not None:
                progress(step, {"lm_loss": lm_loss.item(), "coherence_loss": coh_loss.item(),
                                "loss": loss.item()})  # fmt: skip
        decoder.eval()
        head.eval()
        final_lm, final_acc = nan, nan
        if eval_size:
            final_lm, final_acc = _evaluate(decoder, head, tokenizer, eval_texts, eval_pairs, batch_size)
    decoder.train(was_training)
    return {
        "initial_lm_loss": init_lm,
        "final_lm_loss": final_lm,
        "initial_perplexity": math.exp(min(init_lm, 50.0)),
        "perplexity": math.exp(min(final_lm, 50.0)),
        "initial_coherence_accuracy": init_acc,
        "coherence_accuracy": final_acc,
        "train_coherence_accuracy": sum(recent) / len(recent) if recent else float("nan"),
        "steps": float(steps),
    }
