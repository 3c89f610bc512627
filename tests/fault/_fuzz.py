"""A small coverage-guided mutational fuzzer (no dependency beyond the standard library).

Coverage is edge coverage -- (code object, previous line, line) triples plus the exception
types raised -- of chosen source files, collected with :func:`sys.settrace`. An input that
reaches an edge not seen before joins the corpus; new inputs are corpus entries put through
1-4 stacked mutations (bit flips, interesting integers at any offset and width, inserts,
deletes, duplications, splices, frame-length fix-ups, frame-type swaps). It is the libFuzzer
loop in miniature, tuned for a length-prefixed binary protocol.
"""

from __future__ import annotations

import random
import struct
import sys
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from aiokvpipe import _wire

INTERESTING: dict[int, tuple[int, ...]] = {
    1: (0, 1, 2, 0x10, 0x20, 0x7F, 0x80, 0xFE, 0xFF),
    2: (0, 1, 0xFF, 0x100, 0x3FF, 0x400, 0x401, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF),
    4: (0, 1, 0x7F, 0x100, 0x1000, 0x1001, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
        0xFFFFFFFE, 0xFFFFFFFF, _wire.MAX_HEADER_BODY, _wire.MAX_HEADER_BODY + 1,
        _wire.MAX_TENSORS, _wire.MAX_TENSORS + 1),
    8: (0, 1, 0xFF, 0xFFFFFFFF, 1 << 32, (1 << 47) - 1, 1 << 47, (1 << 48) - 1, 1 << 48,
        (1 << 48) + 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1),
}
_PACK = {1: ">B", 2: ">H", 4: ">I", 8: ">Q"}
FRAME_TYPES = tuple(int(t) for t in _wire.FrameType)


class Coverage:
    """Edge coverage of the code in ``files`` (absolute paths), cumulative over runs."""

    def __init__(self, files: Iterable[str]) -> None:
        self.files = frozenset(files)
        self.seen: set[Any] = set()
        self._edges: set[Any] = set()

    def _global(self, frame: FrameType, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename not in self.files:
            return None
        edges = self._edges
        code = frame.f_code
        last = [-frame.f_lineno]  # a resumed coroutine starts from where it was

        def local(frame: FrameType, event: str, arg: Any) -> Any:
            if event == "line":
                ln = frame.f_lineno
                edges.add((code, last[0], ln))
                last[0] = ln
            elif event == "exception":
                edges.add((code, "raise", arg[0]))
            return local

        return local

    def start(self) -> None:
        self._edges = set()
        sys.settrace(self._global)

    def stop(self) -> int:
        """Stop collecting; return how many edges this run reached for the first time."""
        sys.settrace(None)
        new = self._edges - self.seen
        self.seen |= new
        self._edges = set()
        return len(new)


class Mutator:
    """Byte-level mutations, some of them aware of the 8-byte frame prefix."""

    def __init__(self, rng: random.Random, max_len: int = 16384) -> None:
        self.rng = rng
        self.max_len = max_len

    def mutate(self, data: bytes, corpus: list[bytes]) -> bytes:
        buf = bytearray(data)
        for _ in range(self.rng.choice((1, 1, 1, 2, 2, 3, 4))):
            op = self.rng.randrange(12)
            getattr(self, f"_op{op}")(buf, corpus)
        return bytes(buf[:self.max_len])

    def _pos(self, buf: bytearray, width: int = 1) -> int | None:
        if len(buf) < width:
            return None
        return self.rng.randrange(len(buf) - width + 1)

    def _op0(self, buf: bytearray, corpus: list[bytes]) -> None:  # flip a bit
        if (p := self._pos(buf)) is not None:
            buf[p] ^= 1 << self.rng.randrange(8)

    def _op1(self, buf: bytearray, corpus: list[bytes]) -> None:  # random byte
        if (p := self._pos(buf)) is not None:
            buf[p] = self.rng.randrange(256)

    def _op2(self, buf: bytearray, corpus: list[bytes]) -> None:  # interesting integer
        width = self.rng.choice((1, 2, 4, 8))
        if (p := self._pos(buf, width)) is not None:
            buf[p:p + width] = struct.pack(_PACK[width], self.rng.choice(INTERESTING[width]))

    def _op3(self, buf: bytearray, corpus: list[bytes]) -> None:  # small arithmetic
        width = self.rng.choice((1, 2, 4, 8))
        if (p := self._pos(buf, width)) is not None:
            (v,) = struct.unpack(_PACK[width], buf[p:p + width])
            v = (v + self.rng.randint(-16, 16)) % (1 << (8 * width))
            buf[p:p + width] = struct.pack(_PACK[width], v)

    def _op4(self, buf: bytearray, corpus: list[bytes]) -> None:  # insert random bytes
        p = self.rng.randint(0, len(buf))
        buf[p:p] = self.rng.randbytes(self.rng.randint(1, 16))

    def _op5(self, buf: bytearray, corpus: list[bytes]) -> None:  # delete a range
        if buf:
            p = self.rng.randrange(len(buf))
            del buf[p:p + self.rng.randint(1, 32)]

    def _op6(self, buf: bytearray, corpus: list[bytes]) -> None:  # duplicate a range
        if buf:
            p = self.rng.randrange(len(buf))
            chunk = buf[p:p + self.rng.randint(1, 64)]
            q = self.rng.randint(0, len(buf))
            buf[q:q] = chunk

    def _op7(self, buf: bytearray, corpus: list[bytes]) -> None:  # splice another input
        other = self.rng.choice(corpus)
        if other:
            p = self.rng.randint(0, len(buf))
            q = self.rng.randrange(len(other))
            buf[p:] = other[q:]

    def _op8(self, buf: bytearray, corpus: list[bytes]) -> None:  # append another input
        buf += self.rng.choice(corpus)

    def _op9(self, buf: bytearray, corpus: list[bytes]) -> None:  # truncate
        if buf:
            del buf[self.rng.randrange(len(buf)):]

    def _op10(self, buf: bytearray, corpus: list[bytes]) -> None:  # fix the first frame's length
        if len(buf) >= _wire.FRAME_PREFIX_BYTES:
            buf[4:8] = struct.pack(">I", len(buf) - _wire.FRAME_PREFIX_BYTES)

    def _op11(self, buf: bytearray, corpus: list[bytes]) -> None:  # another frame type
        if buf:
            buf[0] = self.rng.choice(FRAME_TYPES)


def seed_frames() -> list[_wire.Frame]:
    """One or more valid frames of every type: the fuzzers' starting corpus."""
    S = _wire.Structure
    ts = _wire.TensorSpec
    extra: list[_wire.Frame] = []
    if "inline" in getattr(_wire.Header, "__dataclass_fields__", {}):  # HEADER_INLINE frames
        extra.append(_wire.Header(4, "i", S.LIST, (ts(14, (8,), 1), ts(1, (2,), 4)),
                                  inline=bytes(range(16))))
    return [
        _wire.Hello(bytes(32), _wire.Capabilities()),
        _wire.Hello(bytes(range(32)), _wire.Capabilities(_wire.Transport.NCCL, True, True,
                                                         bytes(range(16)), 22005, 1 << 29,
                                                         500)),
        _wire.Auth(b""), _wire.Auth(bytes(32)),
        _wire.Accept(bytes(32), bytes(16), _wire.Transport.TCP),
        _wire.Accept(b"", bytes(16), _wire.Transport.NCCL, (bytes(128), bytes(range(128)))),
        _wire.Ready(), _wire.Attach(bytes(16), _wire.Direction.SERVER_TO_CLIENT),
        _wire.Error(_wire.ErrorCode.AUTHENTICATION, "authentication failed"),
        _wire.Header(0, None, S.NONE), _wire.Header(1, "", S.TENSOR, (ts(1, (2, 3), 4),)),
        _wire.Header(2, "γάμμα", S.LIST, (ts(3, (), 2), ts(14, (0, 5), 1))),
        _wire.Header(3, "k" * 40, S.DICT, (ts(13, (4,), 8, "k"), ts(2, (1, 1, 1), 2, "v"))),
        _wire.Credit(1 << 20), _wire.Heartbeat(), _wire.Close(7),
    ] + extra


def seed_corpus() -> list[bytes]:
    frames = [_wire.encode(f) for f in seed_frames()]
    hello, auth, heartbeat, credit = (_wire.encode(f) for f in (
        _wire.Hello(bytes(32), _wire.Capabilities()), _wire.Auth(b""), _wire.Heartbeat(),
        _wire.Credit(1 << 20)))
    headers = [f for f in frames if f[0] in (_wire.FrameType.HEADER, 20)]
    return frames + [hello + auth, headers[0] + credit + heartbeat, b"".join(headers)]


def run_loop(target: Callable[[bytes, random.Random], str], n: int, rng: random.Random,
             coverage: Coverage, corpus: list[bytes], *, deadline: float | None = None,
             clock: Callable[[], float] | None = None, max_corpus: int = 4096,
             on_progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run ``target`` on ``n`` inputs (or until ``clock() > deadline``); ``target`` returns a
    short outcome label and raises for a crash. Returns counts (crashes are collected, not
    raised)."""
    mut = Mutator(rng)
    outcomes: dict[str, int] = {}
    crashes: list[tuple[bytes, str]] = []
    slowest = 0.0
    import time

    i = 0
    for i in range(n):
        data = mut.mutate(rng.choice(corpus), corpus) if i >= len(corpus) else corpus[i]
        t0 = time.perf_counter()
        coverage.start()
        try:
            label = target(data, rng)
        except Exception as exc:  # noqa: BLE001 - a crash is what we look for
            label = "CRASH"
            if len(crashes) < 20:
                crashes.append((data, f"{type(exc).__name__}: {exc}"))
        finally:
            new = coverage.stop()
        slowest = max(slowest, time.perf_counter() - t0)
        outcomes[label] = outcomes.get(label, 0) + 1
        if new and len(corpus) < max_corpus:
            corpus.append(data)
        if on_progress is not None and i % 10000 == 0:
            on_progress(i)
        if deadline is not None and clock is not None and i % 256 == 0 and clock() > deadline:
            break
    return {"inputs": i + 1, "outcomes": outcomes, "crashes": crashes,
            "slowest_input_s": slowest, "corpus": len(corpus), "edges": len(coverage.seen)}
