"""colabs/sampling.ipynb runs headlessly (nbclient) on a tiny setting: trains in place, samples, shows videos."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.xla_flags import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def test_sampling_notebook_executes(tmp_path):
    nb = nbformat.read(os.path.join(ROOT, "colabs", "sampling.ipynb"), as_version=4)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, "the notebook needs exactly one cell tagged 'parameters'"
    idx = nb.cells.index(params[0])
    overrides = nbformat.v4.new_code_cell(
        'CONFIG = "tests/tiny_config.py"\nTRAIN_STEPS = 3\nNUM = 2\nSTEPS = 3\nPROMPT = "a blue circle moving up"'
    )
    nb.cells.insert(idx + 1, overrides)
    env_cell = nbformat.v4.new_code_cell(f"import os\nos.chdir({ROOT!r})")
    nb.cells.insert(0, env_cell)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env={**os.environ, "XLA_FLAGS": xla_flags(), "JAX_PLATFORMS": "cpu"})

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "\n".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "loaded step 3" in text
    assert "(2, 8, 32, 32, 3) uint8" in text
    html = [o for o in outputs if "text/html" in o.get("data", {})]
    assert html and "<img" in html[0]["data"]["text/html"]  # the videos shown inline (gif)
    metrics = [o for o in outputs if o.get("output_type") == "execute_result"][-1]
    assert "colour_accuracy" in metrics["data"]["text/plain"]
