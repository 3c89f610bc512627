"""aiokvpipe: move tensors (an LLM's KV cache above all) between two processes from asyncio.

::

    listener = await aiokvpipe.listen("127.0.0.1", 5555)
    pipe = await listener.accept()           # or: await aiokvpipe.connect(host, port)
    await pipe.send({"k": k, "v": v}, key="request-17")
    kv = await pipe.recv(key="request-17")
"""

from ._blocks import BlockPool
from ._connect import Listener, connect, listen, open_pipe
from ._errors import (
    AuthenticationError,
    BrokenPipe,
    PeerFailure,
    PipeClosed,
    PipeError,
    ProtocolError,
)
from ._options import PipeOptions
from ._pipe import Pipe, PipeStats
from ._protocol import State

__version__ = "0.1.0.dev0"

__all__ = [
    "listen",
    "connect",
    "open_pipe",
    "Listener",
    "Pipe",
    "PipeStats",
    "State",
    "PipeOptions",
    "BlockPool",
    "PipeError",
    "BrokenPipe",
    "PipeClosed",
    "ProtocolError",
    "AuthenticationError",
    "PeerFailure",
    "__version__",
]
