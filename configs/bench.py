"""Benchmark workloads: `python -m vdit_jax.bench --config=configs/bench.py:VARIANT [--mode=train|sample]`.

All are text-conditioned (precomputed text-encoder embeddings with text masks; no class labels). The benchmark
times synthetic batches; training (`python -m vdit_jax.train --config=configs/bench.py:VARIANT`) reads the
`synthetic_latent_text` dataset, built on first use in the local data dir with the variant's shapes (latents
`data.video_shape`, text `data.text_len` x `model.text_dim`): moving_shapes clips as latents and fixed per-word
embeddings of their captions (vdit_jax/data/latent_text.py), so a run really learns. Point `config.data.name` at
another prepared array_record dataset with `video`, `text` and `text_mask` features to train on real latents.

tiny     CPU, seconds, runs in CI: a width-64 2-block DiT on 4x16x16x4 latents, patch 1x4x4 -> 64 tokens, batch 4,
         8 text tokens of width 32.
S1       DESIGN §7 sampling step, Wan2.1-T2V-1.3B-shaped: 30 blocks, width 1536, 12 heads (head_dim 128), FFN 8960,
         3D RoPE. An 81x480x832 video through Wan's VAE (4x temporal, causal: 1 + 80/4 = 21 frames; 8x spatial)
         is a 21x60x104 latent with 16 channels; patch 1x2x2 -> 21x30x52 = 32,760 tokens; batch 1; 512 umT5 text
         tokens of width 4096; bf16 weights and compute. `sample.guidance = 1`: the §7 row times ONE batch-1
         forward (its ~0.29 PFLOP only fit 509 ms on an H100 at batch 1), so the benchmark step is the
         conditional model alone; `--config.sample.guidance=5` times the CFG step (batch 2).
         Parameters: 1.834e9 — Wan's 1.3B (1.409e9 counted alike) plus 30 per-block adaLN projections D -> 6D
         (0.425e9): this DiT modulates each block from its own Dense (DiT's adaLN-Zero), Wan from one shared one.
S2       DESIGN §7 train step, DiT-XL width: 28 blocks, width 1152, 16 heads, FFN 4608; latent 16x32x32x4, patch
         1x2x2 -> 4,096 tokens; batch 4; 120 T5-XXL text tokens of width 4096; AdamW, f32 master weights, bf16
         compute, remat (matmul outputs saved). Parameters: 0.828e9 = DiT-XL/2's 675M less its label table, plus
         cross-attention (28 x 5.3M) and the text projection (6.0M).
C1       The CPU peer-comparison shape (README, "Performance against PyTorch"): width 384 = 6 heads x 64, FFN 1536,
         8 blocks, latent 8x32x32x16, patch 1x2x2 -> 2,048 tokens, 64 text tokens of width 512, float32, guidance 1
         (one forward a sampling step); batch 2 for the train step (`--config.train.global_batch_size=1` for the
         sampling step, as measured).
demo     The CPU demo's network at its shape, text-conditioned so that Wan can mirror it: width 128, 4 heads, 4
         blocks, 64 tokens (8x16x16x3 pixels in 8x2x2 tubelets), batch 16, 8 text tokens of width 32.
xl_long  The XL DiT on 65,536 tokens: latent 16x128x128x4, patch 1x2x2 -> 16 frames x 64x64; global batch 8;
         120 text tokens; scanned layers, full remat, bf16 compute. The mesh (data 1 x fsdp 8 x sequence = the
         rest) is a starting point for the pod dry run, which picks the fsdp / sequence split that fits.
         Full attention over 65,536 tokens needs a memory-efficient (flash) attention kernel.
"""

from vdit_jax import config as config_lib
from vdit_jax.data import latent_text
from vdit_jax.models import dit

VARIANTS = ("tiny", "S1", "S2", "xl_long", "C1", "demo")


def get_config(arg: str = "tiny"):
    variant = arg or "tiny"
    if variant not in VARIANTS:
        raise ValueError(f"unknown bench variant {variant!r}; allowed: {list(VARIANTS)}")
    c = config_lib.base_config()
    # Latent videos with text embeddings and masks, shaped by each variant below (vdit_jax/data/latent_text.py).
    c.data.name = latent_text.NAME
    c.sample.clip_x0 = 0.0  # latents are not confined to [-1, 1]: no x0 clipping
    c.data.num_classes = 0
    c.data.label_key = ""
    c.model.num_classes = 0
    c.train.warmup_steps = 10
    c.train.weight_decay = 0.01
    if variant == "tiny":
        c.data.video_shape = (4, 16, 16, 4)
        c.data.text_len = 8
        c.model.update(
            dict(hidden_size=64, depth=2, num_heads=4, in_channels=4, patch_size=(1, 4, 4), text_dim=32, mlp_ratio=4.0)
        )
        c.train.global_batch_size = 4
        c.sample.steps = 4
    elif variant == "S1":
        c.data.video_shape = (21, 60, 104, 16)
        c.data.text_len = 512
        c.model.update(
            dict(
                hidden_size=1536,
                depth=30,
                num_heads=12,
                mlp_ratio=8960 / 1536,
                in_channels=16,
                patch_size=(1, 2, 2),
                text_dim=4096,
                pos_emb="rope",
                dtype="bfloat16",
                param_dtype="bfloat16",
            )
        )
        c.train.global_batch_size = 1
        c.sample.guidance = 1.0
        c.sample.steps = 50
    elif variant == "S2":
        c.data.video_shape = (16, 32, 32, 4)
        c.data.text_len = 120
        c.model.update(dit.SIZES["XL"])
        c.model.update(
            dict(in_channels=4, patch_size=(1, 2, 2), text_dim=4096, dtype="bfloat16", remat="dots_no_batch")
        )
        c.train.global_batch_size = 4
    elif variant == "C1":
        c.data.video_shape = (8, 32, 32, 16)
        c.data.text_len = 64
        c.model.update(
            dict(
                hidden_size=384, depth=8, num_heads=6, mlp_ratio=4.0, in_channels=16, patch_size=(1, 2, 2), text_dim=512
            )
        )
        c.train.global_batch_size = 2
        c.sample.guidance = 1.0
    elif variant == "demo":
        c.data.video_shape = (8, 16, 16, 3)
        c.data.text_len = 8
        c.model.update(
            dict(hidden_size=128, depth=4, num_heads=4, mlp_ratio=4.0, in_channels=3, patch_size=(8, 2, 2), text_dim=32)
        )
        c.train.global_batch_size = 16
    else:  # xl_long
        c.data.video_shape = (16, 128, 128, 4)
        c.data.text_len = 120
        c.model.update(dit.SIZES["XL"])
        c.model.update(
            dict(
                in_channels=4,
                patch_size=(1, 2, 2),
                text_dim=4096,
                dtype="bfloat16",
                remat="full",
                scan_layers=True,
            )
        )
        c.train.global_batch_size = 8
        c.mesh_shape.update({"data": 1, "fsdp": 8, "sequence": -1})
    return c
