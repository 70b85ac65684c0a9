"""LoRA: low-rank adapters on the DiT's dense kernels (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models"), as a reparameterisation of the parameters, so no model code path changes.

A targeted kernel W [..., in, out] (the leading axes of a scanned stack, [layers, in, out], included) becomes

    W' = W + (alpha / rank) * A @ B,        A [..., in, rank], B [..., rank, out]

with A drawn as PEFT draws it (Kaiming-uniform, bound 1 / sqrt(in)) and B zero, so a fresh adapter changes nothing.
`merge` computes W' (inside the jitted step while training: the base is a constant, only A and B get gradients;
once for inference); x @ W' equals x @ W + (alpha / rank) * (x @ A) @ B, the activation-space form, to float
tolerance. Several adapters merge with one scale each: W + sum_i scale_i * (alpha_i / rank_i) * A_i @ B_i.
Computing W' costs in x rank x out multiply-adds per kernel, small against the token matmuls; it materialises W'
(and its gradient) for the targeted kernels, as full fine-tuning does, but keeps no optimizer state for them
(`optimizer`: the base gets `optax.set_to_zero`, which has no state).

Targets are regular expressions matched (`re.fullmatch`) against "/"-joined parameter paths ending in `kernel` (or
`embedding`: a table [num, dim] adapts as a kernel [in, out] does, as PEFT's embedding LoRA), or the names of
`PRESETS`:

    cfg = LoraConfig(rank=8, alpha=16.0, targets=("attn", "mlp"))
    adapter = init(cfg, params, jax.random.key(0))    # the base's tree, cut to the targeted kernels, each {"a", "b"}
    merged = merge(params, [(cfg, adapter, 1.0)])      # the base's tree, targeted kernels replaced

An adapter is a nested dict shaped like the parameters, with only the targeted modules, and each targeted `kernel`
replaced by {"a": A, "b": B} (`pairs(adapter)` gives them by "/"-joined kernel path). With boxed (logically
partitioned) parameters, `init` boxes A with the kernel's axis names but its last (rank: None) and B with its
last but one, so an adapter is sharded like its kernel by the same logical rules.

An adapter is tied to its base: `describe(cfg, params)` records the targeted paths and kernel shapes, and
`check_compatible` refuses another base, rank or set of modules with one error naming the mismatch.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

# Named sets of kernels (paths as `flax.traverse_util.flatten_dict(params, sep="/")` gives them). Embedding tables
# [num, dim] adapt as kernels do (PEFT's LoRA for embeddings): A [num, r] gives every row its own update.
PRESETS: dict[str, str] = {
    # every attention projection: the DiT's self-attention, cross-attention, MM-DiT's streams, the text encoder's
    "attn": r".*/(query|key|value|out)/kernel",
    "self_attn": r".*/attn_[a-z]+/(query|key|value|out)/kernel",  # the video tokens' self-attention
    "cross_attn": r".*/cross_attn/(query|key|value|out)/kernel",  # text_mode "cross"
    "joint_attn": r".*/(video|text|stream)/(query|key|value|out)/kernel",  # text_mode "joint" (MM-DiT)
    "mlp": r".*/mlp/fc[12]/kernel",  # every block's MLP
    "adaln": r"(.*/)?(adaLN|final_adaLN)/kernel",  # the adaLN-Zero modulations (the conditioning's way in)
    "label_emb": r"y_embed/.*embedding",  # the class-label embedding tables (a new class or attribute value)
}
ADAPTABLE = ("kernel", "embedding")  # the parameter names LoRA adapts


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r >= 1, alpha > 0 (the update is scaled by alpha / r), targets: `PRESETS` names or regexes.

    Raises ValueError for a rank or alpha out of range, no targets, or a regex that does not compile.
    """

    rank: int
    alpha: float
    targets: tuple[str, ...] = ("attn",)

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an int >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if isinstance(self.targets, str) or not self.targets:
            raise ValueError(
                f"LoRA targets must be a non-empty tuple of {sorted(PRESETS)} or regexes, got {self.targets!r}"
            )
        for target in self.targets:
            try:
                re.compile(PRESETS.get(target, target))
            except re.error as e:
                raise ValueError(f"LoRA target {target!r} is not a preset {sorted(PRESETS)} nor a regex: {e}") from None

    @property
    def scale(self) -> float:
        """alpha / rank."""
        return self.alpha / self.rank

    def patterns(self) -> tuple[re.Pattern, ...]:
        return tuple(re.compile(PRESETS.get(t, t)) for t in self.targets)


def _flat(params: Mapping) -> dict[str, Any]:
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")


def _shape(leaf) -> tuple[int, ...]:
    """The shape of an array, a `jax.ShapeDtypeStruct` or a boxed (`nn.Partitioned`) one."""
    return tuple(nn.unbox(leaf).shape)


def pairs(adapter: Mapping) -> dict[str, dict[str, Any]]:
    """{kernel path: {"a": A, "b": B}} of an adapter (the "/"-joined path of the kernel each pair adapts)."""
    out: dict[str, dict[str, Any]] = {}
    for path, leaf in _flat(adapter).items():
        kernel, _, which = path.rpartition("/")
        if which not in ("a", "b") or not kernel.endswith(ADAPTABLE):
            raise ValueError(f"{path!r} is not an adapter entry (expected '.../kernel/a' or '.../kernel/b')")
        out.setdefault(kernel, {})[which] = leaf
    for kernel, pair in out.items():
        if len(pair) != 2:
            raise ValueError(f"the adapter's {kernel!r} lacks its {'b' if 'a' in pair else 'a'} matrix")
    return out


def _nest(flat_pairs: Mapping[str, Mapping[str, Any]]) -> dict:
    return flax.traverse_util.unflatten_dict(
        {f"{k}/{which}": v for k, pair in flat_pairs.items() for which, v in pair.items()}, sep="/"
    )


def target_paths(cfg: LoraConfig, params: Mapping) -> list[str]:
    """The "/"-joined paths of the kernels of `params` (unboxed, [..., in, out]) that `cfg` targets, sorted.

    Raises ValueError when no kernel matches, naming the targets and some kernels there are.
    """
    kernels = {p: v for p, v in _flat(params).items() if p.endswith(ADAPTABLE) and len(_shape(v)) >= 2}
    patterns = cfg.patterns()
    paths = sorted(p for p in kernels if any(pat.fullmatch(p) for pat in patterns))
    if not paths:
        some = ", ".join(sorted(kernels)[:8])
        raise ValueError(f"LoRA targets {cfg.targets} match no kernel of the model; its kernels include: {some}")
    return paths


def init(cfg: LoraConfig, params: Mapping, rng: jax.Array) -> dict:
    """A fresh adapter for the kernels `cfg` targets (the module docstring's layout): A [..., in, r] and B
    [..., r, out] in each kernel's dtype; A Kaiming-uniform (PEFT's default: bound 1 / sqrt(in)), B zero, so it
    starts as the identity. `params` may be boxed (then so is the adapter) or abstract (`jax.eval_shape`)."""
    flat = _flat(params)
    out = {}
    for i, path in enumerate(target_paths(cfg, params)):
        w = nn.unbox(flat[path])
        *lead, fan_in, fan_out = w.shape
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(rng, i), (*lead, fan_in, cfg.rank), w.dtype, -bound, bound)
        b = jnp.zeros((*lead, cfg.rank, fan_out), w.dtype)
        if isinstance(flat[path], nn.Partitioned):
            names = flat[path].names
            a = flat[path].replace_boxed(a).replace(names=(*names[:-1], None))
            b = flat[path].replace_boxed(b).replace(names=(*names[:-2], None, names[-1]))
        out[path] = {"a": a, "b": b}
    return _nest(out)


def delta(cfg: LoraConfig, pair: Mapping[str, jax.Array]) -> jax.Array:
    """(alpha / r) * A @ B: [..., in, out] (batched over a scanned stack's leading axes)."""
    return cfg.scale * jnp.matmul(pair["a"], pair["b"])


def merge(params: Mapping, adapters: Sequence[tuple[LoraConfig, Mapping, float]]) -> Any:
    """`params` with every targeted kernel W replaced by W + sum of scale * (alpha / r) * A @ B over `adapters`
    ((config, adapter, scale) triples; the kernels' dtype kept). Pure: jit it, or call it inside a jitted loss so
    that only the adapters are differentiated. Raises ValueError for an adapter path or shape the base lacks."""
    flat = _flat(params)
    for cfg, adapter, scale in adapters:
        for path, pair in pairs(adapter).items():
            if path not in flat:
                raise ValueError(f"the adapter targets {path!r}, which this model does not have")
            w = flat[path]
            want_a, want_b = (*w.shape[:-1], cfg.rank), (*w.shape[:-2], cfg.rank, w.shape[-1])
            if tuple(pair["a"].shape) != want_a or tuple(pair["b"].shape) != want_b:
                raise ValueError(
                    f"the adapter's {path!r} has A {tuple(pair['a'].shape)} and B {tuple(pair['b'].shape)}; this "
                    f"model's kernel {tuple(w.shape)} at rank {cfg.rank} needs A {want_a} and B {want_b}"
                )
            flat[path] = (w + scale * delta(cfg, pair).astype(jnp.float32)).astype(w.dtype)
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def describe(cfg: LoraConfig, params: Mapping) -> dict[str, Any]:
    """JSON-ready metadata tying an adapter to its base: rank, alpha, targets and each targeted kernel's shape."""
    flat = _flat(params)
    return {
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "targets": list(cfg.targets),
        "kernels": {p: list(_shape(flat[p])) for p in target_paths(cfg, params)},
    }


def check_compatible(meta: Mapping[str, Any], cfg: LoraConfig, params: Mapping) -> None:
    """Raises ValueError naming the first mismatch between an adapter's metadata (`describe` of the base it was
    made for) and `cfg` + `params`: rank, alpha, targets, a kernel the base lacks or has of another shape, or
    kernels targeted here that the adapter does not cover. Never a partial load."""
    for key in ("rank", "alpha"):
        if meta[key] != getattr(cfg, key):
            raise ValueError(f"the adapter was made with {key} {meta[key]}, not {getattr(cfg, key)}")
    if list(meta["targets"]) != list(cfg.targets):
        raise ValueError(f"the adapter targets {list(meta['targets'])}, not {list(cfg.targets)}")
    here = describe(cfg, params)["kernels"]
    for path, shape in meta["kernels"].items():
        if path not in here:
            raise ValueError(f"the adapter was made for a base with the kernel {path!r}; this base has none there")
        if list(here[path]) != list(shape):
            raise ValueError(
                f"the adapter was made for a base whose {path!r} is {tuple(shape)}; this base's is {tuple(here[path])}"
            )
    missing = sorted(set(here) - set(meta["kernels"]))
    if missing:
        raise ValueError(
            f"the adapter covers {len(meta['kernels'])} kernels but this base has {len(here)} targeted, "
            f"e.g. {missing[0]!r} is not in it"
        )


def optimizer(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` for a tree {"base": ..., "lora": ...}: the adapters get `tx`, the base `optax.set_to_zero()` (frozen,
    no optimizer state)."""
    return optax.multi_transform(
        {"train": tx, "frozen": optax.set_to_zero()},
        lambda tree: {
            "base": jax.tree.map(lambda _: "frozen", tree["base"]),
            "lora": jax.tree.map(lambda _: "train", tree["lora"]),
        },
    )
