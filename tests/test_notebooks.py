"""Every notebook in examples/ runs top to bottom (tiny sizes; share_on_the_hub in test_hub.py, against a fake Hub) and
reproduces the checks its stored copy shows, and the stored copies are executed, with stable outputs."""

import copy
import os
import sys
from pathlib import Path

import pytest
from conftest import require

nbformat = require("nbformat")
require("nbclient")
ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))
sys.path.insert(0, str(ROOT / "examples"))
from run_notebooks import execute, stabilise  # noqa: E402

ids = [p.stem for p in NOTEBOOKS]
# share_on_the_hub runs once, against a fake Hub, in test_hub.py: run here as well, it would only print "nothing pushed".
# The SmolLM2 notebooks share the de-quantized model with test_retrofit.py: one pytest-xdist worker loads it for all.
ON_SMOLLM2 = ("retrofit", "knowledge_injection")
RUN_HERE = [pytest.param(p, id=p.stem, marks=[pytest.mark.xdist_group("smollm2")] * (p.stem in ON_SMOLLM2))
            for p in NOTEBOOKS if p.stem != "share_on_the_hub"]


def claims(notebook) -> list[str]:
    """The lines of a notebook's text outputs that state a checked property (`identical logits: True`)."""
    lines = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            text = output.get("text", "") or output.get("data", {}).get("text/plain", "")
            lines += [line.strip() for line in text.splitlines() if "True" in line]
    return lines


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.parametrize("path", RUN_HERE)
def test_notebook_runs_and_its_checks_hold(path, tmp_path, monkeypatch, request):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    if path.stem in ON_SMOLLM2:  # the same SmolLM2, already de-quantized from its GGUF file
        monkeypatch.setenv("SMOLLM2_DIR", str(request.getfixturevalue("smollm2")[2]))
    stored = nbformat.read(path, as_version=4)
    notebook = execute(path, tmp_path)
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors
    # What the stored notebook shows as checked (exactness, bit-identical reloads) holds in this run too. A notebook
    # without such lines checks itself with `assert` in a cell, and fails above if that assert does.
    expected = claims(stored)
    assert expected or any("assert " in cell.source for cell in stored.cells if cell.cell_type == "code")
    missing = [line for line in expected if line not in claims(notebook)]
    assert not missing, f"{path.name}: stored claims not reproduced: {missing}"
    assert str(tmp_path) not in nbformat.writes(stabilise(notebook, tmp_path))


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
