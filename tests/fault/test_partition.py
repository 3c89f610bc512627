"""A network partition between two hosts, detected by heartbeats in the configured time.

Two network namespaces joined by a veth pair (10.199.N.0/30, addresses that exist only inside
those namespaces); the listener runs in one (``ip netns exec``), the connecting peer in the
other, streaming messages to it. Mid-stream the link is cut -- ``tc`` drops every packet on
both ends of the veth (``netem loss 100%``, or a zero-length ``pfifo`` where the kernel has no
netem), or ``ip link set down`` -- and both ends must report ``BrokenPipe`` caused by a missed
heartbeat within ``heartbeat_timeout`` + a margin. The namespaces are always deleted.

Skipped, with the reason, where namespaces cannot be created (not root, no CAP_SYS_ADMIN, no
iproute2).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from .conftest import timing

HEARTBEAT_INTERVAL_S = 0.2
HEARTBEAT_TIMEOUT_S = 1.0
MARGIN_S = 0.5
_counter = itertools.count()


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], check=False, capture_output=True, text=True,
                          timeout=15)
    if check and proc.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


@dataclass
class NetPair:
    ns_a: str
    ns_b: str
    veth_a: str
    veth_b: str
    addr_a: str
    addr_b: str


@pytest.fixture
def netns_pair() -> Iterator[NetPair]:
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("iproute2 (ip, tc) is not installed")
    pid, i = os.getpid(), next(_counter)
    octet = (pid + i) % 250 + 1
    pair = NetPair(f"akvp{pid}a{i}", f"akvp{pid}b{i}", f"kv{pid % 10**7}a{i}"[:15],
                   f"kv{pid % 10**7}b{i}"[:15], f"10.199.{octet}.1", f"10.199.{octet}.2")
    made = ip("netns", "add", pair.ns_a, check=False)
    if made.returncode:
        pytest.skip(f"cannot create network namespaces here ({made.stderr.strip()}); "
                    "the partition test needs root or CAP_SYS_ADMIN")
    try:
        ip("netns", "add", pair.ns_b)
        ip("link", "add", pair.veth_a, "type", "veth", "peer", "name", pair.veth_b)
        ip("link", "set", pair.veth_a, "netns", pair.ns_a)
        ip("link", "set", pair.veth_b, "netns", pair.ns_b)
        for ns, dev, addr in ((pair.ns_a, pair.veth_a, pair.addr_a),
                              (pair.ns_b, pair.veth_b, pair.addr_b)):
            ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield pair
    finally:
        for ns in (pair.ns_a, pair.ns_b):
            # Our peer processes are reaped by the test; anything left in the namespace is ours.
            pids = ip("netns", "pids", ns, check=False).stdout.split()
            for p in pids:
                try:
                    os.kill(int(p), 9)
                except (ProcessLookupError, ValueError):
                    pass
            ip("netns", "del", ns, check=False)
        ip("link", "del", pair.veth_a, check=False)  # only if it never left the root namespace
        left = ip("netns", "list", check=False).stdout
        assert pair.ns_a not in left and pair.ns_b not in left, f"namespaces left: {left}"


async def run_cmd(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out.decode(errors="replace").strip()


async def drop_all_traffic(pair: NetPair) -> str:
    """tc on both veth ends: netem loss 100% where the kernel has netem, else a pfifo that
    holds zero packets (every packet is dropped on enqueue)."""
    used = ""
    for ns, dev in ((pair.ns_a, pair.veth_a), (pair.ns_b, pair.veth_b)):
        rc, out = await run_cmd("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev,
                                "root", "netem", "loss", "100%")
        used = "tc netem loss 100%"
        if rc:
            rc, out2 = await run_cmd("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev,
                                     "root", "pfifo", "limit", "0")
            used = f"tc pfifo limit 0 (netem: {out[:60]})"
            assert rc == 0, f"tc cannot drop traffic here: {out} / {out2}"
    return used


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how,traffic", [("tc-drop", "stream"), ("link-down", "stream"),
                                         ("tc-drop", "idle")])
async def test_partition_is_detected_by_heartbeat_in_time(
        how: str, traffic: str, netns_pair: NetPair, procs: Any,
        figures: dict[str, Any]) -> None:
    """``stream``: the connector streams 256 KiB messages to the listener, which waits in
    ``recv()``; ``idle``: both ends wait in ``recv()``, only heartbeats cross the link."""
    pair = netns_pair
    idle = traffic == "idle"
    opts = {"heartbeat_interval": HEARTBEAT_INTERVAL_S, "heartbeat_timeout": HEARTBEAT_TIMEOUT_S}
    listener = await procs("fault_peer.py", {"role": "listen", "host": pair.addr_a,
                                             "mode": "partition", "opts": opts,
                                             "report_every": 10, "idle": idle},
                           prefix=["ip", "netns", "exec", pair.ns_a], watchdog_s=80)
    connector = None
    try:
        port = (await listener.expect("listening", 30))["port"]
        connector = await procs("fault_peer.py", {"role": "connect", "host": pair.addr_a,
                                                  "port": port, "mode": "partition",
                                                  "opts": opts, "nbytes": 256 * 1024,
                                                  "interval_s": 0.01, "idle": idle},
                                prefix=["ip", "netns", "exec", pair.ns_b], watchdog_s=80)
        await connector.expect("connected", 30)
        await listener.expect("connected", 10)
        if idle:  # cut at a random phase of the heartbeats
            await asyncio.sleep(random.uniform(2, 4) * HEARTBEAT_INTERVAL_S)
            progress = {"received": 0}
        else:
            progress = await listener.expect("progress", 20)  # mid-stream
        loop = asyncio.get_running_loop()
        t_cut = loop.time()
        if how == "tc-drop":
            method = await drop_all_traffic(pair)
        else:
            rc, out = await run_cmd("ip", "-n", pair.ns_a, "link", "set", pair.veth_a, "down")
            assert rc == 0, out
            method = "ip link set down"
        t_cut_done = loop.time()
        ends = {}
        for name, peer in (("listener (receiving)", listener),
                           ("connector (idle)" if idle else "connector (sending)", connector)):
            event = await peer.next_event(HEARTBEAT_TIMEOUT_S + 10)
            while event["event"] == "progress":
                event = await peer.next_event(HEARTBEAT_TIMEOUT_S + 10)
            assert event["event"] == "broken", event
            ends[name] = event
        detect = {name: round(e["t"] - t_cut, 3) for name, e in ends.items()}
        figures.update(method=method, traffic=traffic, detect=detect, messages=progress["received"],
                       cut_command_s=round(t_cut_done - t_cut, 3),
                       causes={name: e["cause"] for name, e in ends.items()},
                       time_to_error=timing(list(detect.values())),
                       configured={"heartbeat_interval_s": HEARTBEAT_INTERVAL_S,
                                   "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
                                   "margin_s": MARGIN_S})
        for name, e in ends.items():
            assert e["error_type"] == "BrokenPipe", (name, e)
            assert e["cause_type"] == "HeartbeatMissed", (name, e)
            # Silence counts from the last frame heard, at most one interval before the cut.
            assert detect[name] >= HEARTBEAT_TIMEOUT_S - HEARTBEAT_INTERVAL_S - 0.05, (name,
                                                                                      detect)
            assert detect[name] <= HEARTBEAT_TIMEOUT_S + MARGIN_S + (t_cut_done - t_cut), (
                name, detect)
    finally:
        for p in (listener, connector):
            if p is not None:
                await p.reap()
