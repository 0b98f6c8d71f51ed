"""Small Transformers for the sequence tasks, built from ``torch.nn`` modules.

* :class:`Seq2SeqTransformer`: encoder–decoder for translation (pre-norm, shared source /
  target embedding tied to the output projection, sinusoidal positions).
* :class:`CausalTransformerLM`: decoder-only language model (pre-norm, learned positions,
  tied output projection).

Both take token ids and compute their padding / causal masks themselves, so a batch is a
plain dict of ``[B, T]`` id tensors, which :class:`rdrop.RDrop` duplicates consistently
(source and target side alike).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["CausalTransformerLM", "Seq2SeqTransformer", "count_parameters"]


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

    def encode(self, src_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder states ``[B, S, d]`` and the source padding mask (``True`` = pad)."""
        _check_length(src_ids, self.max_positions, "src_ids")
        src_pad = src_ids == self.pad_id
        memory = self.transformer.encoder(self._embed(src_ids), src_key_padding_mask=src_pad)
        return memory, src_pad

    def decode(
        self, tgt_ids: Tensor, memory: Tensor, src_pad: Tensor, *, last_only: bool = False
    ) -> Tensor:
        """Next-token logits ``[B, T, V]`` for decoder inputs ``tgt_ids`` given the encoding
        (``[B, 1, V]`` for the last position only with ``last_only``, as decoding needs)."""
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
        if last_only:
            hidden = hidden[:, -1:]
        return hidden @ self.embedding.weight.T

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
