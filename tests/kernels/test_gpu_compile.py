"""Every kernel variant the launchers use compiles for an NVIDIA Hopper GPU (sm_90, as H100/H200), without a GPU.

The interpreter accepts things the compiler does not (and the reverse), so the parity tests alone would not show
that the kernels build for a GPU. Triton compiles ahead of time for a named target with its bundled ptxas.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, require

require("triton")

COMPILE_ALL = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget

sys.path.insert(0, f"{sys.argv[1]}/kernels")  # this checkout's kernels/engram_kernels
import engram_kernels as kernels
from engram_kernels.gate import kernel as gate
from engram_kernels.gather import kernel as gather
from engram_kernels.hash import kernel as hashing


def compile_variant(fn, pointers, constexprs, num_warps, target):
    signature = {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointers.get(name, pointers["*"])
        else:
            signature[name] = "fp32" if name in ("eps", "scale") else "i32"
    source = triton.compiler.ASTSource(fn, signature, constexprs)
    return triton.compile(source, target=target, options={"num_warps": num_warps})


HASH_FLAGS = ("MAP_IDS", "HAS_HISTORY", "HAS_MASK", "HAS_OFFSETS")
variants = []  # (kernel, pointer dtypes ("*": the default), constexprs, num_warps), as the launchers pick them
for ids, flags in (("i64", (True, False, True, False)), ("i64", (False, True, False, False)),
                   ("i32", (True, True, True, True))):  # forward(), hash_tokens(), every option with int32 ids
    pointers = {"*": "i64", "ids_ptr": ids, "token_map_ptr": ids, "mask_ptr": "i8"}
    constexprs = dict(N=3, HEADS=8, K_PAD=16, BLOCK_T=64, **dict(zip(HASH_FLAGS, flags)))
    variants.append((hashing._ngram_hash_kernel, pointers, constexprs, 4))
block_p, block_d = gather._blocks(80)  # the paper's head dim
warps = kernels.utils.num_warps_for(block_p * block_d)
for dtype in ("fp32", "bf16"):
    variants += [
        (gather._gather_rows_kernel, {"*": "i64", "weight_ptr": dtype, "out_ptr": dtype},
         dict(BLOCK_P=block_p, BLOCK_D=block_d), warps),
        (gather._row_grads_atomic_kernel, {"*": "i64", "grad_ptr": dtype, "out_ptr": "fp32"},
         dict(BLOCK_P=block_p, BLOCK_D=block_d), warps),
        (gather._row_grads_ordered_kernel, {"*": "i64", "grad_ptr": dtype, "out_ptr": "fp32"},
         dict(BLOCK_D=block_d, CHUNK=8), 4),
    ]
    for dim in (48, 2048):
        block_t, d_pad, gate_warps = gate._gate_blocks(dim)
        for fn in (gate._gate_fwd_kernel, gate._gate_bwd_kernel):
            pointers = {"*": dtype, "dwq_ptr": "fp32", "dwk_ptr": "fp32"}
            variants.append((fn, pointers, dict(BLOCK_T=block_t, D_PAD=d_pad), gate_warps))

compiled = []
for fn, pointers, constexprs, warps in variants:
    kernel = compile_variant(fn, pointers, constexprs, warps, GPUTarget("cuda", 90, 32))
    assert "cubin" in kernel.asm, fn.__name__
    compiled.append(fn.__name__)
print(json.dumps(compiled))
"""


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_hopper(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton-cache"), TRITON_DEFAULT_FP_FUSION="1")
    run = subprocess.run([sys.executable, "-c", COMPILE_ALL, ROOT], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    compiled = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(compiled) == 3 + 2 * (3 + 4), compiled
