"""bench/lookup_kernels.py runs; without a GPU it checks the kernels against the torch path at small sizes."""

import os
import runpy
import sys

import pytest
import torch
from conftest import ROOT, require

require("triton")


def test_lookup_kernel_bench_reports_parity(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["lookup_kernels.py", "--small"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script adds tests/ to the path
    runpy.run_path(os.path.join(ROOT, "bench", "lookup_kernels.py"), run_name="__main__")
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|")[3].strip() for line in out.splitlines()
            if line.startswith("| ") and line.count("|") == 4}
    assert rows["hash (all layers)"] == "bit-identical"
    assert rows["gather fwd+bwd (1 layer)"] == "bit-identical"
    for name in ("gate fwd+bwd (1 layer)", "full forward (last hidden state)"):
        assert rows[name] == "bit-identical" or float(rows[name].rsplit(" ", 1)[1]) < 1e-3, (name, rows[name])
    if not torch.cuda.is_available():
        assert "correctness only" in out
