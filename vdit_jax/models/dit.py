"""Spacetime DiT: a diffusion transformer over 3D tubelet patches of a video (latent).

    video [B, T, H, W, C] -> tokens [B, N, D] -> blocks (adaLN-Zero) -> [B, N, pt*ph*pw*C] -> [B, T, H, W, C]

Conditioning (timestep + optional class label) modulates every block and the final layer through adaLN-Zero, so
a freshly initialised model predicts exactly zero. The network knows nothing of diffusion: it maps
(x_t, t, label) to a tensor shaped like x_t; what it means (eps, v, x0) is the diffusion code's business.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdit_jax.models import attention, layers, mmdit
from vdit_jax.models import text as text_lib
from vdit_jax.models.layers import Grid
from vdit_jax.parallel import sharding as sh

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "offload")
DTYPES = ("float32", "bfloat16", "float16")

# Named sizes (width, depth, heads) as in DiT; `tiny` is for CPUs and tests.
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, depth=4, num_heads=4),
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
}


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Hyperparameters of the spacetime DiT, validated on construction."""

    in_channels: int = 3
    out_channels: int | None = None  # None: same as in_channels
    patch_size: tuple[int, int, int] = (1, 4, 4)  # tubelet (pt, ph, pw)
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 0  # 0: no label conditioning; else labels in [0, num_classes], num_classes = null
    # () = one embedding per class; else the label is a mixed-radix number of these factors (most significant
    # first, product = num_classes) and its embedding the sum of one per digit, so attributes shared by classes
    # (moving_shapes: colour x shape x direction = (7, 3, 4)) are learned from every class that has them.
    label_factors: tuple[int, ...] = ()
    text_dim: int = 0  # 0: no text; else width of precomputed text embeddings [B, L, text_dim] (cross-attention)
    # The built-in text encoder (`vdit_jax.models.text`), trained with the DiT: non-empty = its word vocabulary, and
    # `text` is then int32 tokens [B, L <= text_max_len] that a `text_encoder_depth`-block transformer of width
    # text_dim encodes (instead of precomputed embeddings).
    text_vocab: tuple[str, ...] = ()
    text_encoder_depth: int = 2
    text_encoder_heads: int = 2
    text_max_len: int = 16
    # How the video tokens read the text: `cross` = a cross-attention sublayer in every block (PixArt / Open-Sora /
    # Wan); `joint` = MM-DiT joint attention (SD3 / Flux / HunyuanVideo: `vdit_jax.models.mmdit`), the text a second
    # stream with its own weights, full attention only; its last `single_stream_blocks` blocks share one set of
    # weights between the streams (Flux's single-stream blocks).
    text_mode: str = "cross"
    single_stream_blocks: int = 0
    # Also add a pooled text vector to the timestep embedding that every adaLN reads, as SD3 and Flux add their
    # pooled CLIP vector: for precomputed embeddings their masked mean through an MLP (`layers.PooledTextEmbedder`);
    # for the built-in encoder a bag of words in the model width (`text.BagOfWords`).
    text_pooled: bool = False
    attention: str = "full"  # full / factorized / windowed
    # windowed only: spacetime windows in tokens (t, h, w), coarse to fine; depth is split evenly across them.
    windows: tuple[tuple[int, int, int], ...] = ((4, 8, 8), (2, 4, 4))
    pos_emb: str = "sincos"  # sincos / rope / sincos+rope
    qk_norm: bool = True
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    # none / full / dots / dots_no_batch / offload (matmul outputs to pinned host memory; GPU/TPU, also runs on CPU)
    remat: str = "none"
    scan_layers: bool = False  # nn.scan over the blocks of each stage: compile time independent of depth
    # U-ViT long skips (Bao et al. 2023): each block of the second half also gets the input of its mirror block in
    # the first half (block D-1-i gets block i's input: the patch embedding reaches the last block), concatenated
    # and projected back to the width; helps small pixel-space models reproduce fine detail. Not with scan_layers.
    long_skips: bool = False
    # Self-conditioning (Chen et al. 2022, Analog Bits): the network also sees an estimate of x0 (zeros, or its own
    # previous estimate: `diffusion.self_conditioned` in training, the samplers' `self_condition`), concatenated
    # with x_t along channels before patchifying.
    self_condition: bool = False
    # Frame conditioning (image-to-video, continuation, first/last frame; as SVD and Wan's first/last-frame models
    # do): clean given frames [B, T, H, W, C] times a per-frame mask [B, T], and the mask itself, enter as C + 1
    # extra input channels beside x_t. No mask (None, or all False) is the unconditional case.
    frame_conditioning: bool = False
    # auto / xla / cudnn / splash (vdit_jax.models.attention); auto: cuDNN on GPU in bf16, splash on TPU, else XLA
    attention_impl: str = "auto"
    # tokens split over the `sequence` mesh axis: K/V all-gathered (`allgather`) or passed around a ring (`ring`)
    sequence_parallel: str = "allgather"

    def __post_init__(self):
        def fail(msg):
            raise ValueError(f"DiTConfig: {msg}")

        for name in ("in_channels", "hidden_size", "depth", "num_heads"):
            if int(getattr(self, name)) <= 0:
                fail(f"{name} must be positive, got {getattr(self, name)}")
        if self.out_channels is not None and self.out_channels <= 0:
            fail(f"out_channels must be positive or None, got {self.out_channels}")
        if len(self.patch_size) != 3 or any(int(p) <= 0 for p in self.patch_size):
            fail(f"patch_size must be three positive ints (pt, ph, pw), got {self.patch_size}")
        if self.hidden_size % self.num_heads:
            fail(f"hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}")
        if self.mlp_ratio <= 0:
            fail(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.num_classes < 0:
            fail(f"num_classes must be >= 0, got {self.num_classes}")
        if self.label_factors and (
            any(int(f) < 1 for f in self.label_factors) or math.prod(self.label_factors) != self.num_classes
        ):
            fail(
                f"label_factors {tuple(self.label_factors)} must be positive with product num_classes "
                f"({self.num_classes}), or () for one embedding per class"
            )
        if self.text_dim < 0:
            fail(f"text_dim must be >= 0 (0 = no text conditioning), got {self.text_dim}")
        for name, least in (("text_encoder_depth", 1), ("text_encoder_heads", 1), ("text_max_len", 2)):
            if int(getattr(self, name)) < least:
                fail(f"{name} must be >= {least} (text_max_len: <bos> and a word), got {getattr(self, name)}")
        if self.text_vocab:
            try:
                text_lib.Tokenizer(self.text_vocab)
            except ValueError as e:
                fail(f"text_vocab: {e}")
            if not self.text_dim or self.text_dim % self.text_encoder_heads:
                fail(
                    f"the built-in text encoder needs text_dim (its width) > 0 and divisible by text_encoder_heads "
                    f"{self.text_encoder_heads}, got {self.text_dim}"
                )
        if self.attention not in layers.ATTENTION_LAYOUTS:
            fail(f"attention {self.attention!r} is not one of {layers.ATTENTION_LAYOUTS}")
        if self.pos_emb not in layers.POS_EMBEDDINGS:
            fail(f"pos_emb {self.pos_emb!r} is not one of {layers.POS_EMBEDDINGS}")
        if "sincos" in self.pos_emb and self.hidden_size % 4:
            fail(f"hidden_size {self.hidden_size} must be a multiple of 4 for sin-cos embeddings")
        if "rope" in self.pos_emb and (self.head_dim % 2 or self.head_dim < 6):
            fail(f"rope needs an even head_dim >= 6, got {self.head_dim}")
        if self.text_mode not in mmdit.TEXT_MODES:
            fail(f"text_mode {self.text_mode!r} is not one of {mmdit.TEXT_MODES}")
        if self.text_mode == "joint" and (not self.text_dim or self.attention != "full"):
            fail(
                f"text_mode 'joint' (MM-DiT) needs text (text_dim > 0, got {self.text_dim}) and full attention (got "
                f"{self.attention!r}): the text joins one attention over all video tokens"
            )
        if not 0 <= self.single_stream_blocks <= (self.depth if self.text_mode == "joint" else 0):
            fail(
                f"single_stream_blocks must be in [0, depth={self.depth}] with text_mode 'joint' (0 otherwise), got "
                f"{self.single_stream_blocks}"
            )
        if self.text_pooled and not self.text_dim:
            fail("text_pooled needs text (text_dim > 0, got 0)")
        if self.attention_impl not in attention.IMPLEMENTATIONS:
            fail(f"attention_impl {self.attention_impl!r} is not one of {attention.IMPLEMENTATIONS}")
        if self.sequence_parallel not in attention.SEQUENCE_PARALLEL:
            fail(f"sequence_parallel {self.sequence_parallel!r} is not one of {attention.SEQUENCE_PARALLEL}")
        if self.remat not in REMAT_POLICIES:
            fail(f"remat {self.remat!r} is not one of {REMAT_POLICIES}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                fail(f"{name} {getattr(self, name)!r} is not one of {DTYPES}")
        if self.long_skips and self.scan_layers:
            fail("long_skips needs scan_layers=False (a scanned stack cannot route per-block skips)")
        if self.attention == "windowed":
            if not self.windows or any(len(w) != 3 or min(w) <= 0 for w in self.windows):
                fail(f"windows must be a non-empty list of positive (t, h, w) triples, got {self.windows}")
            if self.depth < len(self.windows):
                fail(f"depth {self.depth} is smaller than the number of window scales {len(self.windows)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def stages(self) -> list[tuple[tuple[str, ...], tuple[int, int, int] | None, int]]:
        """(attention groupings of a block, window, number of blocks) for each homogeneous stage of depth; MM-DiT
        (`text_mode` joint): ("joint",) dual-stream then ("single",) single-stream blocks."""
        if self.text_mode == "joint":
            single = self.single_stream_blocks
            return [s for s in ((("joint",), None, self.depth - single), (("single",), None, single)) if s[2]]
        if self.attention == "full":
            return [(("full",), None, self.depth)]
        if self.attention == "factorized":
            return [(("spatial", "temporal"), None, self.depth)]
        n = len(self.windows)
        counts = [self.depth // n + (i < self.depth % n) for i in range(n)]
        return [(("window",), tuple(w), c) for w, c in zip(self.windows, counts, strict=True)]


def dit_config(size: str = "tiny", **overrides: Any) -> DiTConfig:
    """A DiTConfig for a named size (tiny, S, B, L, XL) with field overrides."""
    if size not in SIZES:
        raise ValueError(f"unknown DiT size {size!r}; allowed: {list(SIZES)}")
    return DiTConfig(**{**SIZES[size], **overrides})


def _remat_policy(name: str) -> Callable | None:
    return {
        "full": None,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        # Saves the same matmul outputs as dots_no_batch, but in pinned host memory instead of device memory.
        "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
    }[name]


class DiTBlock(nn.Module):
    """Pre-norm block: one or two attention sublayers (factorized: spatial then temporal) and an MLP, each
    modulated (shift, scale) and gated by adaLN-Zero from the conditioning vector; with a text context, a
    cross-attention sublayer (pre-norm, zero-initialised output) between self-attention and the MLP."""

    config: DiTConfig
    groupings: tuple[str, ...]
    window: Grid | None
    grid: Grid

    @nn.compact
    def __call__(
        self,
        x: jax.Array | None,
        c: jax.Array | None,
        rope,
        context: jax.Array | None,
        context_mask: jax.Array | None,
        kv: tuple[jax.Array, jax.Array] | None = None,
    ):
        """((x, None)): the block's output; with `kv` its cross-attention reads those keys and values instead of
        projecting the context. x None: (None, kv), this block's cross-attention keys and values of the context
        (the sampler's text cache)."""
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kw = dict(dtype=dtype, param_dtype=pdtype)
        cross = lambda: layers.CrossAttention(
            cfg.num_heads, qk_norm=cfg.qk_norm, implementation=cfg.attention_impl, name="cross_attn", **kw
        )
        if x is None:
            return None, cross()(None, context, context_mask)
        n_mod = 3 * (len(self.groupings) + 1)
        mod = layers.dense(n_mod * cfg.hidden_size, (sh.EMBED, sh.MLP), zero_init=True, name="adaLN", **kw)(nn.silu(c))
        mod = jnp.split(mod, n_mod, axis=-1)  # n_mod x [B, D]
        for i, grouping in enumerate(self.groupings):
            shift, scale, gate = mod[3 * i : 3 * i + 3]
            h = layers.modulate(layers.layer_norm(dtype)(x), shift, scale)
            window = layers.clip_window(self.window, self.grid) if grouping == "window" else None
            h = layers.Attention(
                cfg.num_heads,
                layout=grouping,
                window=window,
                qk_norm=cfg.qk_norm,
                implementation=cfg.attention_impl,
                sequence_parallel=cfg.sequence_parallel,
                name=f"attn_{grouping}",
                **kw,
            )(h, self.grid, rope)
            x = x + gate[:, None] * h
        if context is not None or kv is not None:  # [B, L, D]
            x = x + cross()(layers.layer_norm(dtype)(x), context, context_mask, kv)
        shift, scale, gate = mod[-3:]
        h = layers.modulate(layers.layer_norm(dtype)(x), shift, scale)
        x = x + gate[:, None] * layers.Mlp(cfg.hidden_size, cfg.mlp_dim, name="mlp", **kw)(h)
        return nn.with_logical_constraint(x, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED)), None


class DiT(nn.Module):
    """The spacetime DiT: `__call__(x, t, labels=None, text=None, x_self_cond=None, text_mask=None,
    given_frames=None, frame_mask=None)` -> [B, T, H, W, C_out] (float32).

    x [B, T, H, W, C], t [B]; labels [B] when num_classes > 0; text [B, L, text_dim] precomputed text-encoder
    embeddings when text_dim > 0, with text_mask bool [B, L] (True = a real token; None = all real): padded tokens
    get no attention, so padding the same text to a longer L changes nothing (`null_text` is the null text of
    classifier-free guidance); x_self_cond [B, T, H, W, C] an estimate of x0 when the config has self_condition
    (None = zeros, "no estimate"; ignored otherwise); given_frames [B, T, H, W, C] clean frames and frame_mask bool
    [B, T] (True = a given frame) when the config has frame_conditioning (None = no frame given; ignored otherwise).
    """

    config: DiTConfig

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        labels: jax.Array | None = None,
        text: jax.Array | None = None,
        x_self_cond: jax.Array | None = None,
        text_mask: jax.Array | None = None,
        given_frames: jax.Array | None = None,
        frame_mask: jax.Array | None = None,
        text_cache: dict | None = None,
    ):
        cfg = self.config
        if x is None:  # `text_cache`: what the text contributes, computed once per sampling loop
            return self._text_cache(text, text_mask)
        if x.ndim != 5 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"DiT expects video [B, T, H, W, {cfg.in_channels}], got shape {tuple(x.shape)}")
        if cfg.num_classes and labels is None:
            raise ValueError("this DiT is class-conditional (num_classes > 0): pass labels")
        if cfg.self_condition and x_self_cond is not None and x_self_cond.shape != x.shape:
            raise ValueError(f"x_self_cond must have x's shape {tuple(x.shape)}, got {tuple(x_self_cond.shape)}")
        if cfg.frame_conditioning and (given_frames is None) != (frame_mask is None):
            raise ValueError("pass given_frames and frame_mask together (or neither: no frame given)")
        if cfg.frame_conditioning and given_frames is not None:
            if given_frames.shape != x.shape:
                raise ValueError(f"given_frames must have x's shape {tuple(x.shape)}, got {tuple(given_frames.shape)}")
            if frame_mask.shape != x.shape[:2] or frame_mask.dtype != bool:
                got = f"{frame_mask.dtype} {tuple(frame_mask.shape)}"
                raise ValueError(f"frame_mask must be bool [B, T] = {tuple(x.shape[:2])}, got {got}")
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        kw = dict(dtype=dtype, param_dtype=pdtype)
        grid = layers.token_grid(x.shape, cfg.patch_size)
        out_channels = cfg.out_channels or cfg.in_channels

        if cfg.self_condition:
            x = jnp.concatenate([x, jnp.zeros_like(x) if x_self_cond is None else x_self_cond.astype(x.dtype)], -1)
        if cfg.frame_conditioning:
            x = jnp.concatenate(
                [x, layers.frame_channels(given_frames, frame_mask, x.shape[:-1] + (cfg.in_channels,))], -1
            )
        tokens = layers.patchify(x.astype(dtype), cfg.patch_size)  # [B, N, pt*ph*pw*C]
        tokens = nn.with_logical_constraint(tokens, (sh.BATCH, sh.LENGTH, None))
        h = layers.dense(cfg.hidden_size, (sh.PATCH, sh.EMBED), name="patch_embed", **kw)(tokens)
        if "sincos" in cfg.pos_emb:
            h = h + jnp.asarray(layers.sincos_3d(grid, cfg.hidden_size), dtype)[None]
        h = nn.with_logical_constraint(h, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))
        rope = None
        if "rope" in cfg.pos_emb:
            rope = tuple(jnp.asarray(a, jnp.float32) for a in layers.rope_3d(grid, cfg.head_dim))

        c = layers.TimestepEmbedder(cfg.hidden_size, name="t_embed", **kw)(t)
        if cfg.num_classes:
            c = c + layers.LabelEmbedder(
                cfg.num_classes, cfg.hidden_size, factors=tuple(cfg.label_factors), name="y_embed", **kw
            )(labels)
        c = nn.with_logical_constraint(c, (sh.BATCH, sh.ACT_EMBED))
        kv = pooled = None
        if text_cache is not None:
            context, context_mask, kv = text_cache["context"], text_cache["context_mask"], text_cache.get("kv")
            pooled = text_cache.get("pooled")
        else:
            context, context_mask, pooled = self._encode_text(text, text_mask)
        if pooled is not None:
            c = c + pooled.astype(c.dtype)

        joint = cfg.text_mode == "joint"
        # Cross-attention blocks carry the video tokens and read the context (or its cached keys and values: one
        # (k, v) pair [B, blocks, L, heads, Dh] per stage); joint blocks carry both streams.
        carry = (h, context) if joint else h
        inputs = (c, rope, context_mask) if joint else (c, rope, context, context_mask)
        index, skips = 0, []  # block index over all stages; block inputs of the first half (long_skips)
        for s, (groupings, window, count) in enumerate(cfg.stages()):
            stage_kv = None if kv is None else kv[f"stage{s}"]
            if cfg.scan_layers:
                scanned_kv = () if joint else (None if stage_kv is None else _layers_first(stage_kv),)
                carry, _ = self._block(groupings, window, grid, count, f"stage{s}")(carry, *inputs, *scanned_kv)
            else:
                for i in range(count):
                    if cfg.long_skips:
                        video = self._long_skip(carry[0] if joint else carry, index, skips)
                        carry = (video, carry[1]) if joint else video
                    block_kv = () if joint else (None if stage_kv is None else (stage_kv[0][:, i], stage_kv[1][:, i]),)
                    carry, _ = self._block(groupings, window, grid, None, f"stage{s}_block{i}")(
                        carry, *inputs, *block_kv
                    )
                    index += 1
        h = carry[0] if joint else carry

        shift, scale = jnp.split(
            layers.dense(2 * cfg.hidden_size, (sh.EMBED, sh.MLP), zero_init=True, name="final_adaLN", **kw)(nn.silu(c)),
            2,
            axis=-1,
        )
        h = layers.modulate(layers.layer_norm(dtype)(h), shift, scale)
        out = layers.dense(
            out_channels * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2],
            (sh.EMBED, sh.PATCH),
            zero_init=True,
            name="final_proj",
            **kw,
        )(h)
        out = nn.with_logical_constraint(out, (sh.BATCH, sh.LENGTH, None))
        return layers.unpatchify(out, cfg.patch_size, grid, out_channels).astype(jnp.float32)

    def _block(self, groupings, window, grid, count: int | None, name: str) -> nn.Module:
        """A block of a stage (remat-wrapped as configured), or `count` of them scanned (`scan_layers`)."""
        cfg = self.config
        joint = cfg.text_mode == "joint"
        block = mmdit.JointBlock if joint else DiTBlock
        if cfg.remat != "none":
            block = nn.remat(block, policy=_remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)
        args = (cfg, groupings == ("single",)) if joint else (cfg, groupings, window, grid)
        if count is None:
            return block(*args, name=name)
        # Scanned: the conditioning is broadcast to every layer; cached cross-attention keys and values are scanned.
        in_axes = (nn.broadcast,) * 3 if joint else (nn.broadcast,) * 4 + (0,)
        stack = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=in_axes,
            length=count,
            metadata_params={nn.PARTITION_NAME: sh.LAYERS},
        )
        return stack(*args, name=name)

    def _encode_text(self, text: jax.Array | None, text_mask: jax.Array | None):
        """(context [B, L, D], mask [B, L], pooled [B, D] or None) of the text (None, None, None for a model without
        text): the built-in encoder's output or the precomputed embeddings, projected to the width
        (`layers.TextEmbedder`), and with `text_pooled` the pooled vector (`layers.PooledTextEmbedder`, or
        `text.BagOfWords` for the built-in encoder)."""
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        if cfg.text_vocab and (text is None or text.ndim != 2 or not jnp.issubdtype(text.dtype, jnp.integer)):
            got = None if text is None else f"{text.dtype} {tuple(text.shape)}"
            raise ValueError(f"this DiT has the built-in text encoder: pass text as int tokens [B, L], got {got}")
        if cfg.text_dim and not cfg.text_vocab and (text is None or text.ndim != 3 or text.shape[-1] != cfg.text_dim):
            got = None if text is None else tuple(text.shape)
            raise ValueError(f"this DiT is text-conditional: pass text [B, L, {cfg.text_dim}], got {got}")
        if cfg.text_dim and text_mask is not None and (text_mask.shape != text.shape[:2] or text_mask.dtype != bool):
            got = f"{text_mask.dtype} {tuple(text_mask.shape)}"
            raise ValueError(f"text_mask must be bool [B, L] = {tuple(text.shape[:2])}, got {got}")
        context = context_mask = pooled = None
        tokens = text
        if cfg.text_vocab:  # tokens -> [B, L, text_dim]; the padding (mask False) gives and gets no attention
            text_mask = text != text_lib.PAD if text_mask is None else text_mask
            text = text_lib.TextEncoder(
                text_lib.Tokenizer(cfg.text_vocab).vocab_size,
                width=cfg.text_dim,
                depth=cfg.text_encoder_depth,
                num_heads=cfg.text_encoder_heads,
                max_len=cfg.text_max_len,
                name="text_encoder",
                **kw,
            )(text, text_mask)
        if cfg.text_dim:
            context = layers.TextEmbedder(cfg.hidden_size, name="text_embed", **kw)(text)  # [B, L, D]
            context_mask = text_mask
            if cfg.text_pooled and cfg.text_vocab:
                pooled = text_lib.BagOfWords(
                    text_lib.Tokenizer(cfg.text_vocab).vocab_size, cfg.hidden_size, name="text_pool", **kw
                )(tokens, text_mask)
            elif cfg.text_pooled:
                pooled = layers.PooledTextEmbedder(cfg.hidden_size, name="text_pool", **kw)(text, text_mask)
        if cfg.text_mode == "joint":  # the text stream: padding zero from the start
            context_mask = jnp.ones(context.shape[:2], bool) if context_mask is None else context_mask
            context = jnp.where(context_mask[:, :, None], context, jnp.zeros((), context.dtype))

        return context, context_mask, pooled

    def _text_cache(self, text: jax.Array, text_mask: jax.Array | None) -> dict:
        """{"context": [B, L, D], "context_mask": [B, L], with `text_pooled` "pooled": [B, D], and for
        cross-attention "kv": {stage: (k, v) [B, blocks, L, heads, Dh]}}: everything of the forward pass that depends
        on the text alone (the encoders, the projections, every cross-attention's keys and values).
        `__call__(..., text_cache=...)` then skips it: the sampler computes it once per loop, not once per denoising
        step. (Joint attention's text stream is modulated by the timestep: only its input is cached.)"""
        cfg = self.config
        if not cfg.text_dim:
            raise ValueError("this DiT takes no text: there is no text cache")
        context, context_mask, pooled = self._encode_text(text, text_mask)
        cache = {"context": context, "context_mask": context_mask}
        if pooled is not None:
            cache["pooled"] = pooled
        if cfg.text_mode == "cross":
            cache["kv"] = {}
            grid = (1, 1, 1)  # the blocks' keys and values do not depend on the video grid
            for s, (groupings, window, count) in enumerate(cfg.stages()):
                if cfg.scan_layers:
                    _, (k, v) = self._block(groupings, window, grid, count, f"stage{s}")(
                        None, None, None, context, context_mask, None
                    )
                    cache["kv"][f"stage{s}"] = (jnp.moveaxis(k, 0, 1), jnp.moveaxis(v, 0, 1))
                else:
                    pairs = [
                        self._block(groupings, window, grid, None, f"stage{s}_block{i}")(
                            None, None, None, context, context_mask
                        )[1]
                        for i in range(count)
                    ]
                    cache["kv"][f"stage{s}"] = tuple(jnp.stack(a, axis=1) for a in zip(*pairs, strict=True))
        return cache

    def _long_skip(self, h: jax.Array, index: int, skips: list[jax.Array]) -> jax.Array:
        """Block `index`'s input: pushed onto `skips` in the first half; in the second half, fused with the input of
        the mirror block (a Dense from [h, skip] to the width)."""
        cfg = self.config
        if index < cfg.depth // 2:
            skips.append(h)
            return h
        if index < cfg.depth - cfg.depth // 2:  # the middle block of an odd depth
            return h
        dtype = jnp.dtype(cfg.dtype)
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = layers.dense(
            cfg.hidden_size,
            (sh.MLP, sh.EMBED),
            dtype=dtype,
            param_dtype=jnp.dtype(cfg.param_dtype),
            name=f"skip{index}",
        )(h)
        return nn.with_logical_constraint(h, (sh.BATCH, sh.LENGTH, sh.ACT_EMBED))


def _layers_first(kv: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Cached (k, v) [B, blocks, ...] -> [blocks, B, ...], the layout `nn.scan` slices."""
    return tuple(jnp.moveaxis(a, 1, 0) for a in kv)


def drop_labels(rng: jax.Array, labels: jax.Array, rate: float, num_classes: int) -> jax.Array:
    """Replaces each label by the null class (`num_classes`) with probability `rate` (CFG training)."""
    drop = jax.random.bernoulli(rng, rate, labels.shape)
    return jnp.where(drop, num_classes, labels).astype(labels.dtype)


def null_text(batch: int, length: int, text_dim: int, builtin: bool = False) -> tuple[jax.Array, jax.Array]:
    """The null text of classifier-free guidance: one real token and padding. For precomputed embeddings a zero
    embedding at position 0 (text [B, L, E] zeros, mask True at position 0 only); for the built-in encoder
    (`builtin`) the tokens of the empty prompt, `<bos>` alone (int32 [B, L], mask True at position 0 only:
    `text.Tokenizer.null`).

    Either way the null does not depend on L (the padding is masked) in both text modes, and no key is ever masked
    out entirely. (All L zero tokens real would do for cross-attention, whose equal keys read one context vector
    whatever L, but not for joint attention, where L equal text keys weigh L times against the video keys.)
    """
    mask = jnp.zeros((batch, length), bool).at[:, 0].set(True)
    if builtin:
        return jnp.where(mask, text_lib.BOS, text_lib.PAD).astype(jnp.int32), mask
    return jnp.zeros((batch, length, text_dim), jnp.float32), mask


def drop_text(
    rng: jax.Array, text: jax.Array, rate: float, text_mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Replaces each example's text (embeddings [B, L, E] or built-in tokens [B, L]) and mask [B, L] by the null
    text (`null_text`, the one the sampler's unconditional branch uses) with probability `rate`. Returns
    (text, text_mask); a missing mask means all tokens real (embeddings) or the non-padding (tokens).
    """
    drop = jax.random.bernoulli(rng, rate, text.shape[:1])
    builtin = jnp.issubdtype(text.dtype, jnp.integer)
    null, null_mask = null_text(text.shape[0], text.shape[1], 0 if builtin else text.shape[2], builtin=builtin)
    if text_mask is None:
        text_mask = text != text_lib.PAD if builtin else jnp.ones(text.shape[:2], bool)
    extra = (None,) * (text.ndim - 2)
    text = jnp.where(drop[(slice(None), None, *extra)], null.astype(text.dtype), text)
    return text, jnp.where(drop[:, None], null_mask, text_mask)


def init_params(config: DiTConfig, rng: jax.Array, video_shape: tuple[int, ...]):
    """Initialises (boxed, logically-annotated) parameters for videos of `video_shape` [B, T, H, W, C].

    Parameter shapes do not depend on the text length, so a text model is initialised with one null text token.
    """
    model = DiT(config)
    b = video_shape[0]

    def init(rng):
        labels = jnp.zeros((b,), jnp.int32) if config.num_classes else None
        text = jnp.zeros((b, 1, config.text_dim), jnp.float32) if config.text_dim else None
        if config.text_vocab:
            text = jnp.full((b, 1), text_lib.BOS, jnp.int32)
        return model.init(rng, jnp.zeros(video_shape, jnp.float32), jnp.zeros((b,), jnp.int32), labels, text)

    return jax.jit(init)(rng)  # one compiled program, not hundreds of eager ops
