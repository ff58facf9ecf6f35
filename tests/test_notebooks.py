"""Every notebook in examples/ runs top to bottom (tiny sizes), and is stored executed, with stable outputs."""

import copy
import os
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))
sys.path.insert(0, str(ROOT / "examples"))
from run_notebooks import execute, stabilise  # noqa: E402

ids = [p.stem for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_runs(path, tmp_path, monkeypatch, request):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if path.stem == "retrofit":  # the same SmolLM2, already de-quantized from its GGUF file
        monkeypatch.setenv("SMOLLM2_DIR", str(request.getfixturevalue("smollm2")[2]))
    notebook = execute(path, tmp_path)
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    stable = stabilise(notebook, tmp_path)
    assert str(tmp_path) not in nbformat.writes(stable)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_stored_notebook_is_executed_with_its_plots_and_stable_outputs(path, tmp_path):
    text = path.read_text(encoding="utf-8")
    notebook = nbformat.reads(text, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    regenerate = "regenerate the stored notebooks: python examples/run_notebooks.py"
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), regenerate
    outputs = [output for cell in code for output in cell.outputs]
    assert outputs and not [o for o in outputs if o.output_type == "error"], regenerate
    shows_plots = any("Image(" in cell.source for cell in code)
    assert shows_plots == any("image/png" in o.get("data", {}) for o in outputs), regenerate
    for machine_specific in (str(ROOT), sys.prefix, str(Path.home()), "/tmp/"):
        assert machine_specific not in text, f"{path.name} holds {machine_specific!r}: {regenerate}"
    assert stabilise(copy.deepcopy(notebook), tmp_path) == notebook, regenerate
