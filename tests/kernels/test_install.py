"""`pip install .` and `pip install -e .` expose kernels/ as `engram_kernels`, never as `kernels`."""

import json
import os
import subprocess
import sys
import sysconfig

import pytest
from conftest import require, source_copy

require("triton")
pytestmark = [pytest.mark.install, pytest.mark.slow]

IMPORT_CHECK = r"""
import importlib.util, json, os, sys, torch
import engram_kernels
from engram_kernels.hash import ngram_hash, ngram_hash_reference

device = "cuda" if torch.cuda.is_available() else "cpu"
ids = torch.randint(0, 50, (2, 7), device=device)
args = [torch.tensor(x, device=device) for x in (list(range(50)), [[3, 5, 7]], [[11, 13]])]
spec = importlib.util.find_spec("kernels")
print(json.dumps({
    "file": os.path.realpath(engram_kernels.__file__),
    "ops": sorted(n for n in ("hash", "gather", "gate") if importlib.util.find_spec(f"engram_kernels.{n}")),
    "hash_ok": bool(torch.equal(ngram_hash(ids, *args, pad_id=0), ngram_hash_reference(ids, *args, pad_id=0))),
    "kernels": None if spec is None else os.path.realpath(spec.origin or str(spec.submodule_search_locations)),
}))
"""


def pip_install(*args, cwd):
    # --ignore-installed: without it pip uninstalls the environment's own install of the project first.
    run = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--disable-pip-version-check", "--ignore-installed", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def import_check(site_dir, tmp_path):
    """Import engram_kernels with `site_dir` ahead of everything else, in a clean working directory.

    Started with -S so that `site_dir`'s .pth files run first: an editable install's finder module has the same
    name as that of any other editable install of this project (e.g. in the environment running the tests).
    """
    bootstrap = (
        "import site, sys\n"
        f"sys.path.insert(0, {str(site_dir)!r})\n"
        f"site.addsitedir({str(site_dir)!r})\n"
        f"site.addsitedir({sysconfig.get_path('purelib')!r})\n"  # torch, triton
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-S", "-c", bootstrap + IMPORT_CHECK], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def check(result, kernels_folder):
    assert result["file"] == os.path.realpath(os.path.join(kernels_folder, "__init__.py"))
    assert result["ops"] == ["gate", "gather", "hash"] and result["hash_ok"]
    # `import kernels` is not ours: the name belongs to the Hugging Face kernels library (absent or its own).
    ours = os.path.realpath(os.path.dirname(kernels_folder))
    assert result["kernels"] is None or not result["kernels"].startswith(ours)


def test_regular_install_exposes_engram_kernels(tmp_path):
    source = source_copy(tmp_path)
    pip_install("--target", str(tmp_path / "site"), ".", cwd=source)
    assert (tmp_path / "site" / "engram_kernels" / "gate" / "kernel.py").exists()
    assert not (tmp_path / "site" / "kernels").exists()
    check(import_check(tmp_path / "site", tmp_path), tmp_path / "site" / "engram_kernels")


def test_editable_install_exposes_engram_kernels(tmp_path):
    source = source_copy(tmp_path)
    pip_install("--prefix", str(tmp_path / "prefix"), "-e", ".", cwd=source)
    prefix = str(tmp_path / "prefix")
    purelib = sysconfig.get_path("purelib", vars={"base": prefix, "platbase": prefix})
    check(import_check(purelib, tmp_path), source / "kernels" / "engram_kernels")
