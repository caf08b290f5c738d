"""pilimit 0.1's module for π-parameters and rows; they now live in :mod:`inf.parameters`
and :mod:`inf.rows`. Kept so that old imports work."""

from .parameters import FinPiParameter, InfPiParameter, owner_of
from .rows import RowStore

__all__ = ["InfPiParameter", "FinPiParameter", "RowStore", "owner_of"]
