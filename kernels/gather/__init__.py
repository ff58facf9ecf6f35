"""Multi-head row gather from the flat Engram tables, with fp32 row gradients (see README.md)."""

from .reference import gather_rows_reference, row_gradients_in_order, row_gradients_reference
from .kernel import gather_rows, row_gradients

__all__ = ["gather_rows", "row_gradients", "gather_rows_reference", "row_gradients_reference", "row_gradients_in_order"]
