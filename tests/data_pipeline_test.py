"""The grain pipeline: shapes and scaling, determinism, exact resume, per-process shards, crops, bad records."""

import json

import grain
import numpy as np
import pytest

from vdit_jax.data import moving_shapes as ms
from vdit_jax.data import pipeline

T, S = 8, 4  # synthetic videos [T, S, S, 3]


class ListSource:
    """Record i: label i; video frame t filled with t, channel 1 with i % 256. `bad` maps an index to a problem."""

    def __init__(self, n, bad=None):
        self.n = n
        self.bad = bad or {}

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        problem = self.bad.get(i)
        if problem == "raises":
            raise OSError(f"corrupt record {i}")
        video = np.zeros((T, S, S, 3), np.uint8)
        video[..., 0] = np.arange(T)[:, None, None]
        video[..., 1] = i % 256
        if problem == "shape":
            video = video[:, :2]
        elif problem == "dtype":
            video = video.astype(np.float32)
        elif problem == "int16":
            video = video.astype(np.int16)
        elif problem == "missing":
            return {"label": i}
        return {"video": video, "label": i}


def _take(ds, n, it=None):
    it = iter(ds) if it is None else it
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def _record_ids(batch):
    return batch["label"].tolist()


def _frames(batch):
    """The stored frame indices of each cropped clip: [b, T']."""
    return np.rint((batch["video"][:, :, 0, 0, 0] + 1) * 127.5).astype(int)


# ---------------------------------------------------------------- the real dataset


@pytest.fixture(scope="session")
def data_dir(moving_shapes_dir):
    """moving_shapes 8x32, prepared once per run (tests/conftest.py)."""
    return str(moving_shapes_dir)


def test_tfds_source_batches(data_dir):
    source = ms.data_source(data_dir, "8x32", "train")
    ds = pipeline.make_dataset(source, global_batch_size=6, seed=0, shuffle=False)
    batch = next(iter(ds))
    assert batch.keys() == {"video", "label"}
    assert batch["video"].shape == (6, 8, 32, 32, 3) and batch["video"].dtype == np.float32
    assert batch["label"].shape == (6,) and batch["label"].dtype == np.int32
    for i in range(6):  # unshuffled: rows are records 0..5, uint8 -> [-1, 1] exactly
        record = source[i]
        np.testing.assert_allclose(batch["video"][i], record["video"] / 127.5 - 1, atol=1e-6)
        assert batch["label"][i] == record["label"]
    assert batch["video"].min() == -1.0 and batch["video"].max() == 1.0

    cropped = next(iter(pipeline.make_dataset(source, global_batch_size=4, seed=0, num_frames=3, frame_stride=2)))
    assert cropped["video"].shape == (4, 3, 32, 32, 3)


# ---------------------------------------------------------------- determinism and resume


def test_same_seed_same_batches_other_seed_other_order():
    source = ListSource(50)
    a = _take(pipeline.make_dataset(source, global_batch_size=4, seed=3, num_frames=4), 5)
    b = _take(pipeline.make_dataset(source, global_batch_size=4, seed=3, num_frames=4), 5)
    c = _take(pipeline.make_dataset(source, global_batch_size=4, seed=4, num_frames=4), 5)
    _assert_batches_equal(a, b)
    assert [_record_ids(x) for x in a] != [_record_ids(x) for x in c]
    assert sorted(sum((_record_ids(x) for x in a), [])) != list(range(20))  # actually shuffled


@pytest.mark.parametrize("process_count", [1, 2])
def test_iterator_state_resumes_exactly(process_count, tmp_path):
    source = ListSource(37, bad={5: "shape"})
    ds = pipeline.make_dataset(
        source, global_batch_size=4, seed=1, num_frames=5, process_index=process_count - 1, process_count=process_count
    )
    it = iter(ds)
    _take(ds, 12, it)  # past the end of the first epoch (37 records)
    state = it.get_state()
    assert json.loads(json.dumps(state)) == state  # JSON-able, as grain's orbax handler stores it
    expected = _take(ds, 15, it)

    resumed = iter(ds)
    resumed.set_state(state)
    _assert_batches_equal(_take(ds, 15, resumed), expected)
    assert resumed.num_skipped == it.num_skipped

    # Through grain's checkpoint handler too (what the orbax checkpoints in train/ use).
    handler = grain.checkpoint.CheckpointHandler()
    it2 = iter(ds)
    _take(ds, 12, it2)
    handler.save(tmp_path, item=it2)
    restored = iter(ds)
    handler.restore(tmp_path, item=restored)
    _assert_batches_equal(_take(ds, 15, restored), expected)


def test_epochs_are_permutations_and_finite_datasets_end():
    ds = pipeline.make_dataset(ListSource(16), global_batch_size=4, seed=0, num_epochs=2)
    batches = list(ds)
    assert len(batches) == 8
    ids = [_record_ids(b) for b in batches]
    first, second = sum(ids[:4], []), sum(ids[4:], [])
    assert sorted(first) == sorted(second) == list(range(16))
    assert first != second  # reshuffled each epoch
    ordered = pipeline.make_dataset(ListSource(10), global_batch_size=4, seed=0, shuffle=False, num_epochs=1)
    assert [_record_ids(b) for b in ordered] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # the incomplete batch is dropped


# ---------------------------------------------------------------- processes


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_are_disjoint_and_form_the_global_batch(process_count):
    source = ListSource(64)
    kwargs = dict(global_batch_size=8, seed=2, num_frames=3, frame_stride=2)
    global_batches = _take(pipeline.make_dataset(source, **kwargs), 10)  # beyond one epoch of 64
    shards = [
        _take(pipeline.make_dataset(source, process_index=p, process_count=process_count, **kwargs), 10)
        for p in range(process_count)
    ]
    for k, whole in enumerate(global_batches):
        parts = [shards[p][k] for p in range(process_count)]
        assert all(part["label"].shape == (8 // process_count,) for part in parts)
        ids = [set(_record_ids(part)) for part in parts]
        assert sum(len(x) for x in ids) == len(set().union(*ids)) == 8  # disjoint
        _assert_batches_equal([{k: np.concatenate([p[k] for p in parts]) for k in whole}], [whole])  # same crops too


# ---------------------------------------------------------------- crops


def test_temporal_crop_and_stride():
    ds = pipeline.make_dataset(ListSource(40), global_batch_size=8, seed=0, num_frames=3, frame_stride=2)
    batches = _take(ds, 5)
    frames = np.concatenate([_frames(b) for b in batches])  # [40, 3]
    assert batches[0]["video"].shape == (8, 3, S, S, 3)
    assert (np.diff(frames, axis=1) == 2).all()  # consecutive frames at stride 2
    assert frames[:, 0].min() == 0 and frames[:, -1].max() == T - 1  # windows anywhere in [0, 8) ...
    assert len(set(frames[:, 0].tolist())) == 4  # ... with all 4 possible starts drawn

    full = next(iter(pipeline.make_dataset(ListSource(8), global_batch_size=2, seed=0)))
    assert (_frames(full) == np.arange(T)).all()  # no crop by default
    strided = next(iter(pipeline.make_dataset(ListSource(8), global_batch_size=2, seed=0, frame_stride=3)))
    assert (_frames(strided) == [0, 3, 6]).all()  # num_frames=None: all frames the stride allows


def test_unconditional_pipeline_has_no_label():
    batch = next(iter(pipeline.make_dataset(ListSource(8), global_batch_size=2, seed=0, label_key=None)))
    assert batch.keys() == {"video"}


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(global_batch_size=6, process_count=4), "not divisible by process_count=4"),
        (dict(num_frames=9), "needs 9 frames, but the videos have 8"),
        (dict(num_frames=4, frame_stride=3), "needs 10 frames"),
        (dict(feature_key="frames"), r"feature_key='frames'.*available keys: \['label', 'video'\]"),
        (dict(label_key="class"), "label_key='class'"),
        (dict(process_index=2, process_count=2), r"process_index=2 must be in \[0, 1\]"),
        (dict(global_batch_size=0), "global_batch_size=0 must be >= 1"),
        (dict(num_epochs=0), "num_epochs=0"),
        (dict(video_shape=(8, 4, 4, 1)), r"video_shape=\(8, 4, 4, 1\) but feature 'video' has shape \(8, 4, 4, 3\)"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    args = dict(global_batch_size=4, seed=0) | kwargs
    with pytest.raises(ValueError, match=match):
        pipeline.make_dataset(ListSource(8), **args)


def test_videos_other_than_pixels_or_latents_are_rejected_up_front():
    with pytest.raises(ValueError, match="dtype int16; the pipeline reads uint8 pixels or float latents"):
        pipeline.make_dataset(ListSource(8, bad={0: "int16"}), global_batch_size=2, seed=0)


# ---------------------------------------------------------------- latents and extra fields (text, text_mask)

L, D = 5, 3


class TextSource:
    """Record i: float latents [T, S, S, 2] equal to i (beyond [-1, 1]), text [L, D] equal to i on its first
    1 + i % L tokens and 0 on the padding, text_mask True on those tokens; `bad` maps an index to a problem."""

    def __init__(self, n, bad=None):
        self.n = n
        self.bad = bad or {}

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        mask = np.arange(L) < 1 + i % L
        record = {
            "video": np.full((T, S, S, 2), i, np.float32),
            "text": np.where(mask[:, None], np.float32(i), np.float32(0)) * np.ones((L, D), np.float32),
            "text_mask": mask,
            "label": i,
        }
        problem = self.bad.get(i)
        if problem == "text_shape":
            record["text"] = record["text"][:2]
        elif problem == "mask_dtype":
            record["text_mask"] = mask.astype(np.int32)
        elif problem == "no_mask":
            del record["text_mask"]
        return record


EXTRA = {"text": (L, D), "text_mask": (L,)}


def test_float_latents_and_extra_fields_are_batched():
    ds = pipeline.make_dataset(TextSource(12), global_batch_size=4, seed=0, shuffle=False, extra_shapes=EXTRA)
    batch = next(iter(ds))
    assert batch.keys() == {"video", "label", "text", "text_mask"}
    assert batch["video"].dtype == np.float32 and batch["video"].shape == (4, T, S, S, 2)
    assert batch["text"].dtype == np.float32 and batch["text"].shape == (4, L, D)
    assert batch["text_mask"].dtype == np.bool_ and batch["text_mask"].shape == (4, L)
    for i in range(4):  # unshuffled: records 0..3, latents passed through as stored (no [-1, 1] scaling)
        record = TextSource(12)[i]
        np.testing.assert_array_equal(batch["video"][i], record["video"])
        np.testing.assert_array_equal(batch["text"][i], record["text"])
        np.testing.assert_array_equal(batch["text_mask"][i], record["text_mask"])
    assert batch["text_mask"].sum(1).tolist() == [1, 2, 3, 4]
    # The temporal crop applies to the video only.
    cropped = next(
        iter(pipeline.make_dataset(TextSource(12), global_batch_size=2, seed=0, num_frames=3, extra_shapes=EXTRA))
    )
    assert cropped["video"].shape == (2, 3, S, S, 2) and cropped["text"].shape == (2, L, D)


def test_bad_extra_fields_are_skipped_and_counted():
    bad = {1: "text_shape", 2: "mask_dtype", 4: "no_mask"}
    ds = pipeline.make_dataset(
        TextSource(12, bad), global_batch_size=4, seed=0, shuffle=False, num_epochs=1, extra_shapes=EXTRA
    )
    it = iter(ds)
    ids = sum((_record_ids(b) for b in it), [])
    assert ids == [0, 3, 5, 6, 7, 8, 9, 10]
    assert it.num_skipped == 3


@pytest.mark.parametrize(
    "extra,match",
    [
        ({"text": (4, 3)}, r"extra_shapes\['text'\]=\(4, 3\) but feature 'text' has shape \(5, 3\)"),
        ({"tokens": None}, r"extra_shapes key='tokens' is not a feature of the source; available keys: \['label', "),
    ],
)
def test_bad_extra_shapes_are_named(extra, match):
    with pytest.raises(ValueError, match=match):
        pipeline.make_dataset(TextSource(8), global_batch_size=2, seed=0, extra_shapes=extra)


def test_bad_records_are_skipped_and_counted():
    bad = {3: "shape", 5: "raises", 7: "dtype", 11: "missing"}
    ds = pipeline.make_dataset(ListSource(22, bad), global_batch_size=4, seed=0, shuffle=False, num_epochs=1)
    it = iter(ds)
    batches = list(it)
    ids = sum((_record_ids(b) for b in batches), [])
    assert ids == [i for i in range(22) if i not in bad][:16]  # 18 good records -> 4 full batches
    assert it.num_skipped == 4
    assert it.get_state()["num_skipped"] == 4


def test_a_broken_source_fails_clearly():
    source = ListSource(3000, bad={i: "raises" for i in range(1, 3000)})
    with pytest.raises(RuntimeError, match="bad records in a row"):
        next(iter(pipeline.make_dataset(source, global_batch_size=2, seed=0, shuffle=False)))
