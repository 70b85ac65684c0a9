"""The pod dry run: the real train step compiled ahead of time for small TPU slices (needs libtpu, no TPU)."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import helpers
from tests.xla_flags import xla_flags
from vdit_jax.parallel import topology
from vdit_jax.train import dry_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "tiny_config.py")
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason='needs libtpu: pip install "vdit-jax[tpu]"'
)


def _aot(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=xla_flags())
    return subprocess.run(
        [sys.executable, "-m", "vdit_jax.aot", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "name,desc,chips",
    [
        ("v5p-32", "v5p:2x2x4", 16),
        ("v5p-128", "v5p:4x4x4", 64),
        ("v4-8", "v4:2x2x1", 4),
        ("v5e-16", "v5e:4x4", 16),
        ("v5litepod-16", "v5e:4x4", 16),
        ("v6e-8", "v6e:2x4", 8),
    ],
)
def test_topology_names(name, desc, chips):
    tpu = topology.parse(name)
    assert (tpu.topology_name, tpu.chips) == (desc, chips)
    assert tpu.hbm_gib == {"v4": 32, "v5p": 95, "v5e": 16, "v6e": 32}[tpu.generation]


@pytest.mark.parametrize("bad", ["v5p-31", "v5p-7", "v3-8", "tpu", "v5e-3"])
def test_bad_topology_names(bad):
    with pytest.raises(ValueError, match=r"unknown TPU topology .*allowed: v4-8, .*v5p-32, .*v6e-256"):
        topology.parse(bad)


def test_collectives_counts_loop_iterations_and_async_pairs():
    hlo = """HloModule m, is_scheduled=true

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %ag = f32[8,4]{1,0} all-gather(f32[2,4]{1,0} %x), dimensions={0}
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %y)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %c = s32[] constant(28)
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

%all-reduce-scatter.1 (a: f32[16]) -> f32[4] {
  %ar = f32[16]{0} all-reduce(%a), to_apply=%add
}

ENTRY %main (a: f32[16]) -> f32[4] {
  %w = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body
  %s = (bf16[64]{0}, bf16[64]{0}) all-reduce-start(%a), to_apply=%add
  %d = bf16[64]{0} all-reduce-done(%s)
  %rs = f32[4]{0} fusion(%a), kind=kOutput, calls=%all-reduce-scatter.1
  ROOT %cp = f32[4]{0} collective-permute(%rs), source_target_pairs={{0,1}}
}
"""
    out = dry_run.collectives(hlo)
    assert out["all-gather"] == {"count": 28, "bytes": 28 * 8 * 4 * 4}
    assert out["all-reduce"] == {"count": 1, "bytes": 64 * 2}
    assert out["reduce-scatter"] == {"count": 1, "bytes": 16}
    assert out["collective-permute"] == {"count": 1, "bytes": 16}
    assert "all-to-all" not in out


@pytest.mark.slow
@needs_libtpu
def test_aot_cli_on_v4_8_finds_a_mesh_and_reports_memory_flops_collectives_and_fits():
    """The config's mesh (data 3) does not divide the 4 chips: the CLI says so, searches, and compiles the first
    candidate (all FSDP), which fits."""
    proc = _aot(f"--config={CONFIG}", "--topology=v4-8", "--config.mesh_shape.data=3", "--max_tries=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "v4-8 = v4:2x2x1: 4 chips" in out
    assert "does not work on 4 chips" in out + proc.stderr
    assert "{'data': 1, 'fsdp': 4, 'tensor': 1, 'sequence': 1} (from auto)" in out
    for key in ("argument", "output", "temp", "generated_code", "total"):
        assert f"\n  {key}" in out, key
    assert "verdict         fits: margin" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["fits"] is True and summary["chips"] == 4 and summary["hbm_gib"] == 32
    assert summary["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1, "sequence": 1}
    assert 0 < summary["total_gib"] < summary["hbm_gib"]
    memory = summary["memory_bytes"]
    assert memory["argument"] > 0 and memory["output"] > 0 and memory["generated_code"] > 0
    assert (
        memory["total"]
        == memory["argument"] + memory["output"] - memory["alias"] + memory["temp"] + memory["generated_code"]
    )
    assert summary["flops_per_chip"] > 0
    # FSDP gathers parameters and reduces gradients.
    assert summary["collectives"]["all-gather"]["count"] > 0
    assert summary["collectives"]["all-gather"]["bytes"] > 0
    assert {"all-reduce", "reduce-scatter"} & set(summary["collectives"])


@needs_libtpu
def test_aot_cli_bad_topology_is_one_line_and_exit_2():
    proc = _aot(f"--config={CONFIG}", "--topology=v5p-30")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unknown TPU topology 'v5p-30'; allowed: v4-8, ") and "v5p-32" in last


@pytest.mark.slow
@needs_libtpu
def test_a_model_too_big_for_hbm_does_not_fit():
    config = helpers.tiny_config(scan_layers=True)
    config.model.update(dict(hidden_size=8192, depth=2, num_heads=32))
    tpu = topology.parse("v5e-4")
    result = dry_run.run(config, tpu, {"data": 4})
    assert not result.fits
    assert result.memory["total"] > tpu.hbm_bytes
    assert "RESOURCE_EXHAUSTED" in result.error
    assert "does not fit" in dry_run.format_report(result)
    assert result.flops_per_chip_unrolled > 0  # FLOPs are still counted, from an unrolled CPU lowering


@pytest.mark.slow
@needs_libtpu
def test_text_model_with_masks_compiles_for_tpu():
    """A text model's step (batch with a bool text mask) compiled for a v4-8: the splash kernel masks padded text
    through per-example segment ids on the real TPU compiler."""
    config = helpers.tiny_config()
    config.data.num_classes = config.model.num_classes = 0
    config.model.update(dict(text_dim=16, depth=1))
    config.data.text_len = 6
    batch = dry_run.abstract_batch(config, *_cpu_mesh(config))
    assert batch["text_mask"].dtype == np.bool_ and batch["text_mask"].shape == (8, 6)
    assert dry_run.for_tpu(config).model.attention_impl == "splash"  # what `run` compiles
    result = dry_run.run(config, topology.parse("v4-8"), {"data": 4}, max_tries=1)
    assert result.fits and result.error is None
    assert result.flops_per_chip > 0


def _cpu_mesh(config):
    from vdit_jax.parallel import mesh as mesh_lib
    from vdit_jax.parallel import sharding as sh

    return mesh_lib.make_mesh({"data": 1}, jax.devices()[:1]), sh.rules_from_config(config.logical_axis_rules)
