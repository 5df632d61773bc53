"""examples/explore_smolvlm.ipynb runs top to bottom offline and is committed without outputs.

Refresh the README figures with
    SMOLVLM_FIGURES=examples/figures python -m pytest tests/test_notebook.py
"""

import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "examples" / "explore_smolvlm.ipynb"
FIGURES = ["frames", "quantization", "similarity", "tiles", "token_budget", "topk"]
# Per cell; the slowest (two SmolLM2 answers) takes 20-35 s on a busy 2-core CPU.
CELL_TIMEOUT = 240


def test_notebook_committed_without_outputs():
    nb = json.loads(NOTEBOOK.read_text())
    dirty = [
        i
        for i, cell in enumerate(nb["cells"])
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count"))
    ]
    assert not dirty, f"{NOTEBOOK.name}: cells {dirty} hold outputs; clear them before committing"


def test_notebook_runs(tmp_path, monkeypatch):
    try:
        import nbformat
        from nbclient import NotebookClient
    except ImportError as e:
        raise AssertionError(f"pip install -e '.[notebook]' to run the notebook ({e})") from None

    monkeypatch.setenv("MPLBACKEND", "Agg")
    figures = Path(os.environ.get("SMOLVLM_FIGURES") or tmp_path).resolve()
    monkeypatch.setenv("SMOLVLM_FIGURES", str(figures))
    # The kernel imports this checkout's mlx_smolvlm, whatever is installed.
    path = [str(ROOT), os.environ.get("PYTHONPATH")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, path)))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(ROOT / "examples")}},  # the notebook's own folder
    )
    tic = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell, on any error
    print(f"\nnotebook ran in {time.perf_counter() - tic:.1f} s")

    assert sorted(p.stem for p in figures.glob("*.png")) == FIGURES
    text = "".join(
        o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
    )
    # the real SmolLM2 answers the factual question, in float and in 4 and 8 bits
    assert text.count("The capital of France is Paris.") >= 4, text[-2000:]
