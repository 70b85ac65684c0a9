"""Forward process, targets, exact target conversions, min-SNR weights and the training loss."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdit_jax import diffusion

VIDEO = (3, 2, 4, 4, 2)  # [B, T, H, W, C]


def normals(shape, seed=0, n=2):
    return [jax.random.normal(k, shape) for k in jax.random.split(jax.random.key(seed), n)]


def cond_number(sched, t):
    """How much float32 rounding the ill-conditioned conversions amplify at t (1/a + 1/s), [B, 1]."""
    return (1 / sched.sqrt_alphas_cumprod[t] + 1 / sched.sqrt_one_minus_alphas_cumprod[t])[:, None]


def test_q_sample_broadcasts_per_example_over_video_dims():
    sched = diffusion.make_schedule("cosine", 1000)
    x0, noise = normals(VIDEO)
    t = jnp.array([0, 500, 999])
    x_t = diffusion.q_sample(sched, x0, t, noise)
    chex.assert_shape(x_t, VIDEO)
    for i in range(3):
        a, s = sched.sqrt_alphas_cumprod[t[i]], sched.sqrt_one_minus_alphas_cumprod[t[i]]
        np.testing.assert_allclose(x_t[i], a * x0[i] + s * noise[i], rtol=1e-6, atol=1e-6)


def test_q_sample_marginal_variance_is_preserved():
    """Unit-variance data stays unit variance at every t (a² + s² = 1): catches a swapped table."""
    sched = diffusion.make_schedule("linear", 1000)
    x0, noise = normals((4, 8192))
    x_t = diffusion.q_sample(sched, x0, jnp.array([0, 300, 700, 999]), noise)
    np.testing.assert_allclose(jnp.std(x_t, axis=1), 1.0, atol=0.03)


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_get_target(prediction):
    sched = diffusion.make_schedule("cosine", 100, prediction)
    x0, noise = normals(VIDEO, seed=1)
    t = jnp.array([3, 50, 97])
    target = diffusion.get_target(sched, x0, noise, t)
    a = sched.sqrt_alphas_cumprod[t][:, None, None, None, None]
    s = sched.sqrt_one_minus_alphas_cumprod[t][:, None, None, None, None]
    expected = {"eps": noise, "x0": x0, "v": a * noise - s * x0}[prediction]
    np.testing.assert_allclose(target, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", diffusion.SCHEDULES)
@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_x0_and_eps_recovered_from_any_target(name, prediction):
    sched = diffusion.make_schedule(name, 1000, prediction)
    x0, noise = normals((1000, 8), seed=2)
    t = jnp.arange(1000)  # every timestep, including the ill-conditioned ends
    x_t = diffusion.q_sample(sched, x0, t, noise)
    target = diffusion.get_target(sched, x0, noise, t)
    got_x0, got_eps = diffusion.predict_x0_and_eps(sched, target, x_t, t)
    tol = 1e-5 + 1e-6 * cond_number(sched, t)
    assert bool(jnp.all(jnp.abs(got_x0 - x0) <= tol))
    assert bool(jnp.all(jnp.abs(got_eps - noise) <= tol))
    # Away from the ends (where 1/a or 1/s explode) the conversions are exact to ~1e-5 outright.
    mid = np.asarray(cond_number(sched, t)[:, 0] <= 10)
    assert mid.sum() > 300
    np.testing.assert_allclose(got_x0[mid], x0[mid], atol=1e-5)
    np.testing.assert_allclose(got_eps[mid], noise[mid], atol=1e-5)


def test_pairwise_conversions_agree_and_round_trip():
    sched = diffusion.make_schedule("cosine", 1000)
    x0, eps = normals(VIDEO, seed=3)
    t = jnp.array([10, 400, 850])
    x_t = diffusion.q_sample(sched, x0, t, eps)
    v = diffusion.get_target(sched.replace(prediction="v"), x0, eps, t)
    close = functools.partial(np.testing.assert_allclose, atol=2e-5)
    close(diffusion.eps_to_x0(sched, eps, x_t, t), x0)
    close(diffusion.x0_to_eps(sched, x0, x_t, t), eps)
    close(diffusion.v_to_x0(sched, v, x_t, t), x0)
    close(diffusion.v_to_eps(sched, v, x_t, t), eps)
    close(diffusion.x0_to_v(sched, x0, x_t, t), v)
    close(diffusion.eps_to_v(sched, eps, x_t, t), v)
    # Round trips through a wrong-but-arbitrary prediction: conversions are mutually inverse given x_t.
    p = normals(VIDEO, seed=4, n=1)[0]
    close(diffusion.x0_to_eps(sched, diffusion.eps_to_x0(sched, p, x_t, t), x_t, t), p)
    close(diffusion.v_to_x0(sched, diffusion.x0_to_v(sched, p, x_t, t), x_t, t), p)
    close(diffusion.eps_to_v(sched, diffusion.v_to_eps(sched, p, x_t, t), x_t, t), p)


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_min_snr_weights_match_hand_formula(prediction):
    gamma = 5.0
    sched = diffusion.make_schedule("cosine", 1000, prediction)
    t = jnp.array([0, 50, 200, 400, 600, 999])
    ac = np.cumprod(1 - diffusion.make_betas("cosine", 1000))[np.asarray(t)]
    snr = ac / (1 - ac)
    expected = {
        "eps": np.minimum(snr, gamma) / snr,
        "v": np.minimum(snr, gamma) / (snr + 1),
        "x0": np.minimum(snr, gamma),
    }[prediction]
    got = diffusion.min_snr_weight(sched, t, gamma)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert float(got[0]) != float(got[-1])  # the weighting is not flat
    # With a floor the x0-space weight is clip(snr, floor, gamma): high-noise steps keep at least `floor`.
    floored = {
        "eps": np.clip(snr, 1.0, gamma) / snr,
        "v": np.clip(snr, 1.0, gamma) / (snr + 1),
        "x0": np.clip(snr, 1.0, gamma),
    }[prediction]
    got = diffusion.min_snr_weight(sched, t, gamma, floor=1.0)
    np.testing.assert_allclose(got, floored, rtol=1e-5)
    assert not np.allclose(floored, expected)  # t=999 has snr << 1: the floor changes its weight


def test_min_snr_floor_must_lie_below_gamma():
    sched = diffusion.make_schedule("cosine", 100, "x0")
    x0 = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=r"min_snr_floor must be in \[0, min_snr_gamma=5.0\], got 6.0"):
        diffusion.loss_fn(lambda x, t: x, sched, x0, jax.random.key(0), min_snr_gamma=5.0, min_snr_floor=6.0)


def oracle(sched, x0):
    """A model_fn that knows the clean data: returns the exact target for any x_t."""

    def model_fn(x_t, t):
        eps = diffusion.x0_to_eps(sched, x0, x_t, t)
        return diffusion.get_target(sched, x0, eps, t)

    return model_fn


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_loss_is_zero_for_the_oracle_and_positive_otherwise(prediction, gamma):
    sched = diffusion.make_schedule("cosine", 1000, prediction)
    (x0,) = normals(VIDEO, seed=5, n=1)
    rng = jax.random.key(6)
    loss, aux = diffusion.loss_fn(oracle(sched, x0), sched, x0, rng, min_snr_gamma=gamma)
    chex.assert_shape(loss, (VIDEO[0],))
    chex.assert_shape(aux["t"], (VIDEO[0],))
    assert aux["t"].dtype == jnp.int32
    assert float(jnp.max(loss)) < 1e-6
    bad, aux_bad = diffusion.loss_fn(lambda x, t: jnp.zeros_like(x), sched, x0, rng, min_snr_gamma=gamma)
    assert float(jnp.min(aux_bad["mse"])) > 0.01
    np.testing.assert_array_equal(aux_bad["t"], aux["t"])  # the same rng draws the same timesteps
    np.testing.assert_allclose(bad, aux_bad["weight"] * aux_bad["mse"], rtol=1e-6)


def test_loss_with_fixed_t_noise_and_min_snr_matches_manual():
    sched = diffusion.make_schedule("linear", 1000, "v")
    x0, noise = normals(VIDEO, seed=7)
    t = jnp.array([1, 500, 990])
    model_fn = lambda x, t: 0.5 * x
    loss, aux = diffusion.loss_fn(model_fn, sched, x0, jax.random.key(0), min_snr_gamma=5.0, t=t, noise=noise)
    x_t = diffusion.q_sample(sched, x0, t, noise)
    target = diffusion.get_target(sched, x0, noise, t)
    mse = jnp.mean((0.5 * x_t - target) ** 2, axis=(1, 2, 3, 4))
    weight = diffusion.min_snr_weight(sched, t, 5.0)
    np.testing.assert_allclose(loss, weight * mse, rtol=1e-5)
    np.testing.assert_array_equal(aux["t"], t)


def test_mask_scores_only_selected_frames():
    sched = diffusion.make_schedule("cosine", 1000, "eps")
    x0, noise = normals(VIDEO, seed=8)
    t = jnp.array([10, 400, 800])
    # Exact on frame 0, wrong (predicts zeros) on frame 1.
    model_fn = lambda x, t: noise.at[:, 1].set(0.0)
    mask = jnp.zeros((VIDEO[0], VIDEO[1], 1, 1, 1)).at[:, 0].set(1.0)  # [B, T, 1, 1, 1]
    loss, _ = diffusion.loss_fn(model_fn, sched, x0, jax.random.key(0), mask=mask, t=t, noise=noise)
    np.testing.assert_allclose(loss, 0.0, atol=1e-7)
    loss, _ = diffusion.loss_fn(model_fn, sched, x0, jax.random.key(0), mask=1.0 - mask, t=t, noise=noise)
    np.testing.assert_allclose(loss, jnp.mean(noise[:, 1] ** 2, axis=(1, 2, 3)), rtol=1e-5)


def test_l1_loss_is_the_mean_absolute_error_and_keeps_mse_in_aux():
    sched = diffusion.make_schedule("cosine", 1000, "x0")
    x0, noise = normals(VIDEO, seed=10)
    t = jnp.array([5, 300, 900])
    model_fn = lambda x, t: 0.5 * x
    kw = dict(t=t, noise=noise, min_snr_gamma=5.0, min_snr_floor=1.0)
    l1, aux = diffusion.loss_fn(model_fn, sched, x0, jax.random.key(0), loss_type="l1", **kw)
    l2, aux2 = diffusion.loss_fn(model_fn, sched, x0, jax.random.key(0), **kw)
    err = 0.5 * diffusion.q_sample(sched, x0, t, noise) - x0
    np.testing.assert_allclose(l1, aux["weight"] * jnp.mean(jnp.abs(err), axis=(1, 2, 3, 4)), rtol=1e-5)
    np.testing.assert_allclose(aux["mse"], aux2["mse"], rtol=1e-6)
    np.testing.assert_allclose(l2, aux2["weight"] * aux2["mse"], rtol=1e-6)
    assert not np.allclose(l1, l2)
    mask = jnp.zeros((VIDEO[0], VIDEO[1], 1, 1, 1)).at[:, 0].set(1.0)  # frame 0 only
    l1_mask, _ = diffusion.loss_fn(model_fn, sched, x0, jax.random.key(0), loss_type="l1", mask=mask, **kw)
    np.testing.assert_allclose(l1_mask, aux["weight"] * jnp.mean(jnp.abs(err[:, 0]), axis=(1, 2, 3)), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown loss_type 'huber'; allowed: mse, l1"):
        diffusion.loss_fn(model_fn, sched, x0, jax.random.key(0), loss_type="huber")


def test_loss_fn_jits():
    sched = diffusion.make_schedule("cosine", 1000, "v")
    (x0,) = normals(VIDEO, seed=9, n=1)
    f = jax.jit(lambda s, x, r: diffusion.loss_fn(lambda x, t: 0 * x, s, x, r, min_snr_gamma=5.0))
    loss, aux = f(sched, x0, jax.random.key(1))
    eager, _ = diffusion.loss_fn(lambda x, t: 0 * x, sched, x0, jax.random.key(1), min_snr_gamma=5.0)
    np.testing.assert_allclose(loss, eager, rtol=1e-5)


def test_bad_min_snr_gamma_raises():
    sched = diffusion.make_schedule("cosine", 10)
    with pytest.raises(ValueError, match="min_snr_gamma"):
        diffusion.loss_fn(lambda x, t: x, sched, jnp.zeros((2, 3)), jax.random.key(0), min_snr_gamma=0)


def test_sample_timesteps_uniform_ints():
    t = diffusion.sample_timesteps(jax.random.key(0), 20000, 10)
    chex.assert_shape(t, (20000,))
    assert t.dtype == jnp.int32
    assert int(t.min()) == 0 and int(t.max()) == 9
    counts = np.bincount(np.asarray(t), minlength=10)
    np.testing.assert_allclose(counts / 20000, 0.1, atol=0.01)


def test_sample_timesteps_logit_normal():
    """t / T = sigmoid(N(mean, std)): median at sigmoid(mean) * T, more mass in the middle than at the ends."""
    T, n = 1000, 40000
    for mean in (0.0, 1.0, -1.0):
        t = np.asarray(diffusion.sample_timesteps(jax.random.key(0), n, T, "logit_normal", logit_mean=mean))
        assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= T - 1
        np.testing.assert_allclose(np.median(t), T / (1 + np.exp(-mean)), atol=10)
    t = np.asarray(diffusion.sample_timesteps(jax.random.key(1), n, T, "logit_normal"))
    middle, ends = np.mean((t >= 400) & (t < 600)), np.mean(t < 100) + np.mean(t >= 900)
    # N(0, 1) mass of |u| < logit(0.6) = 0.405 and of |u| > logit(0.9) = 2.197; uniform t: 0.2 and 0.2.
    np.testing.assert_allclose([middle, ends], [0.315, 0.028], atol=0.006)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sampling="beta"), "unknown timestep sampling 'beta'; allowed: uniform, logit_normal"),
        (dict(sampling="logit_normal", logit_std=0.0), "logit_std must be > 0"),
    ],
)
def test_sample_timesteps_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        diffusion.sample_timesteps(jax.random.key(0), 4, 10, **kwargs)


def test_self_conditioned_feeds_back_its_stopped_estimate():
    """net(x_t, t, x0) = x0 + w x_t predicts x0 directly: with rate 1 the second pass sees the first's w x_t, but
    the gradient in w flows only through the second pass; with rate 0 the estimate is zeros."""
    sched = diffusion.make_schedule("cosine", 10, prediction="x0")
    x_t, t = jax.random.normal(jax.random.key(0), (3, 2, 4, 4, 3)), jnp.array([1, 5, 9])
    rng = jax.random.key(1)

    def total(w, rate):
        net = lambda x, tt, x0: x0 + w * x
        return jnp.sum(diffusion.self_conditioned(net, sched, rng, rate)(x_t, t))

    s = float(jnp.sum(x_t))
    np.testing.assert_allclose(total(2.0, 1.0), 4.0 * s, rtol=1e-5)
    np.testing.assert_allclose(jax.grad(total)(2.0, 1.0), s, rtol=1e-5)
    np.testing.assert_allclose(total(2.0, 0.0), 2.0 * s, rtol=1e-5)
    # One draw per call: over many keys the default rate feeds the estimate back about half the time.
    fed = jax.vmap(  # the output is 2 x_t when fed back, else x_t
        lambda k: jnp.sum(diffusion.self_conditioned(lambda x, tt, x0: x0 + x, sched, k)(x_t, t)) / s > 1.5
    )(jax.random.split(jax.random.key(2), 400))
    assert 0.4 < float(jnp.mean(fed)) < 0.6
    with pytest.raises(ValueError, match="rate must be in"):
        diffusion.self_conditioned(lambda x, tt, x0: x, sched, rng, 1.5)
