"""N-gram hash ids for every Engram layer in one launch (see README.md)."""

from .kernel import ngram_hash
from .reference import ngram_hash_reference

__all__ = ["ngram_hash", "ngram_hash_reference"]
