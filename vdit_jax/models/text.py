"""The built-in text path: a word-level tokenizer and a small transformer text encoder trained with the DiT.

No downloaded weights: the vocabulary is the words of the dataset's captions (moving_shapes: "a", the colours, the
shapes, "moving", the directions), stored in the run's config (`model.text_vocab`) so a checkpoint carries it.

    tok = Tokenizer(("a", "cyan", "triangle", "moving", "up"))
    tokens, mask = tok.encode(["a cyan triangle moving up"], length=8)    # int32 [1, 8], bool [1, 8]
    tok.decode(tokens[0])                                                  # "a cyan triangle moving up"

Ids: 0 = padding, 1 = `<bos>` (every prompt starts with it, so every prompt has at least one real token), then the
vocabulary in order. **The null condition** of classifier-free guidance is the encoding of the empty prompt,
`encode([""])` = `<bos>` alone (`NULL_PROMPT`): caption dropout in training and the unconditional branch in
sampling both use it (tests/models_text_encoder_test.py checks they are the same tokens).

Words are lower-cased runs of letters and digits (punctuation is a separator). A word outside the vocabulary or a
prompt longer than the text length is refused with one ValueError naming it (a word the encoder never saw carries
no meaning; cutting a prompt would change it silently).

`TextEncoder`: token embedding + learned positions, `depth` pre-LN transformer blocks with masked self-attention
(padded tokens give and get no attention), a final LayerNorm: [B, L] int32 -> [B, L, width] (the T5/CLIP text
towers in miniature; the DiT projects it like any precomputed embedding, `layers.TextEmbedder`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdit_jax.models import layers
from vdit_jax.parallel import sharding as sh

PAD, BOS = 0, 1
SPECIAL = ("<pad>", "<bos>")
NULL_PROMPT = ""  # what classifier-free guidance means by "no text": <bos> alone
_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """The words of `text`: lower-cased runs of letters and digits."""
    return _WORD.findall(text.lower())


class Tokenizer:
    """Word-level tokenizer over a fixed vocabulary (ids: 0 padding, 1 `<bos>`, then the words in order)."""

    def __init__(self, vocabulary: Sequence[str]):
        vocabulary = tuple(vocabulary)
        bad = [w for w in vocabulary if words(w) != [w]]
        if bad or len(set(vocabulary)) != len(vocabulary) or not vocabulary:
            raise ValueError(
                f"a vocabulary is distinct lower-case words of letters and digits, got {list(vocabulary)[:20]}"
            )
        self.vocabulary = vocabulary
        self._ids = {w: i + len(SPECIAL) for i, w in enumerate(vocabulary)}

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding table: the words and the two special tokens."""
        return len(self.vocabulary) + len(SPECIAL)

    def max_words(self, length: int) -> int:
        """The most words a prompt may have at text length `length` (`<bos>` takes one token)."""
        return length - 1

    def encode(self, texts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens int32 [N, length], mask bool [N, length]): `<bos>`, the words, then padding (mask False).

        Raises ValueError for a word outside the vocabulary or a prompt of more than `length - 1` words.
        """
        if isinstance(texts, str):
            raise TypeError("encode takes a sequence of texts, not one string")
        if length < 1:
            raise ValueError(f"text length {length} must be >= 1 (<bos> takes one token)")
        tokens = np.zeros((len(texts), length), np.int32)
        for i, text in enumerate(texts):
            ws = words(text)
            unknown = [w for w in ws if w not in self._ids]
            if unknown:
                raise ValueError(
                    f"prompt {text!r}: {unknown} not in the text encoder's vocabulary of {len(self.vocabulary)} "
                    f"words: {', '.join(self.vocabulary)}"
                )
            if len(ws) > self.max_words(length):
                raise ValueError(
                    f"prompt {text!r} has {len(ws)} words + <bos> = {len(ws) + 1} tokens, more than the model's "
                    f"text length {length}"
                )
            tokens[i, 0] = BOS
            tokens[i, 1 : len(ws) + 1] = [self._ids[w] for w in ws]
        return tokens, tokens != PAD

    def decode(self, tokens: Sequence[int]) -> str:
        """The words of `tokens` (special tokens dropped)."""
        n = len(SPECIAL)
        return " ".join(self.vocabulary[int(t) - n] for t in tokens if int(t) >= n)

    def null(self, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """The null condition: `encode([NULL_PROMPT] * batch, length)` (`<bos>` alone)."""
        return self.encode([NULL_PROMPT] * batch, length)


class _EncoderBlock(nn.Module):
    width: int
    num_heads: int
    mlp_ratio: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.layer_norm(self.dtype, name="norm1")(h)
        h = h + layers.CrossAttention(
            self.num_heads, implementation="xla", query_axis=sh.TEXT_LENGTH, name="self_attn", **kw
        )(x, x, mask)
        x = layers.layer_norm(self.dtype, name="norm2")(h)
        mlp = int(self.width * self.mlp_ratio)
        y = layers.dense(mlp, (sh.EMBED, sh.MLP), name="fc1", **kw)(x)
        y = nn.gelu(y, approximate=True)
        return h + layers.dense(self.width, (sh.MLP, sh.EMBED), name="fc2", **kw)(y)


class TextEncoder(nn.Module):
    """tokens int32 [B, L] (+ mask bool [B, L], True = real) -> embeddings float [B, L, width].

    Raises ValueError for tokens longer than `max_len` or of another rank.
    """

    vocab_size: int
    width: int = 64
    depth: int = 2
    num_heads: int = 2
    max_len: int = 16
    mlp_ratio: float = 4.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        if tokens.ndim != 2 or tokens.shape[1] > self.max_len:
            raise ValueError(f"tokens must be int [B, L <= {self.max_len}], got {tokens.shape}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embed = nn.Embed(
            self.vocab_size,
            self.width,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (sh.VOCAB, sh.EMBED)),
            name="token_embed",
            **kw,
        )
        pos = self.param(
            "pos_embed",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, sh.EMBED)),
            (self.max_len, self.width),
            self.param_dtype,
        )
        h = embed(tokens) + pos[None, : tokens.shape[1]].astype(self.dtype)
        h = nn.with_logical_constraint(h, (sh.BATCH, sh.TEXT_LENGTH, sh.ACT_EMBED))
        for i in range(self.depth):
            h = _EncoderBlock(self.width, self.num_heads, self.mlp_ratio, name=f"block{i}", **kw)(h, mask)
        h = layers.layer_norm(self.dtype, name="final_norm")(h)
        return jnp.where(mask[..., None], h, 0.0).astype(self.dtype)  # padding: exactly zero


class BagOfWords(nn.Module):
    """tokens int32 [B, L] (+ mask bool [B, L], True = real) -> [B, width]: the sum of one learned embedding per
    real token (`<bos>` included, so the null prompt has one too).

    The built-in encoder's pooled text vector (`DiTConfig.text_pooled`), added to the adaLN conditioning: the
    factored class embedding (`layers.LabelEmbedder` with `label_factors`) generalised to free text, one vector
    per word instead of per attribute, so a new combination of known words gets a new sum. Measured on the CPU
    demo's recipe at 1,200 steps (`configs/text.py:cross`, denoising loss at t = 800 with the direction word
    swapped, README): +2.5 % with it, as the class model's +2.6 % for a swapped direction label; the masked mean of
    the encoder's outputs through an MLP (`layers.PooledTextEmbedder`, SD3's pooled projection) gave +0.0 %: the
    jointly trained encoder learned the colour words first and the DiT never read the direction.
    """

    vocab_size: int
    width: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        embed = nn.Embed(
            self.vocab_size,
            self.width,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (sh.VOCAB, sh.EMBED)),
            name="embed",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        h = (embed(tokens) * mask[..., None].astype(self.dtype)).sum(1)
        return nn.with_logical_constraint(h, (sh.BATCH, sh.ACT_EMBED))
