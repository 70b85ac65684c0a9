"""Noise schedules: closed forms, invariants, pytree behaviour, and errors for bad names."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdit_jax import diffusion

TABLES = (
    "betas",
    "alphas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


@pytest.mark.parametrize("name", diffusion.SCHEDULES)
@pytest.mark.parametrize("T", [2, 37, 1000, 4000])
def test_tables_are_float32_finite_and_monotone(name, T):
    sched = diffusion.make_schedule(name, num_timesteps=T)
    assert sched.num_timesteps == T
    for field in TABLES:
        table = getattr(sched, field)
        chex.assert_shape(table, (T,))
        assert table.dtype == jnp.float32, field
        chex.assert_tree_all_finite(table)
    betas = np.asarray(sched.betas)
    ac = np.asarray(sched.alphas_cumprod)
    assert np.all((betas > 0) & (betas < 1))
    assert np.all((ac > 0) & (ac < 1))
    assert np.all(np.diff(betas) >= 0)
    assert np.all(np.diff(ac) < 0)
    np.testing.assert_allclose(sched.alphas_cumprod_prev[1:], sched.alphas_cumprod[:-1])
    assert float(sched.alphas_cumprod_prev[0]) == 1.0


@pytest.mark.parametrize("T", [1000, 500, 250])
def test_linear_endpoints_scale_with_T(T):
    betas = np.asarray(diffusion.make_schedule("linear", T).betas)
    scale = 1000 / T  # improved-DDPM rescaling
    np.testing.assert_allclose(betas[[0, -1]], [1e-4 * scale, 0.02 * scale], rtol=1e-6)
    np.testing.assert_allclose(np.diff(betas), np.full(T - 1, np.diff(betas).mean()), rtol=1e-3)


@pytest.mark.parametrize("name", diffusion.SCHEDULES)
def test_every_schedule_ends_in_noise_at_any_length(name):
    # The samplers start from N(0, I): ᾱ_(T-1) <= 0.01 at every accepted T (scaled_linear used to end at 0.58 at
    # T = 100 and 0.90 at T = 20).
    for T in [*range(2, 64), 100, 250, 1000, 4000]:
        assert float(diffusion.make_schedule(name, T).alphas_cumprod[-1]) <= 0.01, T


def test_scaled_linear_keeps_stable_diffusion_at_1000_and_rescales_with_T():
    ac = np.cumprod(1 - diffusion.make_betas("scaled_linear", 1000))
    np.testing.assert_allclose(ac[-1], 0.0047, atol=1e-4)  # Stable Diffusion's terminal ᾱ
    for T in (500, 100):
        betas = diffusion.make_betas("scaled_linear", T)
        np.testing.assert_allclose(betas[[0, -1]], np.array([0.00085, 0.012]) * 1000 / T, rtol=1e-12)


def test_a_schedule_that_never_reaches_noise_is_refused():
    with pytest.raises(ValueError, match=r"'linear' with num_timesteps=1 ends at ᾱ_\(T-1\) = 0.9, above 0.01"):
        diffusion.make_schedule("linear", 1)


@pytest.mark.parametrize("name", diffusion.SCHEDULES)
def test_zero_terminal_snr_closed_form(name):
    """Lin et al. 2024, Algorithm 1: sqrt(ᾱ) shifted to end at 0 and scaled to keep its first value."""
    T = 1000
    base = np.sqrt(np.cumprod(1 - diffusion.make_betas(name, T)))
    sched = diffusion.make_schedule(name, T, prediction="v", zero_terminal_snr=True)
    expected = (base - base[-1]) * base[0] / (base[0] - base[-1])
    np.testing.assert_allclose(sched.sqrt_alphas_cumprod, expected, rtol=1e-5, atol=1e-7)
    assert float(sched.alphas_cumprod[-1]) == 0.0 and float(sched.betas[-1]) == 1.0
    np.testing.assert_allclose(sched.alphas_cumprod[0], base[0] ** 2, rtol=1e-6)
    chex.assert_tree_all_finite(
        [sched.posterior_mean_coef1, sched.posterior_mean_coef2, sched.posterior_variance, sched.betas]
    )
    with pytest.raises(ValueError, match="zero_terminal_snr needs prediction 'v' or 'x0'"):
        diffusion.make_schedule(name, T, prediction="eps", zero_terminal_snr=True)


@pytest.mark.parametrize(
    "name,T,zero_terminal_snr", [("scaled_linear", 100, False), ("scaled_linear", 20, False), ("linear", 50, True)]
)
def test_exact_denoiser_samples_the_data_distribution(name, T, zero_terminal_snr):
    """Data N(0.3, 0.5^2) and its exact posterior mean E[x0 | x_t] as the x0 model: DDIM over every step must give
    back the data's mean and spread (with scaled_linear ending at ᾱ = 0.58 the mean came out at 0.15)."""
    mu, s = 0.3, 0.5
    sched = diffusion.make_schedule(name, T, prediction="x0", zero_terminal_snr=zero_terminal_snr)

    def model_fn(x_t, t):
        a = sched.sqrt_alphas_cumprod[t][:, None]
        var = 1.0 - a**2
        return mu + a * s**2 * (x_t - a * mu) / (a**2 * s**2 + var)

    x = diffusion.ddim_sample(model_fn, sched, (8192, 1), jax.random.key(0), num_steps=T, clip_x0=None)
    assert abs(float(jnp.mean(x)) - mu) < 0.03
    assert abs(float(jnp.std(x)) - s) < 0.08  # deterministic DDIM over 20 steps shrinks the spread a little


def test_scaled_linear_is_linear_in_sqrt_beta():
    betas = diffusion.make_betas("scaled_linear", 1000)
    assert betas.dtype == np.float64
    np.testing.assert_allclose(betas[[0, -1]], [0.00085, 0.012], rtol=1e-12)
    steps = np.diff(np.sqrt(betas))
    np.testing.assert_allclose(steps, steps[0], rtol=1e-9)


@pytest.mark.parametrize("T", [1000, 64])
def test_cosine_alphas_cumprod_closed_form(T):
    s = 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    expected = np.array([f(t + 1) / f(0) for t in range(T)])
    sched = diffusion.make_schedule("cosine", T)
    # All but the last step: the last beta is clipped to 0.999 (otherwise ᾱ_T = 0 exactly).
    np.testing.assert_allclose(sched.alphas_cumprod[:-1], expected[:-1], rtol=2e-5, atol=1e-9)
    assert float(sched.betas[-1]) == pytest.approx(0.999)
    assert float(sched.alphas_cumprod[-1]) == pytest.approx(expected[-2] * 0.001, rel=1e-4)
    assert float(jnp.max(sched.betas)) <= 0.999 + 1e-7


@pytest.mark.parametrize("name", diffusion.SCHEDULES)
def test_posterior_matches_bayes_rule(name):
    """q(x_{t-1} | x_t, x0) from the product of two Gaussians, independently of the table formulas."""
    T = 200
    sched = diffusion.make_schedule(name, T)
    betas = diffusion.make_betas(name, T)
    alphas = 1 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    # precision = α_t / β_t + 1 / (1 - ᾱ_{t-1});
    # mean = (sqrt(α_t) / β_t · x_t + sqrt(ᾱ_{t-1}) / (1 - ᾱ_{t-1}) · x0) / precision
    t = np.arange(1, T)
    precision = alphas[t] / betas[t] + 1 / (1 - ac_prev[t])
    np.testing.assert_allclose(sched.posterior_variance[1:], 1 / precision, rtol=1e-5)
    coef_x0 = np.sqrt(ac_prev[t]) / (1 - ac_prev[t]) / precision
    coef_xt = np.sqrt(alphas[t]) / betas[t] / precision
    np.testing.assert_allclose(sched.posterior_mean_coef1[1:], coef_x0, rtol=1e-5)
    np.testing.assert_allclose(sched.posterior_mean_coef2[1:], coef_xt, rtol=1e-5)
    # t = 0: the posterior is the data itself.
    assert float(sched.posterior_variance[0]) == 0.0
    assert float(sched.posterior_mean_coef1[0]) == pytest.approx(1.0)
    assert float(sched.posterior_mean_coef2[0]) == 0.0
    np.testing.assert_allclose(sched.posterior_log_variance_clipped[0], np.log(sched.posterior_variance[1]), rtol=1e-6)


def test_snr_matches_float64_formula():
    sched = diffusion.make_schedule("cosine", 1000)
    ac = np.cumprod(1 - diffusion.make_betas("cosine", 1000))
    t = jnp.arange(1000)
    got = diffusion.snr(sched, t)
    np.testing.assert_allclose(got, ac / (1 - ac), rtol=1e-5)
    assert np.all(np.diff(np.asarray(got)) < 0)


def test_schedule_is_a_pytree_with_static_prediction():
    sched = diffusion.make_schedule("linear", 10, prediction="v")
    leaves = jax.tree.leaves(sched)
    assert len(leaves) == len(TABLES)
    assert all(isinstance(x, jax.Array) for x in leaves)
    doubled = jax.tree.map(lambda x: 2 * x, sched)
    assert doubled.prediction == "v" and doubled.num_timesteps == 10
    np.testing.assert_allclose(doubled.betas, 2 * sched.betas)

    traces = []

    @jax.jit
    def f(s):
        traces.append(s.prediction)
        return s.betas.sum()

    f(sched)
    f(jax.tree.map(lambda x: x + 1, sched))  # new values, same structure: no retrace
    f(diffusion.make_schedule("linear", 10, prediction="eps"))  # static field changed: retrace
    assert traces == ["v", "eps"]


def test_bad_names_raise_with_allowed_values():
    with pytest.raises(ValueError, match=r"'cosin'.*linear, scaled_linear, cosine"):
        diffusion.make_schedule("cosin")
    with pytest.raises(ValueError, match=r"'epsilon'.*eps, v, x0"):
        diffusion.make_schedule("cosine", prediction="epsilon")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="num_timesteps"):
            diffusion.make_schedule("linear", num_timesteps=bad)


def test_linear_short_schedule_clips_betas_below_one():
    betas = np.asarray(diffusion.make_schedule("linear", 10).betas)
    np.testing.assert_allclose(betas[0], 1e-4 * 100, rtol=1e-6)
    assert betas.max() == pytest.approx(0.999)
