"""Fused per-branch context-aware gate with its backward (see README.md)."""

from .kernel import fused_gate
from .reference import fused_gate_reference

__all__ = ["fused_gate", "fused_gate_reference"]
