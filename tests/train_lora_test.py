"""LoRA fine-tuning through the trainer (`config.lora`): the step differentiates only the adapter (the base is a step
argument, untouched), identity at the start, the same losses on 1 device and on a data x fsdp x tensor mesh with a
scanned DiT, adapter-only checkpoints tied to their base by metadata, resuming, sampling merged (one adapter or
several with scales), and one clear error for every mismatch."""

import os

import flax
import jax
import numpy as np
import pytest

from tests import helpers
from tests import tiny_config as tiny
from tests.conftest import TRAINED_STEPS
from vdit_jax import cli, inference, sample, tasks
from vdit_jax import config as config_lib
from vdit_jax.models import lora
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.parallel import sharding as sh
from vdit_jax.train import finetune, loop
from vdit_jax.train import state as state_lib
from vdit_jax.train import step as step_lib


def _lora_config(**model):
    c = helpers.tiny_config(scan_layers=True, **model)
    c.lora.rank = 2
    c.lora.alpha = 4.0
    c.lora.targets = ("attn", "mlp")
    c.lora.base_workdir = "unused: the base is passed in"
    c.train.learning_rate = 1e-2
    return c


def _steps(config, devices, mesh_shape, base_host, batches):
    """(initial state, final state, metrics, the base after the steps) of LoRA steps on `mesh_shape`."""
    config.mesh_shape.update(mesh_shape)
    mesh = mesh_lib.make_mesh(config.mesh_shape.to_dict(), devices)
    rules = sh.rules_from_config(config.logical_axis_rules)
    abstract = state_lib.abstract_params(config, mesh, rules)
    base = jax.tree.map(lambda a, s: jax.device_put(a, s.sharding), base_host, abstract)
    state = state_lib.create_train_state(config, mesh, rules, jax.random.key(0))
    first = jax.device_get(state)
    step = step_lib.make_train_step(config, mesh, rules, base)
    metrics = []
    with step_lib.logical_context(mesh, rules):
        for batch in batches:
            state, m = step(state, batch)
            metrics.append(jax.device_get(m))
    return first, state, metrics, jax.device_get(base)


def test_lora_step_trains_only_the_adapter_scanned_and_sharded():
    config = _lora_config()
    task = tasks.get(config)
    shapes = task.batch_shapes(config.train.global_batch_size)
    base_host = helpers.randomize(flax.linen.unbox(jax.eval_shape(task.init, jax.random.key(0), shapes)))
    batches = helpers.random_batches(config, 3)
    first, one_state, one, base_after = _steps(config, jax.devices()[:1], {"data": 1}, base_host, batches)

    # The state is the adapter alone: A and B of q, k, v, out and both MLP kernels of the scanned stack.
    cfg = config_lib.lora_config(config)
    assert sorted(lora.pairs(first.params)) == lora.target_paths(cfg, base_host)
    assert len(lora.pairs(first.params)) == 6
    n_adapter = state_lib.count_params(first.params)
    assert 0 < n_adapter < state_lib.count_params(base_host) / 2
    assert state_lib.count_params(first.opt_state) <= 2 * n_adapter + 8  # Adam's moments of the adapter only

    # Step 1 starts from the base exactly (B = 0): its loss is the base model's loss on the same draws.
    rng = jax.random.fold_in(jax.random.wrap_key_data(first.rng), 0)
    prepared = task.prepare_batch(batches[0], rng)
    base_loss, _ = jax.jit(task.loss)(base_host, prepared, rng)
    np.testing.assert_allclose(one[0]["loss"], base_loss, rtol=1e-5)
    assert one[2]["loss"] < one[0]["loss"]

    # The base is untouched; every B moved.
    jax.tree.map(np.testing.assert_array_equal, base_after, base_host)
    moved = {
        path: float(np.abs(np.asarray(pair["b"])).max())
        for path, pair in lora.pairs(jax.device_get(one_state.params)).items()
    }
    assert all(v > 0 for v in moved.values()), moved

    # The same steps on data x fsdp x tensor: the same losses, the adapter split like its kernel.
    config = _lora_config()
    _, state8, eight, _ = _steps(config, jax.devices(), {"data": 2, "fsdp": 2, "tensor": 2}, base_host, batches)
    np.testing.assert_allclose([m["loss"] for m in eight], [m["loss"] for m in one], rtol=2e-4)
    a = lora.pairs(state8.params)["stage0/attn_full/query/kernel"]
    assert a["a"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)  # [layers, embed, rank]
    assert a["b"].sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")  # [layers, rank, heads]


@pytest.fixture(scope="module")
def lora_run(trained_run, moving_shapes_dir, tmp_path_factory):
    """A LoRA run of 3 steps (a checkpoint every 2) on tests/conftest.py's trained run, resumed to 4."""
    workdir = tmp_path_factory.mktemp("lora") / "run"
    config = tiny.get_config("")
    config.lora.update(rank=2, alpha=16.0, targets=("self_attn",), base_workdir=str(trained_run))
    # A high rate, so that 4 steps move the adapter far enough to change the samples (tested).
    config.train.update(num_steps=3, checkpoint_every=2, sample_num=0, learning_rate=0.05, warmup_steps=1)
    loop.train(config, workdir, data_dir=moving_shapes_dir)
    config.train.num_steps = 4
    last = loop.train(config, workdir, data_dir=moving_shapes_dir)
    return workdir, last


@pytest.mark.xdist_group("trained")  # one worker builds the `trained_run` fixture (launch/test.sh: loadgroup)
def test_lora_run_checkpoints_resumes_and_samples_merged(lora_run, trained_run, tmp_path):
    workdir, last = lora_run
    assert last["step"] == 4 and np.isfinite(last["loss"])
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "3", "4"]  # resumed at 3, not started again

    # Adapter-only checkpoints: a fraction of the base's bytes, with metadata tying them to the base's step.
    def size(path):
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

    assert size(workdir / "checkpoints/4/state") < size(trained_run / f"checkpoints/{TRAINED_STEPS}/state") / 4
    adapter = inference.load_adapter(workdir)
    meta = adapter.metadata
    assert meta["base_step"] == TRAINED_STEPS and meta["base_workdir"] == str(trained_run)
    base_config, base, _ = inference.load(trained_run)
    assert sorted(meta["adapter"]["kernels"]) == lora.target_paths(adapter.lora, base)
    assert meta["base_model"]["hidden_size"] == base_config.model.hidden_size

    # Loading the LoRA run gives the base with the EMA adapter merged; scale 0 is the base bit for bit.
    config, merged, step = inference.load(workdir)
    assert step == 4 and config.lora.rank == 2
    want = lora.merge(base, [(adapter.lora, adapter.params, 1.0)])
    jax.tree.map(np.testing.assert_array_equal, merged, want)
    assert any(not np.array_equal(m, b) for m, b in zip(jax.tree.leaves(merged), jax.tree.leaves(base), strict=True))
    jax.tree.map(np.testing.assert_array_equal, inference.apply_adapters(base_config, base, [(adapter, 0.0)]), base)

    # An adapter made for another base is refused, naming the mismatch.
    other = base_config.copy_and_resolve_references()
    other.model.hidden_size = 64
    with pytest.raises(
        ValueError, match=r"made for a base with model.hidden_size=32; this base has model.hidden_size=64"
    ):
        inference.apply_adapters(other, base, [(adapter, 1.0)])

    # The sample CLI: the LoRA run itself, and the base with the adapter stacked twice at scales 0.5 + 0.5.
    args = dict(step=None, prompt="a red square moving right", label=None, num=2, steps=2, sampler=None, eta=None)
    args.update(guidance=1.0, seed=0, batch_size=2)
    own = np.load(sample.run(workdir, out_dir=tmp_path / "own", **args))["videos"]
    lora_spec = f"{workdir}:0.5,{workdir}:0.5"
    out = sample.run(trained_run, out_dir=tmp_path / "stacked", lora=lora_spec, **args)
    stacked = np.load(out)["videos"]
    plain = np.load(sample.run(trained_run, out_dir=tmp_path / "plain", **args))["videos"]
    assert own.shape == (2, 8, 32, 32, 3)
    assert np.abs(own.astype(int) - plain.astype(int)).mean() > 2  # the adapter changes the samples
    assert np.abs(own.astype(int) - stacked.astype(int)).max() <= 1  # 0.5 + 0.5 of one adapter = the adapter
    for bad, match in [
        (f"{workdir}:x", r"--lora entry '.*:x': the scale 'x' is not a number"),
        (str(trained_run), r"--lora: .* is not a LoRA run \(its config.lora.rank is 0\)"),
    ]:
        with pytest.raises(cli.UsageError, match=match):
            sample.run(trained_run, out_dir=tmp_path / "bad", lora=bad, **args)


@pytest.mark.xdist_group("trained")
def test_lora_config_errors_name_the_value(trained_run, tmp_path):
    config = tiny.get_config("")
    config.lora.rank = 2
    with pytest.raises(config_lib.ConfigError, match="config.lora.rank > 0 needs config.lora.base_workdir"):
        config_lib.validate(config, 1)
    config.lora.update(base_workdir=str(trained_run), targets=("attn(",))
    with pytest.raises(config_lib.ConfigError, match=r"config.lora: LoRA target 'attn\(' is not a preset"):
        config_lib.validate(config, 1)
    config.lora.targets = ("attn",)
    mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
    rules = sh.rules_from_config(config.logical_axis_rules)
    config.model.depth = 3
    with pytest.raises(config_lib.ConfigError, match=r"config.model.depth=3, but the base run .* has model.depth=2"):
        finetune.base_params(config, mesh, rules)
    config.model.depth = 2
    config.lora.base_workdir = str(tmp_path / "nowhere")
    with pytest.raises(config_lib.ConfigError, match=r"config.lora.base_workdir=.*nowhere.*no config.json"):
        finetune.base_params(config, mesh, rules)
