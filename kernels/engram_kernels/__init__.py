"""engram_kernels: Triton kernels for the Engram lookup path, one op per folder, each beside a torch reference.

Installed under the import name `engram_kernels` (the name `kernels` belongs to the Hugging Face `kernels`
library). The model reaches these functions only through `modeling_engram/kernel_dispatch.py`.
"""

from .gather import gather_fp8_rows, gather_rows, row_gradients
from .gate import fused_gate
from .hash import ngram_hash
from .utils import INTERPRETED, runnable_on

__all__ = ["INTERPRETED", "fused_gate", "gather_fp8_rows", "gather_rows", "ngram_hash", "row_gradients", "runnable_on"]
