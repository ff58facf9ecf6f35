"""Launch helpers shared by the Engram kernels."""

import os

import torch
import triton

# Triton decides at decoration time whether `@triton.jit` kernels are interpreted, so read the flag once, too.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def runnable_on(*tensors: torch.Tensor) -> bool:
    """Whether Triton can run on these tensors: all on one CUDA device, or on the CPU under TRITON_INTERPRET=1."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return False
    kind = next(iter(devices)).type
    return kind == "cuda" or (INTERPRETED and kind == "cpu")


def check_runnable(name: str, *tensors: torch.Tensor) -> None:
    if not runnable_on(*tensors):
        devices = sorted({str(t.device) for t in tensors})
        raise ValueError(
            f"{name}: the Triton kernels need all tensors on one CUDA device (or TRITON_INTERPRET=1 on the CPU); "
            f"got devices {devices}. Use the torch path (engram_kernel='torch') instead."
        )


def num_warps_for(elements: int) -> int:
    """Warps for a program holding `elements` values per live tensor."""
    return 4 if elements <= 2048 else 8 if elements <= 4096 else 16


def persistent_programs(blocks: int, device: torch.device) -> int:
    """Programs of a loop-over-blocks kernel: a few per SM on a GPU; under the interpreter three, so that the
    tests run the loop over blocks (and its per-program accumulation) as a GPU would."""
    if device.type != "cuda":
        return max(1, min(blocks, 3))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(blocks, 4 * sms))


next_power_of_2 = triton.next_power_of_2
