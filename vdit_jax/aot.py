"""`python -m vdit_jax.aot --config=configs/bench.py:xl_long --topology=v5p-32 [--mesh=auto]`: a pod dry run.

Compiles the real sharded train step ahead of time for a Cloud TPU slice on this machine (no TPU needed; needs
libtpu: `pip install "vdit-jax[tpu]"`) and prints per-chip memory against the chip's HBM, XLA's FLOPs per step,
the collectives of the compiled program, a fits / does-not-fit verdict with the margin, and a last line of JSON.
Exit code 0: fits; 1: does not fit; 2: bad input. The logic lives in `vdit_jax.train.dry_run`.
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

from vdit_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (path[:variant]).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "Cloud TPU slice, e.g. v5p-32, v4-8, v5e-16, v6e-64.")
_MESH = flags.DEFINE_string(
    "mesh",
    "",
    "'' = the config's mesh, searching if it is invalid or does not fit; 'config' = only the config's; 'auto' = "
    "search data x fsdp x sequence meshes, first that fits; or explicit, e.g. 'data=1,fsdp=8,sequence=2'.",
)
_MAX_TRIES = flags.DEFINE_integer("max_tries", 8, "At most this many compiles in the mesh search.")
_UNROLLED = flags.DEFINE_bool("unrolled_flops", True, "Scanned models: also count FLOPs with the layers unrolled.")
flags.mark_flags_as_required(["config", "topology"])


def _run():
    from vdit_jax.parallel import topology
    from vdit_jax.train import dry_run

    try:
        tpu = topology.parse(_TOPOLOGY.value)
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    mesh = _MESH.value
    if mesh not in ("", "config", "auto"):
        try:
            mesh = dry_run.parse_mesh(mesh)
        except ValueError as e:
            raise cli.UsageError(str(e)) from None
    try:
        result = dry_run.run(
            _CONFIG.value,
            tpu,
            mesh,
            max_tries=_MAX_TRIES.value,
            flops_unrolled=_UNROLLED.value,
            log=lambda s: print(s, flush=True),
        )
    except RuntimeError as e:
        if "libtpu" in str(e):
            raise cli.UsageError(str(e)) from None
        raise
    print(dry_run.format_report(result))
    print(json.dumps(result.summary()))
    return result


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; see --help")
    result = cli.run_guarded(_run)
    raise SystemExit(0 if result.fits else 1)


if __name__ == "__main__":
    # Abstract TPU devices only: never grab a real accelerator (a training job may own it).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    app.run(main, flags_parser=cli.parse_flags)
