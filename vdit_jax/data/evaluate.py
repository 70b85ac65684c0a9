"""Synthetic-domain metrics for generated `moving_shapes` videos: does each video show what its prompt asked for?

A deliberately simple analyser, per video (uint8 [T, H, W, 3], any T and S):
  foreground  pixels whose brightest channel is > FOREGROUND_THRESHOLD (the background is black)
  colour      the palette entry nearest to the mean foreground colour over all frames
  shape       the fill ratio area / bounding-box area (square ~1, circle ~pi/4, triangle ~1/2), helped for circle vs
              triangle by the centroid's height in its box (circle 1/2, apex-up triangle 2/3); medians over frames
  direction   the centroid track's least-squares velocity: dominant axis and its sign (image y points down)
  consistency the object is there in every frame, each frame's colour is "pure" (most foreground pixels match the
              frame's palette entry) and the same entry as the video's, and the area is stable (coefficient of
              variation < AREA_CV_MAX). `stability` is a softer score in [0, 1]: the fraction of frames agreeing
              on the colour times (1 - area CV), clipped.

    metrics = evaluate(videos, prompts)   # {"colour_accuracy": ..., "num_samples": N, ...}
    analysis = analyse(videos)            # per-sample predictions, e.g. analysis.captions()
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

from vdit_jax.data import moving_shapes as ms

FOREGROUND_THRESHOLD = 96  # brightest channel above this = foreground
SQUARE_MIN_FILL = 0.89  # fill ratio >= this: square (1.0); otherwise circle or triangle, by _triangle_score
AREA_CV_MAX = 0.2  # largest area coefficient of variation over frames of a consistent video
PIXEL_TOLERANCE = 96  # a foreground pixel matches a palette colour if every channel is within this
MIN_PURITY = 0.5  # a frame's colour counts when at least this fraction of its foreground pixels match it
RECOMMENDED_SAMPLES = 64
_CHUNK = 64  # videos analysed at once (bounds the memory of the int16 copies)


@dataclasses.dataclass(frozen=True)
class Analysis:
    """Per-sample predictions; -1 where no object was found."""

    colour: np.ndarray  # [N] int, index into moving_shapes.COLOUR_NAMES
    shape: np.ndarray  # [N] int, index into moving_shapes.SHAPES
    direction: np.ndarray  # [N] int, index into moving_shapes.DIRECTIONS
    fill_ratio: np.ndarray  # [N] median over frames of area / bounding-box area
    centroid_height: np.ndarray  # [N] median over frames of (centroid y - box top) / box height
    velocity: np.ndarray  # [N, 2] fitted centroid velocity (vx, vy), px/frame
    area_cv: np.ndarray  # [N] coefficient of variation of the object area over frames (inf: no object)
    stability: np.ndarray  # [N] in [0, 1]
    consistent: np.ndarray  # [N] bool

    def captions(self) -> list[str]:
        """The caption each video looks like, or "" where the analyser found no object."""
        out = []
        for c, s, d in zip(self.colour, self.shape, self.direction):
            if min(c, s, d) < 0:
                out.append("")
            else:
                out.append(f"a {ms.COLOUR_NAMES[c]} {ms.SHAPES[s]} moving {ms.DIRECTIONS[d]}")
        return out


def analyse(videos: np.ndarray) -> Analysis:
    """Predicts colour, shape and direction and measures the temporal consistency of uint8 [N, T, H, W, 3] videos."""
    videos = _check_videos(videos)
    parts = [_analyse_chunk(videos[i : i + _CHUNK]) for i in range(0, len(videos), _CHUNK)]
    return Analysis(**{f.name: np.concatenate([p[f.name] for p in parts]) for f in dataclasses.fields(Analysis)})


def evaluate(videos: np.ndarray, prompts) -> dict[str, float | int]:
    """Fractions of videos whose colour / shape / direction match their prompt, and that are temporally consistent.

    Args:
      videos: uint8 [N, T, H, W, 3], N >= 1 (fewer than 64 gives a warning: the fractions are coarse).
      prompts: N moving_shapes captions ("a red square moving right"); str or bytes.

    Returns:
      {"colour_accuracy", "shape_accuracy", "direction_accuracy", "consistency", "stability", "num_samples"}.
    """
    videos = _check_videos(videos)
    prompts = [p.decode() if isinstance(p, bytes) else str(p) for p in np.asarray(prompts, dtype=object).ravel()]
    if len(prompts) != len(videos):
        raise ValueError(f"got {len(videos)} videos but {len(prompts)} prompts; give one prompt per video")
    truth = np.array([ms.split_label(ms.parse_caption(p)) for p in prompts])  # [N, 3] names
    if len(videos) < RECOMMENDED_SAMPLES:
        warnings.warn(
            f"evaluating only {len(videos)} samples; use >= {RECOMMENDED_SAMPLES} for meaningful fractions",
            stacklevel=2,
        )
    a = analyse(videos)
    want = {
        "colour": np.array([ms.COLOUR_NAMES.index(c) for c in truth[:, 0]]),
        "shape": np.array([ms.SHAPES.index(s) for s in truth[:, 1]]),
        "direction": np.array([ms.DIRECTIONS.index(d) for d in truth[:, 2]]),
    }
    return {
        "colour_accuracy": float(np.mean(a.colour == want["colour"])),
        "shape_accuracy": float(np.mean(a.shape == want["shape"])),
        "direction_accuracy": float(np.mean(a.direction == want["direction"])),
        "consistency": float(np.mean(a.consistent)),
        "stability": float(np.mean(a.stability)),
        "num_samples": len(videos),
    }


def _check_videos(videos) -> np.ndarray:
    videos = np.asarray(videos)
    if videos.dtype != np.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"videos must be uint8 [N, T, H, W, 3]; got {videos.dtype} {videos.shape}")
    if min(videos.shape) < 1:
        raise ValueError(f"videos must hold at least one sample with T, H, W >= 1; got shape {videos.shape}")
    return videos


def _analyse_chunk(videos: np.ndarray) -> dict[str, np.ndarray]:
    n, t, h, w, _ = videos.shape
    v = videos.astype(np.int16)  # [n, T, H, W, 3]
    fg, area, cx, cy = _track(v)
    present = area > 0
    safe_area = np.maximum(area, 1)

    # Least-squares velocity of the centroid track over the frames with an object.
    frames = np.arange(t, dtype=np.float64)
    weight = present.astype(np.float64)
    count = weight.sum(1)  # [n]
    t_mean = (weight * frames).sum(1) / np.maximum(count, 1)
    dt = (frames[None] - t_mean[:, None]) * weight  # [n, T]
    denom = np.maximum((dt**2).sum(1), 1e-9)
    velocity = np.stack([(dt * cx).sum(1) / denom, (dt * cy).sum(1) / denom], -1)  # [n, 2]
    horizontal = np.abs(velocity[:, 0]) >= np.abs(velocity[:, 1])
    direction = np.where(
        horizontal,
        np.where(velocity[:, 0] < 0, ms.DIRECTIONS.index("left"), ms.DIRECTIONS.index("right")),
        np.where(velocity[:, 1] < 0, ms.DIRECTIONS.index("up"), ms.DIRECTIONS.index("down")),
    )
    direction = np.where(count >= 2, direction, -1)

    # Fill ratio of the bounding box, per frame, then the median over frames with an object.
    cols, rows = fg.any(2), fg.any(3)  # [n, T, W], [n, T, H]
    width = w - np.argmax(cols[..., ::-1], -1) - np.argmax(cols, -1)
    height = h - np.argmax(rows[..., ::-1], -1) - np.argmax(rows, -1)
    top = np.argmax(rows, -1)
    fill = np.where(present, area / np.maximum(width * height, 1), np.nan)  # [n, T]
    rise = np.where(present, (cy - top) / np.maximum(height, 1), np.nan)  # [n, T]
    has_object = count > 0
    fill_ratio, centroid_height = np.full(n, np.nan), np.full(n, np.nan)
    fill_ratio[has_object] = np.nanmedian(fill[has_object], 1)
    centroid_height[has_object] = np.nanmedian(rise[has_object], 1)
    shape = np.select(
        [~has_object, fill_ratio >= SQUARE_MIN_FILL, _triangle_score(fill_ratio, centroid_height) > 0],
        [-1, ms.SHAPES.index("square"), ms.SHAPES.index("triangle")],
        ms.SHAPES.index("circle"),
    )

    # Colour: of the whole video, and of each frame (with how many of its pixels actually match that colour).
    colour_sum = (v * fg[..., None]).sum((2, 3)).astype(np.float64)  # [n, T, 3]
    colour = np.where(has_object, _nearest(colour_sum.sum(1) / np.maximum(area.sum(1), 1)[:, None]), -1)  # [n]
    frame_colour = _nearest(colour_sum / safe_area[..., None])  # [n, T]
    palette = ms.PALETTE.astype(np.int16)[frame_colour]  # [n, T, 3]
    matches = (np.abs(v - palette[:, :, None, None, :]).max(-1) <= PIXEL_TOLERANCE) & fg
    purity = matches.sum((2, 3)) / safe_area  # [n, T]
    agrees = present & (purity >= MIN_PURITY) & (frame_colour == colour[:, None])  # [n, T]

    mean_area = area.mean(1)
    area_cv = np.where(mean_area > 0, area.std(1) / np.maximum(mean_area, 1e-9), np.inf)
    consistent = agrees.all(1) & (area_cv < AREA_CV_MAX)
    stability = agrees.mean(1) * np.clip(1 - area_cv, 0, 1)
    return {
        "colour": colour.astype(np.int32),
        "shape": shape.astype(np.int32),
        "direction": direction.astype(np.int32),
        "fill_ratio": fill_ratio,
        "centroid_height": centroid_height,
        "velocity": velocity,
        "area_cv": area_cv,
        "stability": stability,
        "consistent": consistent,
    }


def _track(v: np.ndarray) -> tuple[np.ndarray, ...]:
    """(foreground bool [n, T, H, W], area float [n, T], centroid x and y float [n, T] in px) of int [n, T, H, W, 3]."""
    _, _, h, w, _ = v.shape
    fg = v.max(-1) > FOREGROUND_THRESHOLD
    area = fg.sum((2, 3)).astype(np.float64)
    safe_area = np.maximum(area, 1)
    cx = (fg.sum(2) * (np.arange(w) + 0.5)).sum(-1) / safe_area
    cy = (fg.sum(3) * (np.arange(h) + 0.5)).sum(-1) / safe_area
    return fg, area, cx, cy


# ---------------------------------------------------------------- frame interpolation and seams

PSNR_CAP_DB = 100.0  # the PSNR of identical frames (MSE 0) is reported as this


def frame_quality(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """PSNR and SSIM of generated frames against the ground truth, uint8 [N, G, H, W, C] each (G frames per clip).

    PSNR (dB) per clip from the MSE over the clip's G frames on uint8 pixels (peak 255; capped at PSNR_CAP_DB), then
    averaged over clips; SSIM (Wang et al. 2004; `dm_pix.ssim`, 11x11 Gaussian window, sigma 1.5, on [0, 1] pixels)
    per frame, averaged over a clip's frames, then over clips. Raises ValueError for inputs of other shapes.
    """
    import dm_pix

    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape or pred.ndim != 5 or pred.dtype != np.uint8 or truth.dtype != np.uint8:
        raise ValueError(
            f"pred and truth must be uint8 [N, G, H, W, C] of one shape; got {pred.dtype} "
            f"{pred.shape} and {truth.dtype} {truth.shape}"
        )
    n, g, h, w, c = pred.shape
    mse = ((pred.astype(np.float64) - truth.astype(np.float64)) ** 2).mean((1, 2, 3, 4))  # [N]
    with np.errstate(divide="ignore"):
        psnr = np.minimum(10 * np.log10(255.0**2 / mse), PSNR_CAP_DB)
    a = pred.reshape(n * g, h, w, c).astype(np.float32) / 255.0
    b = truth.reshape(n * g, h, w, c).astype(np.float32) / 255.0
    ssim = np.asarray(dm_pix.ssim(a, b, filter_size=min(11, h, w))).reshape(n, g).mean(1)
    return {"psnr": float(psnr.mean()), "ssim": float(ssim.mean()), "num_clips": int(n)}


def blend_frames(first: np.ndarray, last: np.ndarray, gap: int) -> np.ndarray:
    """The linear-blending baseline: frame i of the gap (1..gap) is (1 - i / (gap + 1)) first + i / (gap + 1) last,
    rounded; first, last uint8 [N, H, W, C] -> uint8 [N, gap, H, W, C]."""
    w = (np.arange(1, gap + 1) / (gap + 1))[None, :, None, None, None]
    mix = (1 - w) * first[:, None].astype(np.float64) + w * last[:, None].astype(np.float64)
    return np.clip(np.round(mix), 0, 255).astype(np.uint8)


def nearest_frames(first: np.ndarray, last: np.ndarray, gap: int) -> np.ndarray:
    """The repeat-the-nearest-keyframe baseline (ties to the first): uint8 [N, gap, H, W, C]."""
    later = (np.arange(1, gap + 1) > (gap + 1) / 2)[None, :, None, None, None]
    return np.where(later, last[:, None], first[:, None]).astype(np.uint8)


SEAM_TOLERANCE_PX = 1.0


def keyframe_steps(num_frames: int, stride: int) -> list[int]:
    """The frame steps into and out of every inner keyframe (frames stride, 2 stride, ...) of a video of
    `num_frames` frames: where a keyframes -> interpolation pipeline could show a seam (`seams`' `steps`)."""
    return [t for k in range(stride, num_frames - 1, stride) for t in (k - 1, k)]


def seams(videos: np.ndarray, steps) -> dict[str, float]:
    """Continuity of the object across chosen frame steps (e.g. the keyframe boundaries of a pipeline, or the
    last given -> first generated frame of a continuation), uint8 videos [N, T, H, W, 3].

    `steps` are frame indices t: the step from frame t to t + 1 is a boundary step. Per video, the centroid step
    length |c(t+1) - c(t)| (px) of each boundary step is compared with the median step length over the other steps;
    a video has a seam when one of them differs by more than SEAM_TOLERANCE_PX or the object's (nearest palette)
    colour changes across one.

    Returns: {"seam_free": fraction of videos without a seam, "step_deviation_px": mean over videos of the largest
    |boundary step - median inner step|, "colour_kept": fraction of videos whose colour is the same on both sides of
    every boundary step, "num_samples"}. Videos with a frame without an object count as seams (deviation inf is not
    averaged: such videos are left out of step_deviation_px).
    """
    videos = _check_videos(videos)
    t = videos.shape[1]
    steps = sorted({int(s) for s in steps})
    if not steps or steps[0] < 0 or steps[-1] > t - 2:
        raise ValueError(f"steps {steps} must be non-empty frame indices in [0, {t - 2}] (step t: frame t -> t + 1)")
    inner = [s for s in range(t - 1) if s not in steps]
    if not inner:
        raise ValueError(f"steps {steps} leave no inner step of the {t} frames to compare with")
    v = videos.astype(np.int16)
    _, area, cx, cy = _track(v)
    present = (area > 0).all(1)
    step_len = np.hypot(np.diff(cx, axis=1), np.diff(cy, axis=1))  # [N, T - 1]
    deviation = np.abs(step_len[:, steps] - np.median(step_len[:, inner], 1, keepdims=True)).max(1)
    fg = v.max(-1) > FOREGROUND_THRESHOLD
    mean = (v * fg[..., None]).sum((2, 3)) / np.maximum(area, 1)[..., None]
    colour = _nearest(mean)  # [N, T]
    kept = np.all([colour[:, s] == colour[:, s + 1] for s in steps], 0) & present
    ok = present & (deviation <= SEAM_TOLERANCE_PX) & kept
    return {
        "seam_free": float(ok.mean()),
        "step_deviation_px": float(deviation[present].mean()) if present.any() else float("nan"),
        "colour_kept": float(kept.mean()),
        "num_samples": len(videos),
    }


def _triangle_score(fill_ratio: np.ndarray, centroid_height: np.ndarray) -> np.ndarray:
    """> 0 for an apex-up triangle, < 0 for a circle: each cue scaled to +-1/2 at the two ideal shapes, summed."""
    from_fill = (np.pi / 4 + 0.5) / 2 - fill_ratio  # ideal: circle pi/4, triangle 1/2
    from_height = centroid_height - (0.5 + 2 / 3) / 2  # ideal: circle 1/2, triangle 2/3
    return from_fill / (np.pi / 4 - 0.5) + from_height / (2 / 3 - 0.5)


def _nearest(rgb: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour (Euclidean) of float [..., 3] colours."""
    d = ((rgb[..., None, :] - ms.PALETTE.astype(np.float64)) ** 2).sum(-1)  # [..., 7]
    return np.argmin(d, -1)
