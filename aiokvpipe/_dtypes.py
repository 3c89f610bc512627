"""Torch dtypes ↔ the wire's dtype codes (``_wire.DTYPE_ITEMSIZE``).

Codes are stable protocol constants, looked up by name so that a torch without, say, the
float8 types still imports this module; such a dtype is simply not supported there.
"""

from __future__ import annotations

from typing import Final

import torch

from ._wire import DTYPE_ITEMSIZE

_CODE_BY_NAME: Final[dict[str, int]] = {
    "float32": 1, "float16": 2, "bfloat16": 3, "float64": 4,
    "float8_e4m3fn": 5, "float8_e5m2": 6, "float8_e4m3fnuz": 7, "float8_e5m2fnuz": 8,
    "float8_e8m0fnu": 9,
    "int8": 10, "int16": 11, "int32": 12, "int64": 13,
    "uint8": 14, "uint16": 15, "uint32": 16, "uint64": 17,
    "bool": 18, "complex64": 19, "complex128": 20, "complex32": 21,
}

CODE_OF: Final[dict[torch.dtype, int]] = {}
DTYPE_OF: Final[dict[int, torch.dtype]] = {}
for _name, _code in _CODE_BY_NAME.items():
    _dtype = getattr(torch, _name, None)
    if isinstance(_dtype, torch.dtype):
        assert _dtype.itemsize == DTYPE_ITEMSIZE[_code], _name
        CODE_OF[_dtype] = _code
        DTYPE_OF[_code] = _dtype


def code_of(dtype: torch.dtype) -> int:
    """The wire code of ``dtype``; ``TypeError`` for a dtype the pipe cannot carry."""
    try:
        return CODE_OF[dtype]
    except KeyError:
        raise TypeError(f"aiokvpipe cannot send tensors of dtype {dtype}") from None


def dtype_of(code: int) -> torch.dtype | None:
    """The torch dtype of a wire code, or ``None`` if this torch lacks it."""
    return DTYPE_OF.get(code)
