"""Spacetime DiT: shapes, adaLN-Zero init, layouts, position information, scan/remat, sharding."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import randomize
from vdit_jax.models import dit, layers
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.parallel import sharding as sh

VIDEO = (2, 4, 16, 16, 3)


def tiny(**overrides) -> dit.DiTConfig:
    """A very small DiT for tests; any field can be overridden."""
    base = dict(hidden_size=48, depth=2, num_heads=4, patch_size=(1, 4, 4), num_classes=5)
    return dit.DiTConfig(**{**base, **overrides})


def inputs(shape=VIDEO, seed=1):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k1, shape)
    t = jax.random.randint(k2, (shape[0],), 0, 1000)
    labels = jnp.arange(shape[0]) % 5
    return x, t, labels


@functools.partial(jax.jit, static_argnums=0)  # one compiled forward per config, not hundreds of eager ops
def apply(cfg, params, x, t, labels):
    return dit.DiT(cfg).apply(params, x, t, labels)


@pytest.mark.parametrize(
    "attention,patch,shape",
    # Each layout once and each tubelet once (the layouts group tokens by their grid, so the uneven tubelet goes to
    # the factorized layout, whose groups are frames).
    [
        ("full", (1, 4, 4), (2, 4, 16, 16, 3)),
        ("windowed", (2, 2, 2), (1, 4, 8, 8, 3)),
        ("factorized", (4, 8, 4), (2, 8, 16, 8, 3)),
    ],
)
def test_shapes_and_zero_output_at_init(attention, patch, shape):
    cfg = tiny(attention=attention, patch_size=patch, pos_emb="sincos+rope", windows=((2, 2, 2),))
    x, t, labels = inputs(shape)
    params = dit.init_params(cfg, jax.random.key(0), shape)
    out = apply(cfg, params, x, t, labels)
    chex.assert_shape(out, shape)
    chex.assert_trees_all_equal(out, jnp.zeros(shape))  # adaLN-Zero: gates and final layer start at 0
    out = apply(cfg, randomize(params), x, t, labels)
    chex.assert_shape(out, shape)
    chex.assert_tree_all_finite(out)
    assert float(jnp.std(out)) > 1e-3


def test_output_depends_on_timestep_label_and_input():
    cfg = tiny()
    x, t, labels = inputs()
    params = randomize(dit.init_params(cfg, jax.random.key(0), VIDEO))
    base = apply(cfg, params, x, t, labels)
    for other in [
        apply(cfg, params, x, t + 100, labels),
        apply(cfg, params, x, t, (labels + 1) % 5),
        apply(cfg, params, x + 0.5, t, labels),
    ]:
        assert float(jnp.abs(other - base).max()) > 1e-4
    # The null class (index num_classes) is a valid label for classifier-free guidance.
    null = apply(cfg, params, x, t, jnp.full_like(labels, cfg.num_classes))
    chex.assert_tree_all_finite(null)


def test_self_condition_input():
    """self_condition: the x0 estimate enters beside x (twice the patch width); None means zeros."""
    cfg = tiny(self_condition=True)
    x, t, labels = inputs()
    params = dit.init_params(cfg, jax.random.key(0), VIDEO)
    kernel = nn.meta.unbox(params)["params"]["patch_embed"]["kernel"]
    assert kernel.shape == (2 * 4 * 4 * 3, cfg.hidden_size)
    params = randomize(params)
    fwd = jax.jit(dit.DiT(cfg).apply)
    none = fwd(params, x, t, labels)
    chex.assert_trees_all_equal(none, fwd(params, x, t, labels, None, jnp.zeros_like(x)))
    assert float(jnp.abs(fwd(params, x, t, labels, None, 0.5 * x) - none).max()) > 1e-4
    with pytest.raises(ValueError, match="x_self_cond must have x's shape"):
        fwd(params, x, t, labels, None, x[:, :2])


def test_patchify_roundtrip():
    x = jax.random.normal(jax.random.key(0), (2, 4, 8, 12, 3))
    tokens = layers.patchify(x, (2, 4, 3))
    chex.assert_shape(tokens, (2, 2 * 2 * 4, 2 * 4 * 3 * 3))
    chex.assert_trees_all_equal(layers.unpatchify(tokens, (2, 4, 3), (2, 2, 4), 3), x)
    # A token holds exactly one tubelet: the first token is the (0:2, 0:4, 0:3) block.
    np.testing.assert_array_equal(tokens[0, 0], np.asarray(x[0, :2, :4, :3]).reshape(-1))


def test_patch_must_divide_video():
    cfg = tiny(patch_size=(3, 4, 4))
    with pytest.raises(ValueError, match=r"patch_size \(3, 4, 4\) must divide"):
        dit.init_params(cfg, jax.random.key(0), VIDEO)


def test_sincos_3d_table():
    table = layers.sincos_3d((3, 4, 5), 32)
    assert table.shape == (60, 32)
    # Every token gets a distinct code, and tokens at the same (h, w) in different frames differ.
    assert len(np.unique(np.round(table, 6), axis=0)) == 60
    t0, t1 = table.reshape(3, 4, 5, 32)[0], table.reshape(3, 4, 5, 32)[1]
    assert np.abs(t0 - t1).max() > 0.1
    with pytest.raises(ValueError, match="multiple of 4"):
        layers.sincos_3d((1, 1, 1), 30)


def test_rope_is_rotation_with_relative_positions():
    grid, dh = (4, 4, 4), 12
    cos, sin = (jnp.asarray(a, jnp.float32) for a in layers.rope_3d(grid, dh))
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, dh))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, dh))
    n = 64
    qs = layers.apply_rope(jnp.broadcast_to(q, (1, n, 1, dh)), cos, sin)
    ks = layers.apply_rope(jnp.broadcast_to(k, (1, n, 1, dh)), cos, sin)
    # Norms are preserved (a rotation).
    np.testing.assert_allclose(jnp.linalg.norm(qs, axis=-1), jnp.linalg.norm(q), rtol=1e-5)
    # <q_m, k_n> depends only on the offset m - n in (t, h, w).
    idx = lambda t, h, w: t * 16 + h * 4 + w
    dot = lambda a, b: float(jnp.sum(qs[0, a] * ks[0, b]))
    np.testing.assert_allclose(dot(idx(1, 2, 0), idx(0, 1, 3)), dot(idx(3, 3, 0), idx(2, 2, 3)), rtol=1e-4)
    assert abs(dot(idx(1, 2, 0), idx(0, 1, 3)) - dot(idx(1, 2, 0), idx(0, 1, 2))) > 1e-4


@pytest.mark.parametrize(
    "layout,window,same",
    [
        # Perturbing token (t=0, h=0, w=0) of a 4x4x4 grid...
        ("spatial", None, lambda t, h, w: t != 0),  # ...leaves other frames unchanged
        ("temporal", None, lambda t, h, w: (h, w) != (0, 0)),  # ...leaves other locations unchanged
        ("window", (2, 2, 2), lambda t, h, w: t >= 2 or h >= 2 or w >= 2),  # ...other windows
        ("full", None, lambda t, h, w: False),  # ...changes every token
    ],
)
def test_attention_layouts_mix_only_within_groups(layout, window, same):
    grid = (4, 4, 4)
    attn = layers.Attention(num_heads=2, layout=layout, window=window)
    x = jax.random.normal(jax.random.key(0), (1, 64, 16))
    params = attn.init(jax.random.key(1), x, grid, None)
    y0 = attn.apply(params, x, grid, None)
    y1 = attn.apply(params, x.at[0, 0].add(1.0), grid, None)
    diff = np.asarray(jnp.abs(y1 - y0).max(-1)[0]).reshape(grid)
    for t, h, w in np.ndindex(*grid):
        if (t, h, w) == (0, 0, 0):
            continue
        if same(t, h, w):
            assert diff[t, h, w] < 1e-6, (t, h, w)
        else:
            assert diff[t, h, w] > 1e-6, (t, h, w)


def test_windowed_stages_go_coarse_to_fine():
    cfg = tiny(attention="windowed", depth=5, windows=((4, 4, 4), (2, 2, 2), (1, 1, 1)))
    assert [(w, n) for _, w, n in cfg.stages()] == [((4, 4, 4), 2), ((2, 2, 2), 2), ((1, 1, 1), 1)]
    # Windows larger than the grid are clipped; ones that do not divide it are rejected.
    assert layers.clip_window((8, 8, 8), (4, 4, 4)) == (4, 4, 4)
    with pytest.raises(ValueError, match="must divide the token grid"):
        layers.clip_window((3, 2, 2), (4, 4, 4))


def _unstack_scanned(scanned, cfg):
    """Turns the params of a scan_layers=True model into those of the equivalent unrolled model."""
    p = dict(nn.unbox(scanned)["params"])
    out = {k: v for k, v in p.items() if not k.startswith("stage")}
    for s, (_, _, count) in enumerate(cfg.stages()):
        for i in range(count):
            out[f"stage{s}_block{i}"] = jax.tree.map(lambda a, i=i: a[i], p[f"stage{s}"])
    return {"params": out}


@pytest.mark.slow
@pytest.mark.parametrize(
    "attention",
    ["windowed"],  # the most stages; full attention: models_text_test's scan test (the same nn.scan)
)
def test_scan_and_remat_match_unrolled(attention):
    kw = dict(attention=attention, depth=3, windows=((2, 4, 4), (1, 2, 2)), pos_emb="sincos+rope")
    plain, scanned = tiny(**kw), tiny(scan_layers=True, remat="dots", **kw)
    x, t, labels = inputs()
    p_scan = randomize(dit.init_params(scanned, jax.random.key(0), VIDEO))
    p_plain = _unstack_scanned(p_scan, plain)
    out_scan = apply(scanned, p_scan, x, t, labels)
    out_plain = apply(plain, p_plain, x, t, labels)
    np.testing.assert_allclose(out_scan, out_plain, atol=1e-5)


def test_jitted_apply_traces_once():
    cfg = tiny()
    x, t, labels = inputs()
    params = dit.init_params(cfg, jax.random.key(0), VIDEO)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def fwd(params, x, t, labels):
        return dit.DiT(cfg).apply(params, x, t, labels)

    fwd(params, x, t, labels)
    fwd(randomize(params), x + 1, t + 1, labels)  # new values, same shapes: no retrace


def test_drop_labels_rate():
    labels = jnp.zeros((20000,), jnp.int32)
    dropped = dit.drop_labels(jax.random.key(0), labels, 0.1, num_classes=84)
    frac = float(jnp.mean(dropped == 84))
    assert 0.09 < frac < 0.11
    assert set(np.unique(dropped).tolist()) == {0, 84}


def test_factored_labels_sum_one_embedding_per_digit():
    """label = (a * 3 + b) * 4 + c with factors (7, 3, 4): the embedding is A[a] + B[b] + C[c]; the null class
    (84) takes each table's last row."""
    embed = layers.LabelEmbedder(84, 16, factors=(7, 3, 4))
    labels = jnp.array([0, 8, 83, 47, 84])
    params = randomize(nn.unbox(embed.init(jax.random.key(0), labels)), scale=1.0)
    out = embed.apply(params, labels)
    tables = [params["params"][f"factor{i}"]["embedding"] for i in range(3)]
    digits = [(0, 0, 0), (0, 2, 0), (6, 2, 3), (3, 2, 3), (7, 3, 4)]
    want = jnp.stack([sum(t[d] for t, d in zip(tables, ds, strict=True)) for ds in digits])
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    assert [t.shape[0] for t in tables] == [8, 4, 5]
    # The DiT takes it through its config: same output shape, a different function of the label than one table.
    cfg = tiny(num_classes=84, label_factors=(7, 3, 4))
    x, t, _ = inputs()
    variables = randomize(nn.unbox(dit.init_params(cfg, jax.random.key(0), x.shape)))
    a, b = (apply(cfg, variables, x, t, jnp.array(lab)) for lab in ([0, 8], [1, 9]))
    assert a.shape == x.shape and float(jnp.abs(a - b).max()) > 1e-4


@pytest.mark.parametrize("depth,skipped", [(4, {"skip2": 1, "skip3": 0}), (5, {"skip3": 1, "skip4": 0})])
def test_long_skips_route_mirror_block_inputs(depth, skipped):
    """Block D-1-i of the second half gets block i's input; skip{j} maps [h, mirror input] back to the width."""
    cfg = tiny(depth=depth, long_skips=True)
    x, t, labels = inputs()
    params = randomize(dit.init_params(cfg, jax.random.key(0), VIDEO))["params"]
    assert {k for k in params if k.startswith("skip")} == set(skipped)
    d = cfg.hidden_size
    eye, zero = jnp.eye(d), jnp.zeros((d, d))

    def with_skips(kernels):
        return {**params, **{k: {"kernel": v, "bias": jnp.zeros(d)} for k, v in kernels.items()}}

    # Skips that pass h and drop the mirror input: exactly the DiT without long skips, same blocks.
    keep = with_skips({k: jnp.concatenate([eye, zero]) for k in skipped})
    plain = {k: v for k, v in params.items() if not k.startswith("skip")}
    np.testing.assert_allclose(
        apply(cfg, {"params": keep}, x, t, labels),
        apply(tiny(depth=depth), {"params": plain}, x, t, labels),
        rtol=1e-5,
        atol=1e-6,
    )
    # The last block's skip takes only the mirror input, the patch embedding (block 0's input): the blocks before
    # the last no longer matter, the last one does.
    last = f"stage0_block{depth - 1}"
    mirror = with_skips(
        {k: jnp.concatenate([zero, eye]) if k == f"skip{depth - 1}" else params[k]["kernel"] for k in skipped}
    )
    base = apply(cfg, {"params": mirror}, x, t, labels)
    for name, moves in [(f"stage0_block{i}", False) for i in range(depth - 1)] + [(last, True)]:
        moved = {**mirror, name: randomize(mirror[name], seed=7)}
        diff = float(jnp.abs(apply(cfg, {"params": moved}, x, t, labels) - base).max())
        assert (diff > 1e-4) if moves else (diff == 0.0), (name, diff)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(hidden_size=50, num_heads=4), "divisible by num_heads"),
        (dict(attention="sparse"), "attention 'sparse' is not one of"),
        (dict(pos_emb="alibi"), "pos_emb 'alibi' is not one of"),
        (dict(remat="everything"), "remat 'everything' is not one of"),
        (dict(dtype="float8"), "dtype 'float8' is not one of"),
        (dict(patch_size=(1, 0, 4)), "patch_size must be three positive ints"),
        (dict(attention="windowed", windows=()), "windows must be a non-empty list"),
        (dict(attention="windowed", depth=1, windows=((1, 1, 1), (2, 2, 2))), "smaller than"),
        (dict(num_classes=84, label_factors=(7, 3, 5)), r"label_factors \(7, 3, 5\) must be positive with product"),
        (dict(long_skips=True, scan_layers=True), "long_skips needs scan_layers=False"),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)


def test_named_sizes():
    assert dit.dit_config("XL").hidden_size == 1152 and dit.dit_config("XL").depth == 28
    assert dit.dit_config("S", num_classes=3).num_heads == 6
    with pytest.raises(ValueError, match="unknown DiT size 'XXL'"):
        dit.dit_config("XXL")


def _sharded_forward(cfg, params_host, x, t, labels, mesh):
    rules = sh.default_rules()
    abstract = jax.eval_shape(lambda: dit.init_params(cfg, jax.random.key(0), x.shape))
    shardings = sh.logical_shardings(abstract, mesh, rules)
    params = jax.device_put(nn.unbox(params_host), nn.unbox(shardings))
    data_sharding = lambda a: sh.batch_sharding(mesh, rules, a.ndim)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        fwd = jax.jit(
            lambda p, x, t, y: dit.DiT(cfg).apply(p, x, t, y),
            in_shardings=(nn.unbox(shardings), *(data_sharding(a) for a in (x, t, labels))),
        )
        return fwd(params, x, t, labels), params


@pytest.mark.parametrize(
    "attention,mesh_shape",
    [
        ("full", {"data": 2, "fsdp": 2, "tensor": 2}),
        ("full", {"data": 1, "fsdp": 4, "tensor": 2}),
        ("full", {"data": 2, "sequence": 4}),
        ("factorized", {"data": 2, "fsdp": 2, "tensor": 2}),  # the parameters split as full attention's
        ("factorized", {"data": 2, "sequence": 4}),  # tokens regrouped per frame / per position over the sequence
    ],
)
def test_sharded_matches_single_device(attention, mesh_shape):
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    cfg = tiny(attention=attention, hidden_size=64, num_heads=4, pos_emb="sincos+rope")
    shape = (4, 4, 16, 16, 3)
    x, t, labels = inputs(shape)
    params = randomize(dit.init_params(cfg, jax.random.key(0), shape))
    expected = jax.jit(lambda p: apply(cfg, p, x, t, labels))(params)
    mesh = mesh_lib.make_mesh(mesh_shape)
    out, sharded = _sharded_forward(cfg, params, x, t, labels, mesh)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # The parameters really are split: a query kernel [embed, heads] lies over fsdp x tensor.
    kernel = sharded["params"]["stage0_block0"][f"attn_{'full' if attention == 'full' else 'spatial'}"]
    query = kernel["query"]["kernel"]
    assert query.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    split = mesh_shape.get("fsdp", 1) * mesh_shape.get("tensor", 1)
    shard_size = query.addressable_shards[0].data.size
    assert shard_size == query.size // split
