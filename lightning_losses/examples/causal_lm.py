"""A small character-level causal transformer and its vocabulary, for the LLM post-training configs.

- :class:`CharVocab`: characters ↔ ids, with a padding id 0 (never a real character).
- :class:`TinyCausalLM`: token + learned position embeddings, pre-norm transformer blocks with a causal
  mask, a final norm and an LM head; ``input_ids [B, T]`` → ``{"next_token_logits": [B, T, V]}`` (position
  ``t`` predicts token ``t + 1``, the convention of ``nll``, ``clipped_pg``, ``dpo`` and
  ``custom_sequence`` with ``shift=True``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["CharVocab", "TinyCausalLM"]


class CharVocab:
    """Characters ↔ ids; id 0 is padding, characters get ids ``1..len(chars)`` in the given order.

    >>> vocab = CharVocab("ab+=")
    >>> vocab.encode("a+b"), vocab.decode([1, 3, 2, 0]), len(vocab)
    ([1, 3, 2], 'a+b', 5)
    """

    pad_id = 0

    def __init__(self, chars: Iterable[str]) -> None:
        chars = list(dict.fromkeys(chars))
        if any(len(c) != 1 for c in chars):
            raise ValueError("`chars` must be single characters")
        if not chars:
            raise ValueError("`chars` must not be empty")
        self.chars = chars
        self.index = {c: i + 1 for i, c in enumerate(chars)}

    def __len__(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - set(self.index))
        if unknown:
            raise ValueError(f"characters {unknown!r} are not in the vocabulary")
        return [self.index[c] for c in text]

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """The text of ``ids``, padding dropped."""
        ids = ids.tolist() if isinstance(ids, Tensor) else ids
        return "".join(self.chars[i - 1] for i in ids if i != self.pad_id)


class TinyCausalLM(nn.Module):
    """A GPT-style causal LM small enough to train on 2 CPU cores.

    Args:
        vocab_size: ``V``, the number of token ids (including padding).
        d_model / num_layers / num_heads: width, depth and attention heads.
        max_len: the longest sequence (learned position embeddings).
        dropout: dropout in the blocks (0 keeps training deterministic and log-probs reproducible).
        return_logits: ``forward`` returns ``{"next_token_logits": [B, T, V]}``; with ``False`` it returns
            ``{"hidden_states": [B, T, d_model], "lm_head_weight": [V, d_model]}`` instead, for the fused
            linear losses that never build the whole ``[B, T, V]`` logits.

    >>> lm = TinyCausalLM(vocab_size=12, d_model=32, num_layers=1, num_heads=2, max_len=16)
    >>> lm(torch.randint(0, 12, (3, 10)))["next_token_logits"].shape
    torch.Size([3, 10, 12])
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 128,
        num_layers: int = 2,
        num_heads: int = 4,
        max_len: int = 256,
        dropout: float = 0.0,
        return_logits: bool = True,
    ) -> None:
        super().__init__()
        if vocab_size < 2 or d_model < 1 or num_layers < 1 or max_len < 1:
            raise ValueError(
                f"`vocab_size` must be ≥ 2 and `d_model`, `num_layers`, `max_len` positive, got "
                f"{vocab_size}, {d_model}, {num_layers}, {max_len}"
            )
        if d_model % num_heads:
            raise ValueError(f"`d_model` ({d_model}) must be divisible by `num_heads` ({num_heads})")
        self.vocab_size, self.max_len, self.return_logits = vocab_size, max_len, return_logits
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(max_len, d_model)
        block = nn.TransformerEncoderLayer(
            d_model, num_heads, dim_feedforward=4 * d_model, dropout=dropout, activation="gelu",
            batch_first=True, norm_first=True,
        )  # fmt: skip
        self.blocks = nn.TransformerEncoder(block, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)
        nn.init.normal_(self.lm_head.weight, std=0.02)

    def hidden_states(self, input_ids: Tensor) -> Tensor:
        """``[B, T, d_model]``: the final-norm hidden states the LM head reads."""
        if input_ids.ndim != 2:
            raise ValueError(f"`input_ids` must be [B, T], got shape {tuple(input_ids.shape)}")
        length = input_ids.shape[1]
        if length > self.max_len:
            raise ValueError(f"`input_ids` has {length} positions, more than `max_len` = {self.max_len}")
        positions = torch.arange(length, device=input_ids.device)
        x = self.token_embedding(input_ids) + self.position_embedding(positions)
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=x.device, dtype=x.dtype)
        return self.norm(self.blocks(x, mask=causal, is_causal=True))

    def forward(self, input_ids: Tensor) -> dict[str, Tensor]:
        hidden = self.hidden_states(input_ids)
        if not self.return_logits:
            return {"hidden_states": hidden, "lm_head_weight": self.lm_head.weight}
        return {"next_token_logits": self.lm_head(hidden)}

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        greedy: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample ``max_new_tokens`` after ``prompt_ids [B, P]`` (equal-length prompts); ``[B, P + new]``.

        >>> lm = TinyCausalLM(vocab_size=5, d_model=8, num_layers=1, num_heads=2, max_len=8)
        >>> lm.generate(torch.ones(2, 3, dtype=torch.long), 4, greedy=True).shape
        torch.Size([2, 7])
        """
        if temperature <= 0 and not greedy:
            raise ValueError(f"`temperature` must be positive, got {temperature}")
        ids = prompt_ids
        for _ in range(max_new_tokens):
            logits = self.lm_head(self.hidden_states(ids[:, -self.max_len :])[:, -1]).float()
            if greedy:
                step = logits.argmax(-1, keepdim=True)
            else:
                probs = torch.softmax(logits / temperature, -1)
                step = torch.multinomial(probs, 1, generator=generator)
            ids = torch.cat([ids, step], dim=1)
        return ids
