"""The built-in text path: the word-level tokenizer (round trip, padding, masks, the null prompt, refusals) and the
transformer text encoder (shapes, padding invariance, prompt dependence)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import randomize
from vdit_jax.data import moving_shapes as ms
from vdit_jax.models import text

VOCAB = ("a", *ms.COLOUR_NAMES, *ms.SHAPES, "moving", *ms.DIRECTIONS)


def test_tokenizer_round_trip_padding_masks_and_the_null_prompt():
    tok = text.Tokenizer(VOCAB)
    assert tok.vocab_size == len(VOCAB) + 2
    captions = [ms.caption_for(label) for label in range(ms.NUM_CLASSES)]
    tokens, mask = tok.encode(captions, length=8)
    assert tokens.dtype == np.int32 and tokens.shape == (ms.NUM_CLASSES, 8) and mask.dtype == bool
    assert [tok.decode(row) for row in tokens] == captions
    assert (tokens[:, 0] == text.BOS).all() and (mask.sum(1) == 6).all()  # <bos> + 5 words
    np.testing.assert_array_equal(mask, tokens != text.PAD)
    assert len({tuple(row) for row in tokens}) == ms.NUM_CLASSES
    # Case and punctuation do not matter; a longer length only adds padding.
    again, _ = tok.encode(["A Cyan triangle, moving UP."], length=12)
    first, _ = tok.encode(["a cyan triangle moving up"], length=8)
    np.testing.assert_array_equal(again[0, :8], first[0])
    assert (again[0, 8:] == text.PAD).all()
    null, null_mask = tok.null(2, 8)
    np.testing.assert_array_equal(null, tok.encode([text.NULL_PROMPT] * 2, 8)[0])
    np.testing.assert_array_equal(null_mask, [[True] + [False] * 7] * 2)


def test_tokenizer_refuses_unknown_words_long_prompts_and_bad_vocabularies():
    tok = text.Tokenizer(VOCAB)
    with pytest.raises(ValueError, match=r"\['purple'\] not in the text encoder's vocabulary of 16 words: a, red, "):
        tok.encode(["a purple square moving up"], 8)
    with pytest.raises(ValueError, match="has 5 words \\+ <bos> = 6 tokens, more than the model's text length 5"):
        tok.encode(["a red square moving up"], 5)
    with pytest.raises(TypeError, match="sequence of texts"):
        tok.encode("a red square", 8)
    with pytest.raises(ValueError, match="distinct lower-case words"):
        text.Tokenizer(("a", "a"))
    with pytest.raises(ValueError, match="distinct lower-case words"):
        text.Tokenizer(("Red",))


@pytest.fixture(scope="module")
def encoder():
    tok = text.Tokenizer(VOCAB)
    model = text.TextEncoder(vocab_size=tok.vocab_size, width=16, depth=2, num_heads=2, max_len=12)
    tokens, mask = tok.encode(["a red square moving up"], 8)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens, mask))
    return tok, model, randomize(params, scale=0.3), jax.jit(model.apply)


def test_encoder_ignores_padding_and_reads_the_prompt(encoder):
    tok, model, params, apply = encoder
    prompts = ["a red square moving up", "a red circle moving up", "a cyan triangle moving left"]
    tokens, mask = tok.encode(prompts, 8)
    out = apply(params, tokens, mask)
    assert out.shape == (3, 8, 16) and out.dtype == jnp.float32
    np.testing.assert_array_equal(out[~mask], 0.0)  # padding: exactly zero
    long_tokens, long_mask = tok.encode(prompts, 12)
    long = apply(params, long_tokens, long_mask)
    np.testing.assert_allclose(long[:, :8], out, atol=1e-6)  # the same prompt padded further: the same encoding
    # One word changed changes every real token's encoding (self-attention), not only its own.
    assert np.abs(out[0, :6] - out[1, :6]).min(axis=-1).max() > 1e-4
    assert (np.abs(out[0, :6] - out[1, :6]).max(axis=-1) > 1e-4).all()
    with pytest.raises(ValueError, match=r"tokens must be int \[B, L <= 12\]"):
        apply(params, *tok.encode(prompts, 13))


def test_dit_with_the_built_in_encoder_reads_prompts_ignores_padding_and_shares_the_null():
    """A DiT with `text_vocab` takes tokens: its output depends on the prompt, not on how far it is padded; caption
    dropout (`drop_text`) and the sampler's unconditional branch (`null_text`) use the same null: the empty prompt."""
    from tests.models_dit_test import inputs, tiny
    from vdit_jax.models import dit

    cfg = tiny(num_classes=0, text_dim=16, text_vocab=VOCAB, text_max_len=12, text_pooled=True)
    tok = text.Tokenizer(cfg.text_vocab)
    x, t, _ = inputs()
    params = randomize(nn.unbox(dit.init_params(cfg, jax.random.key(0), x.shape)), scale=0.2)
    assert "text_encoder" in params["params"]
    # The pooled vector of the built-in encoder: a bag of words, one embedding per vocabulary entry.
    assert params["params"]["text_pool"]["embed"]["embedding"].shape == (tok.vocab_size, cfg.hidden_size)
    fwd = jax.jit(lambda p, tokens, mask: dit.DiT(cfg).apply(p, x, t, None, tokens, None, mask))
    prompts = ["a red square moving up", "a blue square moving up"]
    out = fwd(params, *tok.encode(prompts, 8))
    np.testing.assert_allclose(fwd(params, *tok.encode(prompts, 12)), out, atol=1e-5)  # padded further: the same
    swapped = fwd(params, *tok.encode(prompts[::-1], 8))  # the same videos, the other prompt: another output
    assert float(jnp.abs(swapped[0] - out[0]).max()) > 1e-4
    # One null for training and sampling: the empty prompt.
    null, null_mask = dit.null_text(2, 8, cfg.text_dim, builtin=True)
    np.testing.assert_array_equal(null, tok.null(2, 8)[0])
    np.testing.assert_array_equal(null_mask, tok.null(2, 8)[1])
    tokens, mask = tok.encode(prompts, 8)
    dropped, dropped_mask = dit.drop_text(jax.random.key(0), jnp.asarray(tokens), 1.0, jnp.asarray(mask))
    np.testing.assert_array_equal(dropped, null)
    np.testing.assert_array_equal(dropped_mask, null_mask)
    kept, kept_mask = dit.drop_text(jax.random.key(0), jnp.asarray(tokens), 0.0, jnp.asarray(mask))
    np.testing.assert_array_equal(kept, tokens)
    np.testing.assert_array_equal(kept_mask, mask)
    with pytest.raises(ValueError, match=r"built-in text encoder: pass text as int tokens \[B, L\]"):
        dit.DiT(cfg).apply(params, x, t, None, jnp.zeros((2, 8, 16)))
    with pytest.raises(ValueError, match="needs text_dim \\(its width\\) > 0"):
        tiny(num_classes=0, text_vocab=VOCAB)
    with pytest.raises(ValueError, match="text_vocab: a vocabulary is distinct lower-case words"):
        tiny(num_classes=0, text_dim=16, text_vocab=("Red",))
