"""cuDNN flash attention on an NVIDIA GPU (skipped, with its reason in the summary, on machines without one).

Run there with `JAX_PLATFORMS=cuda python -m pytest -q -rs tests/gpu_attention_test.py`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models_attention_test import qkv, reference
from tests.models_dit_test import inputs, randomize, tiny
from vdit_jax.models import attention, dit

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")


@pytest.mark.parametrize("lq,lk", [(256, 256), (4095, 4095), (1000, 120), (21 * 30 * 52, 512)])
def test_cudnn_matches_plain_for_any_token_count(lq, lk):
    """Token counts that are no multiple of 64 (4,095; 1,000; S1's 32,760 = 21x30x52) are padded and masked."""
    q, k, v = (a.astype(jnp.bfloat16) for a in qkv(1, lq, lk, 4, 64, seed=lq))
    assert attention.resolve("auto", q.dtype) == "cudnn"
    out = attention.attend(q, k, v)
    want = reference(*(a.astype(jnp.float32) for a in (q, k, v)))
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("head_dim", [6, 20, 120, 512])
def test_cudnn_takes_any_head_width(head_dim):
    """Widths cuDNN refuses unpadded (6, 20, 120: no multiple of 8) are padded; 512 is wider than it takes at all
    and falls back to XLA. `dit_config("S", hidden_size=120, num_heads=6, dtype="bfloat16")` has width 20."""
    q, k, v = (a.astype(jnp.bfloat16) for a in qkv(2, 300, 300, 2, head_dim, seed=head_dim))
    out = attention.attend(q, k, v, implementation="cudnn")
    want = reference(*(a.astype(jnp.float32) for a in (q, k, v)))
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=2e-2, rtol=2e-2)


def test_cudnn_gradients_match_plain():
    q, k, v = (a.astype(jnp.bfloat16) for a in qkv(2, 300, 300, 2, 64, seed=9))
    w = jax.random.normal(jax.random.key(1), q.shape)
    loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
    got = jax.grad(loss(attention.cudnn_attention), argnums=(0, 1, 2))(q, k, v)
    f32 = lambda q, k, v: reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    want = jax.grad(loss(f32), argnums=(0, 1, 2))(q, k, v)
    for g, e in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(e, np.float32), atol=5e-2, rtol=5e-2)


def test_bf16_dit_with_cudnn_matches_xla():
    shape = (2, 3, 20, 28, 3)  # 3 x 5 x 7 = 105 tokens: no block multiple
    cfg = tiny(attention="full", hidden_size=128, num_heads=2, dtype="bfloat16", attention_impl="cudnn")
    x, t, labels = inputs(shape)
    params = randomize(dit.init_params(cfg, jax.random.key(0), shape), scale=0.1)
    out = dit.DiT(cfg).apply(params, x, t, labels)
    xla = dit.DiT(dit.DiTConfig(**{**cfg.__dict__, "attention_impl": "xla"})).apply(params, x, t, labels)
    assert "cudnn" in jax.jit(lambda p: dit.DiT(cfg).apply(p, x, t, labels)).lower(params).as_text().lower()
    np.testing.assert_allclose(out, xla, atol=3e-2, rtol=3e-2)
