"""The one place that chooses between the Triton kernels (package `engram_kernels`) and the torch path.

The kernels are optional: a model exported for `trust_remote_code` without them, or a machine without Triton,
runs the torch path. `engram_kernel` (config field) states a preference; `force_engram_kernel` overrides it.
"""

import contextlib
import functools

import torch

from .configuration_engram import ENGRAM_KERNELS

# Whether "auto" runs the Triton kernels on CUDA tensors. Off until the kernels pass `bench/gpu_check.py` on a GPU:
# so far they have run only in Triton's interpreter and through ptxas (issue 25). The commit that records a passing
# GPU run turns this on, with the numbers.
AUTO_USES_TRITON = False
_forced: str | None = None  # set by `force_engram_kernel`; a module global (not a ContextVar) so dynamo can read it


@functools.cache
def load_kernels():
    """The `engram_kernels` module, or None when it (or Triton) does not import."""
    try:
        import engram_kernels
    except ImportError:
        return None
    return engram_kernels


def checked_preference(kernel: str) -> str:
    """`kernel` if it is a valid engram_kernel value (`force_engram_kernel`, an `EngramTable` built by hand)."""
    if kernel not in ENGRAM_KERNELS:
        raise ValueError(f"engram_kernel={kernel!r} is invalid; it must be one of {ENGRAM_KERNELS}.")
    return kernel


@contextlib.contextmanager
def force_engram_kernel(kernel: str):
    """Run the block with `kernel` ("triton" / "torch" / "auto") whatever the modules prefer.

    Forcing "triton" is strict: a call that Triton cannot run (no `engram_kernels`, or CPU tensors without
    TRITON_INTERPRET=1) raises instead of falling back, so tests cannot pass on the torch path by accident.
    """
    global _forced
    previous, _forced = _forced, checked_preference(kernel)
    try:
        yield
    finally:
        _forced = previous


def use_triton(preference: str, *tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels run on `tensors`, for a module whose preference is `preference`.

    "auto": never for now (`AUTO_USES_TRITON`; once on: when all tensors are on CUDA and `engram_kernels` imports);
    "triton": whenever Triton can run them (CUDA, or the interpreter under TRITON_INTERPRET=1), the torch path
    otherwise; "torch": never. Code traced by torch.compile always takes the torch path (user Triton kernels inside a
    compiled graph are not tested).
    """
    choice = _forced or preference
    if choice == "torch" or torch.compiler.is_compiling():  # under torch.compile Inductor fuses the torch path
        return False
    if choice == "auto" and not (AUTO_USES_TRITON and all(t.is_cuda for t in tensors)):
        return False
    kernels = load_kernels()
    runnable = kernels is not None and kernels.runnable_on(*tensors)
    if _forced == "triton" and not runnable:
        raise RuntimeError(
            "force_engram_kernel('triton'): the Triton kernels cannot run here "
            + ("(package engram_kernels or triton does not import)." if kernels is None else
               f"(tensors on {sorted({str(t.device) for t in tensors})}; on the CPU set TRITON_INTERPRET=1).")
        )
    return runnable


__all__ = ["AUTO_USES_TRITON", "checked_preference", "force_engram_kernel", "load_kernels", "use_triton"]
