"""moving_shapes: the DESIGN §4 contract (palette, labels, captions, motion, sizes), determinism, and the TFDS
builder really prepared as array_record and read back with tfds.data_source (no TensorFlow)."""

import pathlib

import numpy as np
import pytest

from vdit_jax.data import moving_shapes as ms

CONFIG = "8x32"  # the cheap config for the prepared dataset; 16x32 / 16x64 are checked through `render`


@pytest.fixture(scope="session")
def data_dir(moving_shapes_dir):
    """moving_shapes 8x32, prepared once per run (tests/conftest.py)."""
    return str(moving_shapes_dir)


def _mask(video):
    return video.max(-1) > 0  # [T, S, S]


# ---------------------------------------------------------------- vocabulary, labels, captions


def test_vocabulary_is_the_contract():
    assert ms.COLOURS == {
        "red": (255, 0, 0),
        "green": (0, 255, 0),
        "blue": (0, 0, 255),
        "yellow": (255, 255, 0),
        "cyan": (0, 255, 255),
        "magenta": (255, 0, 255),
        "white": (255, 255, 255),
    }
    assert list(ms.COLOURS) == ["red", "green", "blue", "yellow", "cyan", "magenta", "white"]
    assert ms.SHAPES == ("square", "circle", "triangle")
    assert ms.DIRECTIONS == ("left", "right", "up", "down")
    assert ms.NUM_CLASSES == 84


def test_label_formula_and_caption_round_trip():
    seen = set()
    for ci, colour in enumerate(ms.COLOURS):
        for si, shape in enumerate(ms.SHAPES):
            for di, direction in enumerate(ms.DIRECTIONS):
                label = ms.label_for(colour, shape, direction)
                assert label == (ci * 3 + si) * 4 + di
                caption = ms.caption_for(label)
                assert caption == f"a {colour} {shape} moving {direction}"
                assert ms.parse_caption(caption) == label
                assert ms.split_label(label) == (colour, shape, direction)
                seen.add(label)
    assert seen == set(range(84))
    assert ms.caption_for(0) == "a red square moving left"
    assert ms.caption_for(83) == "a white triangle moving down"
    assert ms.parse_caption("  A Blue   CIRCLE moving up ") == ms.label_for("blue", "circle", "up")
    assert ms.parse_caption("A blue circle, moving up.") == ms.label_for("blue", "circle", "up")  # punctuation


@pytest.mark.parametrize(
    "prompt", ["a purple square moving left", "a red hexagon moving up", "red square moving left", "", "a red square"]
)
def test_parse_caption_names_the_prompt_and_the_grammar(prompt):
    with pytest.raises(ValueError) as e:
        ms.parse_caption(prompt)
    message = str(e.value)
    assert repr(prompt) in message and "\n" not in message
    assert "a {colour} {shape} moving {direction}" in message
    for word in (*ms.COLOURS, *ms.SHAPES, *ms.DIRECTIONS):
        assert word in message


@pytest.mark.parametrize("label", [-1, 84])
def test_out_of_range_label_is_rejected(label):
    with pytest.raises(ValueError, match="0..83"):
        ms.caption_for(label)


# ---------------------------------------------------------------- rendering


@pytest.mark.parametrize("shape", ms.SHAPES)
@pytest.mark.parametrize("colour", list(ms.COLOURS))
def test_render_uses_the_exact_colour_on_black(colour, shape):
    video = ms.render(7, 16, 32, colour, shape, "right")["video"]
    assert video.shape == (16, 32, 32, 3) and video.dtype == np.uint8
    values = {tuple(int(c) for c in px) for px in video.reshape(-1, 3)}
    assert values == {(0, 0, 0), ms.COLOURS[colour]}  # crisp: no anti-aliased in-between colours
    assert _mask(video).any(axis=(1, 2)).all()  # visible in every frame


@pytest.mark.parametrize("num_frames,size", [(16, 32), (16, 64), (8, 32)])
def test_motion_size_and_containment(num_frames, size):
    scale = size / 32
    speeds, sizes = [], []
    for i in range(120):
        ex = ms.make_example(3, "train", i, num_frames, size)
        video, d, speed = ex["video"], int(ex["size"]), float(ex["speed"])
        assert video.shape == (num_frames, size, size, 3)
        assert 7 * scale <= d <= 11 * scale and 0.75 * scale <= speed <= 1.25 * scale
        speeds.append(speed / scale)
        sizes.append(d / scale)
        # The bounding box [centre - d/2, centre + d/2] stays inside the frame along the whole path.
        vx, vy = ms.VELOCITY[ex["direction"]]
        t = np.arange(num_frames)
        x = ex["start"][0] + vx * speed * t
        y = ex["start"][1] + vy * speed * t
        assert (x - d / 2 >= -1e-4).all() and (x + d / 2 <= size + 1e-4).all()
        assert (y - d / 2 >= -1e-4).all() and (y + d / 2 <= size + 1e-4).all()
        # ... and so the pixels are never clipped: a square covers exactly d x d pixels in every frame.
        mask = _mask(video)
        area = mask.sum((1, 2))
        if ex["shape"] == "square":
            assert (area == d * d).all()
        assert area.min() > 0.7 * area.max()  # small discs vary with the sub-pixel position, within reason
        # The centroid moves in the stated direction at the stated speed.
        cx = (mask.sum(1) * (np.arange(size) + 0.5)).sum(-1) / area
        cy = (mask.sum(2) * (np.arange(size) + 0.5)).sum(-1) / area
        along, across = (cx, cy) if vx else (cy, cx)
        slope = np.polyfit(t, along, 1)[0] * (vx or vy)
        assert abs(slope - speed) < 0.2 * scale
        assert np.ptp(across) < 0.6  # no drift across the motion (only discretisation wobble)
    # The draws cover their ranges (not stuck at one value).
    assert min(speeds) < 0.85 and max(speeds) > 1.15
    assert set(np.round(sizes).astype(int)) == {7, 8, 9, 10, 11}


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_have_their_geometry(size):
    d = 10 * size // 32
    start = (size / 2, size / 2)
    frames = {}
    for shape in ms.SHAPES:
        clip = ms.render(0, 1, size, "white", shape, "up", object_size=d, speed=0.0, start=start)
        frames[shape] = _mask(clip["video"])[0]
    fill = {s: m.sum() / (d * d) for s, m in frames.items()}
    assert fill["square"] == 1.0
    assert abs(fill["circle"] - np.pi / 4) < 0.06
    assert abs(fill["triangle"] - 0.5) < 0.08
    rows = frames["triangle"].sum(1)
    rows = rows[rows > 0]
    assert (np.diff(rows) >= 0).all() and rows[-1] > rows[0]  # apex up: widening downwards
    circle = frames["circle"]
    assert (circle == circle[::-1]).all() and (circle == circle[:, ::-1]).all()  # a centred disc is symmetric


def test_render_explicit_parameters_and_errors():
    out = ms.render(None, 4, 32, "red", "square", "down", object_size=8, speed=1.0, start=(10.0, 6.0))
    mask = _mask(out["video"])
    ys, xs = np.nonzero(mask[0])
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (6, 13, 2, 9)
    ys, xs = np.nonzero(mask[3])
    assert (ys.min(), ys.max()) == (5, 12)  # moved down 3 px in 3 frames
    with pytest.raises(ValueError, match="does not fit"):
        ms.render(0, 64, 32, "red", "square", "left")
    with pytest.raises(ValueError, match="purple"):
        ms.render(0, 8, 32, "purple", "square", "left")


def test_examples_are_deterministic_per_seed_split_and_index():
    a = [ms.make_example(0, "train", i, 8, 32)["video"].tobytes() for i in range(6)]
    b = [ms.make_example(0, "train", i, 8, 32)["video"].tobytes() for i in reversed(range(6))][::-1]
    assert a == b  # independent of generation order
    assert len(set(a)) == 6
    other_seed = [ms.make_example(1, "train", i, 8, 32)["video"].tobytes() for i in range(6)]
    other_split = [ms.make_example(0, "test", i, 8, 32)["video"].tobytes() for i in range(6)]
    assert all(x != y for x, y in zip(a, other_seed))
    assert all(x != y for x, y in zip(a, other_split))
    r1 = ms.render(np.random.default_rng(5), 8, 32, "cyan", "circle", "left")
    r2 = ms.render(5, 8, 32, "cyan", "circle", "left")
    assert r1["video"].tobytes() == r2["video"].tobytes() and r1["start"].tolist() == r2["start"].tolist()


# ---------------------------------------------------------------- the TFDS builder


def test_builder_configs():
    names = {c.name: (c.num_frames, c.size) for c in ms.MovingShapes.BUILDER_CONFIGS}
    assert names["16x32"] == (16, 32) and names["16x64"] == (16, 64) and names["8x32"] == (8, 32)
    assert names["8x16"] == (8, 16)
    assert ms.MovingShapes.DEFAULT_CONFIG_NAME == "16x32"
    with pytest.raises(ValueError, match="16x32"):
        ms.prepare("/nonexistent", "32x32")


def test_data_source_of_an_unprepared_dir_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="not prepared"):
        ms.data_source(tmp_path, "16x64", "train")


def test_prepared_dataset_is_read_with_tfds_data_source(data_dir):
    train = ms.data_source(data_dir, CONFIG, "train")
    test = ms.data_source(data_dir, CONFIG, "test")
    assert len(train) == 10_000 and len(test) == 1_000
    assert type(train).__name__ == "ArrayRecordDataSource"
    for split, source in (("train", train), ("test", test)):
        for i in (0, 1, len(source) - 1):
            record = source[i]
            assert record["video"].dtype == np.uint8 and record["video"].shape == (8, 32, 32, 3)
            want = ms.make_example(0, split, i, 8, 32)  # record i is example i (disable_shuffling)
            np.testing.assert_array_equal(record["video"], want["video"])
            assert record["label"] == want["label"]
            assert record["caption"].decode() == ms.caption_for(record["label"])
            colour, shape, direction = ms.split_label(record["label"])
            assert ms.COLOUR_NAMES[record["colour"]] == colour
            assert ms.SHAPES[record["shape"]] == shape
            assert ms.DIRECTIONS[record["direction"]] == direction
            assert record["size"] == want["size"] and record["start"].shape == (2,)
    features = train.dataset_info.features
    assert features["label"].num_classes == 84 and features["label"].int2str(0) == "a red square moving left"


def test_train_split_covers_all_classes(data_dir):
    train = ms.data_source(data_dir, CONFIG, "train")
    labels = np.array([train[i]["label"] for i in range(0, len(train), 5)])  # 2,000 records
    counts = np.bincount(labels, minlength=84)
    assert counts.min() > 0 and counts.max() < 3 * counts.mean()


def test_prepare_again_is_a_no_op(data_dir):
    root = pathlib.Path(data_dir) / ms.NAME / CONFIG
    files = lambda: {p: (p.stat().st_mtime_ns, p.stat().st_ino) for p in root.rglob("*") if p.is_file()}
    before = files()
    assert before
    builder = ms.prepare(data_dir, CONFIG)
    assert files() == before  # nothing rewritten, nothing added
    assert builder.info.splits["train"].num_examples == 10_000
    assert builder.info.file_format.value == "array_record"
