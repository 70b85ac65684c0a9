"""Samplers: the analytic Gaussian check, DDIM/DDPM agreement, compile-once, clipping, CFG, errors.

The Gaussian check: for data x0 ~ N(μ, s²) the optimal denoiser is known in closed form,
E[x0 | x_t] = μ + a s² / (a² s² + σ²) (x_t − a μ) with a = sqrt(ᾱ_t), σ² = 1 − ᾱ_t. Fed to a sampler as
model_fn, the samples must come out N(μ, s²) up to the sampler's discretisation error. Because the oracle is
affine in x_t, every sampler step is affine too, so the exact discretised mean and std also follow from a
scalar float64 recursion (`reference_moments`); samples must match that to within sampling noise.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from vdit_jax import diffusion
from vdit_jax.diffusion import samplers

MU, S = 0.5, 0.3
N = 8192  # samples: the sample std has ~0.8% relative noise, the mean ~0.4% of μ


def gaussian_oracle(sched, x_t, t):
    """The exact E[target | x_t] for x0 ~ N(MU, S²), in sched.prediction space."""
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    a = sched.sqrt_alphas_cumprod[t].reshape(shape)
    sig = sched.sqrt_one_minus_alphas_cumprod[t].reshape(shape)
    x0 = MU + a * S**2 / (a**2 * S**2 + sig**2) * (x_t - a * MU)
    eps = (x_t - a * x0) / sig
    return {"x0": x0, "eps": eps, "v": a * eps - sig * x0}[sched.prediction]


def reference_moments(name, T, steps, coefs):
    """Mean and std after running x ← α x + β + sqrt(var) z from N(0, 1), in float64.

    ``steps``: the timesteps visited (descending); ``coefs(t, i) -> (c_x0, c_xt, var)`` gives the update
    x_prev = c_x0 · x0_hat + c_xt · x_t + sqrt(var) z for the oracle x0_hat = k x_t + (1 − k a) μ.
    """
    ac = np.cumprod(1 - diffusion.make_betas(name, T))
    m, v = 0.0, 1.0
    for i, t in enumerate(steps):
        a2 = ac[t]
        k = np.sqrt(a2) * S**2 / (a2 * S**2 + 1 - a2)
        c_x0, c_xt, var = coefs(t, i)
        alpha = c_x0 * k + c_xt
        beta = c_x0 * (1 - k * np.sqrt(a2)) * MU
        m, v = alpha * m + beta, alpha**2 * v + var
    return m, np.sqrt(v)


def ddpm_reference(name, T, variance):
    betas = diffusion.make_betas(name, T)
    ac = np.cumprod(1 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    post = betas * (1 - ac_prev) / (1 - ac)
    var = post if variance == "fixed_small" else np.append(post[1], betas[1:])

    def coefs(t, i):
        c1 = betas[t] * np.sqrt(ac_prev[t]) / (1 - ac[t])
        c2 = (1 - ac_prev[t]) * np.sqrt(1 - betas[t]) / (1 - ac[t])
        return c1, c2, var[t] if t > 0 else 0.0

    return reference_moments(name, T, range(T - 1, -1, -1), coefs)


def ddim_reference(name, T, num_steps, eta):
    ac = np.cumprod(1 - diffusion.make_betas(name, T))
    ts = diffusion.ddim_timesteps(T, num_steps)[::-1]
    prev = np.append(ts[1:], -1)

    def coefs(t, i):
        a2, a2p = ac[t], (ac[prev[i]] if prev[i] >= 0 else 1.0)
        var = eta**2 * (1 - a2p) / (1 - a2) * (1 - a2 / a2p)
        c_eps = np.sqrt(1 - a2p - var)
        # eps_hat = (x_t − a x0_hat) / σ: fold it into the x0 and x_t coefficients.
        return np.sqrt(a2p) - c_eps * np.sqrt(a2 / (1 - a2)), c_eps / np.sqrt(1 - a2), var

    return reference_moments(name, T, ts, coefs)


def check_moments(x, ref, truth_tol):
    mean, std = float(jnp.mean(x)), float(jnp.std(x))
    # Against the exact discretised answer: only sampling noise (~4 sigma).
    assert mean == pytest.approx(ref[0], abs=0.015), (mean, ref)
    assert std == pytest.approx(ref[1], rel=0.035), (std, ref)
    # Against the data distribution: sampling noise plus the sampler's own discretisation error.
    assert mean == pytest.approx(MU, rel=truth_tol), mean
    assert std == pytest.approx(S, rel=truth_tol), std


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
@pytest.mark.parametrize("variance", samplers.VARIANCES)
def test_ddpm_samples_the_gaussian(prediction, variance):
    sched = diffusion.make_schedule("cosine", 1000, prediction)
    x = diffusion.ddpm_sample(Partial(gaussian_oracle, sched), sched, (N, 1), jax.random.key(0), variance=variance)
    chex.assert_shape(x, (N, 1))
    assert x.dtype == jnp.float32
    check_moments(x, ddpm_reference("cosine", 1000, variance), truth_tol=0.03)


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_samples_the_gaussian(prediction, eta):
    sched = diffusion.make_schedule("cosine", 1000, prediction)
    oracle = Partial(gaussian_oracle, sched)
    x = diffusion.ddim_sample(oracle, sched, (N // 4, 2, 2), jax.random.key(1), num_steps=50, eta=eta)
    chex.assert_shape(x, (N // 4, 2, 2))
    # 50 big steps under-disperse (std ≈ 0.287 for η = 0, 0.272 for η = 1); the reference pins them down.
    check_moments(x, ddim_reference("cosine", 1000, 50, eta), truth_tol=0.1)
    # With more steps the discretisation error shrinks to a few percent.
    x = diffusion.ddim_sample(oracle, sched, (N, 1), jax.random.key(2), num_steps=250, eta=eta)
    check_moments(x, ddim_reference("cosine", 1000, 250, eta), truth_tol=0.04)


def test_ddim_eta1_over_all_steps_is_ddpm_fixed_small():
    """η = 1 with no skipped steps is exactly the ancestral sampler (same noise draws, same result)."""
    sched = diffusion.make_schedule("linear", 100, "v")
    oracle = Partial(gaussian_oracle, sched)
    rng = jax.random.key(3)
    ddpm = diffusion.ddpm_sample(oracle, sched, (256, 2), rng, variance="fixed_small")
    ddim = diffusion.ddim_sample(oracle, sched, (256, 2), rng, num_steps=100, eta=1.0)
    np.testing.assert_allclose(ddim, ddpm, atol=2e-4)
    ddim0 = diffusion.ddim_sample(oracle, sched, (256, 2), rng, num_steps=100, eta=0.0)
    assert float(jnp.max(jnp.abs(ddim0 - ddpm))) > 0.05  # the comparison can tell samplers apart


def test_ddim_timesteps_even_distinct_and_cover_the_range():
    for T, n in [(1000, 50), (1000, 1000), (1000, 999), (37, 5), (10, 1), (1, 1)]:
        ts = diffusion.ddim_timesteps(T, n)
        assert len(ts) == n
        assert ts[-1] == T - 1
        assert np.all(np.diff(ts) > 0)
        if n > 1:
            assert ts[0] == 0
            assert np.ptp(np.diff(ts)) <= 1  # evenly spaced up to rounding


def test_sampling_loop_compiles_once_for_new_params():
    sched = diffusion.make_schedule("cosine", 100, "eps")

    @chex.assert_max_traces(n=1)
    def apply(params, x, t):  # traced once per compilation of the loop body
        return params["w"] * x + params["b"]

    shape, rng = (16, 3), jax.random.key(0)
    p1 = {"w": jnp.float32(0.5), "b": jnp.zeros((3,))}
    p2 = {"w": jnp.float32(0.1), "b": jnp.ones((3,))}
    before = samplers._ddim_loop._cache_size()
    x1 = diffusion.ddim_sample(Partial(apply, p1), sched, shape, rng, num_steps=10)
    x2 = diffusion.ddim_sample(Partial(apply, p2), sched, shape, rng, num_steps=10)
    assert samplers._ddim_loop._cache_size() == before + 1
    assert float(jnp.max(jnp.abs(x1 - x2))) > 1e-3  # the new params were actually used
    # A new guidance scale is traced too: one more compile for the CFG model, then none.
    apply_c = lambda x, t, c: x * c[:, None]
    cond, null = jnp.ones((16,)), jnp.zeros((16,))
    before = samplers._ddim_loop._cache_size()
    for g in (2.0, 4.0):
        diffusion.ddim_sample(diffusion.cfg_model_fn(apply_c, cond, null, g), sched, shape, rng, 10)
    assert samplers._ddim_loop._cache_size() == before + 1


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_clip_x0_bounds_the_prediction(sampler):
    sched = diffusion.make_schedule("cosine", 50, "x0")
    model_fn = lambda x, t: jnp.full_like(x, 5.0)  # wildly out of range
    sample = diffusion.ddpm_sample if sampler == "ddpm" else functools.partial(diffusion.ddim_sample, num_steps=10)
    x = sample(model_fn, sched, (8, 2), jax.random.key(0), clip_x0=1.0)
    np.testing.assert_allclose(x, 1.0, atol=1e-5)
    x = sample(model_fn, sched, (8, 2), jax.random.key(0), clip_x0=None)
    np.testing.assert_allclose(x, 5.0, atol=1e-4)


def test_bad_sampler_arguments_raise():
    sched = diffusion.make_schedule("cosine", 100)
    f, shape, rng = (lambda x, t: x), (2, 3), jax.random.key(0)
    for steps in (0, 101, 2.5):
        with pytest.raises(ValueError, match=r"num_steps must be .*\[1, 100\]"):
            diffusion.ddim_sample(f, sched, shape, rng, num_steps=steps)
    for eta in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="eta must be"):
            diffusion.ddim_sample(f, sched, shape, rng, eta=eta)
    with pytest.raises(ValueError, match="'learned'.*fixed_small, fixed_large"):
        diffusion.ddpm_sample(f, sched, shape, rng, variance="learned")
    for clip in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="clip_x0"):
            diffusion.ddim_sample(f, sched, shape, rng, clip_x0=clip)
    with pytest.raises(ValueError, match="shape"):
        diffusion.ddpm_sample(f, sched, (0, 3), rng)


# ------------------------------------------------------------------------------ classifier-free guidance


def make_apply(calls):
    """A conditional 'network' that records the batch it sees; cond is a pytree {"label", "emb"}."""

    def apply_fn(x, t, cond):
        calls.append((x.shape, t.shape, jax.tree.map(jnp.shape, cond)))
        return x * cond["label"][:, None] + cond["emb"] + 0.01 * t[:, None]

    return apply_fn


def cond_pair(batch):
    cond = {"label": jnp.arange(1.0, batch + 1), "emb": jnp.full((batch, 3), 2.0)}
    null = {"label": jnp.zeros((1,)), "emb": jnp.zeros((1, 3))}  # broadcast over the batch
    return cond, null


def test_cfg_guidance_one_equals_conditional_output():
    calls = []
    apply_fn = make_apply(calls)
    cond, null = cond_pair(4)
    x, t = jax.random.normal(jax.random.key(0), (4, 3)), jnp.arange(4)
    out = diffusion.cfg_model_fn(apply_fn, cond, null, 1.0)(x, t)
    chex.assert_trees_all_equal(out, apply_fn(x, t, cond))
    assert calls[0][0] == (4, 3)  # short-circuit: no doubled batch

    # The same holds inside a sampler, jitted.
    sched = diffusion.make_schedule("cosine", 20)
    rng = jax.random.key(1)
    guided = diffusion.ddim_sample(diffusion.cfg_model_fn(apply_fn, cond, null, 1.0), sched, (4, 3), rng, 5)
    plain = diffusion.ddim_sample(Partial(apply_fn, cond=cond), sched, (4, 3), rng, 5)
    chex.assert_trees_all_equal(guided, plain)


@pytest.mark.parametrize("guidance", [0.0, 3.0, jnp.float32(7.5)])
def test_cfg_mixes_cond_and_uncond_in_one_batched_call(guidance):
    calls = []
    apply_fn = make_apply(calls)
    cond, null = cond_pair(4)
    x, t = jax.random.normal(jax.random.key(0), (4, 3)), jnp.arange(4)
    model_fn = diffusion.cfg_model_fn(apply_fn, cond, null, guidance)
    out = jax.jit(lambda m, x, t: m(x, t))(model_fn, x, t)
    assert len(calls) == 1
    x_shape, t_shape, cond_shapes = calls[0]
    assert x_shape == (8, 3) and t_shape == (8,)
    assert cond_shapes == {"label": (8,), "emb": (8, 3)}
    c = x * cond["label"][:, None] + 2.0 + 0.01 * t[:, None]
    u = 0.01 * t[:, None] + 0.0 * x
    np.testing.assert_allclose(out, u + float(guidance) * (c - u), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_self_condition_feeds_each_step_the_previous_x0(sampler):
    """An x0-predicting model that returns its input estimate + 1: step k (from 1) predicts k, so the sample (the
    last step's x0) counts the steps; without self_condition the model is called with (x_t, t) only."""
    sched = diffusion.make_schedule("cosine", 10, prediction="x0")
    counter = lambda x, t, x0_prev: x0_prev + 1.0
    if sampler == "ddim":
        run = functools.partial(diffusion.ddim_sample, num_steps=4)
    else:
        run = diffusion.ddpm_sample
    out = run(counter, sched, (2, 3), jax.random.key(0), self_condition=True)
    np.testing.assert_allclose(out, 4.0 if sampler == "ddim" else 10.0, rtol=1e-5)
    clipped = run(counter, sched, (2, 3), jax.random.key(0), self_condition=True, clip_x0=2.5)
    np.testing.assert_allclose(clipped, 2.5, rtol=1e-6)  # the carried estimate is the clipped x0
    with pytest.raises(TypeError):
        run(counter, sched, (2, 3), jax.random.key(0))


def test_cfg_passes_the_self_condition_estimate_to_both_branches():
    apply_fn = lambda x, t, cond, x0_prev: x0_prev * cond[:, None] + 0.0 * x
    cond, null = jnp.array([2.0, 3.0]), jnp.zeros((2,))
    x, t, x0_prev = jnp.ones((2, 3)), jnp.arange(2), jnp.full((2, 3), 0.5)
    guided = diffusion.cfg_model_fn(apply_fn, cond, null, 3.0)(x, t, x0_prev)
    np.testing.assert_allclose(guided, 3.0 * 0.5 * cond[:, None] * jnp.ones((2, 3)), rtol=1e-6)  # uncond = 0
    plain = diffusion.cfg_model_fn(apply_fn, cond, null, 1.0)(x, t, x0_prev)
    np.testing.assert_allclose(plain, 0.5 * cond[:, None] * jnp.ones((2, 3)), rtol=1e-6)
