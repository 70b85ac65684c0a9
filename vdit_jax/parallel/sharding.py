"""Logical axis names and the default logical -> mesh rules.

Every parameter and key activation in `vdit_jax.models` is annotated with the logical names below; a config's
`logical_axis_rules` maps them onto the physical mesh axes (`data`, `fsdp`, `tensor`, `sequence`). The names are
constants here so that no other module writes them as string literals.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
from jax.sharding import NamedSharding

# Physical mesh axes, in mesh order.
DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
SEQUENCE = "sequence"
MESH_AXES = (DATA, FSDP, TENSOR, SEQUENCE)

# Logical axes of parameters.
EMBED = "embed"  # model width
MLP = "mlp"  # MLP hidden width
HEADS = "heads"  # attention heads
KV = "kv"  # per-head width
VOCAB = "vocab"  # rows of an embedding table (class labels)
PATCH = "patch"  # flattened tubelet patch (t*h*w*c)
FREQ = "freq"  # sinusoidal frequency features
LAYERS = "layers"  # the stacked axis of scanned layers
TEXT_EMBED = "text_embed"  # width of precomputed text-encoder embeddings (input of the context projection)

# Logical axes of activations.
BATCH = "activation_batch"
GROUPS = "activation_groups"  # batch x attention groups folded into one axis (spatial / temporal / window layouts)
LENGTH = "activation_length"  # spacetime tokens
ACT_EMBED = "activation_embed"
ACT_MLP = "activation_mlp"
ACT_HEADS = "activation_heads"
ACT_KV = "activation_kv"
TEXT_LENGTH = "activation_text_length"  # text-context tokens (short: kept whole on every device)

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def default_rules() -> Rules:
    """Data + FSDP + tensor + sequence parallelism in the usual MaxText/MaxDiffusion style.

    Batch is split over `data` and `fsdp`; parameters are split over `fsdp` along their model-width axis (ZeRO-3
    style: gathered just in time by XLA) and over `tensor` along heads / MLP width (Megatron style); tokens are
    split over `sequence`. Attention groups folded into the batch (independent attention problems) are split over
    the data axes and `sequence` together, so the `sequence` devices share them instead of repeating them.
    """
    return (
        (BATCH, (DATA, FSDP)),
        (GROUPS, (DATA, FSDP, SEQUENCE)),
        (LENGTH, SEQUENCE),
        (ACT_EMBED, None),
        (ACT_MLP, TENSOR),
        (ACT_HEADS, TENSOR),
        (ACT_KV, None),
        (EMBED, FSDP),
        (MLP, TENSOR),
        (HEADS, TENSOR),
        (KV, None),
        (VOCAB, None),
        (PATCH, None),
        (FREQ, None),
        (LAYERS, None),
        (TEXT_EMBED, None),
        (TEXT_LENGTH, None),
    )


def rules_from_config(rules: Sequence[Sequence]) -> Rules:
    """Normalises rules read from a config (lists from JSON/ml_collections) into hashable tuples."""
    out = []
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(f"logical_axis_rules entry {rule!r} must be (logical_name, mesh_axes)")
        name, axes = rule
        if isinstance(axes, list | tuple):
            axes = tuple(axes)
            unknown = [a for a in axes if a not in MESH_AXES]
        else:
            unknown = [axes] if axes is not None and axes not in MESH_AXES else []
        if unknown:
            raise ValueError(f"logical_axis_rules maps {name!r} to unknown mesh axes {unknown}; allowed: {MESH_AXES}")
        out.append((str(name), axes))
    return tuple(out)


def logical_shardings(abstract_tree, mesh: jax.sharding.Mesh, rules: Rules):
    """NamedShardings for a tree of (possibly boxed) abstract values from `jax.eval_shape(model.init, ...)`."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, jax.sharding.PartitionSpec())


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules, ndim: int) -> NamedSharding:
    """Sharding of a batch-major input array with `ndim` dims (batch over the data axes, rest replicated)."""
    spec = nn.logical_to_mesh_axes((BATCH,) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)
