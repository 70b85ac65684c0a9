"""synthetic_latent_text: prepared at tiny sizes and read back through `sources.make_train_dataset` (fields, dtypes,
shapes, masks, determinism), a learnable caption -> text / video relation, metadata, data dirs, sample conditions."""

import itertools

import numpy as np
import pytest

from vdit_jax import config as config_lib
from vdit_jax.data import latent_text as lt
from vdit_jax.data import moving_shapes as ms
from vdit_jax.data import sources

SHAPE, L, D = (4, 8, 8, 4), 8, 16


def text_config(**data):
    c = config_lib.base_config()
    c.data.update({**dict(name=lt.NAME, video_shape=SHAPE, text_len=L, label_key="", num_classes=0), **data})
    c.model.update(dict(in_channels=4, text_dim=D, num_classes=0))
    c.train.global_batch_size = 6
    return c


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The dataset of `text_config()`, prepared once through the training pipeline's own entry point."""
    path = tmp_path_factory.mktemp("latent_text")
    sources.make_train_dataset(text_config(), path)
    return path


@pytest.fixture(scope="session")
def records(data_dir):
    return list(lt.data_source(data_dir, sources.latent_text_config(text_config()), "train"))


def _take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def test_training_batches_have_exactly_what_a_text_model_reads(data_dir):
    batches = _take(sources.make_train_dataset(text_config(), data_dir), 3)
    batch = batches[0]
    assert batch.keys() == {"video", "text", "text_mask"}  # no label_key: no label
    assert batch["video"].dtype == np.float32 and batch["video"].shape == (6, *SHAPE)
    assert batch["text"].dtype == np.float32 and batch["text"].shape == (6, L, D)
    assert batch["text_mask"].dtype == np.bool_ and batch["text_mask"].shape == (6, L)
    for mask, text in zip(batch["text_mask"], batch["text"]):
        n = int(mask.sum())
        assert 5 <= n <= lt.MAX_WORDS and mask[:n].all()  # a prefix of 5-7 real words, then padding
        assert (text[n:] == 0).all() and (np.abs(text[:n]).sum(-1) > 0).all()
    # Latents: float, about unit scale, not pixels in [-1, 1].
    assert 0.3 < float(np.std(batch["video"])) < 3 and float(np.abs(batch["video"]).max()) > 1
    # Deterministic: a second pipeline over the same prepared data gives the same batches.
    for a, b in zip(batches, _take(sources.make_train_dataset(text_config(), data_dir), 3), strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # With a label key the class label comes along too.
    labelled = next(iter(sources.make_train_dataset(text_config(label_key="label"), data_dir)))
    assert labelled["label"].dtype == np.int32 and labelled["label"].shape == (6,)
    assert labelled["label"].min() >= 0 and labelled["label"].max() < ms.NUM_CLASSES


def test_records_are_the_deterministic_examples(records):
    config = sources.latent_text_config(text_config())
    assert config.name == "4x8x8x4-text8x16" and len(records) == config.num_train == 400
    for i in (0, 7, 399):
        expected = lt.make_example(config, "train", i)
        for key in ("video", "text", "text_mask", "label"):
            np.testing.assert_array_equal(records[i][key], expected[key])
        assert records[i]["caption"].decode() == expected["caption"]
    assert not np.array_equal(lt.make_example(config, "test", 0)["video"], records[0]["video"])


def test_text_and_video_follow_the_caption(records):
    """The learnable relation: the same caption always has the same text; the text is the caption's words; the
    latent decodes to a clip of the caption's colour moving in its direction."""
    by_caption = {}
    for r in records:
        by_caption.setdefault(r["caption"].decode(), []).append(r)
    repeated = [rs for rs in by_caption.values() if len(rs) > 1]
    assert len(repeated) >= 10
    for rs in repeated:
        for a, b in itertools.pairwise(rs):
            np.testing.assert_array_equal(a["text"], b["text"])
            np.testing.assert_array_equal(a["text_mask"], b["text_mask"])
    config = sources.latent_text_config(text_config())
    lengths, travel = set(), []
    for r in records[:40]:
        words = r["caption"].decode().split()
        lengths.add(len(words))
        text, mask = lt.embed_text(words, L, D)
        np.testing.assert_array_equal(r["text"], text)
        np.testing.assert_array_equal(r["text_mask"], mask)
        colour, shape, direction = ms.split_label(r["label"])
        assert [colour, shape, direction] == [w for w in words if w in (*ms.COLOUR_NAMES, *ms.SHAPES, *ms.DIRECTIONS)]
        rgb = lt.to_rgb(r["video"], config)  # [T, H, W, 3]
        lit = rgb.max(-1) > 0
        colours = np.unique(rgb[lit], axis=0)
        np.testing.assert_array_equal(colours, [ms.COLOURS[colour]])  # exactly the caption's colour
        ys, xs = (np.array([np.nonzero(f)[a].mean() for f in lit]) for a in (0, 1))
        vx, vy = ms.VELOCITY[direction]
        travel.append((xs[-1] - xs[0]) * vx + (ys[-1] - ys[0]) * vy)  # px along the caption's direction
    assert lengths == {5, 6, 7}  # optional words vary the real length
    # Under 1 px of travel over 4 frames of 8x8: some clips do not move a whole pixel, none moves backwards.
    assert min(travel) >= 0 and np.mean(np.array(travel) > 0) > 0.5
    # Different words, different embeddings.
    assert not np.allclose(lt.embed_text(["red"], 1, D)[0], lt.embed_text(["blue"], 1, D)[0])


def test_metadata_holds_the_latent_statistics(data_dir, records):
    builder = lt.prepare(data_dir, sources.latent_text_config(text_config()))  # prepared: a no-op
    meta = builder.info.metadata
    latents = np.stack([r["video"] for r in records])
    np.testing.assert_allclose(meta["latent_mean"], latents.mean((0, 1, 2, 3)), atol=1e-4)
    np.testing.assert_allclose(meta["latent_std"], latents.std((0, 1, 2, 3)), rtol=1e-3)
    assert all(0.5 < s < 2 for s in meta["latent_std"]) and len(meta["latent_mean"]) == SHAPE[3]


def test_config_names_and_bad_shapes():
    assert lt.config_name((16, 32, 32, 4), 120, 4096) == "16x32x32x4-text120x4096"
    assert (
        lt.builder_config((4, 8, 8, 4), 8, 16, seed=3, num_train=10, num_test=5).name == "4x8x8x4-text8x16-seed3-n10+5"
    )
    with pytest.raises(ValueError, match="text_len=0 and text_dim=16 must be >= 1"):
        lt.builder_config(SHAPE, 0, 16)
    with pytest.raises(ValueError, match=r"video_shape=\(4, 4, 8, 4\) needs H' and W' >= 8"):
        lt.builder_config((4, 4, 8, 4), 8, 16)


def test_data_dir_must_be_local(monkeypatch, tmp_path):
    for url in ("gs://bucket/data", "s3://b/d"):
        with pytest.raises(ValueError, match=f"data dir '{url}' must be a local path"):
            sources.open_source(text_config(), url)
    monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path))
    assert sources.default_data_dir() == str(tmp_path)
    monkeypatch.delenv(sources.DATA_DIR_ENV)
    assert sources.default_data_dir().endswith("/.cache/vdit_jax/data")


def test_sample_conditions_draw_texts_from_the_test_split(data_dir):
    config = text_config()
    cond = sources.sample_conditions(config, data_dir, 5, seed=1)
    assert cond.keys() == {"text", "text_mask", "captions", "labels"}
    assert cond["text"].shape == (5, L, D) and cond["text"].dtype == np.float32
    assert cond["text_mask"].shape == (5, L) and cond["text_mask"].dtype == np.bool_
    assert cond["labels"].tolist() == [0] * 5 and len(cond["captions"]) == 5
    for text, mask, caption in zip(cond["text"], cond["text_mask"], cond["captions"]):
        want_text, want_mask = lt.embed_text(caption.split(), L, D)
        np.testing.assert_array_equal(text, want_text)
        np.testing.assert_array_equal(mask, want_mask)
    tests = [r["caption"].decode() for r in lt.data_source(data_dir, sources.latent_text_config(config), "test")]
    assert set(cond["captions"]) <= set(tests)
    again = sources.sample_conditions(config, data_dir, 5, seed=1)
    np.testing.assert_array_equal(again["text"], cond["text"])
    assert sources.sample_conditions(config, data_dir, 5, seed=2)["captions"] != cond["captions"]
    assert len(sources.sample_conditions(config, data_dir, 50, seed=0)["captions"]) == 50  # beyond the 40 tests


def test_sample_conditions_of_class_models_need_no_data():
    config = config_lib.base_config()  # moving_shapes, 84 classes: labels spread over the classes
    config.model.num_classes = 84
    cond = sources.sample_conditions(config, "gs://not/read", 4, seed=0)
    assert cond["labels"].tolist() == [0, 21, 42, 63]
    assert cond["captions"] == [ms.caption_for(y) for y in (0, 21, 42, 63)]
