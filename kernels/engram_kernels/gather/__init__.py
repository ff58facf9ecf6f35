"""Multi-head row gather from the flat Engram tables, with fp32 row gradients (see README.md)."""

from .reference import gather_fp8_rows_reference, gather_rows_reference, row_gradients_in_order, row_gradients_reference
from .kernel import gather_fp8_rows, gather_rows, row_gradients

__all__ = [
    "gather_fp8_rows", "gather_rows", "row_gradients", "gather_fp8_rows_reference", "gather_rows_reference",
    "row_gradients_reference", "row_gradients_in_order",
]
