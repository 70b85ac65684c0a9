"""The peer benchmark: diffusers' `WanTransformer3DModel` (PyTorch, eager, float32, random weights) at the shape of a
vdit_jax DiT config, timed in the same process as ours (`python -m vdit_jax.bench --peer=diffusers`).

The mapping (Wan's names <- ours): num_attention_heads <- model.num_heads, attention_head_dim <- hidden_size /
num_heads, ffn_dim <- mlp_ratio x hidden_size, num_layers <- depth, in/out_channels <- the latent channels,
patch_size <- model.patch_size, text_dim <- model.text_dim; the latent [B, T, H, W, C] and the text [B, L, text_dim]
of the config's shapes. Timed as ours is: `sample` is one forward on the sampling batch (B, or 2B with
classifier-free guidance), `train` is forward + MSE + backward + AdamW on the global batch.

Needs the optional `peer` extra (`pip install -e .[peer]`: torch 2.13.0, a CPU build where one is on the machine,
and diffusers); `available()` says what is missing, and the benchmark then runs ours alone.
"""

from __future__ import annotations

import importlib.util
import statistics
import time

import ml_collections
import numpy as np

NAME = "diffusers"


def available() -> str | None:
    """None when torch and diffusers import, else one line naming what is missing and how to install it."""
    missing = [m for m in ("torch", "diffusers") if importlib.util.find_spec(m) is None]
    if missing:
        return (
            f"the peer benchmark needs {' and '.join(missing)}, which {'are' if len(missing) > 1 else 'is'} not "
            "installed: pip install -e '.[peer]' (torch 2.13.0 and diffusers); running vdit_jax alone"
        )
    return None


def wan_kwargs(config: ml_collections.ConfigDict) -> dict:
    """`WanTransformer3DModel`'s constructor arguments at `config`'s shape. Raises ValueError for a config Wan
    cannot mirror (no text, class labels)."""
    m = config.model
    if not m.text_dim or m.text_vocab:
        raise ValueError(
            "the peer benchmark mirrors text-conditioned DiTs on precomputed embeddings (configs/bench.py)"
        )
    if m.hidden_size % m.num_heads:
        raise ValueError(f"hidden_size={m.hidden_size} must be a multiple of num_heads={m.num_heads}")
    channels = config.data.video_shape[3]
    return dict(
        patch_size=tuple(m.patch_size),
        num_attention_heads=m.num_heads,
        attention_head_dim=m.hidden_size // m.num_heads,
        in_channels=channels,
        out_channels=channels,
        text_dim=m.text_dim,
        freq_dim=256,
        ffn_dim=int(m.mlp_ratio * m.hidden_size),
        num_layers=m.depth,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        image_dim=None,
        rope_max_seq_len=1024,
    )


def _times(call, steps: int) -> list[float]:
    """Seconds of each of `steps` calls of `call`, after one warm-up call (eager PyTorch on the CPU: each call has
    finished when it returns)."""
    call()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def run(config: ml_collections.ConfigDict, mode: str, steps: int) -> dict:
    """Times diffusers' Wan transformer at `config`'s shape in `mode` ("train" / "sample"): {"ms_per_step", "params",
    "torch", "torch_build", "threads", ...}. Raises ImportError without the `peer` extra (see `available`)."""
    import torch
    from diffusers import WanTransformer3DModel

    torch.manual_seed(config.seed)
    model = WanTransformer3DModel(**wan_kwargs(config)).float()
    t, h, w, c = config.data.video_shape
    b = config.train.global_batch_size
    if mode == "sample" and config.sample.guidance != 1.0:
        b *= 2  # the classifier-free-guidance batch [cond; null], as ours times it
    x = torch.randn(b, c, t, h, w)
    text = torch.randn(b, config.data.text_len, config.model.text_dim)
    timestep = torch.randint(0, config.diffusion.num_timesteps, (b,))

    if mode == "sample":
        model.eval()

        def call():
            with torch.no_grad():
                return model(x, timestep, text, return_dict=False)[0]

    else:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=config.train.learning_rate, weight_decay=0.01)
        target = torch.randn_like(x)

        def call():
            opt.zero_grad(set_to_none=True)
            out = model(x, timestep, text, return_dict=False)[0]
            loss = torch.nn.functional.mse_loss(out, target)
            loss.backward()
            opt.step()
            return loss

    times = _times(call, steps)
    return {
        "model": "diffusers.WanTransformer3DModel",
        "torch": torch.__version__,
        "torch_build": "cuda" if torch.version.cuda else "cpu",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "params": int(sum(p.numel() for p in model.parameters())),
        "batch": b,
        "ms_per_step": 1e3 * statistics.median(times),
        "ms_per_step_all": [round(1e3 * s, 1) for s in times],
        "tokens_per_video": int(np.prod([t // model.config.patch_size[0], h // model.config.patch_size[1]]))
        * (w // model.config.patch_size[2]),
    }


def kernel_times(shapes: dict[str, dict[str, tuple[int, ...]]], steps: int) -> dict:
    """PyTorch's side of `bench.kernel_times` at the same `shapes` (`bench.kernel_shapes`), float32, eager: attention
    as diffusers' Wan calls it (`scaled_dot_product_attention` on [B, H, L, Dh]), `x @ w`, `layer_norm` (no
    affine, eps 1e-6), `gelu(approximate="tanh")`; median forward and gradient (backward of sum(out * r)) ms.
    Returns {"kernels": {name: {"forward_ms", "grad_ms"}}, "torch", "threads"}."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    def attend(q, k, v):  # [B, L, H, Dh] in and out, as diffusers' attention dispatch does
        t = lambda a: a.transpose(1, 2)  # noqa: E731
        return t(F.scaled_dot_product_attention(t(q), t(k), t(v)))

    torch.manual_seed(0)
    out = {}
    for name, shape in shapes.items():
        if "attention" in name:
            args = [torch.randn(shape["q"]), torch.randn(shape["kv"]), torch.randn(shape["kv"])]
            fn = attend
        elif name.startswith("mlp"):
            args, fn = [torch.randn(shape["x"]), torch.randn(shape["w"])], torch.matmul
        elif name == "layer_norm":
            args = [torch.randn(shape["x"])]
            fn = lambda x: F.layer_norm(x, x.shape[-1:], eps=1e-6)  # noqa: E731
        else:
            args = [torch.randn(shape["x"])]
            fn = lambda x: F.gelu(x, approximate="tanh")  # noqa: E731
        with torch.no_grad():
            r = torch.randn(fn(*args).shape)

        def forward(fn=fn, args=args):
            with torch.no_grad():
                return fn(*args)

        def grad(fn=fn, args=args, r=r):
            leaves = [a.detach().requires_grad_() for a in args]
            return torch.autograd.grad((fn(*leaves) * r).sum(), leaves)

        out[name] = {
            what: 1e3 * statistics.median(_times(call, steps))
            for what, call in (("forward_ms", forward), ("grad_ms", grad))
        }
    return {"kernels": out, "torch": torch.__version__, "threads": torch.get_num_threads()}
