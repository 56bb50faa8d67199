"""Both notebooks execute top to bottom (nbclient) at 256², each within a time limit."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.acceptance

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name", ["walkthrough.ipynb", "survey_batch.ipynb"])
def test_notebook_runs(name, monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFIM_NB_SIZE", "256")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # a non-interactive backend set by the caller draws nothing inline
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    t0 = time.perf_counter()
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    elapsed = time.perf_counter() - t0
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the figures were drawn
    assert elapsed < 150, f"{name} took {elapsed:.0f} s"
