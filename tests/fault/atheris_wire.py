"""libFuzzer (atheris) on the wire decoder: optional, run by ``test_fuzz_frame_decoder_atheris``
in the slow suite when ``atheris`` is installed (``pip install atheris``; not a dependency).

    python atheris_wire.py -runs=1000000 CORPUS_DIR

Whatever the input, the decoder yields frames or raises ProtocolError; every frame re-encodes
to itself. Any other exception is a crash that libFuzzer reports (and saves) with its input.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _light  # noqa: F401  (first: aiokvpipe's wire modules without torch)
import atheris

with atheris.instrument_imports(include=["aiokvpipe"]):
    from aiokvpipe import _wire
    from aiokvpipe._errors import ProtocolError

MAX_BUFFERED = max(_wire.FRAME_PREFIX_BYTES, max(_wire.MAX_BODY.values()))


def test_one_input(data: bytes) -> None:
    dec = _wire.FrameDecoder()
    split = data[0] if data else 0
    try:
        frames = dec.feed(data[1:1 + split]) + dec.feed(data[1 + split:])
    except ProtocolError:
        return
    if dec.buffered > MAX_BUFFERED:
        raise AssertionError(f"decoder holds {dec.buffered} bytes")
    for f in frames:
        again = _wire.FrameDecoder().feed(_wire.encode(f))
        if again != [f]:
            raise AssertionError(f"{f!r} re-encodes to {again!r}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
