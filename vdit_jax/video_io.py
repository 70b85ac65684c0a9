"""Writing videos: mp4 through mediapy (with the ffmpeg binary that imageio-ffmpeg ships) and gif through imageio."""

from __future__ import annotations

import os
import tempfile

import numpy as np
from absl import logging
from etils import epath

from vdit_jax import paths


def configure_mediapy():
    """mediapy with the ffmpeg binary that imageio-ffmpeg ships (no system ffmpeg needed)."""
    import imageio_ffmpeg
    import mediapy

    mediapy.set_ffmpeg(imageio_ffmpeg.get_ffmpeg_exe())
    return mediapy


def write_mp4(path: str, video: np.ndarray, fps: int = 8) -> None:
    """video: uint8 [T, H, W, 3]. Frames are upscaled to at least 64 px (mp4 encoders dislike tiny frames)."""
    configure_mediapy().write_video(path, _upscale(video), fps=fps, codec="h264")


def write_gif(path: str, video: np.ndarray, fps: int = 8) -> None:
    import imageio.v3 as iio

    iio.imwrite(path, _upscale(video), extension=".gif", duration=1000 / fps, loop=0)


def _upscale(video: np.ndarray, min_size: int = 64) -> np.ndarray:
    factor = max(1, -(-min_size // video.shape[1]))
    return np.repeat(np.repeat(video, factor, axis=1), factor, axis=2)


def read_prompts(path) -> list[str] | None:
    """The `prompts` of a `samples.npz` (str, one per video), or None for a file without them (or not an .npz)."""
    path = paths.resolve(path)
    if path.suffix.lower() != ".npz" or not path.exists():
        return None
    import io

    with np.load(io.BytesIO(path.read_bytes())) as data:
        if "prompts" not in data:
            return None
        return [p.decode() if isinstance(p, bytes) else str(p) for p in data["prompts"].ravel()]


def read_videos(path) -> np.ndarray:
    """uint8 [N, T, H, W, 3] videos from a `samples.npz` as the sampler writes it (key `videos`) or one video file
    (.mp4 / .gif / anything imageio's FFMPEG plugin reads: N = 1). `path` is any `etils.epath` path.

    Raises:
      ValueError: the file holds no such videos (the message names what it found), or cannot be decoded.
      FileNotFoundError: no such file.
    """
    path = paths.resolve(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {os.fspath(path)}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        import io

        with np.load(io.BytesIO(path.read_bytes())) as data:
            if "videos" not in data:
                raise ValueError(f"{os.fspath(path)} has no 'videos' array (it has {sorted(data.files)})")
            videos = data["videos"]
    else:
        import imageio.v3 as iio

        with tempfile.TemporaryDirectory(prefix="vdit_read_") as tmp:
            local = os.path.join(tmp, f"video{suffix}")
            epath.Path(local).write_bytes(path.read_bytes())
            try:
                frames = iio.imread(local, index=None, plugin="FFMPEG" if suffix != ".gif" else None)
            except Exception as e:  # imageio raises many kinds for a file it cannot decode
                raise ValueError(f"cannot read {os.fspath(path)} as a video: {type(e).__name__}: {e}") from None
        videos = np.asarray(frames)[None, ..., :3]
    if videos.ndim != 5 or videos.shape[-1] != 3 or videos.dtype != np.uint8 or 0 in videos.shape:
        raise ValueError(
            f"{os.fspath(path)} must hold uint8 RGB videos [N, T, H, W, 3], got {videos.dtype} {videos.shape}"
        )
    return videos


def save_samples(out_dir, videos: np.ndarray, prompts, fps: int = 8, write_media: bool = True) -> str:
    """Writes `out_dir/samples.npz` and, for RGB videos, `sample_NNN.mp4` / `.gif` per video.

    `out_dir` is any `etils.epath` path (`gs://...` too: the media are encoded in a local temporary directory and
    copied). `videos`: uint8 [N, T, H, W, 3] RGB (npz key `videos`), or a model output that is not an RGB video,
    e.g. float latents [N, T', H', W', C'] until an autoencoder decodes them: those go to samples.npz only (key
    `latents`), with one warning. `prompts`: N strings (npz key `prompts`). Returns the path of samples.npz.
    """
    out_dir = paths.resolve(out_dir)
    if videos.ndim != 5:
        raise ValueError(f"videos must be [N, T, H, W, C], got shape {videos.shape}")
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = np.asarray(list(prompts), dtype=str)
    path = out_dir / "samples.npz"
    if videos.dtype != np.uint8 or videos.shape[-1] != 3:
        logging.log_first_n(
            logging.WARNING,
            "samples of shape %s (%s) are not RGB videos (latents?): writing %s only, no mp4/gif",
            1,
            videos.shape,
            videos.dtype,
            path,
        )
        paths.savez_compressed(path, latents=videos, prompts=prompts)
        return os.fspath(path)
    if write_media:
        with tempfile.TemporaryDirectory(prefix="vdit_samples_") as tmp:
            for i, video in enumerate(videos):
                for ext, write in (("mp4", write_mp4), ("gif", write_gif)):
                    local = os.path.join(tmp, f"sample_{i:03d}.{ext}")
                    write(local, video, fps)
                    (out_dir / f"sample_{i:03d}.{ext}").write_bytes(epath.Path(local).read_bytes())
    paths.savez_compressed(path, videos=videos, prompts=prompts)
    return os.fspath(path)
