"""`python -m vdit_jax.train --config=configs/moving_shapes.py:tiny --workdir=runs/demo [--config.x=y ...]`.

Trains a video DiT, or resumes the run already in --workdir. The logic lives in `vdit_jax.train.loop`.

Several processes (hosts): on a Cloud TPU VM pod or under SLURM (`srun`) start the same command on every host;
elsewhere add `--coordinator_address=HOST0:PORT --num_processes=N --process_id=I` (or the env vars VDIT_COORDINATOR,
VDIT_NUM_PROCESSES, VDIT_PROCESS_ID). See `vdit_jax.parallel.distributed`. Resume with the same number of processes
(each process's data-iterator position is saved separately); the mesh and devices a process may change.
"""

import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from vdit_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:variant]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints/, tb/, metrics.jsonl, samples/.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir",
    None,
    "Local directory where the dataset is (or is built); default $VDIT_DATA_DIR or ~/.cache/vdit_jax/data.",
)
flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0 (default: detected).")
flags.DEFINE_integer("num_processes", None, "Multi-process: how many processes (default: detected).")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index in [0, num_processes).")
flags.DEFINE_integer("initialization_timeout_s", 300, "Multi-process: give up reaching the others after this.")
flags.DEFINE_integer("heartbeat_timeout_s", 60, "Multi-process: a process silent this long stops the others.")
flags.DEFINE_integer("shutdown_timeout_s", 120, "Multi-process: at the end, wait this long for the others.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; see --help")
    cli.setup_logging()
    from vdit_jax.parallel import distributed

    try:
        distributed.initialize(flags.FLAGS)  # before anything touches a JAX device
    except distributed.DistributedError as e:
        cli.fail(str(e))
    from vdit_jax.train import checkpoint, loop

    try:
        with distributed.peer_failure_guard():
            metrics = cli.run_guarded(loop.train, _CONFIG.value, _WORKDIR.value, data_dir=_DATA_DIR.value)
    except distributed.PeerFailure as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # not sys.exit: JAX's exit-time shutdown would wait for the dead process
    except loop.RunStopped as e:
        if e.unexpected:  # a bug, not a way for a run to stop: keep its traceback
            traceback.print_exception(e.__cause__, file=sys.stderr)
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except checkpoint.CheckpointError as e:  # nothing restorable, or a read error: every checkpoint left in place
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    if metrics.get("stopped"):
        logging.info("stopped by %s; run the same command to resume", metrics["stopped"])


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
