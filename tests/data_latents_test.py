"""The latent dataset round trip (`vdit_jax.data.latents`): a dataset encoded once by an autoencoder run, normalised
with stats stored in its metadata, read by the trainer's pipeline, and a DiT trained on it whose samples come out
as pixels decoded by that autoencoder."""

import json

import jax
import numpy as np
import pytest

from tests import tiny_config as tiny
from vdit_jax import cli, inference, tasks
from vdit_jax import config as config_lib
from vdit_jax import evaluate as evaluate_cli
from vdit_jax.data import latents, sources
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.parallel import sharding as sh
from vdit_jax.train import checkpoint as ckpt_lib
from vdit_jax.train import loop
from vdit_jax.train import state as state_lib

N = 16  # records encoded per split


def _autoencoder_run(workdir):
    """A randomly initialised autoencoder (4x spatial, 1x temporal: the 8-frame test data) saved as a training run."""
    c = config_lib.base_config("video_autoencoder")
    c.data.update(builder_config="8x32", video_shape=(8, 32, 32, 3), label_key="", num_classes=0)
    c.model.update(base_channels=8, spatial_patch=2, channel_mults=(1, 1), temporal_compression=1)
    c.train.global_batch_size = 2
    mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
    rules = sh.rules_from_config(c.logical_axis_rules)
    state = state_lib.create_train_state(c, mesh, rules, jax.random.key(0))
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(c.to_json_best_effort())
    with ckpt_lib.Checkpointer(workdir / "checkpoints") as ckpt:
        ckpt.save(0, state, config=c, force=True)
    return workdir


@pytest.fixture(scope="module")
def latent_data(tmp_path_factory, moving_shapes_dir):
    root = tmp_path_factory.mktemp("latents")
    run = _autoencoder_run(root / "vae")
    data_dir = root / "data"
    data_dir.mkdir()
    for name in ("moving_shapes",):  # the prepared source, shared read-only
        (data_dir / name).symlink_to(moving_shapes_dir / name)
    name = latents.write_dataset(data_dir, "moving_shapes/8x32", "tiny", run, batch_size=8, max_examples=N)
    return run, data_dir, name


def test_latent_dataset_round_trip(latent_data, moving_shapes_dir):
    run, data_dir, name = latent_data
    assert name == "video_latents/tiny"
    meta = latents.read_metadata(data_dir, name)
    assert meta["autoencoder"] == str(run) and meta["autoencoder_step"] == 0 and meta["source"] == "moving_shapes/8x32"
    mean, std = np.asarray(meta["latent_mean"]), np.asarray(meta["latent_std"])
    assert mean.shape == std.shape == (4,)

    import tensorflow_datasets as tfds

    train = tfds.data_source(name, split="train", data_dir=str(data_dir))
    source = tfds.data_source("moving_shapes/8x32", split="train", data_dir=str(moving_shapes_dir))
    assert len(train) == N
    z = np.stack([train[i]["video"] for i in range(N)])
    assert z.shape == (N, 8, 8, 8, 4) and z.dtype == np.float32
    np.testing.assert_allclose(z.mean(axis=(0, 1, 2, 3)), 0, atol=1e-4)  # normalised with the train split's stats
    np.testing.assert_allclose(z.std(axis=(0, 1, 2, 3)), 1, atol=1e-3)
    assert train[3]["label"] == source[3]["label"]  # the other features kept, record for record

    # Record 3 is the autoencoder's posterior mean of source record 3, normalised; denormalised and decoded it is
    # the autoencoder's reconstruction of that video.
    config, params, _ = inference.load(run)
    task = tasks.get(config)
    video = np.asarray(source[3]["video"])[None]
    want = np.asarray(task.encode(params, video)[0][0])
    np.testing.assert_allclose(train[3]["video"] * std + mean, want, rtol=1e-4, atol=1e-4)
    dit = tiny.get_config("")
    dit.data.name = name
    latents.fill_config(dit, data_dir)
    assert dit.latent.autoencoder == str(run) and np.allclose(dit.latent.std, std)
    assert dit.latent.source == "moving_shapes/8x32" and sources.caption(dit, 3) == "a red square moving down"
    pixels = latents.decode(dit, train[3]["video"][None])
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 8, 32, 32, 3)
    recon = np.asarray(task.sample(params, {"video": video}, None))
    assert np.abs(pixels.astype(int) - recon.astype(int)).max() <= 1

    # The evaluate CLI's --autoencoder_run: reconstruction quality, whole and in tiles, and the compression.
    scores = evaluate_cli.run(None, autoencoder=str(run), num=4, data_dir=str(moving_shapes_dir))
    assert scores["compression"] == 8 * 32 * 32 * 3 / (8 * 8 * 8 * 4) and scores["latent_shape"] == [8, 8, 8, 4]
    assert scores["num_clips"] == 4 and np.isfinite(scores["psnr"]) and -1 <= scores["ssim"] <= 1
    assert scores["tiled"]["tile_latent_px"] == 4 and np.isfinite(scores["tiled"]["psnr_vs_whole"])

    other = dit.copy_and_resolve_references()
    other.latent.autoencoder = "/somewhere/else"
    with pytest.raises(ValueError, match="config.latent.autoencoder='/somewhere/else' .* was encoded with"):
        latents.fill_config(other, data_dir)
    with pytest.raises(FileExistsError, match="exists; delete it to write the dataset again"):
        latents.write_dataset(data_dir, "moving_shapes/8x32", "tiny", run)


def test_a_dit_trains_on_latents_and_samples_pixels(latent_data, tmp_path):
    run, data_dir, name = latent_data
    c = tiny.get_config("")
    c.data.update(name=name, video_shape=(8, 8, 8, 4), builder_config="")
    c.model.update(in_channels=4, patch_size=(2, 2, 2))
    c.train.update(num_steps=2, sample_num=2, global_batch_size=8)
    latents._autoencoder.cache_clear()  # the trainer's samples load the autoencoder inside its sampling mesh
    last = loop.train(c, tmp_path / "run", data_dir=data_dir)
    assert last["step"] == 2 and np.isfinite(last["loss"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["latent"]["autoencoder"] == str(run)  # the run samples pixels with nothing but its config
    samples = np.load(tmp_path / "run" / "samples" / "step_2" / "samples.npz")
    assert samples["videos"].shape == (2, 8, 32, 32, 3) and samples["videos"].dtype == np.uint8
    with pytest.raises(cli.UsageError, match="is a 'dit' run, not a video autoencoder"):
        evaluate_cli.run(None, autoencoder=str(tmp_path / "run"), num=1)
