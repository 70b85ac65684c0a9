"""The notebooks run headlessly (nbclient) on tiny settings: colabs/sampling.ipynb on the session's trained run,
colabs/multistage.ipynb on the session's tiny text keyframe and interpolator runs with a free-text prompt; each shows
its videos inline."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import TRAINED_STEPS
from tests.xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def execute(name: str, overrides: str, tmp_path) -> list[dict]:
    """Runs colabs/`name` with `overrides` after its parameters cell; returns every code cell's outputs."""
    nb = nbformat.read(os.path.join(ROOT, "colabs", name), as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    nb.cells.insert(nb.cells.index(params[0]) + 1, nbformat.v4.new_code_cell(overrides))
    nb.cells.insert(0, nbformat.v4.new_code_cell(f"import os\nos.chdir({ROOT!r})"))
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env={**os.environ, "XLA_FLAGS": xla_flags(), "JAX_PLATFORMS": "cpu"})
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    return outputs


def _text(outputs) -> str:
    return "\n".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")


def _gifs(outputs) -> list[str]:
    return [o["data"]["text/html"] for o in outputs if "<img" in o.get("data", {}).get("text/html", "")]


@pytest.mark.xdist_group("trained")
def test_sampling_notebook_executes(trained_run, tmp_path):
    outputs = execute(
        "sampling.ipynb",
        f'WORKDIR = {str(trained_run)!r}\nNUM = 2\nSTEPS = 3\nPROMPT = "a blue circle moving up"',
        tmp_path,
    )
    assert f"loaded step {TRAINED_STEPS}" in _text(outputs)
    assert "(2, 8, 32, 32, 3) uint8" in _text(outputs)
    assert _gifs(outputs)  # the videos shown inline (gif)
    metrics = [o for o in outputs if o.get("output_type") == "execute_result"][-1]
    assert "colour_accuracy" in metrics["data"]["text/plain"]


@pytest.mark.xdist_group("multistage")
def test_multistage_notebook_executes(tiny_multistage, tmp_path):
    m = tiny_multistage
    outputs = execute(
        "multistage.ipynb",
        # A text keyframe model: the prompt is free text (the pipeline and the notebook take text prompts).
        f"KEYFRAMES_WORKDIR = {str(m.text_keyframe_dir)!r}\nINTERPOLATOR_WORKDIR = {str(m.interp_dir)!r}\n"
        'PROMPT = "A cyan triangle, moving up"\nNUM = 2\nSTEPS = 2\nINTERPOLATION_STEPS = 2',
        tmp_path,
    )
    text = _text(outputs)
    assert "3 keyframes every 4 frames -> 9 frames" in text
    assert "keyframes (2, 3, 8, 8, 3) videos (2, 9, 8, 8, 3) uint8" in text
    assert len(_gifs(outputs)) == 2  # keyframes, then the interpolated videos
    metrics = [o for o in outputs if o.get("output_type") == "execute_result"][-1]["data"]["text/plain"]
    assert "colour_accuracy" in metrics and "seam_free" in metrics
