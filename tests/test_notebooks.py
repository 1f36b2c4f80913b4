"""Every notebook executes against a tiny run made here."""
from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import CONF, ROOT, SMALL_EVAL, TINY
from prob_jepa.config import compose_config
from prob_jepa.train import pretrain

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs") / "tiny"
    pretrain(compose_config(CONF, [*TINY, *SMALL_EVAL]), run_dir=path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, tiny_run, monkeypatch):
    monkeypatch.setenv("PROB_JEPA_RUNS", str(tiny_run))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the notebook shows no figure"
