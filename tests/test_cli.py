"""The command line: ``python -m aiokvpipe doctor`` and ``python -m aiokvpipe bench``.

Each command runs in a real subprocess, as a user would run it, under a timeout. The bench
run is tiny (two sizes, 0.2 s a point) but real: two measured processes, every CPU baseline.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aiokvpipe.bench import blocks, common, gpu, ipc, measure
from aiokvpipe.bench.endpoints import OursEndpoint

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "aiokvpipe", *args], check=False, cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_doctor_text() -> None:
    out = run_cli("doctor", timeout=30)
    assert out.returncode == 0, out.stderr
    assert "torch" in out.stdout and "uvloop" in out.stdout
    assert 'transport="auto" would choose' in out.stdout


@pytest.mark.parametrize("peer_access", [True, False])
def test_doctor_says_ipc_between_two_gpus_only_with_peer_access(
        monkeypatch: pytest.MonkeyPatch, peer_access: bool) -> None:
    """Two GPUs of one machine: ``auto`` picks ipc only where they have peer access (the
    handshake's probe handle opens only then), and doctor says so. (It said ipc right
    under its own "no peer access" line.) The CUDA facts are faked at their seams."""
    import dataclasses

    from aiokvpipe import _connect, _cudaipc, _doctor, _ipc_probe, _wire

    host = _ipc_probe.host_id()

    async def local_caps(opts: object, device: object) -> _wire.Capabilities:
        index = getattr(device, "index", None)
        if index is None:  # the CPU peer
            return _wire.Capabilities(transport=_wire.Transport.AUTO)
        return dataclasses.replace(
            _wire.Capabilities(transport=_wire.Transport.AUTO), cuda=True, nccl=True,
            nccl_version=22809, ipc=True, host_id=host,
            device_uuid=bytes([index + 1]) * _wire.DEVICE_UUID_BYTES)

    monkeypatch.setattr(_connect, "_local_caps", local_caps)
    monkeypatch.setattr(_ipc_probe, "ipc_info", lambda: (True, "faked"))
    monkeypatch.setattr(_doctor.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_doctor.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(_cudaipc, "can_access_peer", lambda a, b: peer_access)
    verdict = _doctor._auto_transport()["other_gpu"]
    if peer_access:
        assert verdict["transport"] == "ipc", verdict
    else:
        assert verdict["transport"] == "nccl", verdict
        assert "no peer access" in verdict["why"], verdict


def test_doctor_json() -> None:
    out = run_cli("doctor", "--json", timeout=30)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert {"aiokvpipe", "python", "torch", "cuda", "cupy", "uvloop", "ipc",
            "auto_transport"} <= info.keys()
    for situation in ("other_gpu", "same_gpu", "cpu_peer"):
        assert info["auto_transport"][situation]["transport"] in ("tcp", "nccl", "ipc")
    # NCCL refuses two ranks on one GPU: auto never picks it there; ipc when it can.
    same_gpu = "ipc" if info["ipc"]["possible"] else "tcp"
    assert info["auto_transport"]["same_gpu"]["transport"] == same_gpu
    assert info["auto_transport"]["cpu_peer"]["transport"] == "tcp"
    assert isinstance(info["ipc"]["why"], str) and info["ipc"]["why"]
    if not info["cuda"].get("available"):
        assert info["auto_transport"]["other_gpu"]["transport"] == "tcp"


def test_bench_help_hides_the_child_options() -> None:
    out = run_cli("bench", "--help", timeout=30)
    assert out.returncode == 0, out.stderr
    for option in ("--device", "--sizes", "--seconds", "--repeat", "--json", "--plot",
                   "--uvloop", "--quick"):
        assert option in out.stdout
    assert "--role" not in out.stdout


def test_bench_cpu_tiny_run(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    out = run_cli("bench", "--sizes", "4K,1M", "--seconds", "0.2", "--repeat", "1",
                  "--json", str(report), timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "throughput GB/s" in out.stdout and "one-way p50 µs" in out.stdout
    doc = json.loads(report.read_text())
    assert doc["errors"] == [] and doc["date"] and doc["command"]
    impls = ["ours", "streams-asyncio", "ceiling"]
    if importlib.util.find_spec("uvloop"):
        impls += ["streams-uvloop", "streams-tensors"]
    for impl in impls:
        figs = doc["summary"][impl]
        for size in ("4 KiB", "1 MiB"):
            assert figs[f"tput {size}"]["gbps"] > 0, (impl, size)
            assert figs[f"lat {size}"]["p50_us"] > 0, (impl, size)
            assert figs[f"tput {size}"]["receiver_cpu_s_per_gb"] > 0, (impl, size)
    assert {t["name"] for t in doc["targets"]} >= {"one-way p50 4 KiB ours/ceiling"}


def test_bench_interrupted_leaves_no_child_behind() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "aiokvpipe", "bench", "--sizes", "1M",
                             "--seconds", "5", "--repeat", "1"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # the first case has started: both children are up
        assert "[1/" in line, line
        children = _children_of(proc.pid)
        assert len(children) == 2
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) != 0
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in children)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"--role" in cmdline:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_bench_cuda_refuses_cleanly_without_two_gpus() -> None:
    out = run_cli("bench", "--device", "cuda", "--quick", timeout=30)
    if out.returncode == 0:
        pytest.skip("this machine ran the GPU bench")
    assert out.returncode == 2
    if not torch.cuda.is_available():  # (torch's CPU build: CuPy would not help)
        assert "needs a GPU and a CUDA build of torch" in out.stderr
        for transport in ("ipc", "nccl"):
            out = run_cli("bench", "--device", "cuda", "--transport", transport, timeout=30)
            assert out.returncode == 2 and "CUDA build of torch" in out.stderr
    else:
        assert "CuPy" in out.stderr or "two CUDA devices" in out.stderr


def test_bench_refuses_a_transport_the_cpu_suite_does_not_measure() -> None:
    out = run_cli("bench", "--transport", "ipc", timeout=30)
    assert out.returncode == 2 and "--transport ipc is for --device cuda" in out.stderr


def test_bench_plot_without_matplotlib_says_so() -> None:
    if importlib.util.find_spec("matplotlib"):
        pytest.skip("matplotlib is installed here")
    out = run_cli("bench", "--plot", "x.png", timeout=30)
    assert out.returncode == 2 and "matplotlib" in out.stderr


def test_sizes_parse_and_print() -> None:
    assert common.parse_sizes("64M, 4K,1m,1G,4KiB") == [4096, 1 << 20, 64 << 20, 1 << 30]
    assert [common.format_size(n) for n in (4096, 1 << 20, 1 << 30, 1000)] == [
        "4 KiB", "1 MiB", "1 GiB", "1000 B"]
    with pytest.raises(ValueError):
        common.parse_size("lots")


def test_gpu_plan_builds_without_cuda() -> None:
    cases = gpu.plan_gpu([4096, 1 << 30], 1.0, 1, "asyncio", quick=False)
    assert [c["impl"] for c in cases] == ["nccl-raw", "ours"]
    raw, ours = (c["phases"] for c in cases)
    assert [p["label"] for p in raw] == [p["label"] for p in ours]
    assert ours[-1]["kind"] == "keyed" and raw[-1]["kind"] == "tput"
    assert cases[0]["max_nbytes"] >= 1 << 30
    assert all(c["transport"] == "nccl" for c in cases)


def test_ipc_plan_times_ours_as_the_raw_copy_and_as_an_echo() -> None:
    cases = ipc.plan_ipc([4096, 16 << 20], 1.0, 1, "uvloop")
    labels = {c["impl"]: [p["label"] for p in c["phases"]] for c in cases}
    # the raw copy's round trip moves one payload: ours is timed alike (lat1), and as an echo
    assert labels["ipc-raw"] == ["tput 4 KiB", "tput 16 MiB", "lat1 4 KiB"]
    assert labels["ours"] == labels["ipc-raw"] + ["lat 4 KiB"]


async def test_a_ping_answered_without_payload_round_trips_on_the_cpu() -> None:
    # The measuring loops of both ends, as a bench child runs them, over a tcp pipe: the
    # receiver must learn from the phase to answer without payload, or the sender hangs.
    case = {"transport": "tcp", "depth": 1,
            "phases": [common.lat_phase(4096, 0.05, reply="none")]}
    port, accept = await OursEndpoint.listen(case, "cpu")
    sender = await OursEndpoint.connect(case, "cpu", port)
    receiver = await accept()
    try:
        async with asyncio.timeout(20):
            got, answered = await asyncio.gather(measure.sender_phases(sender, case),
                                                 measure.receiver_phases(receiver, case))
        assert got[0]["p50_us"] > 0 and answered[0]["msgs"] >= 20
        assert receiver.pipe.stats.bytes_sent == 0  # the answers carried no payload
    finally:
        await sender.aclose()
        await receiver.aclose()


def test_bench_blocks_tiny_run_on_the_cpu(tmp_path: Path) -> None:
    """The paged-KV case at a tiny size: our blocks (one call, and a call per layer), our
    send() and the zero-copy ceiling moving the same bytes, the target row, the JSON."""
    report = tmp_path / "blocks.json"
    out = run_cli("bench", "--blocks", "--blocks-pool", "64", "--blocks-request", "16",
                  "--blocks-layers", "4", "--seconds", "0.2", "--repeat", "1",
                  "--json", str(report), timeout=90)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "pools of 64 blocks, scaled down from the full-size 4,096 (--blocks-pool)" in out.stdout
    assert "16 blocks × 4 layers × K,V × 32 KiB = 4 MiB" in out.stdout
    rows = {line.split("  ")[0].strip() + "|" + line.split("  ")[1].strip(): line
            for line in out.stdout.splitlines() if line.startswith("tcp (cpu)")}
    assert set(rows) == {"tcp (cpu)|ours, blocks: 1 call",
                         "tcp (cpu)|ours, blocks: 4 calls, a layer each",
                         "tcp (cpu)|ours, send(): 1 tensor",
                         "tcp (cpu)|zero-copy ceiling: 1 buffer (baseline)"}, out.stdout
    target_row = rows["tcp (cpu)|ours, blocks: 1 call"]
    assert "≥0.75×zero-copy ceiling" in target_row
    assert target_row.rstrip().endswith(("PASS", "FAIL"))
    doc = json.loads(report.read_text())
    assert doc["errors"] == [] and doc["settings"]["request_bytes"] == 4 << 20
    for impl, label in (("blocks", "tcp: blocks"), ("blocks", "tcp: blocks by layer"),
                        ("ours", "tcp: one tensor"), ("ceiling", "tcp: one tensor")):
        figs = doc["summary"][impl][label]
        assert figs["gbps"] > 0 and figs["nbytes"] == 4 << 20, (impl, label)
        assert figs["receiver_cpu_s_per_gb"] > 0, (impl, label)
    for label in ("tcp: blocks", "tcp: blocks by layer"):
        for side in ("sender", "receiver"):
            assert doc["summary"]["blocks"][label][f"{side}_lag_p99_ms"] >= 0
    [target] = doc["targets"]
    assert target["name"] == "cpu:tcp blocks ours/zero-copy ceiling" and target["target"] == 0.75
    assert target["value"] > 0 and isinstance(target["pass"], bool)


def test_bench_blocks_refuses_what_does_not_apply() -> None:
    out = run_cli("bench", "--blocks", "--sizes", "1M", timeout=30)
    assert out.returncode == 2 and "--sizes" in out.stderr
    out = run_cli("bench", "--blocks", "--blocks-pool", "8", "--blocks-request", "16",
                  timeout=30)
    assert out.returncode == 2 and "--blocks-request" in out.stderr


def test_blocks_plan_measures_every_plane_beside_its_baseline() -> None:
    shape = {"pool_blocks": 4096, "request_blocks": 256, "layers": 32}
    cases = blocks.plan_blocks(blocks.planes_for("cuda", cupy=True, ipc=True), shape, 1.0, 1,
                               "uvloop")
    assert [(c["plane"], c["impl"]) for c in cases] == [
        ("cuda:nccl", "blocks"), ("cuda:nccl", "ours"), ("cuda:nccl", "nccl-raw"),
        ("cuda:tcp", "blocks"), ("cuda:tcp", "ours"),
        ("cuda:ipc", "blocks"), ("cuda:ipc", "ours"), ("cuda:ipc", "blocks-ipc-copy")]
    assert all(c["max_nbytes"] == 512 << 20 for c in cases)  # the 512 MiB request
    assert all(p["nbytes"] == 512 << 20 for c in cases for p in c["phases"])
    assert [p.get("by_layer", False) for p in cases[0]["phases"]] == [False, True]
    assert blocks.planes_for("cuda", cupy=False, ipc=False) == ["cuda:tcp"]
