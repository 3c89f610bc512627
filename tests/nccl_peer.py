"""Peer process for the CUDA/NCCL tests: ``python tests/nccl_peer.py PORT DEVICE MODE [ARG]``.

Modes:
  echo         receive unkeyed messages and send each straight back, until the pipe closes
  blast N MiB  send N messages of MiB each (value = index), then echo
  hold         connect, print "ready", then wait forever (the test kills it)
  blocks N     a CUDA block pool of N blocks (tests/test_pipe_blocks_cuda.py's layout): for
               each unkeyed message {"ids": ...}, receive blocks of key "blocks" into those
               ids, then send the same blocks back under key "back" (or, if the receive
               raised ValueError, None under key "failed"); "blocks N slow" queues a
               second of GPU work on its stream before each receive

Before connecting it prints "connected <transport>" on stdout. When the test runs both ends on
one GPU, it sets AIOKVPIPE_TEST_FAKE_UUID and NCCL_HOSTID, so that our handshake and NCCL each
take the two processes for two GPUs (NCCL then talks over its socket transport). Test-only.
"""

from __future__ import annotations

import asyncio
import os
import sys

import torch

import aiokvpipe
from aiokvpipe import _connect


async def main(port: int, device: str, mode: str, args: list[str]) -> None:
    fake = os.environ.get("AIOKVPIPE_TEST_FAKE_UUID")
    if fake:
        async def fake_uuid(_d: object) -> bytes:
            return bytes.fromhex(fake)

        _connect.device_uuid = fake_uuid  # type: ignore[assignment]
        _connect.host_id = lambda: bytes.fromhex(fake)  # two hosts: auto must not pick ipc
    transport = os.environ.get("AIOKVPIPE_TEST_TRANSPORT", "auto")
    pipe = await aiokvpipe.connect("127.0.0.1", port, device=device, transport=transport,
                                   heartbeat_interval=0.2)
    print("connected", pipe.transport, flush=True)
    if mode == "blast":
        count, mib = int(args[0]), int(args[1])
        for i in range(count):
            t = torch.full((mib << 18,), float(i), device=device)
            await pipe.send(t, key="blast")
        mode = "echo"
    if mode == "blocks":
        from aiokvpipe import BlockPool

        pool = BlockPool([torch.zeros(2, int(args[0]), 16, 2, 64, dtype=torch.bfloat16,
                                      device=device) for _ in range(4)], block_dim=1)
        try:
            while True:
                ids = (await pipe.recv())["ids"].tolist()
                if args[1:] == ["slow"]:
                    # Our stream is busy for about a second: blocks land only after it. The
                    # copy kernel is made first (CuPy's import and a compile, which the pull
                    # waits for): made during the sleep, it could outlast it, and the window
                    # between our pull and its end, which the test watches, would close.
                    from aiokvpipe import _blocks_move

                    await _blocks_move.prepare_kernel(torch.device(device))
                    torch.cuda._sleep(2_000_000_000)
                try:
                    await pipe.recv_blocks(pool, ids, key="blocks")
                except ValueError:  # the sender's call failed: say so, and go on
                    await pipe.send(None, key="failed")
                    continue
                await pipe.send_blocks(pool, ids, key="back")
        except aiokvpipe.PipeClosed:
            pass
        await pipe.aclose()
        return
    if mode == "hold":
        print("ready", flush=True)
        await asyncio.Event().wait()
    try:
        while True:
            msg = await pipe.recv()
            await pipe.send(msg)
    except aiokvpipe.PipeClosed:
        pass
    await pipe.aclose()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]))
