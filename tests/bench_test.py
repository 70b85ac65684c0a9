"""The benchmark: the tiny CLI runs on CPU and prints one sane JSON line; FLOPs formula vs XLA; workload sizes."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import bench as bench_configs
from tests import helpers
from tests.xla_flags import xla_flags
from vdit_jax import bench, cli
from vdit_jax import config as config_lib
from vdit_jax.data import sources
from vdit_jax.models import dit
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.parallel import sharding as sh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    """`python -m vdit_jax.bench ARGS` on one CPU device."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
    cmd = [sys.executable, "-m", "vdit_jax.bench", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["train", "sample"])
def test_tiny_benchmark_prints_one_json_line(mode):
    proc = run_cli("--config=configs/bench.py:tiny", "--steps=2", f"--mode={mode}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    r = json.loads(lines[0])
    assert r["mode"] == mode and r["backend"] == "cpu" and r["device_count"] == 1
    assert r["config"].endswith("bench.py:tiny")
    assert r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and r["compile_s"] > 0
    assert r["params"] == bench.param_count(bench_configs.get_config("tiny"))
    assert r["tokens_per_video"] == 64 and r["batch"] == 4
    assert r["model_flops"] > 0 and r["tflops"] > 0
    # XLA also counts norms, softmax, activations (and the optimiser in training): close, not equal.
    assert 1 / 3 < r["xla_flops"] / r["model_flops"] < 3
    assert r["peak_tflops_per_device"] is None and r["mfu"] is None  # no known peak on CPU
    assert r["peak_memory_bytes"] > 0 and r["peak_memory_source"] == "memory_analysis"
    fwd = sum(r["model_flops_forward_breakdown"].values())
    if mode == "train":
        np.testing.assert_allclose(r["model_flops"], 3 * fwd, rtol=1e-3)
        assert np.isfinite(r["loss"])
    else:
        assert r["cfg_batch"] == 8  # [cond; null] with guidance 3
        np.testing.assert_allclose(r["model_flops"], fwd, rtol=1e-3)
        assert r["loop_steps"] == 4 and r["loop_ms"] > 0


def test_bad_flags_exit_2_with_one_line():
    """An unknown variant through the CLI process (exit 2, one `error:` line, nothing on stdout); the other bad
    values where they enter (`bench.run` raises the `cli.UsageError` that the CLI prints as that line)."""
    proc = run_cli("--config=configs/bench.py:huge")
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "unknown bench variant 'huge'" in errors[0], proc.stderr[-2000:]
    assert proc.stdout == ""
    config = bench_configs.get_config("tiny")
    for kwargs, match in [
        (dict(mode="eval"), "--mode='eval' is not allowed"),
        (dict(steps=0), "--steps=0 must be >= 1"),
    ]:
        with pytest.raises(cli.UsageError, match=match):
            bench.run(config, **kwargs)


@pytest.mark.parametrize("attention", ["full", "factorized"])
def test_analytic_flops_match_xla_forward(attention):
    cfg = dit.DiTConfig(
        hidden_size=128, depth=2, num_heads=4, patch_size=(1, 2, 2), in_channels=4, text_dim=64, attention=attention
    )
    shape, text_len = (2, 4, 16, 16, 4), 16
    params = nn.unbox(jax.jit(dit.init_params, static_argnums=(0, 2))(cfg, jax.random.key(0), shape))
    args = (jnp.zeros(shape), jnp.zeros((2,), jnp.int32), None, jnp.zeros((2, text_len, 64)))
    compiled = jax.jit(lambda p, *a: dit.DiT(cfg).apply(p, *a)).lower(params, *args).compile()
    xla = compiled.cost_analysis()["flops"]
    analytic = bench.forward_flops(cfg, shape, text_len)
    assert analytic["cross_attention"] > 0 and analytic["self_attention"] > 0
    assert abs(xla / analytic["total"] - 1) < 0.15, (xla, analytic)


def test_forward_flops_formula_by_hand():
    cfg = dit.DiTConfig(hidden_size=8, depth=1, num_heads=2, patch_size=(1, 1, 1), in_channels=1, text_dim=4)
    f = bench.forward_flops(cfg, (1, 1, 2, 2, 1), text_len=3)  # B=1, N=4, D=8, F=32, L=3, E=4
    assert f["self_attention"] == 2 * 4 * 3 * 64 + 4 * 4 * 4 * 8 + 2 * 4 * 64
    assert f["cross_attention"] == 4 * 4 * 64 + 4 * 3 * 64 + 4 * 4 * 3 * 8
    assert f["mlp"] == 4 * 4 * 8 * 32
    assert f["text_embed"] == 2 * 3 * (4 * 8 + 64)
    assert f["total"] == sum(v for k, v in f.items() if k != "total")


def test_workloads_sizes_and_validation():
    s1, s2, xl = (bench_configs.get_config(v) for v in ("S1", "S2", "xl_long"))
    assert [bench.num_tokens(c) for c in (s1, s2, xl)] == [32_760, 4_096, 65_536]
    assert config_lib.model_config(s1).mlp_dim == 8960 and config_lib.model_config(s2).mlp_dim == 4608
    for config, devices in ((s1, 1), (s2, 1), (s2, 4), (xl, 8), (xl, 32)):
        config_lib.validate(config, devices)
    # S2 = DiT-XL/2 (675M, label table of 1001 x 1152 included) + per block cross-attention + text projection.
    d, e, blocks = 1152, 4096, 28
    cross = 4 * (d * d + d) + 2 * (d // 16)
    expected = 675e6 - 1001 * d + blocks * cross + (e * d + d) + (d * d + d)
    s2_params = bench.param_count(s2)
    assert abs(s2_params / expected - 1) < 0.01, s2_params
    assert bench.param_count(xl) == s2_params
    # S1: Wan2.1-1.3B's blocks and text projection plus a per-block adaLN Dense D -> 6D (see configs/bench.py).
    assert 1.80e9 < bench.param_count(s1) < 1.90e9
    assert bench.param_count(bench_configs.get_config("tiny")) < 1e6
    c1, demo = bench_configs.get_config("C1"), bench_configs.get_config("demo")  # the peer comparison's shapes
    assert (bench.num_tokens(c1), bench.num_tokens(demo)) == (2048, 64)
    config_lib.validate(c1, 1)
    config_lib.validate(demo, 1)


def test_peak_tflops_by_device_kind():
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert bench.measured_ceiling_tflops("NVIDIA H100 80GB HBM3") == 715.0
    assert bench.peak_tflops("TPU v5 lite") == 197.0
    assert bench.peak_tflops("TPU v5p") == 459.0 and bench.peak_tflops("TPU v5") == 459.0
    assert bench.peak_tflops("TPU v6 lite") == 918.0 and bench.peak_tflops("TPU v4") == 275.0
    assert bench.peak_tflops("cpu") is None


def test_synthetic_batch_has_prefix_text_masks():
    config = bench_configs.get_config("tiny")
    mesh = mesh_lib.make_mesh(config.mesh_shape.to_dict(), jax.devices()[:1])
    batch = bench.synthetic_batch(config, mesh, sh.rules_from_config(config.logical_axis_rules), jax.random.key(0))
    assert set(batch) == {"video", "label", "text", "text_mask"}
    mask = np.asarray(batch["text_mask"])
    assert mask.dtype == np.bool_ and mask.shape == (4, 8)
    lengths = mask.sum(1)
    assert (lengths >= 1).all() and all(mask[i, :n].all() for i, n in enumerate(lengths))  # real-token prefixes


def test_workloads_train_on_the_synthetic_latent_text_dataset():
    for variant in bench_configs.VARIANTS:
        config = bench_configs.get_config(variant)
        assert config.data.name == sources.SYNTHETIC_LATENT_TEXT and config.sample.clip_x0 == 0.0
        builder = sources.latent_text_config(config)  # shaped by the variant: the dataset matches the model
        assert tuple(builder.video_shape) == tuple(config.data.video_shape)
        assert (builder.text_len, builder.text_dim) == (config.data.text_len, config.model.text_dim)
    assert sources.latent_text_config(bench_configs.get_config("S2")).name == "16x32x32x4-text120x4096"


def test_attention_memory_ring_holds_blocks_not_all_keys():
    """--mode=attention_memory at a small size on the 8 fake CPU devices (compiled memory, not a timing): ring
    attention's value-and-grad needs well under all-gather's temporary memory per device (one [L/8, L/8] block of
    scores at a time, forward and backward, against [L/8, L]); differentiated straight through its loop, ring kept
    every block's probabilities and needed about as much as all-gather (0.92 of it here)."""
    r = bench.attention_memory(tokens=512, heads=2, head_dim=16)
    assert r["allgather"]["temp_bytes"] > 2 * 64 * 512 * 4  # the [L/8, L] float32 scores of 2 heads, at least
    assert r["ring"]["temp_bytes"] < r["allgather"]["temp_bytes"] / 3, r
    with pytest.raises(cli.UsageError, match="--config is required for --mode=train"):
        bench.run(None, mode="train")


def test_attention_speed_reports_every_shape_and_implementation(monkeypatch):
    """--mode=attention_speed's structure at one tiny shape (the timings themselves are the benchmark's, not a
    test's): both CPU implementations, forward and gradient, positive milliseconds."""
    monkeypatch.setattr(bench, "ATTENTION_SHAPES", ((1, 16, 2, 8),))
    r = bench.run(None, mode="attention_speed", steps=1)
    assert r["mode"] == "attention_speed" and set(r["shapes"]) == {"1x16x2x8"}
    row = r["shapes"]["1x16x2x8"]
    assert set(row) == {"xla", "chunked"} and all(row[i]["forward_ms"] > 0 and row[i]["grad_ms"] > 0 for i in row)


def test_peer_benchmark_mirrors_the_shape_and_runs_ours_alone_without_torch(monkeypatch):
    """--peer=diffusers: Wan's constructor mirrors the config (C1's sizes here); without torch / diffusers the
    benchmark says what is missing and reports ours alone. (The timings are the benchmark's: README.)"""
    from vdit_jax import peer

    kw = peer.wan_kwargs(bench_configs.get_config("C1"))
    assert (kw["num_attention_heads"], kw["attention_head_dim"], kw["ffn_dim"], kw["num_layers"]) == (6, 64, 1536, 8)
    assert (kw["in_channels"], kw["text_dim"], kw["patch_size"]) == (16, 512, (1, 2, 2))
    _hide_peer(monkeypatch)
    assert "needs torch and diffusers, which are not installed: pip install -e '.[peer]'" in peer.available()
    tiny = bench_configs.get_config("tiny")
    tiny.train.global_batch_size = 8  # one example per fake device
    r = bench.run(tiny, mode="sample", steps=1, peer="diffusers")
    assert r["ms_per_step"] > 0 and "needs torch and diffusers" in r["peer"]["missing"] and "ratio_to_peer" not in r
    with pytest.raises(cli.UsageError, match="--peer='pytorch' is not allowed; use 'diffusers'"):
        bench.run(bench_configs.get_config("tiny"), peer="pytorch")
    with pytest.raises(cli.UsageError, match="mirrors text-conditioned DiTs"):
        bench.run(helpers.tiny_config(), peer="diffusers")


def _hide_peer(monkeypatch):
    from vdit_jax import peer

    find_spec = peer.importlib.util.find_spec  # torch and diffusers hidden, everything else found as ever
    monkeypatch.setattr(
        peer.importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("torch", "diffusers") else find_spec(name, *a),
    )


def test_kernels_mode_times_every_operation_at_the_config_shapes(monkeypatch):
    """--mode=kernels: the train step's operations at the config's shapes (tiny: batch 4, 64 tokens of 4 x 16,
    MLP 256, 8 text tokens), forward and gradient ms of each; without torch, ours alone with the missing extra
    named. (The timings are the benchmark's: README.)"""
    _hide_peer(monkeypatch)
    tiny = bench_configs.get_config("tiny")
    shapes = bench.kernel_shapes(tiny)
    assert shapes["self_attention"] == {"q": (4, 64, 4, 16), "kv": (4, 64, 4, 16)}
    assert shapes["cross_attention"]["kv"] == (4, 8, 4, 16)
    assert shapes["mlp_fc1"] == {"x": (256, 64), "w": (64, 256)} and shapes["gelu_tanh"] == {"x": (4, 64, 256)}
    r = bench.run(tiny, mode="kernels", steps=1, peer="diffusers")
    assert set(r["kernels"]) == set(shapes) and "needs torch and diffusers" in r["peer"]["missing"]
    assert all(row["forward_ms"] > 0 and row["grad_ms"] > 0 for row in r["kernels"].values())
    tiny.model.attention = "factorized"
    with pytest.raises(cli.UsageError, match=r"full self-attention over all 64 tokens; .* \['spatial', 'temporal'\]"):
        bench.run(tiny, mode="kernels", steps=1)


def test_peer_kernel_times_run_in_pytorch():
    """The PyTorch side of --mode=kernels at tiny shapes (runs where the `peer` extra is installed)."""
    pytest.importorskip("torch", reason="torch is not installed (the optional `peer` extra)")
    from vdit_jax import peer

    shapes = bench.kernel_shapes(bench_configs.get_config("tiny"))
    r = peer.kernel_times(shapes, steps=1)
    assert set(r["kernels"]) == set(shapes) and r["threads"] >= 1
    assert all(row["forward_ms"] > 0 and row["grad_ms"] > 0 for row in r["kernels"].values())
