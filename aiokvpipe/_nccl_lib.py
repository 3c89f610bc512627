"""libnccl through ctypes: the few NCCL calls the nccl plane makes, non-blocking communicators.

CuPy's ``NcclCommunicator`` only creates blocking communicators (``ncclCommInitRank``), and a
rank whose peer never joins then waits in that call forever, in a thread nobody can end.
Non-blocking communicators (NCCL >= 2.14: ``ncclCommInitRankConfig`` with
``config.blocking = 0``) return ``ncclInProgress`` at once; their state is polled with
``ncclCommGetAsyncError`` and ``ncclCommAbort`` ends them at any point. CuPy cannot wrap a
communicator made elsewhere, so every NCCL call of the plane goes through this binding.

The library is the one CuPy loaded (found in ``/proc/self/maps`` after importing
``cupy.cuda.nccl``), else the ``nvidia-nccl`` wheel's, else ``libnccl.so.2`` from the loader's
path. Loading is blocking (CuPy's import, NCCL's own start-up): do it off the event loop.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Final

SUCCESS: Final = 0
IN_PROGRESS: Final = 7
UINT8: Final = 1  # ncclUint8
UNIQUE_ID_BYTES: Final = 128
#: Non-blocking communicators and ncclCommGetAsyncError polling need this version.
MIN_VERSION: Final = 21400  # NCCL_VERSION(2, 14, 0)

_CONFIG_MAGIC: Final = 0xCAFEBEEF
_UNDEF_INT: Final = -(2**31)  # NCCL_CONFIG_UNDEF_INT (INT_MIN)


class NcclError(RuntimeError):
    """An NCCL call failed; ``code`` is its ``ncclResult_t``."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_ubyte * UNIQUE_ID_BYTES)]


class _Config(ctypes.Structure):
    """``ncclConfig_t`` as of NCCL 2.14. NCCL reads ``size`` bytes of it and takes its defaults
    for every field a later version added (its ``parseCommConfig``), so this prefix is valid
    for every version since."""

    _fields_ = [("size", ctypes.c_size_t), ("magic", ctypes.c_uint),
                ("version", ctypes.c_uint), ("blocking", ctypes.c_int),
                ("cgaClusterSize", ctypes.c_int), ("minCTAs", ctypes.c_int),
                ("maxCTAs", ctypes.c_int), ("netName", ctypes.c_char_p)]


class NcclLib:
    """The bound functions. Communicators are plain integers (``ncclComm_t`` pointers)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        c_int, c_void_p, c_size_t = ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t
        self._lib = lib
        sig = {
            "ncclGetVersion": (ctypes.POINTER(c_int),),
            "ncclGetUniqueId": (ctypes.POINTER(_UniqueId),),
            "ncclCommInitRankConfig": (ctypes.POINTER(c_void_p), c_int, _UniqueId, c_int,
                                       ctypes.POINTER(_Config)),
            "ncclCommGetAsyncError": (c_void_p, ctypes.POINTER(c_int)),
            "ncclCommAbort": (c_void_p,),
            "ncclCommFinalize": (c_void_p,),
            "ncclCommDestroy": (c_void_p,),
            "ncclSend": (c_void_p, c_size_t, c_int, c_int, c_void_p, c_void_p),
            "ncclRecv": (c_void_p, c_size_t, c_int, c_int, c_void_p, c_void_p),
            "ncclGroupStart": (),
            "ncclGroupEnd": (),
        }
        for name, args in sig.items():
            fn = getattr(lib, name)
            fn.argtypes = list(args)
            fn.restype = c_int
        lib.ncclGetErrorString.argtypes = [c_int]
        lib.ncclGetErrorString.restype = ctypes.c_char_p
        v = c_int()
        self.check(lib.ncclGetVersion(ctypes.byref(v)), "ncclGetVersion")
        self.version = v.value

    def check(self, rc: int, what: str) -> int:
        """``rc`` if it is ``SUCCESS`` or ``IN_PROGRESS``; else raise :class:`NcclError`."""
        if rc in (SUCCESS, IN_PROGRESS):
            return rc
        text = (self._lib.ncclGetErrorString(rc) or b"").decode(errors="replace")
        raise NcclError(f"{what} failed: {text} (ncclResult_t {rc})", rc)

    def unique_id(self) -> bytes:
        """``ncclGetUniqueId`` (blocking: it starts NCCL's bootstrap root)."""
        uid = _UniqueId()
        self.check(self._lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
        return bytes(uid.internal)

    def init_rank_nonblocking(self, uid: bytes, nranks: int, rank: int) -> int:
        """Start a non-blocking ``ncclCommInitRankConfig`` on the calling thread's current
        CUDA device; returns the communicator at once. Poll :meth:`async_error` until it is
        not ``IN_PROGRESS``; :meth:`abort` ends it at any point."""
        if len(uid) != UNIQUE_ID_BYTES:
            raise ValueError(f"NCCL unique id must be {UNIQUE_ID_BYTES} bytes")
        cid = _UniqueId()
        ctypes.memmove(ctypes.addressof(cid), uid, UNIQUE_ID_BYTES)
        config = _Config(ctypes.sizeof(_Config), _CONFIG_MAGIC, MIN_VERSION, 0, _UNDEF_INT,
                         _UNDEF_INT, _UNDEF_INT, None)
        comm = ctypes.c_void_p()
        rc = self._lib.ncclCommInitRankConfig(ctypes.byref(comm), nranks, cid, rank,
                                              ctypes.byref(config))
        if rc not in (SUCCESS, IN_PROGRESS) and comm.value:
            self._lib.ncclCommAbort(comm)
        self.check(rc, "ncclCommInitRankConfig")
        assert comm.value, "ncclCommInitRankConfig returned no communicator"
        return comm.value

    def async_error(self, comm: int) -> int:
        """The communicator's state: ``SUCCESS``, ``IN_PROGRESS`` or an error code."""
        state = ctypes.c_int()
        self.check(self._lib.ncclCommGetAsyncError(ctypes.c_void_p(comm),
                                                   ctypes.byref(state)),
                   "ncclCommGetAsyncError")
        return state.value

    def abort(self, comm: int) -> int:
        """``ncclCommAbort`` (blocking: may take seconds while NCCL's threads wind down)."""
        return int(self._lib.ncclCommAbort(ctypes.c_void_p(comm)))

    def finalize(self, comm: int) -> int:
        return self.check(self._lib.ncclCommFinalize(ctypes.c_void_p(comm)),
                          "ncclCommFinalize")

    def destroy(self, comm: int) -> int:
        return int(self._lib.ncclCommDestroy(ctypes.c_void_p(comm)))

    def group_start(self) -> None:
        self.check(self._lib.ncclGroupStart(), "ncclGroupStart")

    def group_end(self) -> int:
        return self.check(self._lib.ncclGroupEnd(), "ncclGroupEnd")

    def send(self, ptr: int, nbytes: int, peer: int, comm: int, stream: int) -> None:
        self.check(self._lib.ncclSend(ctypes.c_void_p(ptr), nbytes, UINT8, peer,
                                      ctypes.c_void_p(comm), ctypes.c_void_p(stream)),
                   "ncclSend")

    def recv(self, ptr: int, nbytes: int, peer: int, comm: int, stream: int) -> None:
        self.check(self._lib.ncclRecv(ctypes.c_void_p(ptr), nbytes, UINT8, peer,
                                      ctypes.c_void_p(comm), ctypes.c_void_p(stream)),
                   "ncclRecv")


def _library_path() -> str:
    try:
        from cupy.cuda import nccl  # noqa: F401  -- makes CuPy load the libnccl it uses
    except Exception:  # noqa: BLE001  -- no CuPy, or one without NCCL: look elsewhere
        pass
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rsplit(None, 1)[-1]
                if os.path.basename(path).startswith("libnccl.so"):
                    return path
    except OSError:
        pass
    try:
        import nvidia.nccl  # type: ignore[import-not-found,unused-ignore]  # the nccl wheel

        candidate = os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so.2")
        if os.path.exists(candidate):
            return candidate
    except Exception:  # noqa: BLE001
        pass
    return "libnccl.so.2"


@functools.cache
def load() -> NcclLib:
    """The process's NCCL binding (cached). Raises ``OSError`` if no libnccl loads, or
    :class:`NcclError` if it predates non-blocking communicators. Blocking: call it off the
    event loop."""
    lib = NcclLib(ctypes.CDLL(_library_path()))
    if lib.version < MIN_VERSION:
        raise NcclError(f"NCCL {lib.version} is older than 2.14 (no non-blocking "
                        "communicators)", 0)
    return lib
