"""Thin wrappers of the CUDA calls the ipc plane needs: IPC memory handles, allocation facts,
raw device copies.

CuPy's runtime bindings (``cupy.cuda.runtime``) do the IPC calls and copies; the driver's
``cuPointerGetAttributes`` (through ctypes on ``libcuda.so.1``, always present where a CUDA
driver is) tells which allocation a pointer lies in. Nothing is loaded at import: the package
must import on a machine without CUDA or CuPy. Every call here may raise ``RuntimeError``
(CuPy's ``CUDARuntimeError`` is one, and so is :class:`DriverError`); callers turn that into
the plane's own errors.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any, Final, NamedTuple

from . import _wire

#: Size of a ``cudaIpcMemHandle_t`` and of a ``cudaIpcEventHandle_t``.
IPC_HANDLE_BYTES: Final = _wire.IPC_HANDLE_BYTES

#: ``cudaMemcpyDefault``: the direction follows from the pointers (unified addressing).
_MEMCPY_DEFAULT: Final = 4
#: ``cudaIpcMemLazyEnablePeerAccess``: a handle of another GPU's memory enables peer access.
_LAZY_PEER_ACCESS: Final = 1

# CUpointer_attribute values (cuda.h, stable since CUDA 10.2).
_ATTR_BUFFER_ID: Final = 7
_ATTR_IS_LEGACY_CUDA_IPC_CAPABLE: Final = 10
_ATTR_RANGE_START_ADDR: Final = 11
_ATTR_RANGE_SIZE: Final = 12


class DriverError(RuntimeError):
    """A CUDA driver call failed; ``code`` is its ``CUresult``."""

    def __init__(self, call: str, code: int) -> None:
        super().__init__(f"{call} failed with CUresult {code}")
        self.code = code


@functools.cache
def runtime() -> Any:
    """CuPy's CUDA runtime bindings (ImportError without CuPy): the module that
    ``cupy.cuda.runtime`` re-exports, imported without the ``cupy`` package. On an H200 host
    (2026-12-02) that took 2–16 ms against 160–406 ms for ``cupy.cuda.runtime``, whose
    import, even in a worker thread, held the GIL in chunks over 2 ms 8 to 39 times (loading
    and initialising CuPy's extension modules): loop lag at every first ipc connection."""
    try:
        from cupy_backends.cuda.api import runtime as rt  # lazy: CuPy is an optional extra
    except ImportError:  # another layout of CuPy's modules
        from cupy.cuda import runtime as rt
    return rt


#: ``cudaErrorMemoryAllocation`` and ``CUDA_ERROR_OUT_OF_MEMORY``: the same code in both APIs.
_OUT_OF_MEMORY: Final = 2


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc``, raised by a call here, says the device ran out of memory (CuPy's
    runtime errors carry the code as ``status``, :class:`DriverError` as ``code``)."""
    code = getattr(exc, "status", getattr(exc, "code", None))
    return isinstance(exc, MemoryError) or code == _OUT_OF_MEMORY


def load_driver() -> None:
    """Load ``libcuda.so.1`` now (``OSError`` if it cannot be)."""
    _driver()


@functools.cache
def _lib() -> Any:
    return ctypes.CDLL("libcuda.so.1")


@functools.cache
def _driver() -> Any:
    fn = _lib().cuPointerGetAttributes
    fn.argtypes = [ctypes.c_uint, ctypes.POINTER(ctypes.c_int),
                   ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint64]
    fn.restype = ctypes.c_int
    return fn


@functools.cache
def _driver_one() -> Any:
    fn = _lib().cuPointerGetAttribute
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64]
    fn.restype = ctypes.c_int
    return fn


def retain_primary_context(device_index: int) -> None:
    """Create (or find) the primary CUDA context of a device, as the runtime would on its
    first call there: through ctypes, which releases the GIL while the driver works (100 ms
    and more), unlike torch's first CUDA call. The reference is kept: the runtime uses that
    same context for the life of the process. ``DriverError``/``OSError`` if it cannot."""
    _primary_context(device_index)


@functools.cache
def _primary_context(device_index: int) -> ctypes.c_void_p:
    lib = _lib()
    code = lib.cuInit(ctypes.c_uint(0))
    if code != 0:
        raise DriverError("cuInit", code)
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    code = lib.cuDeviceGet(ctypes.byref(dev), ctypes.c_int(device_index))
    if code != 0:
        raise DriverError("cuDeviceGet", code)
    code = lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev)
    if code != 0:
        raise DriverError("cuDevicePrimaryCtxRetain", code)
    return ctx


#: ``CU_STREAM_NON_BLOCKING``: no implicit ordering with the legacy default stream, as torch's
#: own side streams.
_STREAM_NON_BLOCKING: Final = 1


def create_streams(device_index: int, n: int) -> list[int]:
    """``n`` new CUDA streams of the device's primary context, as ``cudaStream_t`` ints.
    Through the driver by ctypes, which releases the GIL: torch makes a device's stream pool
    (64 streams) on its first side stream, 2–8 ms with the GIL held (2026-12-02, H200).
    Call it in a worker thread; the streams are never destroyed (see ``_cuda``), except those
    made before a failure, which are. The thread's current context is left as it was."""
    lib = _lib()
    code = lib.cuCtxPushCurrent_v2(_primary_context(device_index))
    if code != 0:
        raise DriverError("cuCtxPushCurrent_v2", code)
    out: list[int] = []
    try:
        for _ in range(n):
            stream = ctypes.c_void_p()
            code = lib.cuStreamCreate(ctypes.byref(stream),
                                      ctypes.c_uint(_STREAM_NON_BLOCKING))
            if code != 0 or not stream.value:
                raise DriverError("cuStreamCreate", code)
            out.append(int(stream.value))
    except BaseException:
        for handle in out:
            lib.cuStreamDestroy_v2(ctypes.c_void_p(handle))
        raise
    finally:
        lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
    return out


class Allocation(NamedTuple):
    """The ``cudaMalloc`` allocation that holds a pointer."""

    buffer_id: int  # process-wide unique: a new allocation at the same address gets a new id
    base: int
    size: int
    exportable: bool  # cudaIpcGetMemHandle works on it (false for expandable segments / VMM)


_QUERY: Final = (ctypes.c_int * 4)(_ATTR_BUFFER_ID, _ATTR_IS_LEGACY_CUDA_IPC_CAPABLE,
                                    _ATTR_RANGE_START_ADDR, _ATTR_RANGE_SIZE)


def allocation_of(ptr: int) -> Allocation:
    """Which allocation ``ptr`` lies in: one driver call, about a microsecond."""
    values = (ctypes.c_uint64 * 4)()  # zeroed: the IPC flag is written as a 1-byte bool
    slots = (ctypes.c_void_p * 4)(*(ctypes.addressof(values) + 8 * i for i in range(4)))
    code = _driver()(4, _QUERY, slots, ptr)
    if code != 0:
        raise DriverError("cuPointerGetAttributes", code)
    buffer_id, capable, base, size = values
    return Allocation(int(buffer_id), int(base), int(size), bool(capable & 0xFF))


def buffer_id_of(ptr: int) -> int:
    """The process-wide unique id of the allocation holding ``ptr``: one driver call of a
    single attribute, the per-message check that a cached export still names live memory
    (an allocation freed and made again at the same address gets a new id)."""
    value = ctypes.c_uint64()
    code = _driver_one()(ctypes.addressof(value), _ATTR_BUFFER_ID, ptr)
    if code != 0:
        raise DriverError("cuPointerGetAttribute", code)
    return value.value


def export_memory(base: int) -> bytes:
    """The IPC handle of the allocation starting at ``base``."""
    handle: bytes = runtime().ipcGetMemHandle(base)
    return handle


def open_memory(handle: bytes, device_index: int) -> int:
    """Map a peer's allocation on ``device_index``; blocking (up to ~0.1 s for GiBs): call it
    in a worker thread. Returns the local address of the allocation's base."""
    rt = runtime()
    rt.setDevice(device_index)
    ptr: int = rt.ipcOpenMemHandle(handle, _LAZY_PEER_ACCESS)
    return ptr


def close_memory(ptr: int) -> None:
    runtime().ipcCloseMemHandle(ptr)


def copy_async(dst: int, src: int, nbytes: int, stream: int) -> None:
    """``cudaMemcpyAsync`` of ``nbytes`` on ``stream`` (a ``cudaStream_t`` as an int)."""
    runtime().memcpyAsync(dst, src, nbytes, _MEMCPY_DEFAULT, stream)


def malloc(nbytes: int, device_index: int) -> int:
    """A plain ``cudaMalloc`` (never the caching allocator, whose segments may be
    expandable and then not exportable). Blocking: call it in a worker thread."""
    rt = runtime()
    rt.setDevice(device_index)
    ptr: int = rt.malloc(nbytes)
    return ptr


def free(ptr: int, device_index: int) -> None:
    rt = runtime()
    rt.setDevice(device_index)
    rt.free(ptr)


def set_device(device_index: int) -> None:
    runtime().setDevice(device_index)


def can_access_peer(device_index: int, peer_index: int) -> bool:
    return device_index == peer_index or bool(
        runtime().deviceCanAccessPeer(device_index, peer_index))
