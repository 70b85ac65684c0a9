"""A pod dry run: the real sharded train step compiled ahead of time for a TPU slice, on any machine.

    from vdit_jax.parallel import topology
    from vdit_jax.train import dry_run
    result = dry_run.run(config, topology.parse("v5p-32"))   # mesh: the config's, else the first that fits
    print(dry_run.format_report(result))

`compile_train_step` lowers `vdit_jax.train.step.make_train_step` (the function training runs) with the state's
shardings from `vdit_jax.train.state` onto a mesh of libtpu's compile-only devices, then reads per-chip memory
(`memory_analysis`), XLA's FLOPs (`cost_analysis`) and the collectives of the compiled HLO. On TPU the compiler
itself refuses a program larger than HBM (RESOURCE_EXHAUSTED); that is reported as "does not fit" with the
compiler's own numbers.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import itertools
import re
import time
from collections.abc import Callable, Mapping

import jax
import ml_collections
import numpy as np

from vdit_jax import config as config_lib
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.parallel import sharding as sh
from vdit_jax.parallel import topology
from vdit_jax.train import state as state_lib
from vdit_jax.train import step as step_lib

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
MEMORY_KEYS = ("argument", "output", "alias", "temp", "generated_code")


@dataclasses.dataclass
class Result:
    """What one compile of the train step on one mesh says; sizes are bytes per chip."""

    tpu: topology.TpuSlice
    hosts: int
    mesh: dict[str, int]
    mesh_source: str  # "config" / "flag" / "auto"
    fits: bool
    memory: dict[str, int]  # argument, output, alias, temp, generated_code, total (= arg + out - alias + temp + code)
    flops_per_chip: float | None = None  # XLA cost_analysis of the compiled, partitioned step
    flops_per_chip_unrolled: float | None = None  # scanned models: the same step with layers unrolled (see run)
    collectives: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # op -> count, bytes per step
    compile_s: float = 0.0
    error: str | None = None  # the compiler's message when it refused the program (out of HBM)
    tried: list[tuple[dict[str, int], str]] = dataclasses.field(default_factory=list)  # the auto search's log
    attention: str = ""  # the attention implementation compiled (and the sequence-parallel mode, if used)

    @property
    def margin_bytes(self) -> int:
        return self.tpu.hbm_bytes - self.memory.get("total", 0)

    def summary(self) -> dict:
        """The one-line JSON summary."""
        gib = lambda b: round(b / topology.GIB, 3)
        return {
            "topology": self.tpu.name,
            "topology_desc": self.tpu.topology_name,
            "chips": self.tpu.chips,
            "hosts": self.hosts,
            "mesh": self.mesh,
            "mesh_source": self.mesh_source,
            "attention": self.attention,
            "fits": self.fits,
            "hbm_gib": gib(self.tpu.hbm_bytes),
            "total_gib": gib(self.memory["total"]) if "total" in self.memory else None,
            "margin_gib": gib(self.margin_bytes) if "total" in self.memory else None,
            "memory_bytes": self.memory,  # per chip
            "flops_per_chip": self.flops_per_chip,
            "flops_per_chip_unrolled": self.flops_per_chip_unrolled,
            "collectives": self.collectives,
            "compile_s": round(self.compile_s, 1),
            "error": self.error,
        }


# ---------------------------------------------------------------- compiling the real step


def abstract_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules) -> dict:
    """ShapeDtypeStructs of one global batch with the shardings `make_train_step` expects."""
    shardings = step_lib.batch_shardings(config, mesh, rules)
    return {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k])
        for k, v in step_lib.batch_shapes(config).items()
    }


def lower_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> jax.stages.Lowered:
    """The jitted, sharded `train_step` of training, lowered for abstract state and batch on `mesh`."""
    rules = sh.rules_from_config(config.logical_axis_rules)
    state = state_lib.abstract_state(config, mesh, rules)
    batch = abstract_batch(config, mesh, rules)
    step = step_lib.make_train_step(config, mesh, rules)  # outside the mesh context: it builds constant tables
    with step_lib.logical_context(mesh, rules):
        return step.lower(state, batch)


def with_mesh(config: ml_collections.ConfigDict, mesh_shape: Mapping[str, int]) -> ml_collections.ConfigDict:
    c = copy.deepcopy(config)
    c.mesh_shape = ml_collections.ConfigDict(dict(mesh_shape))
    return c


def for_tpu(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config as a TPU runs it: `attention_impl=auto` means the splash kernel there (this process's own
    backend is the CPU, so `auto` cannot be resolved from it)."""
    c = copy.deepcopy(config)
    if c.model.attention_impl == "auto":
        c.model.attention_impl = "splash"
    return c


def unrolled_flops(config: ml_collections.ConfigDict) -> float | None:
    """XLA's FLOPs of the whole step with scanned layers unrolled, from an unpartitioned CPU lowering.

    XLA's cost analysis counts a while loop's body once, so a scanned model's compiled FLOPs miss (depth - 1)
    layers; lowering (no compile) the same step unrolled counts every layer, remat recomputation included.
    """
    c = copy.deepcopy(config)
    c.model.scan_layers = False
    c.model.attention_impl = "xla"  # kernels are custom calls whose FLOPs XLA does not count
    c.mesh_shape = ml_collections.ConfigDict({a: 1 for a in sh.MESH_AXES})
    cpu = jax.devices("cpu")[:1]
    mesh = mesh_lib.make_mesh(c.mesh_shape.to_dict(), cpu)
    rules = sh.rules_from_config(c.logical_axis_rules)
    plain = lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype)
    state = jax.tree.map(plain, state_lib.abstract_state(c, mesh, rules))
    batch = jax.tree.map(plain, abstract_batch(c, mesh, rules))
    step = step_lib.make_train_step(c, mesh, rules)
    with step_lib.logical_context(mesh, rules):
        cost = step.lower(state, batch).cost_analysis()
    return float(cost["flops"]) if cost and "flops" in cost else None


def memory_breakdown(compiled: jax.stages.Compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in MEMORY_KEYS}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    return out


# ---------------------------------------------------------------- collectives in the compiled HLO

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2}
_DTYPE_BYTES.update({"s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16})
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s")
_CALLEES = re.compile(r"(?:calls|body|condition|to_apply)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")


def _type_bytes(type_text: str) -> int:
    total = 0.0
    for dtype, dims in _ARRAY.findall(type_text):
        n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        total += n * _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 4)
    return int(total)


def _trip_count(while_rest: str, comps) -> int:
    """A while loop's trip count: XLA's known_trip_count, else the bound of its `i < N` condition (scan's form)."""
    known = _TRIP.search(while_rest)
    if known:
        return int(known.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", while_rest)
    lines = comps.get(cond.group(1), []) if cond else []
    constants = [re.match(r"(-?\d+)\)", rest) for type_text, opcode, rest in lines if opcode == "constant"]
    compares = [rest for _, opcode, rest in lines if opcode == "compare" and "direction=LT" in rest]
    bounds = [int(c.group(1)) for c in constants if c]
    return bounds[0] if compares and len(bounds) == 1 and bounds[0] > 0 else 1


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """Collective ops of a compiled (scheduled) HLO module: executions per step and bytes of their results.

    Ops inside a while loop (scanned layers, gradient accumulation) count once per iteration, when the trip
    count is known or the loop is scan's `i < N` form. Async pairs count once (at `-done`); TPU's reduce-scatter
    is a fusion calling an `all-reduce-scatter` computation, counted as one reduce-scatter.
    """
    comps: dict[str, list[tuple[str, str, str]]] = collections.defaultdict(list)  # name -> [(type, opcode, rest)]
    entry, current = None, None
    for line in hlo_text.splitlines():
        if not line.startswith((" ", "\t")) and line.rstrip().endswith("{"):
            m = _HEADER.match(line)
            current = m.group(1) if m else None
            if line.startswith("ENTRY"):
                entry = current
            continue
        m = _INSTR.match(line)
        if m and current:
            comps[current].append(m.groups())
    if entry is None:
        return {}

    executions: dict[str, int] = collections.Counter()

    def visit(name: str, times: int, depth: int = 0):
        if depth > 64 or name not in comps:
            return
        executions[name] += times
        for _, opcode, rest in comps[name]:
            callees = _CALLEES.findall(rest)
            for branch in _BRANCHES.findall(rest):
                callees += [c.strip().lstrip("%") for c in branch.split(",")]
            trip = _trip_count(rest, comps) if opcode == "while" else 1
            for callee in callees:
                visit(callee, times * (trip if f"body=%{callee}" in rest else 1), depth + 1)

    visit(entry, 1)
    out = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
    for name, times in executions.items():
        if name.startswith("all-reduce-scatter"):
            continue  # the body of a TPU reduce-scatter fusion: counted at the fusion
        for type_text, opcode, rest in comps[name]:
            op = opcode.removesuffix("-done")
            if opcode == "fusion" and "calls=%all-reduce-scatter" in rest:
                op = "reduce-scatter"
            if op in out and not opcode.endswith("-start"):
                out[op]["count"] += times
                out[op]["bytes"] += times * _type_bytes(type_text)
    return {op: v for op, v in out.items() if v["count"]}


# ---------------------------------------------------------------- one mesh, and the search


def compile_on_mesh(
    config: ml_collections.ConfigDict, tpu: topology.TpuSlice, devices, mesh_shape: Mapping[str, int], source: str
) -> Result:
    """Compiles the train step for `mesh_shape` over `devices`; an out-of-HBM refusal is a result, not an error."""
    config = for_tpu(with_mesh(config, mesh_shape))
    hosts = topology.num_hosts(devices)
    config_lib.validate(config, len(devices), hosts)
    mesh = mesh_lib.make_mesh(config.mesh_shape.to_dict(), devices)
    shape = {a: int(s) for a, s in mesh.shape.items()}
    attention = config.model.attention_impl
    if shape[sh.SEQUENCE] > 1:
        attention += f", sequence parallel: {config.model.sequence_parallel}"
    t0 = time.perf_counter()
    try:
        compiled = lower_train_step(config, mesh).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return Result(
            tpu,
            hosts,
            shape,
            source,
            False,
            _oom_memory(str(e)),
            compile_s=time.perf_counter() - t0,
            error=_short(e),
            attention=attention,
        )
    elapsed = time.perf_counter() - t0
    memory = memory_breakdown(compiled)
    cost = compiled.cost_analysis()
    flops = float(cost["flops"]) if cost and "flops" in cost else None
    return Result(
        tpu,
        hosts,
        shape,
        source,
        memory["total"] <= tpu.hbm_bytes,
        memory,
        flops_per_chip=flops,
        collectives=collectives(compiled.as_text()),
        compile_s=elapsed,
        attention=attention,
    )


def _oom_memory(message: str) -> dict[str, int]:
    """What the compiler says the program needs ('Used X of Y hbm', or 'HLO temporaries (X)': a lower bound)."""
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    for pattern in (r"Used ([\d.]+)([KMGT]) of [\d.]+[KMGT] hbm", r"HLO temporaries \(([\d.]+)([KMGT])\)"):
        m = re.search(pattern, message)
        if m:
            return {"total": int(float(m.group(1)) * scale[m.group(2)])}
    return {}


def _short(e: Exception, limit: int = 600) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    keep = [line for line in lines if "hbm" in line.lower() or "RESOURCE_EXHAUSTED" in line] or lines[:1]
    text = " ".join(keep)
    return text if len(text) <= limit else text[:limit] + "..."


def mesh_candidates(config: ml_collections.ConfigDict, num_devices: int, hosts: int = 1) -> list[dict[str, int]]:
    """Valid data x fsdp x sequence factorisations of the devices (tensor as the config has it, else 1), in the
    order `run` tries them: the least sequence parallelism first (its collectives sit inside attention), then the
    most FSDP (it shards parameters and optimiser state, the largest fixed cost), then data."""
    tensor = int(config.mesh_shape.get(sh.TENSOR, 1))
    tensor = tensor if tensor > 0 and num_devices % tensor == 0 else 1
    rest = num_devices // tensor
    divisors = [d for d in range(1, rest + 1) if rest % d == 0]
    out = []
    for data, fsdp in itertools.product(divisors, divisors):
        if rest % (data * fsdp):
            continue
        shape = {sh.DATA: data, sh.FSDP: fsdp, sh.TENSOR: tensor, sh.SEQUENCE: rest // (data * fsdp)}
        try:
            config_lib.validate(with_mesh(config, shape), num_devices, hosts)
        except config_lib.ConfigError:
            continue
        out.append(shape)
    return sorted(out, key=lambda s: (s[sh.SEQUENCE], -s[sh.FSDP], -s[sh.DATA]))


def parse_mesh(text: str) -> dict[str, int]:
    """'data=2,fsdp=8' -> {'data': 2, 'fsdp': 8}; raises ValueError naming the axes."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in sh.MESH_AXES or not value.lstrip("-").isdigit():
            raise ValueError(f"--mesh entry {part!r} must be AXIS=SIZE with AXIS in {list(sh.MESH_AXES)}")
        out[name] = int(value)
    return out


def run(
    config: ml_collections.ConfigDict,
    tpu: topology.TpuSlice,
    mesh: str | Mapping[str, int] = "",
    *,
    max_tries: int = 8,
    flops_unrolled: bool = True,
    log: Callable[[str], None] = lambda s: None,
) -> Result:
    """Compiles the train step of `config` for the slice `tpu`.

    mesh: '' = the config's mesh if it is valid for the chip count and fits, else the auto search; 'config' = the
      config's mesh only; 'auto' = the search only (`mesh_candidates` order, first that fits, at most `max_tries`
      compiles); a mapping = that mesh.
    flops_unrolled: for a scanned model, also count the FLOPs of every layer (see `unrolled_flops`).
    """
    # Every value but the mesh first (on one device any mesh is valid), so a bad one is named, not taken for a
    # config that no mesh of the slice suits.
    config_lib.validate(with_mesh(config, {}), num_devices=1)
    devices = topology.abstract_devices(tpu)
    hosts = topology.num_hosts(devices)
    n = len(devices)
    log(f"{tpu.name}: {tpu.topology_name}, {n} chips on {hosts} host(s), {tpu.hbm_gib:.0f} GiB HBM a chip")
    tried: list[tuple[dict[str, int], str]] = []
    result = None
    if isinstance(mesh, Mapping) or mesh in ("", "config"):
        explicit = isinstance(mesh, Mapping)
        shape = dict(mesh) if explicit else config.mesh_shape.to_dict()
        source = "flag" if explicit else "config"
        try:
            mesh_lib.resolve_mesh_shape(shape, n)
            config_lib.validate(with_mesh(config, shape), n, hosts)
        except (ValueError, config_lib.ConfigError) as e:
            if mesh != "":
                raise config_lib.ConfigError(f"mesh {shape} on {tpu.name} ({n} chips): {e}") from None
            log(f"the config's mesh {shape} does not work on {n} chips ({e}); searching")
        else:
            log(f"compiling on the {source} mesh {shape} ...")
            result = compile_on_mesh(config, tpu, devices, shape, source)
            tried.append((result.mesh, _verdict(result)))
            log(f"  {result.mesh}: {_verdict(result)} ({result.compile_s:.0f} s)")
            if not result.fits and mesh == "":
                log("the config's mesh does not fit; searching")
    if result is None or (not result.fits and mesh in ("", "auto")):
        candidates = [c for c in mesh_candidates(config, n, hosts) if c not in [t for t, _ in tried]]
        if not candidates and result is None:
            raise config_lib.ConfigError(
                f"no data x fsdp x sequence mesh of {n} chips suits this config (global batch "
                f"{config.train.global_batch_size}, {hosts} hosts)"
            )
        log(f"auto mesh: {len(candidates)} candidates, trying at most {max_tries}")
        for shape in candidates[:max_tries]:
            attempt = compile_on_mesh(config, tpu, devices, shape, "auto")
            tried.append((attempt.mesh, _verdict(attempt)))
            log(f"  {attempt.mesh}: {_verdict(attempt)} ({attempt.compile_s:.0f} s)")
            if result is None or attempt.fits or _total(attempt) < _total(result):
                result = attempt
            if attempt.fits:
                break
    result.tried = tried
    if flops_unrolled and config.model.scan_layers and result.memory:
        log("counting FLOPs with the layers unrolled ...")
        flops = unrolled_flops(with_mesh(config, result.mesh))
        result.flops_per_chip_unrolled = flops / n if flops else None
    return result


def _total(r: Result) -> float:
    return r.memory.get("total", float("inf"))


def _verdict(r: Result) -> str:
    if r.error:
        need = f": needs at least {r.memory['total'] / topology.GIB:.2f} GiB" if "total" in r.memory else ""
        return f"does not fit (the compiler refused{need})"
    word = "fits" if r.fits else "does not fit"
    return f"{word}: {r.memory['total'] / topology.GIB:.2f} of {r.tpu.hbm_gib:.0f} GiB"


# ---------------------------------------------------------------- the report


def _fmt_bytes(b: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{int(b)} B"


def format_report(r: Result) -> str:
    lines = [
        f"topology        {r.tpu.name} = {r.tpu.topology_name}: {r.tpu.chips} chips, {r.hosts} host(s), "
        f"{r.tpu.hbm_gib:.0f} GiB HBM a chip",
        f"mesh            {r.mesh} (from {r.mesh_source})",
        f"attention       {r.attention}",
    ]
    if len(r.tried) > 1 or r.mesh_source == "auto":
        lines += [f"  tried         {shape}: {verdict}" for shape, verdict in r.tried]
    lines.append(f"compile         {r.compile_s:.1f} s")
    lines.append("memory per chip")
    for key in MEMORY_KEYS:
        if key in r.memory:
            lines.append(f"  {key:<14}{_fmt_bytes(r.memory[key]):>12}")
    if "total" in r.memory:
        at_least = " (at least: the compiler stopped)" if r.error else ""
        lines.append(
            f"  {'total':<14}{_fmt_bytes(r.memory['total']):>12}  of {_fmt_bytes(r.tpu.hbm_bytes)} HBM{at_least}"
        )
    if r.error:
        lines.append(f"compiler        {r.error}")
    if r.flops_per_chip is not None:
        note = " (scanned layers counted once)" if r.flops_per_chip_unrolled else ""
        lines.append(
            f"XLA FLOPs/step  {r.flops_per_chip:.4g} per chip{note}, {r.flops_per_chip * r.tpu.chips:.4g} total"
        )
    if r.flops_per_chip_unrolled:
        f = r.flops_per_chip_unrolled
        if r.flops_per_chip is None:
            lines.append("XLA FLOPs/step  (no compiled program)")
        lines.append(f"  unrolled      {f:.4g} per chip, {f * r.tpu.chips:.4g} total (every layer, remat included)")
    if r.collectives:
        lines.append("collectives per step (executions, result bytes per chip)")
        for op, v in r.collectives.items():
            lines.append(f"  {op:<20}{v['count']:>8}  {_fmt_bytes(v['bytes']):>12}")
    elif r.memory and not r.error:
        lines.append("collectives     none")
    if "total" in r.memory:
        word = "fits" if r.fits else "does not fit"
        lines.append(
            f"verdict         {word}: margin {_fmt_bytes(r.margin_bytes)} ({r.margin_bytes / r.tpu.hbm_bytes:+.1%})"
        )
    else:
        lines.append("verdict         does not fit")
    return "\n".join(lines)
