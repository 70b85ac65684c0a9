"""Benchmark of the real train step or sampling loop on whatever backend is present; prints one JSON line.

    python -m vdit_jax.bench --config=configs/bench.py:S2 [--steps=5] [--peak_tflops=X] [--mode=train|sample]
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m vdit_jax.bench --mode=attention_memory
    python -m vdit_jax.bench --mode=attention_speed     # forward / gradient ms of xla vs chunked attention
    python -m vdit_jax.bench --config=configs/bench.py:C1 --mode=kernels [--peer=diffusers]   # op by op

From a notebook: `bench.run(config, mode="train", steps=5)` returns the same dict. Nothing here reads a dataset:
batches are synthetic arrays created on the devices with the shardings training uses.

train: builds the sharded train state (`vdit_jax.train.state.create_train_state`) and compiles and times the
  function training runs (`vdit_jax.train.step.make_train_step`) on a global batch of `train.global_batch_size`.
  With `--config.lora.rank=R` (and `lora.targets`) it times LoRA fine-tuning's step instead, on a random base:
  compare its `ms_per_step` and `peak_memory_bytes` with the full step's (`trainable_params` says what trains).
sample: times one denoising step — one model forward on the classifier-free-guidance batch [cond; null] of
  2 x `train.global_batch_size` videos (B videos when `sample.guidance` = 1, which skips the null branch, as the
  sampler does) — and the whole jitted DDIM loop (`vdit_jax.diffusion.ddim_sample`, `sample.steps` steps). Text
  models step with the text cache the sampler computes once per loop (`DiT._text_cache`: the encoders, the text
  projection, every cross-attention's keys and values); `ms_per_step_text_uncached` times the same step with the
  text encoded again, the saving.
attention_speed (no config): the median forward and gradient times of self-attention with each CPU implementation
  (`attention.attend`: xla, chunked) at `ATTENTION_SHAPES` (`attention_speed`).
kernels: the train step's main operations one at a time at the config's shapes (`kernel_shapes`: self- and
  cross-attention through `attention.attend`, the MLP's two matmuls, LayerNorm, tanh-GELU; float32), forward and
  gradient ms; with `--peer=diffusers`, the same operations in PyTorch (`peer.kernel_times`) and the ratios. Where
  the whole step is slower than the peer's, this says which kernels are.
attention_memory (no config): the temporary memory per device that XLA allocates for the jitted value-and-grad of
  sequence-parallel self-attention (`attention.attend`, tokens split over a `sequence` axis of every device), once
  with `allgather` and once with `ring` (`attention_memory`); compiled only, nothing runs, so fake CPU devices do.

Model FLOPs (`forward_flops`) are analytic: 2 FLOPs per multiply-add of every matmul, nothing else (norms,
softmax, activations and the optimiser are left out, as in MFU). With B videos of N tokens (attention groups of S
tokens: N for full attention, H'W' spatial, T' temporal, the window volume for windows), width D, MLP width F,
text of L tokens of width E, P = pt*ph*pw*C_in and P' = pt*ph*pw*C_out, k attention sublayers a block (2 when
factorized) and depth blocks:

    patch embed        2 B N P D
    timestep MLP       2 B (256 D + D^2)
    text projection    2 B L (E D + D^2)                  (text models)
    per block:
      adaLN            2 B D * 3(k+1) D
      self-attention   k * (2 B N 3D^2 [qkv] + 2 B N S D [scores] + 2 B N S D [probs @ V] + 2 B N D^2 [out])
      cross-attention  2 B N D^2 [q] + 2 B L 2D^2 [kv] + 4 B N L D [scores, probs @ V] + 2 B N D^2 [out]
      MLP              2 B N 2 D F
    per MM-DiT block (text_mode joint; M = N + L tokens, s = 2 streams dual, 1 single):
      adaLN            s * 2 B D 6D
      joint attention  2 B M 4D^2 [qkv, out] + 4 B M M D [scores, probs @ V]
      MLP              2 B M 2 D F
    final layer        2 B D 2D [adaLN] + 2 B N D P'

A train step counts 3 x forward (forward + backward = 2 x forward), whatever remat recomputes (model FLOPs, not
hardware FLOPs); a sampling step counts one forward on its (CFG) batch. MFU = model FLOP/s / (peak x devices).
XLA's FLOPs are `compiled.cost_analysis()["flops"]` of the partitioned program (per device) times the device
count; they include the elementwise work left out above, and XLA counts the body of a loop once (a scanned model,
the DDIM loop), so for scanned layers they are about one layer's share, not the model's.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from vdit_jax import cli, diffusion, tasks
from vdit_jax import config as config_lib
from vdit_jax import peer as peer_lib
from vdit_jax.models import attention, dit, layers
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.parallel import sharding as sh
from vdit_jax.train import state as state_lib
from vdit_jax.train import step as step_lib

MODES = ("train", "sample", "attention_memory", "attention_speed", "kernels")
FREQUENCY_SIZE = 256  # width of the sinusoidal timestep features (layers.TimestepEmbedder)

# Dense bf16 peak TFLOP/s per chip by device kind (lower-case substrings, first match wins; v5e before v5p).
PEAK_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("h100",), 989.0),
    (("h200",), 989.0),
    (("v5 lite", "v5e", "v5litepod"), 197.0),
    (("v6 lite", "v6e"), 918.0),
    (("v5p", "tpu v5"), 459.0),
    (("v4",), 275.0),
)
# What a bf16 matmul actually reaches (DESIGN §7, one H100): reported next to the spec, not used for MFU.
MEASURED_CEILING_TFLOPS = {"h100": 715.0}


def peak_tflops(device_kind: str) -> float | None:
    """The spec dense bf16 TFLOP/s of one chip of `device_kind`, or None (CPU, unknown devices)."""
    kind = device_kind.lower()
    for needles, tflops in PEAK_TFLOPS:
        if any(n in kind for n in needles):
            return tflops
    return None


def measured_ceiling_tflops(device_kind: str) -> float | None:
    kind = device_kind.lower()
    return next((v for k, v in MEASURED_CEILING_TFLOPS.items() if k in kind), None)


# ----------------------------------------------------------------------------------------------------
# Analytic FLOPs.


def _group_size(grouping: str, grid: layers.Grid, window) -> int:
    t, h, w = grid
    if grouping == "full":
        return t * h * w
    if grouping == "spatial":
        return h * w
    if grouping == "temporal":
        return t
    return int(np.prod(layers.clip_window(window, grid)))


def forward_flops(mc: dit.DiTConfig, video_shape, text_len: int = 0, text_cached: bool = False) -> dict[str, float]:
    """Matmul FLOPs of one forward pass on videos [B, T, H, W, C], by part (see the module docstring); `total`.
    `text_cached`: a sampling step with the text cache (no text projection, no cross-attention keys and values)."""
    b = video_shape[0]
    grid = layers.token_grid(video_shape, mc.patch_size)
    n = int(np.prod(grid))
    d, f, e, length = mc.hidden_size, mc.mlp_dim, mc.text_dim, text_len if mc.text_dim else 0
    patch = int(np.prod(mc.patch_size))
    out = {
        "patch_embed": 2 * b * n * patch * mc.in_channels * d,
        "timestep": 2 * b * (FREQUENCY_SIZE * d + d * d),
        "text_embed": 0 if text_cached else 2 * b * length * (e * d + d * d),
        "adaln": 0,
        "self_attention": 0,
        "cross_attention": 0,
        "mlp": 0,
        "final": 2 * b * d * 2 * d + 2 * b * n * d * patch * (mc.out_channels or mc.in_channels),
    }
    for groupings, window, count in mc.stages():
        if groupings in (("joint",), ("single",)):  # MM-DiT: both streams through qkv, out and MLP; N + L tokens
            streams = 2 if groupings == ("joint",) else 1
            m = n + length
            out["adaln"] += count * streams * 2 * b * d * 6 * d
            out["joint_attention"] = out.get("joint_attention", 0) + count * (8 * b * m * d * d + 4 * b * m * m * d)
            out["mlp"] += count * 4 * b * m * d * f
            continue
        out["adaln"] += count * 2 * b * d * 3 * (len(groupings) + 1) * d
        for g in groupings:
            s = _group_size(g, grid, window)
            out["self_attention"] += count * (2 * b * n * 3 * d * d + 4 * b * n * s * d + 2 * b * n * d * d)
        if length:
            kv = 0 if text_cached else 4 * b * length * d * d
            out["cross_attention"] += count * (4 * b * n * d * d + kv + 4 * b * n * length * d)
        out["mlp"] += count * 4 * b * n * d * f
    out = {k: float(v) for k, v in out.items()}
    out["total"] = sum(out.values())
    return out


def num_tokens(config: ml_collections.ConfigDict) -> int | None:
    """Tokens per example the config's network sees (`Task.tokens_per_example`; None for a network without)."""
    return tasks.get(config).tokens_per_example()


def param_count(config: ml_collections.ConfigDict) -> int:
    """Parameters of the config's model, from shapes only (`jax.eval_shape`: nothing is allocated)."""
    task = tasks.get(config)
    shapes = jax.eval_shape(lambda r: task.init(r, task.batch_shapes(1)), jax.random.key(0))
    return state_lib.count_params(nn.unbox(shapes))


# ----------------------------------------------------------------------------------------------------
# Measurements.


def _xla_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per partition
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) * jax.device_count() if flops is not None and flops >= 0 else None


def _compiled_memory(compiled) -> int | None:
    """Bytes per device the compiled program needs: arguments + outputs - aliased (donated) + temporaries."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
        + m.generated_code_size_in_bytes
    )


def peak_memory(compiled_list) -> tuple[int | None, str]:
    """(peak bytes on the busiest device, where the number comes from).

    `device.memory_stats()["peak_bytes_in_use"]` where the backend keeps it (GPU, TPU; the whole process so far),
    else the largest `memory_analysis()` total of the compiled programs (CPU).
    """
    peaks = []
    for d in jax.local_devices():
        stats = d.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    if peaks:
        return max(peaks), "memory_stats"
    totals = [t for t in (_compiled_memory(c) for c in compiled_list) if t is not None]
    return (max(totals), "memory_analysis") if totals else (None, "unavailable")


def _time_calls(fn: Callable[[], Any], steps: int) -> list[float]:
    """Seconds of each of `steps` calls of fn (each blocks until its outputs are ready)."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return times


def _random(rng, shape_dtype: jax.ShapeDtypeStruct, sharding) -> jax.Array:
    """A synthetic array created straight on the devices with `sharding`; a bool [B, L] array is a text mask: a
    prefix of 1..L real tokens per example, as padded text is."""
    shape = shape_dtype.shape
    if shape_dtype.dtype == jnp.bool_:
        make = lambda r: jnp.arange(shape[-1]) < jax.random.randint(r, (*shape[:-1], 1), 1, shape[-1] + 1)
    elif jnp.issubdtype(shape_dtype.dtype, jnp.integer):
        make = lambda r: jax.random.randint(r, shape_dtype.shape, 0, 2, shape_dtype.dtype)
    else:
        make = lambda r: jax.random.uniform(r, shape_dtype.shape, shape_dtype.dtype, -1.0, 1.0)
    return jax.jit(make, out_shardings=sharding)(rng)


def synthetic_batch(config, mesh, rules, rng) -> dict[str, jax.Array]:
    """One global batch shaped like training's (`step.batch_shapes`), on the devices."""
    shapes = step_lib.batch_shapes(config)
    shardings = step_lib.batch_shardings(config, mesh, rules)
    keys = jax.random.split(rng, len(shapes))
    return {k: _random(r, shapes[k], shardings[k]) for k, r in zip(sorted(shapes), keys)}


def bench_train(config, mesh, rules, steps: int) -> tuple[dict, list]:
    """Compiles and times the real sharded train step; returns (fields, compiled programs). A LoRA config
    (`config.lora.rank > 0`) times the adapter's step on a randomly initialised base (no base run is read)."""
    rng = jax.random.key(config.seed)
    state = state_lib.create_train_state(config, mesh, rules, rng)
    batch = synthetic_batch(config, mesh, rules, jax.random.fold_in(rng, 7))
    base = init_params(config, mesh, rules, jax.random.fold_in(rng, 9)) if config.lora.rank else None
    step = step_lib.make_train_step(config, mesh, rules, base)
    with step_lib.logical_context(mesh, rules):
        start = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        holder = {"state": state}

        def call():
            holder["state"], metrics = compiled(holder["state"], batch, step.num_steps, base)  # state donated: carry it
            return metrics

        loss = float(jax.device_get(call()["loss"]))  # warm-up
        times = _time_calls(call, steps)
    b = config.train.global_batch_size
    fwd = tasks.get(config).forward_flops(b)
    # Forward + backward: 3x the forward's matmuls; LoRA skips the base's weight gradients (2x, the adapters' own
    # matmuls are not counted: < 1% at the ranks used).
    passes = 2 if config.lora.rank else 3
    fields = {
        "batch": b,
        "trainable_params": state_lib.count_params(state.params),
        "model_flops": None if fwd is None else passes * fwd["total"],
        "model_flops_forward_breakdown": None if fwd is None else {k: v for k, v in fwd.items() if k != "total"},
        "xla_flops": _xla_flops(compiled),
        "compile_s": compile_s,
        "loss": loss,
        "_times": times,
        "_videos": b,
    }
    return fields, [compiled]


def init_params(config, mesh, rules, rng):
    """The model's parameters only (no optimiser state), initialised straight into their shardings."""
    task = tasks.get(config)
    init = functools.partial(task.init, batch=task.batch_shapes(config.train.global_batch_size))
    shardings = sh.logical_shardings(jax.eval_shape(init, rng), mesh, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        return jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)


def bench_sample(config, mesh, rules, steps: int) -> tuple[dict, list]:
    """Times one denoising step (a forward on the CFG batch) and the whole jitted DDIM loop."""
    rng = jax.random.key(config.seed)
    task = tasks.get(config)
    b = config.train.global_batch_size
    shape = (b, *config_lib.input_shape(config))
    params = init_params(config, mesh, rules, rng)
    batch = synthetic_batch(config, mesh, rules, jax.random.fold_in(rng, 7))
    model_fn, cfg_batch = task.denoise_model_fn(params, batch)
    d = config.diffusion
    sched = config_lib.schedule(config)
    x = batch["video"]
    t = jnp.full((b,), d.num_timesteps - 1, jnp.int32)
    with step_lib.logical_context(mesh, rules):
        step = jax.jit(lambda fn, x, t: fn(x, t))
        start = time.perf_counter()
        compiled = step.lower(model_fn, x, t).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(compiled(model_fn, x, t))  # warm-up
        times = _time_calls(lambda: compiled(model_fn, x, t), steps)

        text_fields = {}
        if config.model.get("text_dim"):  # the saving of the per-loop text cache: the same step, text encoded again
            uncached_fn, _ = task.denoise_model_fn(params, batch, cache_text=False)
            uncached = step.lower(uncached_fn, x, t).compile()
            jax.block_until_ready(uncached(uncached_fn, x, t))
            uncached_times = _time_calls(lambda: uncached(uncached_fn, x, t), steps)
            text_fields["ms_per_step_text_uncached"] = 1e3 * float(np.median(uncached_times))
            text_fields["text_uncached_xla_flops"] = _xla_flops(uncached)

        sample = lambda: diffusion.ddim_sample(
            model_fn, sched, shape, jax.random.fold_in(rng, 3), num_steps=config.sample.steps, eta=config.sample.eta
        )
        start = time.perf_counter()
        jax.block_until_ready(sample())  # compiles and runs once
        loop_first_s = time.perf_counter() - start
        loop_s = _time_calls(sample, 1)[0]
    fwd = task.forward_flops(cfg_batch, text_cached=True)
    fields = {
        "batch": b,
        "cfg_batch": cfg_batch,
        "model_flops": None if fwd is None else fwd["total"],
        "model_flops_forward_breakdown": None if fwd is None else {k: v for k, v in fwd.items() if k != "total"},
        "xla_flops": _xla_flops(compiled),
        "compile_s": compile_s,
        "loop_steps": config.sample.steps,
        "loop_ms": 1e3 * loop_s,
        "loop_compile_s": max(loop_first_s - loop_s, 0.0),
        "_times": times,
        "_videos": b,
        **text_fields,
    }
    return fields, [compiled]


ATTENTION_SHAPES = ((1, 2048, 6, 64), (2, 1024, 6, 64), (2, 512, 6, 64), (16, 64, 4, 32))  # [B, N, H, D]


def attention_speed(steps: int = 5, implementations=("xla", "chunked")) -> dict:
    """Median ms of the jitted forward and of the jitted gradient (w.r.t. q, k, v) of self-attention q/k/v
    [B, N, H, D] (float32, no mask) for each of `implementations` at `ATTENTION_SHAPES`: C1's 2,048 tokens of 6 x 64
    heads down to the CPU demo's 64 tokens. How `attention.resolve`'s CPU choice was measured."""
    out = {}
    for b, n, h, d in ATTENTION_SHAPES:
        q, k, v = (jax.random.normal(jax.random.key(i), (b, n, h, d), jnp.float32) for i in range(3))
        row = {}
        for impl in implementations:
            fn = lambda q, k, v, impl=impl: attention.attend(q, k, v, implementation=impl)
            fwd = jax.jit(fn)
            grad = jax.jit(jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2)))
            timed = {}
            for name, f in (("forward_ms", fwd), ("grad_ms", grad)):
                jax.block_until_ready(f(q, k, v))  # compile and warm up
                timed[name] = 1e3 * statistics.median(_time_calls(functools.partial(f, q, k, v), steps))
            row[impl] = timed
        out[f"{b}x{n}x{h}x{d}"] = row
    return out


def kernel_shapes(config: ml_collections.ConfigDict) -> dict[str, dict[str, tuple[int, ...]]]:
    """The train step's main operations at `config`'s shapes (global batch B, N tokens, width D = H x Dh, MLP width
    F, L text tokens): name -> its input shapes. Attention q/k/v are [B, N or L, H, Dh]; the matmuls x [B N, in] by
    w [in, out]; LayerNorm and GELU act on [B, N, D] and [B, N, F]. The same dict drives `peer.kernel_times`."""
    m = config.model
    b, n, d, h = config.train.global_batch_size, num_tokens(config), m.hidden_size, m.num_heads
    if n is None:
        raise cli.UsageError("--mode=kernels needs a DiT config (configs/bench.py)")
    layouts = {g for groupings, _, _ in config_lib.model_config(config).stages() for g in groupings}
    if layouts != {"full"}:
        raise cli.UsageError(
            f"--mode=kernels times full self-attention over all {n} tokens; this DiT attends in {sorted(layouts)}"
        )
    f = int(m.mlp_ratio * d)
    shapes = {
        "self_attention": {"q": (b, n, h, d // h), "kv": (b, n, h, d // h)},
        "mlp_fc1": {"x": (b * n, d), "w": (d, f)},
        "mlp_fc2": {"x": (b * n, f), "w": (f, d)},
        "layer_norm": {"x": (b, n, d)},
        "gelu_tanh": {"x": (b, n, f)},
    }
    if config.data.text_len:
        shapes["cross_attention"] = {"q": (b, n, h, d // h), "kv": (b, config.data.text_len, h, d // h)}
    return shapes


def kernel_times(config: ml_collections.ConfigDict, steps: int) -> dict[str, dict[str, float]]:
    """Median forward and gradient (of sum(out * r), r fixed random, w.r.t. every input) ms of each operation of
    `kernel_shapes`, jitted, float32: attention as the model runs it (`attention.attend`, "auto"), the matmuls
    as `x @ w`, LayerNorm as the model's (`layers.layer_norm`: no scale or bias, eps 1e-6), tanh-GELU."""
    out = {}
    for name, shapes in kernel_shapes(config).items():
        keys = iter(jax.random.split(jax.random.key(0), 8))
        if "attention" in name:
            args = [jax.random.normal(next(keys), shapes["q"])] + [
                jax.random.normal(next(keys), shapes["kv"]) for _ in range(2)
            ]
            fn = lambda q, k, v: attention.attend(q, k, v)  # noqa: E731
        elif name.startswith("mlp"):
            args = [jax.random.normal(next(keys), shapes[k]) for k in ("x", "w")]
            fn = lambda x, w: x @ w  # noqa: E731
        else:
            args = [jax.random.normal(next(keys), shapes["x"])]
            if name == "layer_norm":
                norm = layers.layer_norm(jnp.float32)
                fn = lambda x, norm=norm: norm.apply({}, x)  # noqa: E731
            else:
                fn = functools.partial(jax.nn.gelu, approximate=True)
        r = jax.random.normal(next(keys), jax.eval_shape(fn, *args).shape)
        grad = jax.jit(jax.grad(lambda *a, fn=fn, r=r: jnp.sum(fn(*a) * r), argnums=tuple(range(len(args)))))
        row = {}
        for what, f in (("forward_ms", jax.jit(fn)), ("grad_ms", grad)):
            jax.block_until_ready(f(*args))
            row[what] = 1e3 * statistics.median(_time_calls(functools.partial(f, *args), steps))
        out[name] = row
    return out


def attention_memory(
    tokens: int = 4096, heads: int = 4, head_dim: int = 64, batch: int = 1, implementation: str = "xla"
) -> dict:
    """Temporary bytes per device of jit(value_and_grad) of self-attention q/k/v [batch, tokens, heads, head_dim]
    (float32) with the tokens split over a `sequence` axis of all devices, for each `attention.SEQUENCE_PARALLEL`
    mode, from `compiled.memory_analysis()` (deterministic: nothing is run or timed).

    With P devices, all-gather attends each device's queries to all keys ([tokens / P, tokens] scores a head); ring
    attention holds one [tokens / P, tokens / P] block at a time, forward and backward. `implementation` is the
    kernel all-gather runs on the gathered keys (xla: the scores are materialised, as on the CPU).
    """
    n = jax.device_count()
    if n < 2:
        raise cli.UsageError(
            "--mode=attention_memory needs several devices; on a CPU set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8"
        )
    if tokens % n:
        raise cli.UsageError(f"tokens={tokens} must be a multiple of the {n} devices")
    mesh = mesh_lib.make_mesh({sh.SEQUENCE: n})
    axes = (sh.BATCH, sh.LENGTH, sh.ACT_HEADS, sh.ACT_KV)
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sh.SEQUENCE))
    arg = jax.ShapeDtypeStruct((batch, tokens, heads, head_dim), jnp.float32, sharding=spec)
    result = {"tokens": tokens, "heads": heads, "head_dim": head_dim, "batch": batch, "implementation": implementation}
    with jax.set_mesh(mesh), nn.logical_axis_rules(sh.default_rules()):
        for mode in attention.SEQUENCE_PARALLEL:
            loss = lambda q, k, v, mode=mode: jnp.sum(
                attention.attend(q, k, v, implementation=implementation, sequence_parallel=mode, q_axes=axes) ** 2
            )
            start = time.perf_counter()
            compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(arg, arg, arg).compile()
            compile_s = time.perf_counter() - start
            m = compiled.memory_analysis()
            if m is None:
                raise cli.UsageError(f"the {jax.default_backend()} backend reports no compiled memory analysis")
            result[mode] = {"temp_bytes": int(m.temp_size_in_bytes), "temp_mib": m.temp_size_in_bytes / 2**20}
            result[mode]["compile_s"] = compile_s
    result["ring_over_allgather"] = result["ring"]["temp_bytes"] / result["allgather"]["temp_bytes"]
    return result


def run(
    config: ml_collections.ConfigDict | None,
    *,
    mode: str = "train",
    steps: int = 5,
    peak: float | None = None,
    config_name: str = "",
    peer: str | None = None,
) -> dict:
    """Validates, builds the mesh, runs the benchmark; returns the JSON-ready result (see the module docstring)."""
    if mode not in MODES:
        raise cli.UsageError(f"--mode={mode!r} is not allowed; use one of {list(MODES)}")
    if mode == "attention_speed":
        if steps < 1:
            raise cli.UsageError(f"--steps={steps} must be >= 1")
        device = jax.devices()[0]
        fields = {"mode": mode, "backend": jax.default_backend(), "device_kind": device.device_kind}
        return {**fields, "steps_timed": steps, "shapes": attention_speed(steps)}
    if mode == "attention_memory":
        device = jax.devices()[0]
        fields = {"mode": mode, "backend": jax.default_backend(), "device_kind": device.device_kind}
        return {**fields, "device_count": jax.device_count(), **attention_memory()}
    if config is None:
        raise cli.UsageError(f"--config is required for --mode={mode}")
    if peer is not None and peer != peer_lib.NAME:
        raise cli.UsageError(f"--peer={peer!r} is not allowed; use {peer_lib.NAME!r} (or leave it out)")
    if peer is not None:
        try:
            peer_lib.wan_kwargs(config)
        except ValueError as e:
            raise cli.UsageError(f"--peer={peer}: {e}") from None
    if steps < 1:
        raise cli.UsageError(f"--steps={steps} must be >= 1")
    if mode == "kernels":
        return _kernels(config, steps, config_name, peer)
    if peak is not None and not peak > 0:
        raise cli.UsageError(f"--peak_tflops={peak} must be > 0")
    if config.lora.rank and not config.lora.base_workdir:
        config = config.copy_and_resolve_references()
        config.lora.base_workdir = "(a random base: the benchmark reads no run)"
    config_lib.validate(config, jax.device_count(), jax.process_count())
    mesh = mesh_lib.make_mesh(config.mesh_shape.to_dict())
    rules = sh.rules_from_config(config.logical_axis_rules)
    fields, compiled = (bench_train if mode == "train" else bench_sample)(config, mesh, rules, steps)

    device = jax.devices()[0]
    n_dev = jax.device_count()
    step_s = statistics.median(fields.pop("_times"))
    videos = fields.pop("_videos")
    peak = peak if peak is not None else peak_tflops(device.device_kind)
    tflops = None if fields["model_flops"] is None else fields["model_flops"] / step_s / 1e12
    tokens = num_tokens(config)
    mem, mem_source = peak_memory(compiled)
    result = {
        "config": config_name,
        "mode": mode,
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": n_dev,
        "mesh": dict(mesh.shape),
        "params": param_count(config),
        "tokens_per_video": tokens,
        "text_len": config.data.text_len,
        "ms_per_step": 1e3 * step_s,
        "tokens_per_s": None if tokens is None else videos * tokens / step_s,
        **fields,
        "tflops": tflops,
        "peak_tflops_per_device": peak,
        "measured_ceiling_tflops_per_device": measured_ceiling_tflops(device.device_kind),
        "mfu": tflops / (peak * n_dev) if peak and tflops is not None else None,
        "peak_memory_bytes": mem,
        "peak_memory_gib": None if mem is None else mem / 2**30,
        "peak_memory_source": mem_source,
        "steps_timed": steps,
    }
    if peer is not None:  # diffusers at the same shape, in this process, after ours
        missing = peer_lib.available()
        if missing:
            logging.warning("%s", missing)
            result["peer"] = {"missing": missing}
        else:
            result["peer"] = peer_lib.run(config, mode, steps)
            result["ratio_to_peer"] = result["ms_per_step"] / result["peer"]["ms_per_step"]
    return result


def _kernels(config, steps: int, config_name: str, peer: str | None) -> dict:
    ours = kernel_times(config, steps)
    result = {"config": config_name, "mode": "kernels", "backend": jax.default_backend(), "steps_timed": steps}
    result["shapes"] = {k: {n: list(s) for n, s in v.items()} for k, v in kernel_shapes(config).items()}
    if peer is None:
        return {**result, "kernels": ours}
    missing = peer_lib.available()
    if missing:
        logging.warning("%s", missing)
        return {**result, "kernels": ours, "peer": {"missing": missing}}
    theirs = peer_lib.kernel_times(kernel_shapes(config), steps)
    rows = {}
    for name, row in ours.items():
        rows[name] = {**row, **{f"peer_{k}": v for k, v in theirs["kernels"][name].items()}}
        for k in ("forward_ms", "grad_ms"):
            rows[name][k.replace("_ms", "_ratio")] = row[k] / theirs["kernels"][name][k]
    return {**result, "kernels": rows, "peer": {k: v for k, v in theirs.items() if k != "kernels"}}


def to_json(result: dict) -> str:
    """One line; floats rounded to 4 significant digits."""

    def fmt(v):
        if isinstance(v, dict):
            return {k: fmt(x) for k, x in v.items()}
        return float(f"{v:.4g}") if isinstance(v, float) else v

    return json.dumps(fmt(result))


# ----------------------------------------------------------------------------------------------------
# The command line (flags are defined only when run as a program, so importing this module defines none).


def main() -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file(
        "config",
        None,
        "Benchmark config (configs/bench.py:VARIANT); not used by --mode=attention_memory or attention_speed.",
    )
    steps = flags.DEFINE_integer("steps", 5, "Timed steps after one warm-up step; the median is reported.")
    peak = flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s per device for MFU (default: by device kind).")
    mode = flags.DEFINE_string("mode", "train", f"One of {list(MODES)}.")
    peer = flags.DEFINE_string(
        "peer",
        None,
        f"'{peer_lib.NAME}': also time diffusers' WanTransformer3DModel at the config's shape in this process (the "
        "optional peer extra; without it, ours runs alone) and print the ratio.",
    )

    def _main(argv):
        if len(argv) > 1:
            cli.fail(f"unexpected arguments {argv[1:]}; see --help")
        name = flags.FLAGS["config"].config_filename if flags.FLAGS["config"].present else ""
        result = cli.run_guarded(
            run,
            config_flag.value,
            mode=mode.value,
            steps=steps.value,
            peak=peak.value,
            config_name=name,
            peer=peer.value,
        )
        print(to_json(result), flush=True)

    app.run(_main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    main()
