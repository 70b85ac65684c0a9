"""A dataset encoded once into a video autoencoder's latents, for latent diffusion.

    python -m vdit_jax.data.latents --autoencoder=runs/vae --source=moving_shapes/17x32 --name=ms17_s4t4

writes the TFDS dataset `video_latents/ms17_s4t4` (array_record) under the data dir: every split of the source with
its other features kept and `video` replaced by the autoencoder's posterior mean, normalised per channel,

    video  float32 [1 + (T - 1) / r, H / s, W / s, C']   (mean(x) - latent_mean) / latent_std

with `latent_mean` / `latent_std` [C'] measured on the train split. The dataset's metadata holds them with the
autoencoder's workdir and step (`read_metadata`). A DiT trains on it like on any dataset (`data.name =
"video_latents/ms17_s4t4"`, `data.video_shape` = the latent shape); the trainer copies the metadata into the run's
`config.latent` (`fill_config`), so sampling decodes its latents back to pixels (`decode`) with nothing but the run:
`vdit_jax.sample` writes mp4 / gif / npz of pixels as for a pixel model.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags, logging
from etils import epath

NAME = "video_latents"


def is_latent_dataset(name: str) -> bool:
    return name.startswith(NAME + "/")


class VideoLatents(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A prepared dataset's records with `video` encoded (see the module docstring). Not registered: written by
    `write_dataset`, read back from its files (so reading needs neither this class nor the autoencoder)."""

    name = NAME
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    code_path = epath.Path(__file__)

    def __init__(self, *, name: str, source: dict, latents: dict, metadata: dict, **kwargs):
        self._source, self._latents, self._metadata = source, latents, metadata
        super().__init__(config=tfds.core.BuilderConfig(name=name, version=self.VERSION), **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = self._source["features"]
        shape = next(iter(self._latents.values())).shape[1:]
        return tfds.core.DatasetInfo(
            builder=self,
            description="a dataset's videos as normalised latents of a causal video autoencoder",
            features=tfds.features.FeaturesDict(
                {
                    **{k: features[k] for k in features.keys() if k != "video"},
                    "video": tfds.features.Tensor(shape=shape, dtype=np.float32, encoding=tfds.features.Encoding.ZLIB),
                }
            ),
            metadata=tfds.core.MetadataDict(self._metadata),
            disable_shuffling=True,  # record i is the source's record i
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in self._latents}

    def _generate_examples(self, split: str):
        source = self._source["splits"][split]
        for i, z in enumerate(self._latents[split]):
            record = {k: v for k, v in source[i].items() if k != "video"}
            yield i, {**record, "video": z}


def write_dataset(
    data_dir,
    source: str,
    name: str,
    autoencoder,
    *,
    step: int | None = None,
    batch_size: int = 32,
    max_examples: int | None = None,
) -> str:
    """Encodes every split of the prepared TFDS dataset `source` ("name/config"; moving_shapes is built first if
    needed) with the EMA parameters of the autoencoder run `autoencoder` (its latest checkpoint, or `step`) and
    writes `video_latents/<name>` under `data_dir`; returns the `config.data.name` to train on.

    Raises:
      ValueError: the run is not a video autoencoder, or the source's videos do not fit it (frames 1 + r k, sizes
        divisible by s); FileExistsError: the dataset exists (delete it to rebuild: nothing is overwritten).
    """
    from vdit_jax import inference, paths, tasks
    from vdit_jax.data import moving_shapes
    from vdit_jax.tasks import autoencoder as ae_task

    data_dir = os.fspath(data_dir)
    target = epath.Path(data_dir) / NAME / name
    if target.exists():
        raise FileExistsError(f"{target} exists; delete it to write the dataset again")
    config, params, loaded_step = inference.load(autoencoder, step)
    if config.model.kind != ae_task.KIND:
        raise ValueError(f"{autoencoder!r} is a {config.model.kind!r} run, not a {ae_task.KIND!r} one")
    task = tasks.get(config)
    source_name, _, source_config = source.partition("/")
    if source_name == moving_shapes.NAME:
        moving_shapes.prepare(data_dir, source_config or moving_shapes.MovingShapes.DEFAULT_CONFIG_NAME)
    builder = tfds.builder(source, data_dir=data_dir)
    splits = {s: tfds.data_source(source, split=s, data_dir=data_dir) for s in builder.info.splits}
    video_shape = builder.info.features["video"].shape
    task.net.latent_shape((1, *video_shape))  # refuses a frame count the autoencoder cannot encode
    s = task.net.spatial_compression
    if video_shape[1] % s or video_shape[2] % s:
        raise ValueError(f"{source}'s {video_shape[1]}x{video_shape[2]} frames are not divisible by s={s}")

    raw = {}
    for split, src in splits.items():
        num = len(src) if max_examples is None else min(len(src), max_examples)
        out = []
        for start in range(0, num, batch_size):
            videos = np.stack([np.asarray(src[i]["video"]) for i in range(start, min(num, start + batch_size))])
            out.append(np.asarray(task.encode(params, videos)[0], np.float32))
            logging.log_every_n_seconds(logging.INFO, "%s: encoded %d / %d", 30, split, start + len(videos), num)
        raw[split] = np.concatenate(out)
    train = raw.get("train", next(iter(raw.values())))
    mean = train.mean(axis=(0, 1, 2, 3))
    std = train.std(axis=(0, 1, 2, 3)) + 1e-6
    latents = {split: (z - mean) / std for split, z in raw.items()}
    metadata = {
        "latent_mean": mean.tolist(),
        "latent_std": std.tolist(),
        "autoencoder": os.fspath(paths.resolve(autoencoder)),  # absolute: the run samples from anywhere
        "autoencoder_step": int(loaded_step),
        "source": source,
    }
    out = VideoLatents(
        name=name,
        source={"features": builder.info.features, "splits": splits},
        latents=latents,
        metadata=metadata,
        data_dir=data_dir,
        file_format="array_record",
    )
    out.download_and_prepare(file_format="array_record")
    return f"{NAME}/{name}"


def read_metadata(data_dir, name: str) -> dict:
    """The metadata of the prepared latent dataset `name` ("video_latents/<name>"): latent_mean, latent_std,
    autoencoder, autoencoder_step, source. Raises FileNotFoundError when it is not prepared under `data_dir`."""
    root = epath.Path(data_dir) / name
    versions = sorted(root.glob("*/metadata.json")) if root.exists() else []
    if not versions:
        raise FileNotFoundError(f"latent dataset {name!r} is not prepared under {os.fspath(data_dir)!r}")
    return json.loads(versions[-1].read_text())


def fill_config(config: ml_collections.ConfigDict, data_dir) -> None:
    """Copies the latent dataset's decoding metadata into `config.latent` (autoencoder, its step, mean, std, the
    source dataset), so a run samples pixels (and reads its source's prompts) with nothing but its own config.
    Raises ValueError when `config.latent` names another autoencoder than the dataset was encoded with."""
    meta = read_metadata(data_dir, config.data.name)
    lat = config.latent
    if lat.autoencoder and (lat.autoencoder, lat.autoencoder_step) != (meta["autoencoder"], meta["autoencoder_step"]):
        raise ValueError(
            f"config.latent.autoencoder={lat.autoencoder!r} (step {lat.autoencoder_step}), but {config.data.name} "
            f"was encoded with {meta['autoencoder']!r} (step {meta['autoencoder_step']})"
        )
    lat.autoencoder = meta["autoencoder"]
    lat.autoencoder_step = meta["autoencoder_step"]
    lat.mean = tuple(float(v) for v in meta["latent_mean"])
    lat.std = tuple(float(v) for v in meta["latent_std"])
    lat.source = meta["source"]


@functools.cache
def _autoencoder(workdir: str, step: int):
    from vdit_jax import inference, tasks

    config, params, _ = inference.load(workdir, step)
    return tasks.get(config), params


def decode(config: ml_collections.ConfigDict, latents) -> np.ndarray:
    """uint8 pixels [N, T, H, W, 3] of normalised latents [N, T', H', W', C'] of a run on a latent dataset (its
    `config.latent`): denormalised with the stored mean / std and decoded by the autoencoder (loaded once)."""
    from vdit_jax.tasks import dit as dit_task

    lat = config.latent
    task, params = _autoencoder(lat.autoencoder, int(lat.autoencoder_step))
    z = np.asarray(latents, np.float32) * np.asarray(lat.std, np.float32) + np.asarray(lat.mean, np.float32)
    return dit_task.to_uint8(task.decode(params, jax.numpy.asarray(z)))


# ---------------------------------------------------------------- CLI (flags defined only when run as a program:
# the trainer imports this module)


def main() -> None:
    from vdit_jax import cli
    from vdit_jax.data import sources

    autoencoder = flags.DEFINE_string("autoencoder", None, "The video autoencoder's training run.")
    step = flags.DEFINE_integer("step", None, "Its checkpoint (default: the latest).")
    source = flags.DEFINE_string("source", None, "The TFDS dataset to encode, e.g. moving_shapes/17x32.")
    name = flags.DEFINE_string("name", None, "The latent dataset's name: writes video_latents/NAME.")
    data_dir = flags.DEFINE_string(
        "data_dir", None, "Local data dir (default $VDIT_DATA_DIR or ~/.cache/vdit_jax/data)."
    )
    batch = flags.DEFINE_integer("batch_size", 32, "Videos per encoder call.")
    max_examples = flags.DEFINE_integer("max_examples", None, "Encode only the first N records of every split.")

    def write(*args, **kwargs):
        try:
            return write_dataset(*args, **kwargs)
        except ValueError as e:
            raise cli.UsageError(str(e)) from None

    def _main(argv):
        if len(argv) > 1:
            cli.fail(f"unexpected arguments {argv[1:]}; see --help")
        for flag in (autoencoder, source, name):
            if not flag.value:
                cli.fail(f"--{flag.name} is required")
        cli.setup_logging()
        root = data_dir.value or sources.default_data_dir()
        written = cli.run_guarded(
            write,
            root,
            source.value,
            name.value,
            autoencoder.value,
            step=step.value,
            batch_size=batch.value,
            max_examples=max_examples.value,
        )
        print(json.dumps({"data.name": written, "data_dir": root, **read_metadata(root, written)}))

    app.run(_main, flags_parser=cli.parse_flags)


if __name__ == "__main__":
    main()
