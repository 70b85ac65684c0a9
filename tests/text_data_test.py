"""Text from the data to the sampler: captions tokenized for the built-in encoder, held-out labels left out of
training, a precomputed-embedding dataset written with an external encoder (a deterministic stand-in here) and read
back, embedding files, and `--prompt` / `--text_embeddings` through the sample CLI."""

import jax
import numpy as np
import pytest

from tests.helpers import stand_in_encoder
from vdit_jax import cli, inference, sample, tasks
from vdit_jax import config as config_lib
from vdit_jax.data import moving_shapes as ms
from vdit_jax.data import sources, text_embeddings, views
from vdit_jax.models import text as text_lib
from vdit_jax.parallel import mesh as mesh_lib
from vdit_jax.parallel import sharding as sh
from vdit_jax.train import checkpoint as ckpt_lib
from vdit_jax.train import state as state_lib

HELD_OUT = tuple(ms.label_for(c, s, d) for c, s, d in [("red", "square", "left"), ("cyan", "circle", "up")])


def text_config(builtin: bool, name: str = ms.NAME, text_dim: int = 16):
    c = config_lib.base_config()
    c.data.builder_config = "8x32"
    c.data.name = name
    c.data.video_shape = (8, 32, 32, 3)
    c.data.num_frames = 2
    c.data.num_classes = 0
    c.data.text_len = 8
    c.model.update(dict(hidden_size=32, depth=1, num_heads=2, patch_size=(2, 16, 16), num_classes=0))
    c.model.text_dim = text_dim
    if builtin:
        c.model.text_vocab = ms.VOCABULARY
        c.model.text_encoder_depth = 1
    c.train.global_batch_size = 4
    c.diffusion.num_timesteps = 20
    c.sample.steps = 2
    return c


def test_built_in_text_batches_tokenize_captions_and_training_leaves_out_held_out_labels(moving_shapes_dir):
    config = text_config(builtin=True)
    config.data.exclude_labels = HELD_OUT
    config_lib.validate(config, 1)
    config.train.global_batch_size = 64
    it = iter(sources.make_train_dataset(config, moving_shapes_dir))
    tokenizer = text_lib.Tokenizer(ms.VOCABULARY)
    task = tasks.get(config)
    seen = set()
    for _ in range(3):
        batch = next(it)
        assert {k: (v.shape[1:], v.dtype) for k, v in batch.items() if k != "label"} == {
            k: (s.shape[1:], s.dtype) for k, s in task.batch_shapes(1).items() if k != "label"
        }
        for tokens, mask, label in zip(batch["tokens"], batch["text_mask"], batch["label"], strict=True):
            assert tokenizer.decode(tokens) == ms.caption_for(label) and tokens[0] == text_lib.BOS
            np.testing.assert_array_equal(mask, tokens != text_lib.PAD)
        seen.update(batch["label"].tolist())
    assert len(seen) > 40 and not seen & set(HELD_OUT)  # 192 clips: many classes, never a held-out one
    # Only training leaves them out: sampling conditions and the test split keep every class.
    assert set(HELD_OUT) <= {ms.parse_caption(c) for c in sources.sample_conditions(config, None, 84)["captions"]}
    with pytest.raises(ValueError, match=r"excluding labels \[3, 5\] leaves none of the 2 records"):
        views.WithoutLabels([{"label": 5}, {"label": 3}], [5, 3])
    bad = config.copy_and_resolve_references()
    bad.data.text_len = 20
    with pytest.raises(config_lib.ConfigError, match=r"data.text_len=20 must be in \[2, model.text_max_len=16\]"):
        config_lib.validate(bad, 1)
    bad.data.text_len, bad.data.exclude_labels = 8, (3, 3)
    with pytest.raises(config_lib.ConfigError, match="exclude_labels=\\(3, 3\\) must be distinct"):
        config_lib.validate(bad, 1)


def _write_run(config, workdir):
    """A run in the trainer's format (config.json and a checkpoint) holding the model's initial parameters."""
    mesh = mesh_lib.make_mesh({sh.DATA: 1}, jax.devices()[:1])
    rules = sh.rules_from_config(config.logical_axis_rules)
    state = state_lib.create_train_state(config, mesh, rules, jax.random.key(0))
    workdir.mkdir()
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", async_save=False)
    ckpt.save(0, state, config=config, force=True)
    ckpt.close()


SAMPLE_ARGS = dict(step=None, label=None, steps=2, sampler=None, eta=None, guidance=None, seed=0, batch_size=8)


def test_free_text_prompts_sample_through_the_cli(moving_shapes_dir, tmp_path):
    """A run of the built-in encoder (its initial parameters: its train step is
    tests/models_text_test.py::test_text_train_step_sharded_equals_single_device's) sampled from free text."""
    config = text_config(builtin=True)
    _write_run(config, tmp_path / "run")
    prompt = "A cyan triangle, moving UP"  # free text: case and punctuation are the tokenizer's business
    path = sample.run(tmp_path / "run", prompt=prompt, num=2, out_dir=tmp_path / "out", **SAMPLE_ARGS)
    with np.load(path) as data:
        assert data["videos"].shape == (2, 2, 32, 32, 3) and list(data["prompts"]) == [prompt] * 2
    run = lambda **kw: sample.run(tmp_path / "run", num=1, out_dir=tmp_path / "bad", **{**SAMPLE_ARGS, **kw})
    with pytest.raises(cli.UsageError, match=r"\['purple'\] not in the text encoder's vocabulary"):
        run(prompt="a purple square moving up")
    with pytest.raises(cli.UsageError, match="10 tokens, more than the model's text length 8"):
        run(prompt="a red red red red red square moving up")
    with pytest.raises(cli.UsageError, match="--label is for class-conditional models"):
        run(prompt=None, label=3)
    with pytest.raises(cli.UsageError, match="this one encodes text itself: use --prompt"):
        run(prompt=None, text_embeddings=str(tmp_path / "x.npz"))
    # The null condition of guidance is the empty prompt, in training and sampling alike.
    task = tasks.get(config)
    np.testing.assert_array_equal(task.null_text(2, 8)[0], text_lib.Tokenizer(ms.VOCABULARY).null(2, 8)[0])
    _, params, _ = inference.load(tmp_path / "run")
    with pytest.raises(ValueError, match="free-text prompts are for models with the built-in text encoder"):
        inference.sample(text_config(builtin=False), params, None, jax.random.key(0), prompts=["a"])


def test_external_encoder_dataset_is_written_read_back_and_sampled_from_a_file(moving_shapes_dir, tmp_path):
    name = text_embeddings.write_dataset(
        moving_shapes_dir, "moving_shapes/8x32", f"stand_in_{tmp_path.name}", stand_in_encoder, 8, max_examples=24
    )
    config = text_config(builtin=False, name=name, text_dim=12)
    config.train.global_batch_size = 8
    batch = next(iter(sources.make_train_dataset(config, moving_shapes_dir)))
    source = sources.open_source(config, moving_shapes_dir)
    by_caption = {r["caption"].decode(): r for r in (source[i] for i in range(len(source)))}
    for text, mask in zip(batch["text"], batch["text_mask"], strict=True):
        caption = next(c for c, r in by_caption.items() if np.array_equal(r["text"], text))
        want, want_mask = stand_in_encoder([caption])
        assert mask.sum() == len(caption.split()) == want_mask.sum()
        np.testing.assert_array_equal(text[: mask.sum()], want[0])
        assert not text[mask.sum() :].any()  # zero padding
    with pytest.raises(FileExistsError, match="exists; delete it"):
        text_embeddings.write_dataset(moving_shapes_dir, "moving_shapes/8x32", name.split("/")[1], stand_in_encoder, 8)
    with pytest.raises(ValueError, match="encodes to 5 tokens, more than text_len 3"):
        text_embeddings.encode(stand_in_encoder, ["a red square moving up"], 3)

    _write_run(config, tmp_path / "run")
    emb, mask = text_embeddings.encode(stand_in_encoder, ["a red square moving up", "a blue circle moving left"], 8)
    text_embeddings.write_npz(tmp_path / "prompts.npz", emb, mask, ["a red square moving up", "a blue circle"])
    path = sample.run(
        tmp_path / "run",
        prompt=None,
        num=5,
        out_dir=tmp_path / "out",
        text_embeddings=str(tmp_path / "prompts.npz"),
        **SAMPLE_ARGS,
    )
    with np.load(path) as data:
        assert data["videos"].shape[0] == 2 and data["prompts"][1] == "a blue circle"  # one per row of the file
    run = lambda **kw: sample.run(tmp_path / "run", num=1, out_dir=tmp_path / "bad", **{**SAMPLE_ARGS, **kw})
    text_embeddings.write_npz(tmp_path / "wide.npz", np.zeros((1, 8, 16)), np.ones((1, 8), bool))
    with pytest.raises(cli.UsageError, match=r"'text' is float32 \(1, 8, 16\), but the model needs float .* 12\]"):
        run(prompt=None, text_embeddings=str(tmp_path / "wide.npz"))
    text_embeddings.write_npz(tmp_path / "mask.npz", np.zeros((1, 8, 12)), np.ones((1, 7), bool))
    with pytest.raises(cli.UsageError, match=r"'text_mask' is bool \(1, 7\), needs bool \(1, 8\)"):
        run(prompt=None, text_embeddings=str(tmp_path / "mask.npz"))
    with pytest.raises(cli.UsageError, match="free text needs the encoder that made them"):
        run(prompt="a red square moving up")
