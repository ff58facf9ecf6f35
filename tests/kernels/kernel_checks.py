"""Shared helpers of the kernel tests: device, tolerances, comparisons and deliberately wrong kernels."""

import importlib.util
import inspect
import itertools
import sys
import tempfile

import pytest
import torch
from conftest import require

engram_kernels = require("engram_kernels")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: Triton's interpreter (conftest)
LENGTHS = [1, 7, 63, 500]
# Largest |error| allowed, relative to the largest |reference| value, per dtype of the float ops.
TOLERANCE = {torch.float32: 5e-4, torch.bfloat16: 3e-2}
_mutants = itertools.count()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """`max |actual - expected| <= TOLERANCE[dtype] * max |expected|`, with the measured ratio in the message."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual.float() - expected.float()).abs().max().item()
    scale = max(expected.float().abs().max().item(), 1e-30)
    assert error <= TOLERANCE[dtype] * scale, f"{what}: error {error:.3g} > {TOLERANCE[dtype]} x {scale:.3g}"


def mutant(module, old: str, new: str):
    """A copy of kernel `module` whose source has `old` (exactly once) replaced by `new`: a deliberately wrong
    kernel, loaded inside the same package so its relative imports resolve."""
    source = inspect.getsource(module)
    assert source.count(old) == 1, f"mutation target {old!r} not found exactly once in {module.__name__}"
    folder = tempfile.mkdtemp()
    name = f"{module.__name__}_mutant{next(_mutants)}"
    path = f"{folder}/{name.rsplit('.', 1)[1]}.py"
    with open(path, "w") as handle:
        handle.write(source.replace(old, new))
    spec = importlib.util.spec_from_file_location(name, path)
    copy = importlib.util.module_from_spec(spec)
    sys.modules[name] = copy
    spec.loader.exec_module(copy)
    return copy
