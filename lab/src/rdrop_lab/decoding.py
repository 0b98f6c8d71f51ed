"""Greedy and beam-search decoding for :class:`~rdrop_lab.models.Seq2SeqTransformer`.

Both decode a batch of source sentences (call them on a model in eval mode) and return
token-id lists without BOS/EOS; padding and BOS are never generated. Beam search scores a
hypothesis by its summed log-probability divided by ``length ** length_penalty`` (the
length counts the EOS token). Each step ranks the ``2 * beam_size`` best extensions; an
EOS among the top ``beam_size`` of them ends a hypothesis, the best non-EOS extensions
(up to ``beam_size``) continue; a sentence is final once ``beam_size`` hypotheses have
ended, and every hypothesis is cut at ``max_len_a * source_length + max_len_b`` tokens
(the fairseq conventions). Both decode incrementally: each step runs the decoder on the
newest token only, against cached keys and values (:meth:`Seq2SeqTransformer.decode_next`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rdrop_lab.models import DecoderCache, Seq2SeqTransformer

__all__ = ["beam_search", "greedy_decode"]


def _max_lengths(src_ids: Tensor, pad_id: int, a: float, b: int, cap: int) -> list[int]:
    lengths = (src_ids != pad_id).sum(dim=1).tolist()
    return [max(1, min(cap, int(a * n + b))) for n in lengths]


def _next_log_probs(
    model: Seq2SeqTransformer, tokens: Tensor, cache: DecoderCache, bos_id: int
) -> tuple[Tensor, DecoderCache]:
    """Log-probabilities of the token after ``tokens`` ``[B]`` over the tokens that can be
    generated (padding and BOS are masked before the softmax, so the distribution is
    renormalised), by incremental decoding; and the cache with ``tokens`` in it."""
    logits, cache = model.decode_next(tokens, cache)
    logits = logits.float()
    logits[:, [model.pad_id, bos_id]] = float("-inf")
    return logits.log_softmax(dim=-1), cache


def _strip(tokens: list[int], eos_id: int) -> list[int]:
    return tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens


@torch.no_grad()
def greedy_decode(
    model: Seq2SeqTransformer,
    src_ids: Tensor,
    *,
    bos_id: int,
    eos_id: int,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
) -> list[list[int]]:
    """The most likely next token at each step, for a batch ``src_ids`` ``[B, S]``."""
    cache = model.start_decoding(*model.encode(src_ids))
    limits = _max_lengths(src_ids, model.pad_id, max_len_a, max_len_b, model.max_positions - 1)
    batch = src_ids.shape[0]
    tokens = torch.full((batch, 1), bos_id, dtype=torch.long, device=src_ids.device)
    done = torch.zeros(batch, dtype=torch.bool, device=src_ids.device)
    for _ in range(max(limits)):
        log_probs, cache = _next_log_probs(model, tokens[:, -1], cache, bos_id)
        next_token = log_probs.argmax(dim=-1)
        next_token = torch.where(done, torch.full_like(next_token, model.pad_id), next_token)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        done |= next_token == eos_id
        if bool(done.all()):
            break
    out = []
    for row, limit in zip(tokens[:, 1:].tolist(), limits, strict=True):
        out.append([t for t in _strip(row, eos_id)[:limit] if t != model.pad_id])
    return out


@torch.no_grad()
def beam_search(
    model: Seq2SeqTransformer,
    src_ids: Tensor,
    *,
    bos_id: int,
    eos_id: int,
    beam_size: int = 4,
    length_penalty: float = 1.0,
    max_len_a: float = 1.5,
    max_len_b: int = 10,
) -> list[list[int]]:
    """Beam search over a batch ``src_ids`` ``[B, S]``; the best hypothesis per sentence.

    Example:
        >>> import torch
        >>> from rdrop_lab.models import Seq2SeqTransformer
        >>> _ = torch.manual_seed(0)
        >>> model = Seq2SeqTransformer(20, d_model=16, nhead=2, num_layers=1,
        ...                            dim_feedforward=32).eval()
        >>> out = beam_search(model, torch.randint(3, 20, (2, 6)), bos_id=1, eos_id=2)
        >>> len(out), all(isinstance(t, int) for t in out[0])
        (2, True)
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    batch, k = src_ids.shape[0], beam_size
    limits = _max_lengths(src_ids, model.pad_id, max_len_a, max_len_b, model.max_positions - 1)
    memory, src_pad = model.encode(src_ids)
    cache = model.start_decoding(memory.repeat_interleave(k, 0), src_pad.repeat_interleave(k, 0))
    tokens = torch.full((batch * k, 1), bos_id, dtype=torch.long, device=src_ids.device)
    scores = torch.full((batch, k), float("-inf"), device=src_ids.device)
    scores[:, 0] = 0.0  # all beams start identical: keep one so the top-k are distinct
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    active = [True] * batch

    for step in range(1, max(limits) + 1):
        log_probs, cache = _next_log_probs(model, tokens[:, -1], cache, bos_id)
        vocab = log_probs.shape[-1]
        candidates = (scores[:, :, None] + log_probs.view(batch, k, vocab)).view(batch, -1)
        top_scores, top_index = candidates.topk(min(2 * k, candidates.shape[1]), dim=1)
        beam_of, token_of = top_index // vocab, top_index % vocab
        next_rows, next_tokens, next_scores = [], [], []
        for b in range(batch):
            kept: list[tuple[int, int, float]] = []
            if active[b]:
                candidates_b = zip(
                    top_scores[b].tolist(), beam_of[b].tolist(), token_of[b].tolist(), strict=True
                )
                for rank, (score, beam, token) in enumerate(candidates_b):
                    if score == float("-inf"):
                        break
                    if token == eos_id and rank >= k and step < limits[b]:
                        continue  # only an EOS among the top k candidates ends a hypothesis
                    if token == eos_id or step == limits[b]:
                        prefix = tokens[b * k + beam, 1:].tolist()
                        hypothesis = prefix if token == eos_id else [*prefix, token]
                        normalised = score / (step**length_penalty)
                        finished[b].append((normalised, hypothesis))
                        if len(finished[b]) >= k:
                            break
                    else:
                        kept.append((beam, token, score))
                        if len(kept) == k:
                            break
                if len(finished[b]) >= k or step >= limits[b]:
                    active[b], kept = False, []
            # Inactive sentences keep dummy beams (score -inf) so shapes stay fixed.
            kept += [(0, model.pad_id, float("-inf"))] * (k - len(kept))
            for beam, token, score in kept:
                next_rows.append(b * k + beam)
                next_tokens.append(token)
                next_scores.append(score)
        if not any(active):
            break
        rows = torch.tensor(next_rows, device=src_ids.device)
        new_tokens = torch.tensor(next_tokens, device=src_ids.device)[:, None]
        tokens = torch.cat([tokens[rows], new_tokens], dim=1)
        cache = cache.select(rows)
        scores = torch.tensor(next_scores, device=src_ids.device).view(batch, k)

    return [max(hyps, key=lambda h: h[0])[1] if hyps else [] for hyps in finished]
