"""Text in the DiT, both ways (cross-attention and MM-DiT joint attention): text masks and padding invariance
through the kernels, the null text, guidance, the text train step on 1 and 8 devices with sequence parallelism;
remat policies (offload) and bf16 parameters."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from tests.models_dit_test import _unstack_scanned, randomize
from vdit_jax import config as config_lib
from vdit_jax import inference
from vdit_jax.data import moving_shapes as ms
from vdit_jax.models import attention, dit
from vdit_jax.models import text as text_lib
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.parallel import sharding as sh
from vdit_jax.train import state as state_lib
from vdit_jax.train import step as step_lib

VIDEO = (2, 4, 8, 8, 3)
TEXT_DIM, TEXT_LEN = 24, 5


def tiny(**overrides) -> dit.DiTConfig:
    base = dict(hidden_size=32, depth=2, num_heads=2, patch_size=(1, 4, 4), text_dim=TEXT_DIM)
    return dit.DiTConfig(**{**base, **overrides})


def inputs(shape=VIDEO, seed=1):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(k1, shape)
    t = jax.random.randint(k2, (shape[0],), 0, 1000)
    text = jax.random.normal(k3, (shape[0], TEXT_LEN, TEXT_DIM))
    return x, t, text


init = jax.jit(dit.init_params, static_argnums=(0, 2))  # (config, rng, video_shape) -> boxed params


@functools.partial(jax.jit, static_argnums=0)
def apply(cfg, params, x, t, text, text_mask=None):
    return dit.DiT(cfg).apply(params, x, t, None, text, None, text_mask)


def test_shapes_zero_output_and_text_dependence():
    cfg = tiny(pos_emb="sincos+rope")
    x, t, text = inputs()
    params = init(cfg, jax.random.key(0), VIDEO)
    p = nn.unbox(params)["params"]
    chex.assert_shape(p["text_embed"]["proj_in"]["kernel"], (TEXT_DIM, 32))
    cross = p["stage0_block0"]["cross_attn"]
    chex.assert_trees_all_equal(cross["out"]["kernel"], jnp.zeros((32, 32)))  # zero-initialised output
    assert set(cross) == {"query", "key", "value", "query_norm", "key_norm", "out"}
    out = apply(cfg, params, x, t, text)
    chex.assert_shape(out, VIDEO)
    chex.assert_trees_all_equal(out, jnp.zeros(VIDEO))
    # Random weights: the output depends on the text, the null text (zeros) is valid, any text length works.
    params = randomize(params)
    a = apply(cfg, params, x, t, text)
    b = apply(cfg, params, x, t, text.at[1].set(-text[1]))
    null = apply(cfg, params, x, t, jnp.zeros_like(text))
    longer = apply(cfg, params, x, t, jnp.concatenate([text, text], axis=1))
    chex.assert_tree_all_finite((a, null, longer))
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)  # example 0's text did not change
    assert float(jnp.abs(a[1] - b[1]).max()) > 1e-3
    assert float(jnp.abs(a - null).max()) > 1e-3
    # Every cross-attention parameter carries logical axis names.
    boxed = jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
    assert all(isinstance(v, nn.LogicallyPartitioned) for v in boxed)


def test_text_is_required_and_checked():
    cfg = tiny()
    x, t, text = inputs()
    params = init(cfg, jax.random.key(0), VIDEO)
    with pytest.raises(ValueError, match=r"pass text \[B, L, 24\]"):
        apply(cfg, params, x, t, None)
    with pytest.raises(ValueError, match="text-conditional"):
        apply(cfg, params, x, t, text[..., :3])
    with pytest.raises(ValueError, match="text_dim must be >= 0"):
        tiny(text_dim=-1)


@pytest.mark.slow
def test_scan_and_offload_remat_match_unrolled():
    """Scanned + offload-remat blocks compute what unrolled blocks do (the text mask broadcast to every scanned
    block), and the offload policy reaches the backward pass. (Rematerialisation itself is JAX's: it recomputes the
    same values, so the gradients are not compared again here.)"""
    kw = dict(depth=3, pos_emb="rope")
    plain, scanned = tiny(**kw), tiny(scan_layers=True, remat="offload", **kw)
    x, t, text = inputs()
    mask = jnp.arange(TEXT_LEN)[None] < jnp.array([[2], [5]])
    p_scan = randomize(init(scanned, jax.random.key(0), VIDEO))
    p_plain = _unstack_scanned(p_scan, plain)
    out = apply(scanned, p_scan, x, t, text, mask)
    np.testing.assert_allclose(out, apply(plain, p_plain, x, t, text, mask), atol=1e-5)
    assert float(jnp.abs(out - apply(scanned, p_scan, x, t, text)).max()) > 1e-4  # the mask reached the blocks
    loss = lambda c: lambda p: jnp.mean(apply(c, p, x, t, text, mask) ** 2)
    # The policy reached the backward pass: the saved matmul outputs are moved to host memory (`f32<host>[...]` in
    # the jaxpr; a CPU keeps them in place when it runs), under `offload` only.
    host_residuals = lambda c: str(jax.make_jaxpr(jax.grad(loss(c)))(p_plain)).count("<host>[")
    assert host_residuals(tiny(remat="offload", **kw)) > 0
    assert host_residuals(tiny(remat="dots", **kw)) == 0 and host_residuals(plain) == 0


def test_drop_text():
    text = jnp.ones((4000, 3, 2))
    mask = jnp.ones((4000, 3), bool).at[:, 2].set(False)
    dropped, dropped_mask = dit.drop_text(jax.random.key(0), text, 0.25, mask)
    per_example = jnp.all(dropped == 0, axis=(1, 2))
    assert jnp.all(per_example | jnp.all(dropped == 1, axis=(1, 2)))  # whole examples, never parts
    assert 0.22 < float(jnp.mean(per_example)) < 0.28
    # The null text is one real zero token and padding; kept examples keep their mask.
    null, null_mask = dit.null_text(2, 3, 2)
    chex.assert_trees_all_equal((null, null_mask), (jnp.zeros((2, 3, 2)), jnp.array([[True, False, False]] * 2)))
    np.testing.assert_array_equal(dropped_mask, jnp.where(per_example[:, None], null_mask[:1], mask))
    chex.assert_trees_all_equal(dit.drop_text(jax.random.key(0), text, 0.0, mask), (text, mask))
    _, all_real = dit.drop_text(jax.random.key(0), text, 0.0)  # no mask in: every token real
    assert bool(all_real.all())


# joint: a dual + a single block. Both with the pooled text in the adaLN conditioning (its padding is masked too).
MODES = {
    "cross": {"text_pooled": True},
    "joint": {"text_mode": "joint", "single_stream_blocks": 1, "text_pooled": True},
}


@pytest.fixture(scope="session", params=list(MODES))
def masked_model(request):
    """A random-weight text DiT (RoPE, 2 blocks) of each text mode and inputs: text whose examples have 3 and 5
    real tokens."""
    cfg = tiny(pos_emb="sincos+rope", **MODES[request.param])
    params = randomize(init(cfg, jax.random.key(0), VIDEO))
    x, t, text = inputs()
    mask = jnp.arange(TEXT_LEN)[None] < jnp.array([[3], [5]])  # [B, L]: prefixes of 3 and 5 tokens
    return cfg, params, x, t, text, mask


@pytest.mark.parametrize("impl", ["xla", "splash"])
def test_text_mask_ignores_padding(masked_model, impl, monkeypatch):
    """Padding the same text to a longer L (mask False on the padding, whatever the padded values) leaves the
    output unchanged; masked text equals the explicitly truncated text; a wholly masked example and the null text
    give finite outputs and gradients. Splash runs in the Pallas interpreter on the CPU."""
    if impl == "splash":
        kernel = attention.splash_attention
        monkeypatch.setattr(attention, "splash_attention", lambda *a, interpret, **kw: kernel(*a, interpret=True, **kw))
    cfg, params, x, t, text, mask = masked_model
    cfg = dit.DiTConfig(**{**cfg.__dict__, "attention_impl": impl})
    out = apply(cfg, params, x, t, text, mask)
    garbage = jax.random.normal(jax.random.key(9), (2, 7, TEXT_DIM))
    longer = apply(cfg, params, x, t, jnp.concatenate([text, garbage], 1), jnp.pad(mask, ((0, 0), (0, 7))))
    np.testing.assert_allclose(longer, out, atol=1e-5)
    # Example 0 with its text cut to its 3 real tokens and no mask.
    truncated = apply(cfg, params, x[:1], t[:1], text[:1, :3])
    np.testing.assert_allclose(truncated[0], out[0], atol=1e-5)
    # The mask matters: the same text with every token real gives another output.
    assert float(jnp.abs(apply(cfg, params, x, t, text, jnp.ones_like(mask)) - out).max()) > 1e-4  # f32 noise: 1e-6
    # No real token at all (example 0) and the null text: finite values, and (XLA; splash's backward runs in the
    # interpreter for seconds a call, and its masked rows are those of the forward) finite gradients.
    empty = mask.at[0].set(False)
    null, null_mask = dit.null_text(2, TEXT_LEN, TEXT_DIM)
    loss = lambda p, tx, m: jnp.mean(apply(cfg, p, x, t, tx, m) ** 2)
    for tx, m in ((text, empty), (null, null_mask)):
        if impl == "splash":
            chex.assert_tree_all_finite(apply(cfg, params, x, t, tx, m))
        else:
            chex.assert_tree_all_finite(jax.value_and_grad(loss)(params, tx, m))


def test_null_text_does_not_depend_on_length(masked_model):
    cfg, params, x, t, _, _ = masked_model
    short, long = (dit.null_text(2, n, TEXT_DIM) for n in (1, 9))
    np.testing.assert_allclose(apply(cfg, params, x, t, *short), apply(cfg, params, x, t, *long), atol=1e-5)


def test_text_mask_is_checked(masked_model):
    cfg, params, x, t, text, mask = masked_model
    with pytest.raises(ValueError, match=r"text_mask must be bool \[B, L\] = \(2, 5\), got int32"):
        apply(cfg, params, x, t, text, mask.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"text_mask must be bool .* got bool \(2, 4\)"):
        apply(cfg, params, x, t, text, mask[:, :4])


def text_config(**model_overrides):
    """The tiny trainer config with text [5, 24] instead of classes."""
    c = helpers.tiny_config(**model_overrides)
    c.data.num_classes = c.model.num_classes = 0
    c.model.text_dim = TEXT_DIM
    c.model.depth = 1
    c.data.text_len = TEXT_LEN
    c.train.warmup_steps = 0  # every step updates (the text reaches the loss by the third step)
    return c


def run_steps(config, devices, *batch_lists):
    """Trains from the same fresh state through each list of batches with one compiled step."""
    mesh = mesh_lib.make_mesh(config.mesh_shape.to_dict(), devices)
    rules = sh.rules_from_config(config.logical_axis_rules)
    step = step_lib.make_train_step(config, mesh, rules)
    runs = []
    for batches in batch_lists:
        state = state_lib.create_train_state(config, mesh, rules, jax.random.key(config.seed))
        metrics = []
        with step_lib.logical_context(mesh, rules):
            for batch in batches:
                state, m = step(state, batch)
                metrics.append(jax.device_get(m))
        runs.append((state, metrics))
    return runs[0] if len(runs) == 1 else runs


def test_guidance_one_is_the_conditional_pass_and_the_null_is_shared(masked_model):
    """Classifier-free guidance at scale 1 is exactly the conditional prediction (no null pass needed), in both
    modes; at another scale the null condition, `dit.null_text` (the one caption dropout uses), moves it."""
    from jax.tree_util import Partial

    from vdit_jax import diffusion
    from vdit_jax.tasks import dit as dit_task

    cfg, params, x, t, text, mask = masked_model
    fn = Partial(dit_task._apply_fn(cfg), params["params"])
    cond = {"text": text, "text_mask": mask}
    null = dict(zip(("text", "text_mask"), dit.null_text(1, TEXT_LEN, TEXT_DIM)))
    want = apply(cfg, params, x, t, text, mask)
    run = jax.jit(lambda model_fn: model_fn(x, t))  # model_fn: a Partial, a pytree
    np.testing.assert_allclose(run(diffusion.cfg_model_fn(fn, cond, null, 1.0)), want, atol=1e-5)
    guided = run(diffusion.cfg_model_fn(fn, cond, null, 3.0))
    unconditional = apply(cfg, params, x, t, *dit.null_text(2, TEXT_LEN, TEXT_DIM))
    np.testing.assert_allclose(guided, unconditional + 3.0 * (want - unconditional), atol=1e-4)
    dropped = dit.drop_text(jax.random.key(0), text, 1.0, mask)
    np.testing.assert_allclose(apply(cfg, params, x, t, *dropped), unconditional, atol=1e-5)
    # The text cache (what the sampler computes once per loop: the pooled vector, cross-attention's keys and
    # values) gives the uncached forward pass.
    cache = jax.jit(lambda p: dit.DiT(cfg).apply(p, None, None, text=text, text_mask=mask))(params)
    assert "pooled" in cache and ("kv" in cache) == (cfg.text_mode == "cross")
    cached = jax.jit(lambda p, c: dit.DiT(cfg).apply(p, x, t, text_cache=c))(params, cache)
    np.testing.assert_allclose(cached, want, atol=1e-5)


# Each mode on a mesh with sequence parallelism: the video tokens split over `sequence` (joint attention gathers
# them for its keys; cross-attention keeps its queries split and the text whole).
@pytest.mark.slow
def test_text_train_step_sharded_equals_single_device():
    """MM-DiT's train step (a dual- and a single-stream block) reading prompts through the built-in text encoder on
    {fsdp, sequence, tensor} = 2 x 2 x 2 fake devices: the losses and gradient norms of one device; padding changes
    no loss; the step reads the text. Cross-attention with precomputed embeddings and a text mask on the same mesh,
    output and every gradient, is tests/models_attention_test.py::test_sequence_parallel_dit_matches_single_device
    (one compile less here)."""
    config = text_config(**MODES["joint"], text_vocab=ms.VOCABULARY, text_encoder_depth=1)
    config.model.depth = 1 + config.model.single_stream_blocks
    config_lib.validate(config, 8)
    tokenizer = text_lib.Tokenizer(ms.VOCABULARY)
    batches = []
    for i, batch in enumerate(helpers.random_batches(config, 3)):
        rng = np.random.default_rng(i)
        prompts = [ms.caption_for(int(label)) for label in rng.integers(0, ms.NUM_CLASSES, len(batch["video"]))]
        prompts = [" ".join(p.split()[: int(rng.integers(0, 5))]) for p in prompts]  # 0..4 words: <bos> + up to 4
        tokens, mask = tokenizer.encode(prompts, TEXT_LEN)
        batches.append(dict(batch, tokens=tokens, text_mask=mask))
    other = [dict(b, tokens=np.where(b["text_mask"], 3, text_lib.PAD)) for b in batches]  # one word throughout
    # Only the padding differs: masked tokens (any id) must not change any loss.
    repadded = [dict(b, tokens=np.where(b["text_mask"], b["tokens"], 5)) for b in batches]
    (single_state, single), (other_state, moved_by), (_, padded) = run_steps(
        config, jax.devices()[:1], batches, other, repadded
    )
    config.mesh_shape.update({"fsdp": 2, "sequence": 2, "tensor": 2})
    state, sharded = run_steps(config, jax.devices(), batches)
    for a, b in zip(single, sharded, strict=True):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
        np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-4)
    assert single[0]["grad_norm"] > 0
    for a, b in zip(single, padded, strict=True):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
    # The text projection's kernel [text width, embed] is split over fsdp along the model width.
    kernel = state.params["text_embed"]["proj_in"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    # The step reads the text. The zero-initialised output layers make the first step blind to it (no gradient
    # reaches the attention before the final layer has moved); from the second on, the updates of the gates depend
    # on it, so three steps on other prompts end at other parameters (by ~lr; f32 noise is ~1e-7).
    np.testing.assert_allclose(moved_by[0]["loss"], single[0]["loss"], rtol=1e-6)
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), single_state.params, other_state.params)
    assert max(jax.tree.leaves(moved)) > 1e-5, moved


def test_text_config_validation():
    config = text_config()
    config.data.text_len = 0
    with pytest.raises(config_lib.ConfigError, match="text_len=0 and config.model.text_dim=24"):
        config_lib.validate(config, 1)
    with pytest.raises(ValueError, match="text_mode 'joint' .* and full attention \\(got 'factorized'\\)"):
        tiny(text_mode="joint", attention="factorized")
    with pytest.raises(ValueError, match="text_mode 'joint' \\(MM-DiT\\) needs text \\(text_dim > 0, got 0\\)"):
        tiny(text_mode="joint", text_dim=0)
    with pytest.raises(ValueError, match="single_stream_blocks must be in \\[0, depth=2\\] with text_mode 'joint'"):
        tiny(single_stream_blocks=1)
    with pytest.raises(ValueError, match="text_mode 'mmdit' is not one of \\('cross', 'joint'\\)"):
        tiny(text_mode="mmdit")
    with pytest.raises(ValueError, match="text_pooled needs text \\(text_dim > 0, got 0\\)"):
        tiny(text_pooled=True, text_dim=0)


@pytest.mark.slow
def test_bf16_params_train_a_step():
    config = helpers.tiny_config(param_dtype="bfloat16", dtype="bfloat16")
    config.model.depth = 1
    batches = helpers.random_batches(config, 2)
    state, metrics = run_steps(config, jax.devices()[:1], batches)
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.bfloat16)}
    assert all(np.isfinite(m["loss"]) and float(m["finite"]) == 1.0 for m in metrics)
    assert int(state.step) == 2 and float(metrics[1]["grad_norm"]) > 0


def test_sample_text_model_returns_latents_and_ignores_padding():
    """`inference.sample` of a latent text model: float32 latents [N, T, H, W, 4]; texts padded to a longer L (mask
    False on the padding) give the same samples, guidance included (the null text does not depend on L); no text
    is a clear error."""
    config = text_config(in_channels=4)
    config.data.video_shape = (4, 8, 8, 4)
    config.sample.update(steps=2, guidance=3.0, clip_x0=0.0)
    shape = (1, *config_lib.input_shape(config))
    params = nn.unbox(randomize(init(config_lib.model_config(config), jax.random.key(0), shape), scale=0.2))["params"]
    text = np.asarray(jax.random.normal(jax.random.key(1), (3, TEXT_LEN, TEXT_DIM)))
    mask = np.arange(TEXT_LEN)[None] < np.array([[5], [2], [3]])
    out = inference.sample(config, params, None, jax.random.key(2), text=text, text_mask=mask)
    assert out.dtype == np.float32 and out.shape == (3, 4, 8, 8, 4)
    assert np.isfinite(out).all() and float(np.abs(out).max()) > 1.0  # raw latents: not clipped to [-1, 1]
    padded = np.concatenate([text, np.ones((3, 4, TEXT_DIM), np.float32)], axis=1)
    padded_mask = np.pad(mask, ((0, 0), (0, 4)))
    again = inference.sample(config, params, None, jax.random.key(2), text=padded, text_mask=padded_mask)
    np.testing.assert_allclose(again, out, atol=1e-4)
    with pytest.raises(ValueError, match="this model is text-conditional .*pass text"):
        inference.sample(config, params, np.zeros(3, np.int32), jax.random.key(2))
    with pytest.raises(ValueError, match="got 2 labels but 3 texts"):
        inference.sample(config, params, np.zeros(2, np.int32), jax.random.key(2), text=text)
