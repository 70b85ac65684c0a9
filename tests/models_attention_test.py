"""The attention entry point: padded/masked kernel paths, key masks, splash in interpret mode, sequence parallelism."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models_dit_test import inputs, randomize, tiny
from vdit_jax.models import attention, blockwise, dit, layers
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.parallel import sharding as sh


def reference(q, k, v, kv_mask=None):
    """Softmax attention written out in float32 (no JAX attention function involved); a query with no real key
    gets zeros."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision="highest") / np.sqrt(q.shape[-1])
    if kv_mask is None:
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v, precision="highest")
    mask = kv_mask[:, None, None, :]
    weights = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1) * mask  # all-masked rows: zero weights
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision="highest")


# [4, 9] key masks: a prefix, scattered tokens, none at all, all.
MASK = np.array([[1, 1, 1, 0, 0, 0, 0, 0, 0], [0, 1, 0, 1, 1, 0, 1, 0, 0], [0] * 9, [1] * 9], bool)


def qkv(b, lq, lk, h, d, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(ks[0], (b, lq, h, d)),
        jax.random.normal(ks[1], (b, lk, h, d)),
        jax.random.normal(ks[2], (b, lk, h, d)),
    )


def test_resolve_per_backend_and_dtype():
    assert attention.resolve("auto", jnp.bfloat16, "gpu") == "cudnn"
    assert attention.resolve("auto", jnp.float32, "gpu") == "xla"  # cuDNN flash attention is bf16/fp16 only
    assert attention.resolve("auto", jnp.float32, "tpu") == "splash"
    assert attention.resolve("auto", jnp.bfloat16, "cpu") == "chunked"  # measured faster on CPUs (attention.py)
    assert attention.resolve("auto", jnp.float32, "cpu", kv_tokens=256) == "chunked"
    assert attention.resolve("auto", jnp.float32, "cpu", kv_tokens=64) == "xla"  # its gradient is faster there
    assert attention.resolve("splash", jnp.float32, "cpu") == "splash"  # interpret mode / TPU AOT compiles
    assert attention.resolve("cudnn", jnp.bfloat16, "gpu") == "cudnn"
    with pytest.raises(ValueError, match="'cudnn' needs an NVIDIA GPU, not 'cpu'"):
        attention.resolve("cudnn", jnp.bfloat16, "cpu")
    with pytest.raises(ValueError, match="'flash' is not one of"):
        attention.resolve("flash", jnp.float32)


@pytest.mark.parametrize("lq,lk", [(100, 100), (37, 130), (128, 9)])
def test_padded_token_axes_match_plain(lq, lk):
    """The padded path `attend` takes for cuDNN (tokens padded to 64 and the padded keys masked by length, bf16
    inside), run through XLA on the CPU: equal to plain attention at token counts that are not block multiples."""
    q, k, v = qkv(2, lq, lk, 3, 16)
    out = jax.jit(functools.partial(attention.cudnn_attention, implementation="xla"))(q, k, v)
    assert out.shape == q.shape
    np.testing.assert_allclose(out, reference(q, k, v), rtol=2e-2, atol=2e-2)  # bf16 inside
    # Unmasked padding would change the result: the padded keys score 0 and would take softmax mass.
    pad = lambda a: attention._pad_axis(a, 1, attention.CUDNN_BLOCK)
    padded = jax.nn.dot_product_attention(q, pad(k), pad(v))
    if lk % attention.CUDNN_BLOCK:
        assert not np.allclose(padded, reference(q, k, v), atol=5e-2)


@pytest.mark.parametrize("lq,lk,d", [(200, 200, 72), (105, 9, 32)])
def test_splash_interpret_matches_plain(lq, lk, d):
    """Pallas splash attention run by the Pallas interpreter on the CPU: token counts that are no block multiple
    (105 = 3x5x7 tokens, 9 text tokens) and a head width that is no lane multiple (72, DiT-XL's)."""
    q, k, v = qkv(2, lq, lk, 2, d, seed=1)
    out = attention.splash_attention(q, k, v, interpret=True)
    assert out.shape == q.shape
    np.testing.assert_allclose(out, reference(q, k, v), rtol=1e-4, atol=1e-4)


def test_splash_interpret_gradients_match_plain():
    q, k, v = qkv(1, 150, 150, 2, 16, seed=2)
    w = jax.random.normal(jax.random.key(3), q.shape)
    loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * w)
    got = jax.grad(loss(lambda *a: attention.splash_attention(*a, interpret=True)), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
    for g, e in zip(got, want, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["xla", "chunked", "splash"])
def test_key_mask_every_implementation(impl):
    """Masked keys get no attention on every implementation that runs on the CPU (splash interpreted); a query
    with no real key gets zeros; values and gradients are finite and match the reference."""
    q, k, v = qkv(4, 37, 9, 2, 16, seed=6)
    mask = jnp.asarray(MASK)
    w = jax.random.normal(jax.random.key(7), q.shape)
    attend = jax.jit(lambda q, k, v, m: attention.attend(q, k, v, kv_mask=m, implementation=impl, interpret=True))
    fn = lambda q, k, v: attend(q, k, v, mask)
    out = fn(q, k, v)
    np.testing.assert_allclose(out, reference(q, k, v, mask), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out[2], 0.0)
    # Padded keys take no part: extra keys beyond 9, whatever their values, change nothing when masked.
    k2, v2 = (jnp.concatenate([a, 5 * jnp.ones_like(a[:, :4])], axis=1) for a in (k, v))
    padded = attend(q, k2, v2, jnp.pad(mask, ((0, 0), (0, 4))))
    np.testing.assert_allclose(padded, out, rtol=1e-5, atol=1e-6)
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * w)
    got = jax.jit(jax.grad(loss(fn), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(loss(lambda q, k, v: reference(q, k, v, mask)), argnums=(0, 1, 2))(q, k, v)
    for g, e in zip(got, want, strict=True):
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_masked_padded_xla_and_cudnn_compaction():
    """XLA attention with a key mask; cuDNN's reformulation (real keys moved to the front, masked by
    length) computed with XLA, since cuDNN itself needs an NVIDIA GPU."""
    q, k, v = qkv(4, 37, 9, 2, 16, seed=8)
    mask = jnp.asarray(MASK[[0, 1, 3, 1]])  # no empty row: the kernels are called after `attend` handles those
    want = reference(q, k, v, mask)
    np.testing.assert_allclose(attention.xla_attention(q, k, v, kv_mask=mask), want, rtol=1e-5, atol=1e-5)
    kc, vc, lengths = attention.compact_keys(k, v, mask)
    np.testing.assert_array_equal(lengths, [3, 4, 9, 4])
    np.testing.assert_array_equal(kc[1, :4], k[1, jnp.array([1, 3, 4, 6])])  # real keys first, in order
    out = jax.nn.dot_product_attention(q, kc, vc, key_value_seq_lengths=lengths, implementation="xla")
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"kv_mask must be \[B, Lk\] = \(4, 9\), got \(4, 8\)"):
        attention.attend(q, k, v, kv_mask=mask[:, :8])


@pytest.mark.parametrize("head_dim", [6, 20, 64])
def test_cudnn_path_pads_any_head_width(head_dim):
    """`cudnn_attention`'s whole path (bf16 cast, key compaction, tokens padded to 64, the head width padded to a
    multiple of 8 with the softmax scale of the true width) run through XLA on the CPU: equal to plain attention.
    Widths 6 and 20 (hidden 120 with 6 heads) are ones cuDNN itself refuses unpadded."""
    q, k, v = qkv(4, 37, 9, 2, head_dim, seed=11)
    mask = jnp.asarray(MASK[[0, 1, 3, 1]])
    got = jax.jit(functools.partial(attention.cudnn_attention, implementation="xla"))(q, k, v, mask)
    assert got.shape == q.shape and got.dtype == q.dtype
    np.testing.assert_allclose(got, reference(q, k, v, mask), atol=2e-2, rtol=2e-2)  # bf16 inside


def test_cudnn_max_head_dim_by_compute_capability():
    class Gpu:
        def __init__(self, cc):
            self.compute_capability = cc

    assert attention.cudnn_max_head_dim(Gpu("8.0")) == 128  # A100
    assert attention.cudnn_max_head_dim(Gpu("9.0")) == 256  # H100 / H200
    assert attention.cudnn_max_head_dim(jax.devices("cpu")[0]) == 128


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
def test_cudnn_key_mask_matches_plain():
    q, k, v = (a.astype(jnp.bfloat16) for a in qkv(4, 300, 9, 2, 64, seed=10))
    mask = jnp.asarray(MASK)
    out = attention.attend(q, k, v, kv_mask=mask, implementation="cudnn")
    want = reference(*(a.astype(jnp.float32) for a in (q, k, v)), mask)
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=2e-2, rtol=2e-2)


def test_attend_rejects_unknown_sequence_parallel():
    q, k, v = qkv(1, 8, 8, 1, 8)
    with pytest.raises(ValueError, match="sequence_parallel 'scatter' is not one of"):
        attention.attend(q, k, v, sequence_parallel="scatter")


AXES = (sh.BATCH, sh.LENGTH, sh.ACT_HEADS, sh.ACT_KV)


@pytest.mark.parametrize(
    "mode,impl",
    # Ring attention is one blockwise kernel whatever the implementation: it runs once.
    [("allgather", "xla"), ("allgather", "chunked"), ("allgather", "splash"), ("ring", "xla")],
)
def test_sequence_parallel_attention_matches_unsharded(mode, impl):
    """Tokens split 4 ways over `sequence` (batch 2 ways over `data`), with a key mask (one example with scattered
    real keys, one with none): outputs and q/k/v gradients equal the unsharded reference."""
    assert jax.device_count() == 8
    q, k, v = qkv(2, 64, 64, 2, 16, seed=4)
    mask = jnp.asarray(np.random.default_rng(0).random((2, 64)) < 0.3).at[1].set(False)
    w = jax.random.normal(jax.random.key(5), q.shape)
    mesh = mesh_lib.make_mesh({"data": 2, "sequence": 4})

    def loss(q, k, v, mask):
        out = attention.attend(
            q, k, v, kv_mask=mask, implementation=impl, sequence_parallel=mode, q_axes=AXES, interpret=True
        )
        return jnp.sum(out * w), out

    with jax.set_mesh(mesh), nn.logical_axis_rules(sh.default_rules()):
        spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "sequence"))
        args = [jax.device_put(a, spec) for a in (q, k, v, mask)]
        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(*args)
        hlo = jax.jit(loss).lower(*args).compile().as_text()
    assert ("collective-permute" if mode == "ring" else "all-gather") in hlo
    np.testing.assert_allclose(out, reference(q, k, v, mask), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[1], 0.0)
    want = jax.grad(lambda q, k, v: jnp.sum(reference(q, k, v, mask) * w), argnums=(0, 1, 2))(q, k, v)
    for g, e in zip(grads, want, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def test_ring_ignores_the_implementation():
    """`attend` runs the same ring kernel for every implementation: splash's HLO is xla's."""
    q, k, v = qkv(2, 64, 64, 2, 16)
    mesh = mesh_lib.make_mesh({"data": 2, "sequence": 4})
    hlo = lambda impl: (
        jax.jit(lambda q, k, v: attention.attend(q, k, v, implementation=impl, sequence_parallel="ring", q_axes=AXES))
        .lower(q, k, v)
        .as_text()
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(sh.default_rules()):
        assert hlo("splash") == hlo("xla")


@pytest.mark.parametrize(
    "block_q,block_k,masked,tile",
    [
        (None, 4, True, None),
        (16, 5, True, None),
        (64, 64, False, None),
        (16, None, True, None),
        (16, None, True, 16 * 9 * 2),
        (64, None, False, None),
    ],
)
def test_blockwise_matches_plain(block_q, block_k, masked, tile):
    """Local blockwise attention (query and key blocks that divide neither 37 nor 9 tokens, or one block of each;
    block_k None: the query-chunked CPU kernel, every key at once, all 8 (batch, head) pairs in a chunk or, with
    `tile`, 2 at a time) with and without a key mask: values and q/k/v gradients equal the reference; a query with
    no real key gets zeros and finite (zero) gradients."""
    q, k, v = qkv(4, 37, 9, 2, 8, seed=12)
    mask = jnp.asarray(MASK) if masked else None
    w = jax.random.normal(jax.random.key(13), q.shape)
    if block_k is None:
        fn = lambda q, k, v: blockwise.query_chunked_attention(  # noqa: E731
            q, k, v, mask, block_q=block_q, tile_elements=tile or blockwise.TILE_ELEMENTS
        )
    else:
        fn = lambda q, k, v: blockwise.attention(q, k, v, mask, block_q=block_q, block_k=block_k)  # noqa: E731
    loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * w)
    out, got = jax.jit(lambda *a: (fn(*a), jax.grad(loss(fn), argnums=(0, 1, 2))(*a)))(q, k, v)
    np.testing.assert_allclose(out, reference(q, k, v, mask), rtol=1e-5, atol=1e-5)
    if masked:
        np.testing.assert_array_equal(out[2], 0.0)
    want = jax.jit(jax.grad(loss(lambda q, k, v: reference(q, k, v, mask)), argnums=(0, 1, 2)))(q, k, v)
    for g, e in zip(got, want, strict=True):
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def test_ring_attention_blocks_without_keys():
    """`ring_attention` itself (no `attend` around it), tokens over 4 shards: one example's keys all lie on one
    shard (the other shards' blocks are all masked), another has none at all and gets zeros, never NaN; values and
    gradients equal the reference."""
    q, k, v = qkv(3, 32, 32, 2, 8, seed=14)
    mask = jnp.zeros((3, 32), bool).at[0, 9:13].set(True).at[2].set(jnp.arange(32) % 3 == 0)  # example 1: no key
    w = jax.random.normal(jax.random.key(15), q.shape)
    mesh = mesh_lib.make_mesh({"data": 2, "sequence": 4})
    spec = jax.sharding.PartitionSpec(None, "sequence")
    ring = jax.shard_map(
        lambda q, k, v, m: attention.ring_attention(q, k, v, "sequence", m), mesh=mesh, in_specs=spec, out_specs=spec
    )
    both = lambda f: jax.jit(lambda *a: (f(*a, mask), jax.grad(lambda *a: jnp.sum(f(*a, mask) * w), (0, 1, 2))(*a)))
    (out, got), (expected, want) = both(ring)(q, k, v), both(reference)(q, k, v)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[1], 0.0)
    for g, e in zip(got, want, strict=True):
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def test_masked_cross_attention_kernel_per_shard():
    """Splash cross-attention under a mesh (queries split over `sequence`, text keys whole): the kernel runs per
    shard inside shard_map with its shard of the key mask."""
    q, k, v = qkv(2, 64, 9, 2, 16, seed=11)
    mask = jnp.asarray(MASK[:2])
    mesh = mesh_lib.make_mesh({"data": 2, "sequence": 4})
    kv_axes = (sh.BATCH, sh.TEXT_LENGTH, sh.ACT_HEADS, sh.ACT_KV)
    fn = lambda q, k, v, m: attention.attend(
        q, k, v, kv_mask=m, implementation="splash", q_axes=AXES, kv_axes=kv_axes, interpret=True
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(sh.default_rules()):
        out = jax.jit(fn)(
            jax.device_put(q, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "sequence"))),
            k,
            v,
            mask,
        )
    np.testing.assert_allclose(out, reference(q, k, v, mask), rtol=1e-4, atol=1e-5)


def test_mesh_spec_keeps_the_longest_dividing_prefix():
    """Batch x groups over (data, fsdp, sequence) on {data: 2, sequence: 4}: 32 rows over both, 12 over data only,
    3 not at all (shard_map needs whole shards)."""
    mesh = mesh_lib.make_mesh({"data": 2, "sequence": 4})
    axes = (sh.GROUPS, None, sh.ACT_HEADS, sh.ACT_KV)
    P = jax.sharding.PartitionSpec
    with nn.logical_axis_rules(sh.default_rules()):
        assert attention._mesh_spec((32, 8, 2, 4), axes, mesh) == P(("data", "sequence"), None, None, None)
        assert attention._mesh_spec((12, 8, 2, 4), axes, mesh) == P("data", None, None, None)
        assert attention._mesh_spec((3, 8, 2, 4), axes, mesh) == P(None, None, None, None)


@pytest.mark.parametrize(
    "layout,window,impl", [("spatial", None, "xla"), ("temporal", None, "splash"), ("window", (2, 2, 2), "splash")]
)
def test_grouped_attention_split_over_sequence(layout, window, impl, monkeypatch):
    """Attention within groups (the factorized / windowed layouts) on a mesh {data: 2, sequence: 4}, with XLA
    attention or through the kernels' shard_map path (XLA attention standing in for splash, so that XLA counts its
    FLOPs): the folded batch x groups axis is split over data and sequence, so each device does 1/8 of the work
    (XLA's FLOPs per device of the value and gradients; the kernel path did 1/2 of the attention when every
    sequence device repeated its data shard's groups), with the output and gradients of one device."""
    monkeypatch.setattr(attention, "splash_attention", lambda q, k, v, **kw: attention.xla_attention(q, k, v))
    grid = (4, 4, 4)  # [T', H', W'] -> 64 tokens a video
    x = jax.random.normal(jax.random.key(16), (2, 64, 16))
    w = jax.random.normal(jax.random.key(17), x.shape)
    layer = layers.Attention(num_heads=2, layout=layout, window=window, implementation=impl)
    params = nn.unbox(randomize(layer.init(jax.random.key(0), x, grid, None), scale=0.3))
    grad_fn = jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(layer.apply(p, x, grid, None) * w), argnums=(0, 1)))
    one_device = grad_fn.lower(params, x).compile()
    expected, expected_grads = one_device(params, x)
    mesh = mesh_lib.make_mesh({"data": 2, "sequence": 4})
    with jax.set_mesh(mesh), nn.logical_axis_rules(sh.default_rules()):
        xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "sequence")))
        sharded = grad_fn.lower(params, xs).compile()
        got, grads = sharded(params, xs)
    np.testing.assert_allclose(got, expected, rtol=1e-4)  # a sum over every output: summed in another order
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)
    ratio = sharded.cost_analysis()["flops"] / one_device.cost_analysis()["flops"]
    assert ratio < 1.15 / 8, ratio


@pytest.mark.slow
@pytest.mark.parametrize(
    "mode,mesh_shape",
    [
        # allgather on {data: 2, sequence: 4}: tests/models_dit_test.py::test_sharded_matches_single_device (the
        # whole DiT) and test_sequence_parallel_attention_matches_unsharded above (with a key mask).
        ("ring", {"fsdp": 2, "tensor": 2, "sequence": 2}),
    ],
)
def test_sequence_parallel_dit_matches_single_device(mode, mesh_shape):
    """The whole DiT (full attention, RoPE, text cross-attention with a text mask) with its tokens split over
    `sequence`: the same output and parameter gradients as on one device."""
    cfg = tiny(attention="full", hidden_size=64, num_heads=4, pos_emb="sincos+rope", sequence_parallel=mode)
    cfg = dit.DiTConfig(**{**cfg.__dict__, "text_dim": 16})
    shape = (4, 4, 16, 16, 3)
    x, t, labels = inputs(shape)
    text = jax.random.normal(jax.random.key(7), (4, 5, 16))
    text_mask = jnp.arange(5)[None] < jnp.array([[5], [2], [0], [4]])  # [4, 5]: one example with no real token
    params = nn.unbox(randomize(dit.init_params(cfg, jax.random.key(0), shape)))
    target = jax.random.normal(jax.random.key(8), shape)

    def loss(p, x, t, y, c, m):
        out = dit.DiT(cfg).apply(p, x, t, y, c, None, m)
        return jnp.mean((out - target) ** 2), out

    grad_fn = jax.value_and_grad(loss, has_aux=True)
    (_, expected), expected_grads = jax.jit(grad_fn)(params, x, t, labels, text, text_mask)
    mesh = mesh_lib.make_mesh(mesh_shape)
    rules = sh.default_rules()
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        batch = lambda a: jax.device_put(a, sh.batch_sharding(mesh, rules, a.ndim))
        fn = jax.jit(grad_fn)
        (_, out), grads = fn(params, *(batch(a) for a in (x, t, labels, text, text_mask)))
        hlo = fn.lower(params, *(batch(a) for a in (x, t, labels, text, text_mask))).compile().as_text()
    assert ("collective-permute" if mode == "ring" else "all-gather") in hlo
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    flat = jax.tree.leaves_with_path(grads)
    for (path, g), e in zip(flat, jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
