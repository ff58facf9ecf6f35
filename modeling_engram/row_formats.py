"""Row formats of the Engram memory tables: what one stored row is, and the FP8 block (de)quantisation.

"fp32", "bf16" and "fp16" rows are plain tensors of that dtype. "fp8_e4m3" is DeepSeek-V4.1's layout: e4m3
values `[rows, D]` and one ue8m0 (power-of-two) scale byte per 32 values `[rows, D / 32]`, dequantised as
`float(e4m3) * 2 ** (byte - 127)`. That product is exact in fp32, and in bf16 wherever it is a normal number
(e4m3 has 3 mantissa bits, bf16 7), so dequantising straight into bf16 gives V4.1's `bf16(...)` rows bit for bit.

Gathers move compact rows: an FP8 row travels as one uint8 vector, its D value bytes then its D / 32 scale bytes
(`pack_rows`), and is dequantised on the execution device after the copy (`unpack_rows`).
"""

from dataclasses import dataclass

import torch

SCALE_BLOCK = 32  # values per ue8m0 scale byte (V4.1)
E4M3_MAX = 448.0
_E4M3_MAX_MANTISSA = 0.875  # 448 = 0.875 * 2**9, as torch.frexp writes it


@dataclass(frozen=True)
class RowFormat:
    name: str
    dtype: torch.dtype  # dtype of the stored values
    scaled: bool = False  # one ue8m0 scale byte per SCALE_BLOCK values beside them

    def row_bytes(self, width: int) -> int:
        """Bytes one stored row of `width` values takes (values plus scale bytes)."""
        return width * self.dtype.itemsize + (width // SCALE_BLOCK if self.scaled else 0)

    @property
    def trainable(self) -> bool:
        return not self.scaled


ROW_FORMATS = {
    "fp32": RowFormat("fp32", torch.float32),
    "bf16": RowFormat("bf16", torch.bfloat16),
    "fp16": RowFormat("fp16", torch.float16),
    "fp8_e4m3": RowFormat("fp8_e4m3", torch.float8_e4m3fn, scaled=True),
}


def get_row_format(name: str | None, width: int | None = None) -> RowFormat | None:
    """The `RowFormat` called `name` (None stays None: rows in the model's dtype); checks `width` against it."""
    if name is None:
        return None
    if name not in ROW_FORMATS:
        raise ValueError(f"engram_row_format={name!r} is not a row format; choose one of {tuple(ROW_FORMATS)} or None.")
    fmt = ROW_FORMATS[name]
    if fmt.scaled and width is not None and width % SCALE_BLOCK:
        raise ValueError(
            f"engram_row_format={name!r} needs rows whose width is a multiple of its scale block {SCALE_BLOCK}; "
            f"the rows are {width} wide (n_embed_per_ngram / n_head_per_ngram)."
        )
    return fmt


def _powers_of_two(exponents: torch.Tensor) -> torch.Tensor:
    """2 ** e in fp32 for integer e in [-126, 127], built from its bits (exact, the same on every device)."""
    return ((exponents.to(torch.int32) + 127) << 23).view(torch.float32)


def quantize_fp8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values [R, D], ue8m0 scale bytes uint8 [R, D / 32]) of `rows` [R, D].

    Each block of 32 gets the smallest power-of-two scale 2**e with max|x| / 2**e <= 448 (DeepSeek's ue8m0
    scaling), found from the exact binary exponent of max|x| rather than a rounded log2; the scaled values round
    to nearest e4m3. All-zero blocks get scale 1 (byte 127).
    """
    blocks = rows.float().unflatten(-1, (-1, SCALE_BLOCK))
    amax = blocks.abs().amax(-1)
    mantissa, exponent = torch.frexp(amax)  # amax = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = exponent - 9 + (mantissa > _E4M3_MAX_MANTISSA).to(exponent.dtype)
    exponent = torch.where(amax > 0, exponent, 0).clamp_(-126, 127)
    values = (blocks * _powers_of_two(-exponent).unsqueeze(-1)).clamp_(-E4M3_MAX, E4M3_MAX)
    return values.to(torch.float8_e4m3fn).flatten(-2), (exponent + 127).to(torch.uint8)


def dequantize_fp8(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`float(values) * 2 ** (scales - 127)` per block of 32: [R, D] in `dtype`."""
    scale = _powers_of_two(scales.to(torch.int32) - 127)
    rows = values.float().unflatten(-1, (-1, SCALE_BLOCK)) * scale.unsqueeze(-1)
    return rows.flatten(-2).to(dtype)


def pack_rows(values: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """Gathered rows as they move: the values themselves, or for FP8 one uint8 row of value then scale bytes."""
    if scales is None:
        return values
    return torch.cat([values.view(torch.uint8), scales], dim=-1)


def unpack_rows(packed: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows [..., width] in `dtype` from `pack_rows` output (FP8 rows dequantised here, after the copy)."""
    if packed.dtype != torch.uint8:
        return packed if packed.dtype == dtype else packed.to(dtype)
    values = packed[..., :width].contiguous().view(torch.float8_e4m3fn)
    return dequantize_fp8(values, packed[..., width:], dtype)


def check_scales(name: str, values: torch.Tensor, scales: torch.Tensor | None) -> None:
    """Raise a ValueError unless `scales` fit `values` as FP8 block scales (uint8 [rows, width / 32])."""
    expected = (values.shape[0], values.shape[1] // SCALE_BLOCK)
    if scales is None:
        raise ValueError(f"{name}: FP8 values {tuple(values.shape)} come without their scale tensor (weight_scale).")
    if scales.dtype != torch.uint8 or tuple(scales.shape) != expected:
        raise ValueError(
            f"{name}: scale tensor has shape {tuple(scales.shape)} and dtype {scales.dtype}; FP8 values of shape "
            f"{tuple(values.shape)} need uint8 scales of shape {expected} (one byte per {SCALE_BLOCK} values)."
        )


__all__ = [
    "ROW_FORMATS", "SCALE_BLOCK", "RowFormat", "check_scales", "dequantize_fp8", "get_row_format",
    "pack_rows", "quantize_fp8", "unpack_rows",
]
