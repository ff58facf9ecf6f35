"""The Triton row gather and its fp32 row gradients against the torch reference."""

import pytest
import torch
from kernel_checks import DEVICE, LENGTHS, TOLERANCE, assert_close, engram_kernels, mutant

from modeling_engram.memory import EngramTable
from modeling_engram.kernel_dispatch import force_engram_kernel

gather = engram_kernels.gather
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Small head tables, so that rows repeat often and the backward really accumulates.
HEAD_SIZES = [5, 7, 11, 13, 17, 19]


def gather_case(length: int, dtype: torch.dtype, head_dim: int = 24, batch: int = 2, seed: int = 0):
    """Table, head-local ids [B, T, 6], offsets and a gradient of the rows; one sequence at T=500 (interpreter time)."""
    batch = 1 if length >= 500 else batch
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.tensor(HEAD_SIZES)
    weight = torch.randn(int(sizes.sum()), head_dim, generator=generator).to(dtype)
    hash_ids = (torch.rand(batch, length, len(HEAD_SIZES), generator=generator) * sizes).long()
    grad_rows = torch.randn(batch, length, len(HEAD_SIZES) * head_dim, generator=generator).to(dtype)
    offsets = torch.cumsum(sizes, 0) - sizes
    return [t.to(DEVICE) for t in (weight, hash_ids, offsets, grad_rows)]


def check_gather(module, case, dtype, deterministic):
    """Forward is a copy (bit-identical); row gradients within the fp32 tolerance; weight gradient per dtype."""
    weight, hash_ids, offsets, grad_rows = case
    weight = weight.clone().requires_grad_()
    rows = module.gather_rows(weight, hash_ids, offsets, deterministic=deterministic)
    expected = gather.gather_rows_reference(weight, hash_ids, offsets)
    assert rows.dtype == weight.dtype and torch.equal(rows, expected), "gathered rows differ"
    unique, row_grads = module.row_gradients(grad_rows, hash_ids, offsets, deterministic=deterministic)
    ref_unique, ref_grads = gather.row_gradients_reference(grad_rows, hash_ids, offsets)
    assert torch.equal(unique, ref_unique) and row_grads.dtype == torch.float32
    assert_close(row_grads, ref_grads, torch.float32, "row gradients")
    (grad_weight,) = torch.autograd.grad(rows, weight, grad_rows)
    (ref_weight,) = torch.autograd.grad(expected, weight, grad_rows)
    assert_close(grad_weight, ref_weight, dtype, "weight gradient")
    return row_grads


@pytest.mark.parametrize("deterministic", [True, False], ids=["ordered", "atomic"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("length", LENGTHS, ids=lambda n: f"T{n}")
def test_gather_and_row_gradients_match_the_reference(length, dtype, deterministic):
    check_gather(gather.kernel, gather_case(length, dtype, seed=length), dtype, deterministic)


@pytest.mark.parametrize("head_dim", [1, 160], ids=lambda d: f"D{d}")
def test_head_dims_below_and_above_one_block(head_dim):
    check_gather(gather.kernel, gather_case(63, torch.float32, head_dim=head_dim), torch.float32, True)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_deterministic_gradients_are_bit_identical_run_to_run_and_sum_in_position_order(dtype):
    weight, hash_ids, offsets, grad_rows = gather_case(63, dtype, seed=1)
    runs = [gather.row_gradients(grad_rows, hash_ids, offsets, deterministic=True)[1] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    # The same fp32 additions in the same order give the same bits: the summation order is fixed, not scheduled.
    assert torch.equal(runs[0], gather.row_gradients_in_order(grad_rows, hash_ids, offsets)[1])
    weight.requires_grad_()
    rows = [gather.gather_rows(weight, hash_ids, offsets, deterministic=True) for _ in range(2)]
    grads = [torch.autograd.grad(r, weight, grad_rows)[0] for r in rows]
    assert torch.equal(grads[0], grads[1])


def test_deterministic_defaults_to_torch_setting(monkeypatch):
    calls = []
    original = gather.kernel._launch_row_grads
    monkeypatch.setattr(gather.kernel, "_launch_row_grads", lambda *a: calls.append(a[-1]) or original(*a))
    weight, hash_ids, offsets, grad_rows = gather_case(7, torch.float32)
    gather.row_gradients(grad_rows, hash_ids, offsets)
    torch.use_deterministic_algorithms(True)
    try:
        gather.row_gradients(grad_rows, hash_ids, offsets)
    finally:
        torch.use_deterministic_algorithms(False)
    assert calls == [False, True]


def test_sparse_gradient_holds_only_the_rows_read():
    weight, hash_ids, offsets, grad_rows = gather_case(63, torch.float32)
    weight.requires_grad_()
    rows = gather.gather_rows(weight, hash_ids, offsets, sparse_grad=True)
    (grad,) = torch.autograd.grad(rows, weight, grad_rows)
    assert grad.is_sparse and grad.is_coalesced()
    unique, row_grads = gather.row_gradients_reference(grad_rows, hash_ids, offsets)
    assert torch.equal(grad.indices()[0], unique)
    assert_close(grad.values(), row_grads, torch.float32, "sparse gradient values")


def test_engram_table_dispatches_to_the_kernel():
    table = EngramTable(HEAD_SIZES, 24).to(DEVICE)
    torch.nn.init.normal_(table.weight)
    _, hash_ids, _, grad_rows = gather_case(63, torch.float32)
    grads = {}
    for kernel in ("torch", "triton"):
        table.zero_grad()
        with force_engram_kernel(kernel):
            rows = table(hash_ids)
        rows.backward(grad_rows)
        grads[kernel] = rows.detach(), table.weight.grad.clone()
    assert torch.equal(grads["torch"][0], grads["triton"][0])
    assert_close(grads["triton"][1], grads["torch"][1], torch.float32, "table gradient")


def test_bad_arguments_are_named():
    weight, hash_ids, offsets, _ = gather_case(7, torch.float32)
    with pytest.raises(ValueError, match="offsets must be int64"):
        gather.gather_rows(weight, hash_ids, offsets[:-1])
    with pytest.raises(ValueError, match="hash_ids must be int64"):
        gather.gather_rows(weight, hash_ids.int(), offsets)


MUTATIONS = {
    "forward-ignores-offsets": (
        "row = tl.load(ids_ptr + p, mask=p_ok, other=0) + tl.load(offsets_ptr + p % K, mask=p_ok, other=0)",
        "row = tl.load(ids_ptr + p, mask=p_ok, other=0)",
    ),
    "ordered-drops-a-contribution": ("valid = first + j < count", "valid = first + j < count - 1"),
    "atomic-stores-instead-of-adding": ("tl.atomic_add(out_ptr + slot[:, None] * D + d[None, :], grad, mask=mask)",
                                        "tl.store(out_ptr + slot[:, None] * D + d[None, :], grad, mask=mask)"),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_deliberately_wrong_gather_kernel_fails_the_parity_check(mutation):
    wrong = mutant(gather.kernel, *MUTATIONS[mutation])
    case = gather_case(63, torch.float32)
    deterministic = mutation != "atomic-stores-instead-of-adding"
    check_gather(gather.kernel, case, torch.float32, deterministic)
    with pytest.raises(AssertionError, match="differ|error"):
        check_gather(wrong, case, torch.float32, deterministic)


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("head_dim", [32, 96])
def test_fp8_gather_dequantises_like_the_reference(length, head_dim):
    """Every e4m3 byte pattern and scale byte in the table; bf16 rows bit for bit (NaN patterns stay NaN)."""
    weight, hash_ids, offsets, _ = gather_case(length, torch.float32, head_dim=head_dim)
    generator = torch.Generator().manual_seed(length)
    values = torch.randint(0, 256, weight.shape, generator=generator, dtype=torch.uint8).view(torch.float8_e4m3fn)
    scales = torch.randint(100, 155, (weight.shape[0], head_dim // 32), generator=generator, dtype=torch.uint8)
    values, scales = values.to(DEVICE), scales.to(DEVICE)
    rows = gather.gather_fp8_rows(values, scales, hash_ids, offsets)
    expected = gather.gather_fp8_rows_reference(values, scales, hash_ids, offsets)
    assert rows.dtype == torch.bfloat16 and rows.shape == (*hash_ids.shape[:-1], hash_ids.shape[-1] * head_dim)
    nan = expected.isnan()
    assert torch.equal(rows.isnan(), nan)
    assert torch.equal(rows[~nan].view(torch.int16), expected[~nan].view(torch.int16))


def test_fp8_gather_refuses_mismatched_scales():
    values = torch.zeros(10, 64, dtype=torch.float8_e4m3fn, device=DEVICE)
    ids, offsets = torch.zeros(1, 3, 1, dtype=torch.long, device=DEVICE), torch.zeros(1, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match=r"scales torch.uint8 \(10, 1\) must be uint8 \[R, D / 32\]"):
        gather.gather_fp8_rows(values, torch.zeros(10, 1, dtype=torch.uint8, device=DEVICE), ids, offsets)
