"""Small Transformers for the sequence tasks, built from ``torch.nn`` modules.

* :class:`Seq2SeqTransformer`: encoder–decoder for translation (pre-norm, shared source /
  target embedding tied to the output projection, sinusoidal positions), with incremental
  decoding against a :class:`DecoderCache` of attention keys and values.
* :class:`CausalTransformerLM`: decoder-only language model (pre-norm, learned positions,
  tied output projection).

Both take token ids and compute their padding / causal masks themselves, so a batch is a
plain dict of ``[B, T]`` id tensors, which :class:`rdrop.RDrop` duplicates consistently
(source and target side alike).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["CausalTransformerLM", "DecoderCache", "Seq2SeqTransformer", "count_parameters"]


def count_parameters(model: nn.Module) -> int:
    """Number of distinct trainable parameters (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _sinusoidal(max_positions: int, dim: int) -> Tensor:
    position = torch.arange(max_positions, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(1e4) / dim))
    table = torch.zeros(max_positions, dim)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency[: dim // 2])
    return table


def _causal_mask(length: int, device: torch.device) -> Tensor:
    """Boolean ``[T, T]`` mask, ``True`` above the diagonal (future positions)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu(1)


def _check_length(ids: Tensor, max_positions: int, name: str) -> None:
    if ids.ndim != 2:
        raise ValueError(f"{name} must be [batch, length] token ids, got shape {tuple(ids.shape)}")
    if ids.shape[1] > max_positions:
        raise ValueError(
            f"{name} has length {ids.shape[1]} > max_positions={max_positions}; truncate "
            "the inputs or build the model with a larger max_positions"
        )


def _heads(attention: nn.MultiheadAttention, x: Tensor, part: int) -> Tensor:
    """The query (``part`` 0), key (1) or value (2) projection of ``x`` ``[B, T, d]`` by
    ``attention``'s packed input weights, split into heads: ``[B, H, T, d / H]``."""
    d = attention.embed_dim
    weight = attention.in_proj_weight[part * d : (part + 1) * d]
    bias = (
        None
        if attention.in_proj_bias is None
        else attention.in_proj_bias[part * d : (part + 1) * d]
    )
    batch, length, _ = x.shape
    heads = attention.num_heads
    return F.linear(x, weight, bias).view(batch, length, heads, d // heads).transpose(1, 2)


def _attend(
    attention: nn.MultiheadAttention, query: Tensor, keys: Tensor, values: Tensor, keep: Tensor
) -> Tensor:
    """``softmax(q kᵀ / √(d/H)) v`` over the keys where ``keep`` ``[B, 1, 1, S]`` is
    ``True`` (with ``attention``'s dropout on the weights in training mode), heads merged
    and through ``attention``'s output projection: ``[B, 1, d]``."""
    dropout = attention.dropout if attention.training else 0.0
    mixed = F.scaled_dot_product_attention(query, keys, values, attn_mask=keep, dropout_p=dropout)
    batch, _, length, _ = mixed.shape
    return attention.out_proj(mixed.transpose(1, 2).reshape(batch, length, attention.embed_dim))


@dataclass(frozen=True)
class DecoderCache:
    """What :meth:`Seq2SeqTransformer.decode_next` keeps between steps, per decoder layer:
    the self-attention keys and values of every target position so far and the
    cross-attention keys and values of the encoder states (each ``[B, H, length, d / H]``),
    and which target and source positions are real tokens (``[B, 1, 1, length]``).

    :meth:`select` reorders or repeats its rows, as beam search does with its beams.
    """

    self_keys: tuple[Tensor, ...]
    self_values: tuple[Tensor, ...]
    memory_keys: tuple[Tensor, ...]
    memory_values: tuple[Tensor, ...]
    target_keep: Tensor
    source_keep: Tensor

    @property
    def length(self) -> int:
        """The number of target positions decoded so far."""
        return self.target_keep.shape[-1]

    def select(self, rows: Tensor) -> DecoderCache:
        """The cache of the batch rows ``rows`` (a 1-D index tensor), in that order."""
        return DecoderCache(
            *(tuple(t.index_select(0, rows) for t in tensors) for tensors in self._per_layer()),
            self.target_keep.index_select(0, rows),
            self.source_keep.index_select(0, rows),
        )

    def _per_layer(self) -> tuple[tuple[Tensor, ...], ...]:
        """The per-layer fields, in the order of the constructor's arguments."""
        return self.self_keys, self.self_values, self.memory_keys, self.memory_values


class Seq2SeqTransformer(nn.Module):
    """Encoder–decoder Transformer: ``logits = model(src_ids, tgt_ids)``.

    ``tgt_ids`` is the decoder input (BOS + target tokens, teacher forcing); the output is
    ``[B, T, vocab_size]``. Padding (``pad_id``) is masked in attention.

    Example:
        >>> import torch
        >>> model = Seq2SeqTransformer(vocab_size=50, d_model=32, nhead=2,
        ...                            num_layers=1, dim_feedforward=64)
        >>> src, tgt = torch.randint(3, 50, (2, 7)), torch.randint(3, 50, (2, 5))
        >>> model(src, tgt).shape
        torch.Size([2, 5, 50])
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        d_model: int = 256,
        nhead: int = 4,
        num_layers: int = 3,
        dim_feedforward: int = 1024,
        dropout: float = 0.3,
        pad_id: int = 0,
        max_positions: int = 256,
    ) -> None:
        super().__init__()
        self.vocab_size, self.pad_id, self.max_positions = vocab_size, pad_id, max_positions
        self.d_model = d_model
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        nn.init.normal_(self.embedding.weight, std=d_model**-0.5)
        with torch.no_grad():
            self.embedding.weight[pad_id].zero_()
        self.register_buffer("positions", _sinusoidal(max_positions, d_model), persistent=False)
        self.dropout = nn.Dropout(dropout)
        layer = {
            "d_model": d_model,
            "nhead": nhead,
            "dim_feedforward": dim_feedforward,
            "dropout": dropout,
            "batch_first": True,
            "norm_first": True,
        }
        encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(**layer),
            num_layers,
            norm=nn.LayerNorm(d_model),
            enable_nested_tensor=False,  # the nested-tensor fast path skips pre-norm layers
        )
        decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(**layer), num_layers, norm=nn.LayerNorm(d_model)
        )
        self.transformer = nn.Transformer(
            d_model, nhead, custom_encoder=encoder, custom_decoder=decoder, batch_first=True
        )

    def _embed(self, ids: Tensor) -> Tensor:
        x = self.embedding(ids) * math.sqrt(self.d_model) + self.positions[: ids.shape[1]]
        return self.dropout(x)

    def _embed_at(self, tokens: Tensor, position: int) -> Tensor:
        """:meth:`_embed` of one token per row ``[B]`` at target position ``position``."""
        x = self.embedding(tokens[:, None]) * math.sqrt(self.d_model) + self.positions[position]
        return self.dropout(x)

    def encode(self, src_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder states ``[B, S, d]`` and the source padding mask (``True`` = pad)."""
        _check_length(src_ids, self.max_positions, "src_ids")
        src_pad = src_ids == self.pad_id
        memory = self.transformer.encoder(self._embed(src_ids), src_key_padding_mask=src_pad)
        return memory, src_pad

    def decode(self, tgt_ids: Tensor, memory: Tensor, src_pad: Tensor) -> Tensor:
        """Next-token logits ``[B, T, V]`` for decoder inputs ``tgt_ids`` given the encoding."""
        _check_length(tgt_ids, self.max_positions, "tgt_ids")
        length = tgt_ids.shape[1]
        causal = _causal_mask(length, tgt_ids.device)
        hidden = self.transformer.decoder(
            self._embed(tgt_ids),
            memory,
            tgt_mask=causal,
            tgt_is_causal=True,
            tgt_key_padding_mask=tgt_ids == self.pad_id,
            memory_key_padding_mask=src_pad,
        )
        return hidden @ self.embedding.weight.T

    def start_decoding(self, memory: Tensor, src_pad: Tensor) -> DecoderCache:
        """An empty :class:`DecoderCache` for the encoding ``memory, src_pad`` of
        :meth:`encode`: each layer's cross-attention keys and values, computed once."""
        layers = self.transformer.decoder.layers
        batch = memory.shape[0]
        # No target positions yet, in the dtype the projections produce (bf16 under autocast).
        empty = _heads(layers[0].self_attn, memory[:, :0], 1)
        return DecoderCache(
            self_keys=(empty,) * len(layers),
            self_values=(empty,) * len(layers),
            memory_keys=tuple(_heads(layer.multihead_attn, memory, 1) for layer in layers),
            memory_values=tuple(_heads(layer.multihead_attn, memory, 2) for layer in layers),
            target_keep=torch.ones(batch, 1, 1, 0, dtype=torch.bool, device=memory.device),
            source_keep=~src_pad[:, None, None, :],
        )

    def decode_next(self, tokens: Tensor, cache: DecoderCache) -> tuple[Tensor, DecoderCache]:
        """Incremental decoding: the next-token logits ``[B, V]`` after appending ``tokens``
        ``[B]`` to the target positions in ``cache``, and the cache with them.

        Feeding a sequence one token at a time gives the logits :meth:`decode` gives for the
        whole sequence (up to float rounding), at one position's cost per step instead of
        the whole prefix's.

        Example:
            >>> import torch
            >>> model = Seq2SeqTransformer(50, d_model=32, nhead=2, num_layers=1,
            ...                            dim_feedforward=64).eval()
            >>> src, tgt = torch.randint(3, 50, (2, 7)), torch.randint(3, 50, (2, 5))
            >>> cache = model.start_decoding(*model.encode(src))
            >>> for t in range(5):
            ...     logits, cache = model.decode_next(tgt[:, t], cache)
            >>> torch.allclose(logits, model(src, tgt)[:, -1], atol=1e-5)
            True
        """
        if cache.length >= self.max_positions:
            raise ValueError(
                f"cannot decode past max_positions={self.max_positions} target positions"
            )
        x = self._embed_at(tokens, cache.length)
        target_keep = torch.cat(
            [cache.target_keep, (tokens != self.pad_id)[:, None, None, None]], -1
        )
        keys, values = [], []
        for i, layer in enumerate(self.transformer.decoder.layers):
            h = layer.norm1(x)
            keys.append(torch.cat([cache.self_keys[i], _heads(layer.self_attn, h, 1)], dim=2))
            values.append(torch.cat([cache.self_values[i], _heads(layer.self_attn, h, 2)], dim=2))
            query = _heads(layer.self_attn, h, 0)
            x = x + layer.dropout1(_attend(layer.self_attn, query, keys[i], values[i], target_keep))
            query = _heads(layer.multihead_attn, layer.norm2(x), 0)
            x = x + layer.dropout2(
                _attend(
                    layer.multihead_attn,
                    query,
                    cache.memory_keys[i],
                    cache.memory_values[i],
                    cache.source_keep,
                )
            )
            h = layer.norm3(x)
            x = x + layer.dropout3(layer.linear2(layer.dropout(layer.activation(layer.linear1(h)))))
        hidden = self.transformer.decoder.norm(x)[:, 0]
        grown = replace(
            cache, self_keys=tuple(keys), self_values=tuple(values), target_keep=target_keep
        )
        return hidden @ self.embedding.weight.T, grown

    def forward(self, src_ids: Tensor, tgt_ids: Tensor) -> Tensor:
        memory, src_pad = self.encode(src_ids)
        return self.decode(tgt_ids, memory, src_pad)


class CausalTransformerLM(nn.Module):
    """Decoder-only Transformer language model: ``logits = model(input_ids)``, ``[B, T, V]``.

    Example:
        >>> import torch
        >>> lm = CausalTransformerLM(vocab_size=40, d_model=32, nhead=2, num_layers=1)
        >>> lm(torch.randint(0, 40, (3, 16))).shape
        torch.Size([3, 16, 40])
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        d_model: int = 192,
        nhead: int = 4,
        num_layers: int = 4,
        dim_feedforward: int | None = None,
        dropout: float = 0.2,
        max_positions: int = 256,
    ) -> None:
        super().__init__()
        self.vocab_size, self.max_positions = vocab_size, max_positions
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_positions, d_model)
        for table in (self.embedding, self.position):
            nn.init.normal_(table.weight, std=0.02)
        self.dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            d_model,
            nhead,
            dim_feedforward=dim_feedforward or 4 * d_model,
            dropout=dropout,
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(
            layer, num_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False
        )

    def forward(self, input_ids: Tensor) -> Tensor:
        _check_length(input_ids, self.max_positions, "input_ids")
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device)
        x = self.dropout(self.embedding(input_ids) + self.position(positions))
        causal = _causal_mask(length, input_ids.device)
        hidden = self.blocks(x, mask=causal, is_causal=True)
        return hidden @ self.embedding.weight.T
