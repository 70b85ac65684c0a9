"""gs:// against a real GCS JSON-API server on 127.0.0.1 (tests/gcs_emulator.py): etils.epath (gcsfs) and orbax
(tensorstore + epath) round trips, run in a child process that gets the emulator's environment before it imports
anything, and checked again from outside through the server's own API."""

import json
import socket
import subprocess
import sys
import textwrap

import pytest

from tests import gcs_emulator as emu

CHILD = textwrap.dedent(
    """
    import json, sys
    import jax
    import jax.numpy as jnp
    import numpy as np
    import orbax.checkpoint as ocp
    from etils import epath

    out = {}
    run = epath.Path(f"gs://{sys.argv[1]}/run")
    # epath (gcsfs): write, read, list, directory rename, rmtree, and a file left for the parent to read.
    (run / "a" / "sub").mkdir(parents=True, exist_ok=True)
    (run / "a" / "sub" / "f.txt").write_text("hello")
    (run / "a" / "g.txt").write_text("world")
    out["read"] = (run / "a" / "sub" / "f.txt").read_text()
    out["exists"] = [(run / "a" / "g.txt").exists(), (run / "a" / "missing.txt").exists()]
    out["iterdir"] = sorted(p.name for p in (run / "a").iterdir())
    (run / "a").rename(run / "b")
    out["after_rename"] = [(run / "a").exists(), (run / "b" / "sub" / "f.txt").read_text()]
    (run / "b").rmtree()
    out["after_rmtree"] = (run / "b").exists()
    (run / "keep.txt").write_text("kept")

    # orbax: arrays through tensorstore's gcs driver, metadata through epath; two steps, max_to_keep=1.
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "n": jnp.array(7, jnp.int32)}
    options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=True, create=True)
    with ocp.CheckpointManager(run / "checkpoints", options=options, item_names=("state", "config")) as mgr:
        for step in (1, 2):
            state = {"w": tree["w"] * step, "n": tree["n"] + step}
            mgr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), config=ocp.args.JsonSave({"lr": 0.5, "step": step})))
        mgr.wait_until_finished()
        out["all_steps"] = [int(s) for s in mgr.all_steps()]
        out["latest_step"] = int(mgr.latest_step())
    # A fresh manager (a restarted run) finds the checkpoint and restores it onto an abstract target.
    with ocp.CheckpointManager(run / "checkpoints", item_names=("state", "config")) as mgr:
        abstract = {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32), "n": jax.ShapeDtypeStruct((), jnp.int32)}
        restored = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), config=ocp.args.JsonRestore()))
        out["restored"] = {k: np.asarray(v).tolist() for k, v in restored.state.items()}
        out["config"] = dict(restored.config)
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="session")
def gcs():
    with emu.gcs_emulator(in_memory=True) as server:
        yield server


def test_epath_and_orbax_round_trip_on_gcs(gcs, tmp_path):
    # cwd is an empty directory: a gs:// path mistaken for a local one would leave a 'gs:' directory there.
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, gcs.bucket],
        env=gcs.child_env(JAX_PLATFORMS="cpu"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, f"child failed:\n{proc.stderr[-6000:]}\nemulator log:\n{gcs.log_tail()}"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout
    out = json.loads(lines[0][len("RESULT ") :])

    assert out["read"] == "hello"
    assert out["exists"] == [True, False]
    assert out["iterdir"] == ["g.txt", "sub"]
    assert out["after_rename"] == [False, "hello"]
    assert out["after_rmtree"] is False
    assert out["all_steps"] == [2]  # step 1 deleted by max_to_keep=1
    assert out["latest_step"] == 2
    assert out["restored"] == {"w": [[0.0, 2.0, 4.0], [6.0, 8.0, 10.0]], "n": 9}
    assert out["config"] == {"lr": 0.5, "step": 2}
    assert list(tmp_path.iterdir()) == []

    # From outside, through the server's JSON API: everything landed in the emulator's bucket.
    names = gcs.list_objects("run/")
    assert gcs.read_object("run/keep.txt") == b"kept"
    assert not [n for n in names if n.startswith(("run/a/", "run/b/"))], names
    assert not [n for n in names if n.startswith("run/checkpoints/1/")], names
    # orbax on GCS (no atomic rename): a step is complete once its commit_success.txt exists.
    assert "run/checkpoints/2/commit_success.txt" in names
    assert any(n.startswith("run/checkpoints/2/state/") and "/d/" in n for n in names), names  # tensorstore data
    assert json.loads(gcs.read_object("run/checkpoints/2/config/metadata")) == {"lr": 0.5, "step": 2}


def test_emulator_start_retries_a_taken_port_and_reports_its_output(monkeypatch):
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))  # bound, not listening: the emulator's bind fails with EADDRINUSE
    real_free_port = emu._free_port
    ports = iter([taken.getsockname()[1]])
    monkeypatch.setattr(emu, "_free_port", lambda: next(ports, None) or real_free_port())
    try:
        with pytest.raises(emu.EmulatorStartError, match="Address already in use"):
            with emu.gcs_emulator(attempts=1, in_memory=True):
                pass
        ports = iter([taken.getsockname()[1]])
        with emu.gcs_emulator(attempts=2, in_memory=True) as server:
            assert server.port != taken.getsockname()[1]
            assert server.list_objects() == []
    finally:
        taken.close()
    with pytest.raises(OSError):  # stopped: nothing answers on its port any more
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
