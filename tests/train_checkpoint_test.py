"""Checkpointer: round trips, resharding, retention, corruption fallback, preemption."""

import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import chex
import flax
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tests import helpers
from tests.xla_flags import xla_flags
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.parallel import sharding as sh
from vdit_jax.train import checkpoint as ckpt_lib
from vdit_jax.train import state as state_lib
from vdit_jax.train import step as step_lib

AUTO = jax.sharding.AxisType.Auto


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    ema_params: dict
    opt_state: optax.OptState
    rng: jax.Array  # typed key
    raw_rng: jax.Array  # uint32 [2]
    skipped_updates: jax.Array


def _mesh(shape, names, n_devices=None):
    devices = jax.devices()[: n_devices or int(np.prod(shape))]
    return jax.make_mesh(shape, names, axis_types=(AUTO,) * len(shape), devices=devices)


def _host_state(seed=0):
    """A tiny train state after one AdamW update, so every leaf is non-trivial."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    params = {"dense": {"kernel": jax.random.normal(k1, (8, 4)), "bias": jax.random.normal(k2, (4,))}}
    tx = optax.adamw(1e-2)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return TrainState(
        step=jnp.int32(7),
        params=params,
        ema_params=jax.tree.map(lambda x: 0.5 * x, params),
        opt_state=opt_state,
        rng=jax.random.key(seed + 100),
        raw_rng=jax.random.PRNGKey(seed + 200),
        skipped_updates=jnp.int32(2),
    )


def _shardings(state, mesh, spec_2d):
    """`spec_2d` for the [8, 4] kernels (and their optimizer moments), replicated elsewhere."""
    return jax.tree.map(lambda x: NamedSharding(mesh, spec_2d if jnp.ndim(x) == 2 else P()), state)


def _abstract(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(jnp.shape(x), x.dtype, sharding=s), state, shardings)


def _comparable(tree):
    """Host numpy leaves (typed keys as their uint32 data) so trees compare exactly."""

    def leaf(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            return ("key", str(jax.random.key_impl(x)), np.asarray(jax.random.key_data(x)))
        return (str(x.dtype), np.asarray(x))

    return jax.tree.map(leaf, tree)


def _assert_trees_equal(a, b):
    chex.assert_trees_all_equal(_comparable(a), _comparable(b))


def _dataset():
    return grain.MapDataset.source(np.arange(40)).shuffle(seed=3).batch(2)


def _checkpointer(path, **kwargs):
    kwargs.setdefault("save_interval_steps", 1)
    return ckpt_lib.Checkpointer(path, **kwargs)


def _small_state(value):
    return {"w": jnp.full((8,), float(value)), "step": jnp.int32(value)}


def _small_abstract():
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return {
        "w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=sharding),
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding),
    }


def test_round_trip_state_iterator_and_config(tmp_path):
    mesh = _mesh((8,), ("data",))
    host = _host_state()
    shardings = _shardings(host, mesh, P("data", None))
    state = jax.device_put(host, shardings)
    config = ml_collections.ConfigDict({"model": {"width": 32}, "mesh_shape": (-1, 1), "lr": 1e-3})

    it = iter(_dataset())
    for _ in range(3):
        next(it)
    expected = _comparable(host)  # before `state` (which may alias `host`) is deleted below
    ckpt = _checkpointer(tmp_path / "ckpt")
    assert ckpt.save(10, state, data_iterator=it, config=config)
    # The iterator position is captured by save(); advancing now must not leak into it.
    expected_batches = [next(it) for _ in range(3)]
    # async save copies arrays off the devices before returning: the caller may donate them.
    jax.tree.map(lambda x: x.delete(), state)
    ckpt.wait()
    assert ckpt.all_steps() == [10] and ckpt.latest_step() == 10

    fresh_it = iter(_dataset())
    restored_step, restored = _checkpointer(tmp_path / "ckpt").restore(
        _abstract(host, shardings), data_iterator=fresh_it
    )
    assert restored_step == 10
    chex.assert_trees_all_equal(_comparable(restored), expected)
    assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)
    assert restored.raw_rng.dtype == jnp.uint32
    chex.assert_trees_all_equal([next(fresh_it) for _ in range(3)], expected_batches)
    assert ckpt_lib.restore_config(tmp_path / "ckpt") == json.loads(config.to_json())
    ckpt.close()


@pytest.mark.slow
def test_resumed_training_continues_from_the_saved_ema(tmp_path):
    """The real train state: two steps, a checkpoint, two more. Restored onto `state.abstract_state` (as the trainer
    resumes) the EMA is the one saved, bit for bit (also read alone, as sampling reads it), and two more steps give
    the uninterrupted run's state bit for bit: parameters, EMA and optimizer state."""
    config = helpers.tiny_config()
    mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
    rules = sh.rules_from_config(config.logical_axis_rules)
    abstract = state_lib.abstract_state(config, mesh, rules)
    step = step_lib.make_train_step(config, mesh, rules)
    batches = helpers.random_batches(config, 4)
    state = state_lib.create_train_state(config, mesh, rules, jax.random.key(config.seed))
    with _checkpointer(tmp_path, async_save=False) as ckpt, step_lib.logical_context(mesh, rules):
        for i, batch in enumerate(batches):
            if i == 2:
                assert ckpt.save(i, state)
                saved = jax.device_get(state)
            state, _ = step(state, batch)
    uninterrupted = jax.device_get(state)
    # The EMA trails the parameters here, so restoring either into the other's place shows.
    assert not np.array_equal(saved.ema_params["final_proj"]["kernel"], saved.params["final_proj"]["kernel"])

    with _checkpointer(tmp_path) as ckpt:
        start, state = ckpt.restore(abstract)
        _, ema_only = ckpt.restore({"ema_params": abstract.ema_params}, partial=True)
    assert start == 2
    chex.assert_trees_all_equal(jax.device_get(state.ema_params), saved.ema_params)
    chex.assert_trees_all_equal(jax.device_get(ema_only), {"ema_params": saved.ema_params})
    with step_lib.logical_context(mesh, rules):
        for batch in batches[2:]:
            state, _ = step(state, batch)
    chex.assert_trees_all_equal(jax.device_get(state), uninterrupted)


@pytest.mark.parametrize("target", ["2_devices", "4x2_mesh", "1_device"], ids=lambda t: f"onto_{t}")
def test_restore_onto_another_mesh(tmp_path, target):
    host = _host_state(seed=1)
    source_mesh = _mesh((8,), ("data",))
    state = jax.device_put(host, _shardings(host, source_mesh, P("data", None)))
    with _checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state)

    if target == "2_devices":
        shardings = _shardings(host, _mesh((2,), ("data",)), P("data", None))
    elif target == "4x2_mesh":
        shardings = _shardings(host, _mesh((4, 2), ("fsdp", "tensor")), P("fsdp", "tensor"))
    else:
        shardings = _shardings(host, _mesh((1,), ("data",)), P())
    with _checkpointer(tmp_path) as ckpt:
        step, restored = ckpt.restore(_abstract(host, shardings))
    assert step == 3
    _assert_trees_equal(restored, host)
    got = jax.tree.map(lambda x: x.sharding, restored)
    for got_sharding, want in zip(jax.tree.leaves(got), jax.tree.leaves(shardings), strict=True):
        assert got_sharding == want
    n_devices = {"2_devices": 2, "4x2_mesh": 8, "1_device": 1}[target]
    assert len(restored.params["dense"]["kernel"].sharding.device_set) == n_devices


def test_keeps_last_n_and_honours_interval(tmp_path):
    with _checkpointer(tmp_path, max_to_keep=2, save_interval_steps=5) as ckpt:
        saved = [s for s in range(1, 21) if ckpt.save(s, _small_state(s))]
        ckpt.wait()
        # Step 1 is saved as the first checkpoint of the run (orbax's initial-save policy).
        assert saved == [1, 5, 10, 15, 20]
        assert ckpt.all_steps() == [15, 20]
        assert ckpt.save(21, _small_state(21), force=True)
        assert not ckpt.save(21, _small_state(21), force=True)  # already saved: a no-op
        ckpt.wait()
        assert ckpt.all_steps() == [20, 21]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["20", "21"]


# A failed orbax read leaves sibling read coroutines to be garbage-collected with their errors;
# collect them inside the tests that cause them, where the resulting warnings are expected.
_orbax_read_failure = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture
def collect_garbage():
    yield
    gc.collect()


def _damage(step_dir, how):
    data_dir = step_dir / "state" / "d"
    files = sorted(data_dir.iterdir())
    assert files, "expected array data files to damage"
    if how == "delete":
        for f in files:
            f.unlink()
    else:
        for f in files:
            os.truncate(f, f.stat().st_size // 2)
    return [f.name for f in files]


@_orbax_read_failure
@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_corrupt_latest_falls_back_with_warning(collect_garbage, tmp_path, caplog, how):
    with _checkpointer(tmp_path) as ckpt:
        for s in (1, 2, 3):
            ckpt.save(s, _small_state(s))
    _damage(tmp_path / "3", how)
    before = sorted(str(p.relative_to(tmp_path / "3")) for p in (tmp_path / "3").rglob("*"))

    with _checkpointer(tmp_path) as ckpt, caplog.at_level(logging.WARNING):
        step, restored = ckpt.restore(_small_abstract())
        assert step == 2
        np.testing.assert_array_equal(restored["w"], np.full((8,), 2.0))
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("step 3" in m and "unreadable" in m for m in warnings), warnings
        # Nothing deleted: the damaged checkpoint is set aside intact for inspection.
        quarantined = tmp_path / f"3{ckpt_lib.CORRUPT_SUFFIX}"
        assert quarantined.is_dir()
        after = sorted(str(p.relative_to(quarantined)) for p in quarantined.rglob("*"))
        assert after == before
        assert ckpt.all_steps() == [1, 2]
        # ... so the resumed run can save step 3 again.
        assert ckpt.save(3, _small_state(30))
        ckpt.wait()
        assert ckpt.restore(_small_abstract())[1]["w"][0] == 30.0


@_orbax_read_failure
def test_nothing_readable_raises_and_touches_nothing(collect_garbage, tmp_path):
    with _checkpointer(tmp_path) as ckpt:
        for s in (1, 2):
            ckpt.save(s, _small_state(s))
    for s in (1, 2):
        _damage(tmp_path / str(s), "truncate")
    with _checkpointer(tmp_path) as ckpt:
        with pytest.raises(ckpt_lib.CheckpointError, match=r"step 2.*\n.*step 1"):
            ckpt.restore(_small_abstract())
        assert ckpt.all_steps() == [1, 2]
    assert (tmp_path / "1").is_dir() and (tmp_path / "2").is_dir()


@_orbax_read_failure
def test_mismatched_state_raises_without_setting_checkpoints_aside(collect_garbage, tmp_path):
    with _checkpointer(tmp_path) as ckpt:
        for s in (1, 2):
            ckpt.save(s, _small_state(s))
        wrong = dict(_small_abstract(), w=jax.ShapeDtypeStruct((3,), jnp.float32))
        with pytest.raises(ckpt_lib.CheckpointReadError, match="step 2 .*not compatible.*left in place"):
            ckpt.restore(wrong)
        assert ckpt.all_steps() == [1, 2]
    assert not list(tmp_path.glob("*.corrupt*"))


@_orbax_read_failure
def test_permission_error_is_not_corruption(collect_garbage, tmp_path_factory):
    """A read the storage refuses (here: a file only root may read, read as user nobody) stops the restore with one
    clear error and sets nothing aside, unlike missing or garbled files."""
    if not hasattr(os, "seteuid"):
        pytest.skip("needs POSIX effective user ids")
    root = tmp_path_factory.mktemp("perm")
    os.chmod(root, 0o777)
    for parent in root.parents:  # user nobody must reach the directory (pytest's base is 0o700)
        if str(parent) == "/tmp" or parent == parent.parent:
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o755)
    with _checkpointer(root) as ckpt:
        for s in (1, 2):
            ckpt.save(s, _small_state(s))
    for path in (root / "2").rglob("*"):
        os.chmod(path, 0o700 if path.is_dir() else 0o600)  # only the owner (root, or this user) may read
    reader_uid = 65534 if os.geteuid() == 0 else None  # as root, read as nobody; otherwise drop our own read bit
    if reader_uid is None:
        for path in (root / "2" / "state").rglob("*"):
            if path.is_file():
                os.chmod(path, 0)
    import grp  # noqa: F401  (imported lazily by epath's stat(); nobody cannot read root's Python install)
    import pwd  # noqa: F401

    try:
        if reader_uid is not None:
            os.seteuid(reader_uid)
        with _checkpointer(root) as ckpt:
            with pytest.raises(ckpt_lib.CheckpointReadError, match=r"step 2 .*(PERMISSION_DENIED|Permission denied)"):
                ckpt.restore(_small_abstract())
    finally:
        if reader_uid is not None:
            os.seteuid(0)
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["1", "2"]


@pytest.mark.parametrize(
    "error,unreadable",
    [
        (ValueError('NOT_FOUND: Error reading "a/.zarray" in OCDBT database'), True),
        (ValueError("OUT_OF_RANGE: Requested byte range [0, 2298) is not valid for value of size 7"), True),
        (ValueError("DATA_LOSS: checksum mismatch"), True),
        (json.JSONDecodeError("Expecting value", "{", 1), True),
        (FileNotFoundError("no such file"), True),
        (ValueError("PERMISSION_DENIED: Error reading ... Permission denied"), False),
        (ValueError("UNAVAILABLE: HTTP response code: 503"), False),
        (ValueError("DEADLINE_EXCEEDED: timed out"), False),
        (ConnectionResetError("Connection reset by peer"), False),
        (PermissionError("denied"), False),
        (ValueError("Requested shape: (3,) is not compatible with the stored shape: (8,)"), False),
    ],
)
def test_is_unreadable_classifies_errors(error, unreadable):
    assert ckpt_lib.is_unreadable(error) is unreadable
    wrapped = Exception("Encountered error while reading array index")  # orbax wraps tensorstore's error
    wrapped.__cause__ = error
    assert ckpt_lib.is_unreadable(wrapped) is unreadable


def test_interrupted_save_is_never_picked_up(tmp_path):
    with _checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _small_state(1))
    # What an async save killed before its final rename leaves behind (orbax's naming).
    orphan = tmp_path / "5.orbax-checkpoint-tmp-1700000000000000"
    shutil.copytree(tmp_path / "1", orphan)
    with _checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
        step, restored = ckpt.restore(_small_abstract())
        assert step == 1 and restored["step"] == 1
    assert orphan.is_dir()


def test_restore_errors_and_config_lookup(tmp_path):
    with _checkpointer(tmp_path) as ckpt:
        with pytest.raises(FileNotFoundError, match="No checkpoint"):
            ckpt.restore(_small_abstract())
        ckpt.save(1, _small_state(1))
        ckpt.save(2, _small_state(2), config={"lr": 0.5, "name": "tiny"})
        ckpt.wait()
        with pytest.raises(FileNotFoundError, match="available steps: \\[1, 2\\]"):
            ckpt.restore(_small_abstract(), step=9)
        assert ckpt.restore(_small_abstract(), step=1)[1]["step"] == 1
    assert ckpt_lib.restore_config(tmp_path) == {"lr": 0.5, "name": "tiny"}
    with pytest.raises(FileNotFoundError, match="No saved config for step 1"):
        ckpt_lib.restore_config(tmp_path, step=1)


def test_preemption_guard_sets_flag_and_restores_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with ckpt_lib.PreemptionGuard(sigint=True) as guard:
        assert not guard.should_stop
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.should_stop and guard.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is previous
    with ckpt_lib.PreemptionGuard(sigint=True) as guard:
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


_PREEMPTED_TRAINER = textwrap.dedent(
    """
    import sys, time
    import jax.numpy as jnp
    from vdit_jax.train.checkpoint import Checkpointer, PreemptionGuard

    ckpt = Checkpointer(sys.argv[1], save_interval_steps=10**6)
    with PreemptionGuard() as guard:
        step, state = 0, {"w": jnp.zeros((8,))}
        while True:
            step += 1
            state = {"w": state["w"] + 1.0}
            ckpt.save(step, state)
            if step == 2:
                print("READY", flush=True)
            if guard.should_stop:
                ckpt.save(step, state, force=True)
                ckpt.wait()
                ckpt.close()
                print("SAVED", step, flush=True)
                sys.exit(0)
            time.sleep(0.01)
    """
)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(
        [sys.executable, "-c", _PREEMPTED_TRAINER, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=repo,
    )
    try:
        assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    saved_step = int(out.split()[-1])
    assert saved_step >= 2
    with _checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == saved_step
        sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        step, state = ckpt.restore({"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=sharding)})
    assert step == saved_step
    np.testing.assert_array_equal(state["w"], np.full((8,), float(saved_step)))
