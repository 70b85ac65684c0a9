"""LoRA adapters (`vdit_jax.models.lora`): targets by preset or regex on the DiT's real parameter paths (scanned
stacks included), identity at init, the merged kernel equals the activation-space form, several adapters with
scales, a fine-tune that moves only the adapters (no optimizer state for the base), and one clear error for every
mismatch."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vdit_jax.models import dit, lora

VIDEO = (2, 4, 8, 8, 3)


def _paths(**overrides):
    cfg = dit.DiTConfig(**{**dict(hidden_size=32, depth=2, num_heads=2, patch_size=(1, 4, 4)), **overrides})
    shapes = jax.eval_shape(lambda: dit.init_params(cfg, jax.random.key(0), VIDEO))
    return nn.unbox(shapes)["params"]


def test_presets_and_regexes_pick_the_dit_kernels():
    cross = _paths(num_classes=0, text_dim=16, scan_layers=True)
    attn = lora.target_paths(lora.LoraConfig(4, 8.0, ("self_attn",)), cross)
    assert attn == sorted(f"stage0/attn_full/{n}/kernel" for n in ("query", "key", "value", "out"))
    assert len(lora.target_paths(lora.LoraConfig(4, 8.0, ("attn",)), cross)) == 8  # self- and cross-attention
    assert lora.target_paths(lora.LoraConfig(4, 8.0, ("mlp",)), cross) == [
        "stage0/mlp/fc1/kernel",
        "stage0/mlp/fc2/kernel",
    ]
    joint = _paths(num_classes=0, text_dim=16, text_mode="joint", single_stream_blocks=1)
    paths = lora.target_paths(lora.LoraConfig(4, 8.0, ("joint_attn",)), joint)
    assert len(paths) == 12 and all("/video/" in p or "/text/" in p or "/stream/" in p for p in paths)
    assert lora.target_paths(lora.LoraConfig(4, 8.0, (r"final_proj/kernel",)), joint) == ["final_proj/kernel"]
    classes = _paths(num_classes=12, label_factors=(3, 4))
    assert lora.target_paths(lora.LoraConfig(4, 8.0, ("label_emb",)), classes) == [
        "y_embed/factor0/embedding",
        "y_embed/factor1/embedding",
    ]
    adaln = lora.target_paths(lora.LoraConfig(4, 8.0, ("adaln",)), classes)
    assert adaln == ["final_adaLN/kernel", "stage0_block0/adaLN/kernel", "stage0_block1/adaLN/kernel"]
    with pytest.raises(ValueError, match=r"targets \('cross_attn',\) match no kernel of the model; its kernels"):
        lora.target_paths(lora.LoraConfig(4, 8.0, ("cross_attn",)), joint)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rank=0, alpha=1.0), "rank must be an int >= 1, got 0"),
        (dict(rank=4, alpha=0.0), "alpha must be > 0, got 0.0"),
        (dict(rank=4, alpha=1.0, targets=()), "targets must be a non-empty tuple"),
        (dict(rank=4, alpha=1.0, targets="attn"), "targets must be a non-empty tuple"),
        (dict(rank=4, alpha=1.0, targets=("attn(",)), r"target 'attn\(' is not a preset"),
    ],
)
def test_bad_config_is_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lora.LoraConfig(**kwargs)


def _params(rng=0):
    """A hand-made tree with a scanned [2, 8, 6] kernel and a plain [8, 8] one (real DiT path names)."""
    r = np.random.default_rng(rng)
    return {
        "stage0": {"attn_full": {"query": {"kernel": r.normal(size=(2, 8, 6)).astype(np.float32)}}},
        "stage1": {"mlp": {"fc1": {"kernel": r.normal(size=(8, 8)).astype(np.float32), "bias": np.zeros(8)}}},
    }


def _randomized(adapter, seed):
    r = np.random.default_rng(seed)
    return jax.tree.map(lambda v: jnp.asarray(r.normal(size=v.shape), v.dtype), adapter)


def test_identity_at_init_activation_space_equality_and_several_adapters():
    params = _params()
    cfg = lora.LoraConfig(rank=3, alpha=6.0, targets=("self_attn", "mlp"))
    fresh = lora.init(cfg, params, jax.random.key(0))
    assert fresh["stage0"]["attn_full"]["query"]["kernel"]["a"].shape == (2, 8, 3)  # the base's layout, kernels cut
    assert fresh["stage0"]["attn_full"]["query"]["kernel"]["b"].shape == (2, 3, 6)
    assert sorted(lora.pairs(fresh)) == ["stage0/attn_full/query/kernel", "stage1/mlp/fc1/kernel"]
    assert float(jnp.abs(lora.pairs(fresh)["stage1/mlp/fc1/kernel"]["a"]).max()) <= 1 / np.sqrt(8)  # PEFT's bound
    jax.tree.map(np.testing.assert_array_equal, lora.merge(params, [(cfg, fresh, 1.0)]), params)  # B = 0: exact

    adapter = _randomized(fresh, 1)
    merged = lora.merge(params, [(cfg, adapter, 1.0)])
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))  # [layers, tokens, in] for the scanned kernel
    pair, w = lora.pairs(adapter)["stage0/attn_full/query/kernel"], params["stage0"]["attn_full"]["query"]["kernel"]
    activation_space = x @ w + cfg.scale * ((x @ pair["a"]) @ pair["b"])
    np.testing.assert_allclose(x @ merged["stage0"]["attn_full"]["query"]["kernel"], activation_space, rtol=1e-5)
    np.testing.assert_array_equal(merged["stage1"]["mlp"]["fc1"]["bias"], params["stage1"]["mlp"]["fc1"]["bias"])

    other_cfg = lora.LoraConfig(rank=2, alpha=1.0, targets=("mlp",))
    other = _randomized(lora.init(other_cfg, params, jax.random.key(2)), 3)
    both = lora.merge(params, [(cfg, adapter, 0.5), (other_cfg, other, 2.0)])
    key = "stage1/mlp/fc1/kernel"
    want = (
        params["stage1"]["mlp"]["fc1"]["kernel"]
        + 0.5 * lora.delta(cfg, lora.pairs(adapter)[key])
        + 2.0 * lora.delta(other_cfg, lora.pairs(other)[key])
    )
    np.testing.assert_allclose(both["stage1"]["mlp"]["fc1"]["kernel"], want, rtol=1e-5, atol=1e-6)


def test_mismatched_adapters_are_refused_naming_the_mismatch():
    params = _params()
    cfg = lora.LoraConfig(rank=3, alpha=6.0, targets=("self_attn", "mlp"))
    meta = lora.describe(cfg, params)
    assert meta["kernels"] == {"stage0/attn_full/query/kernel": [2, 8, 6], "stage1/mlp/fc1/kernel": [8, 8]}
    lora.check_compatible(meta, cfg, params)  # its own base
    with pytest.raises(ValueError, match="made with rank 3, not 4"):
        lora.check_compatible(meta, lora.LoraConfig(rank=4, alpha=6.0, targets=cfg.targets), params)
    with pytest.raises(ValueError, match=r"targets \['self_attn', 'mlp'\], not \['mlp'\]"):
        lora.check_compatible(meta, lora.LoraConfig(rank=3, alpha=6.0, targets=("mlp",)), params)
    wider = jax.tree.map(lambda v: v, params)
    wider["stage1"]["mlp"]["fc1"]["kernel"] = np.zeros((8, 16), np.float32)
    with pytest.raises(ValueError, match=r"whose 'stage1/mlp/fc1/kernel' is \(8, 8\); this base's is \(8, 16\)"):
        lora.check_compatible(meta, cfg, wider)
    adapter = lora.init(cfg, params, jax.random.key(0))
    with pytest.raises(ValueError, match=r"'stage1/mlp/fc1/kernel' has A \(8, 3\) .* kernel \(8, 16\) at rank 3"):
        lora.merge(wider, [(cfg, adapter, 1.0)])
    with pytest.raises(ValueError, match="targets 'stage0/attn_full/query/kernel', which this model does not have"):
        lora.merge({"stage1": params["stage1"]}, [(cfg, adapter, 1.0)])


def test_fine_tuning_moves_only_the_adapters_of_a_scanned_dit():
    """Adam through `merge` inside the jitted step: the loss falls, the base is bit for bit unchanged and the
    optimizer keeps state for the adapters alone."""
    cfg_dit = dit.DiTConfig(hidden_size=32, depth=2, num_heads=2, patch_size=(1, 4, 4), num_classes=4, scan_layers=True)
    base = nn.unbox(jax.jit(dit.init_params, static_argnums=(0, 2))(cfg_dit, jax.random.key(0), VIDEO))["params"]
    base = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(jax.random.key(1), v.shape), base)  # not zero-init
    cfg = lora.LoraConfig(rank=2, alpha=4.0, targets=("self_attn",))
    tree = {"base": base, "lora": lora.init(cfg, base, jax.random.key(2))}
    tx = lora.optimizer(optax.adam(1e-2))
    opt_state = tx.init(tree)
    n_adapter = len(jax.tree.leaves(tree["lora"]))
    assert len([x for x in jax.tree.leaves(opt_state) if jnp.ndim(x) > 0]) == 2 * n_adapter  # Adam's mu, nu only
    x = jax.random.normal(jax.random.key(3), VIDEO)
    t, labels = jnp.array([10, 500]), jnp.array([1, 2])
    target = jax.random.normal(jax.random.key(4), VIDEO)

    def loss(tree):
        params = lora.merge(tree["base"], [(cfg, tree["lora"], 1.0)])
        return jnp.mean((dit.DiT(cfg_dit).apply({"params": params}, x, t, labels) - target) ** 2)

    @jax.jit
    def step(tree, opt_state):
        value, grads = jax.value_and_grad(loss)(tree)
        updates, opt_state = tx.update(grads, opt_state, tree)
        return optax.apply_updates(tree, updates), opt_state, value

    losses = []
    new = tree
    for _ in range(6):
        new, opt_state, value = step(new, opt_state)
        losses.append(float(value))
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses  # every step lowers the loss
    jax.tree.map(np.testing.assert_array_equal, new["base"], tree["base"])
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), new["lora"], tree["lora"])
    moved_b = [v for path, v in flax.traverse_util.flatten_dict(moved, sep="/").items() if path.endswith("/b")]
    assert len(moved_b) == 4 and all(v > 0 for v in moved_b), moved  # q, k, v, out of the scanned self-attention
