"""Coverage-guided fuzzing of the wire decoder and of a live listener's handshake.

* The decoder: mutated byte streams, fed to :class:`FrameDecoder` in random chunks. Whatever
  arrives, it yields frames or raises :class:`ProtocolError` -- nothing else (0 crashes),
  no input takes long (0 hangs), it never holds more than one bounded frame (bounded memory),
  and every frame it yields re-encodes to itself. The sans-I/O handshake decisions
  (``choose_transport``, ``verify``) run on every HELLO / AUTH / ACCEPT it yields.
* The listener: a real listener (with a token) is fed mutated handshakes over sockets -- raw
  byte blasts and interactive sessions that answer the listener's HELLO with fuzzed or valid
  AUTH, ATTACH and post-handshake frames. It must log no crash, leak nothing, and a good client
  must connect and transfer at every health check and at the end.

Coverage: edge coverage of aiokvpipe's modules by ``sys.settrace`` (``_fuzz.Coverage``). Sizes:
``AIOKVPIPE_FUZZ_INPUTS`` (decoder; CI default 40 000 within ~12 s, slow run 1 000 000) and
``AIOKVPIPE_FUZZ_CONNECTIONS`` (listener; CI default 600 within ~12 s, slow run 20 000).
With ``atheris`` installed, ``-m slow`` also runs libFuzzer on the decoder (optional).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import aiokvpipe
from aiokvpipe import _handshake, _wire
from aiokvpipe._errors import ProtocolError

from ._fuzz import Coverage, Mutator, run_loop, seed_corpus, seed_frames
from ._proto import RawConn, hello_bytes
from .conftest import HERE, HOST, Snapshot, describe_loop_errors, env_int, fault_seed, rss_bytes

PKG_DIR = Path(aiokvpipe.__file__).resolve().parent
MAX_BUFFERED = max(_wire.FRAME_PREFIX_BYTES, max(_wire.MAX_BODY.values()))
HANG_S = 1.0  # one decoder input taking this long counts as a hang
TOKEN = b"fuzz-token"
LOCAL_CAPS = _wire.Capabilities(recv_buffer_bytes=1 << 20, heartbeat_ms=500)
N1, N2 = bytes(32), bytes(range(32))


# -- the decoder ------------------------------------------------------------------------------


def decoder_target(data: bytes, rng: random.Random) -> str:
    dec = _wire.FrameDecoder()
    frames: list[_wire.Frame] = []
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(3)))
    pos = 0
    label = "incomplete"
    try:
        for cut in [*cuts, len(data)]:
            frames.extend(dec.feed(data[pos:cut]))
            pos = cut
            if dec.buffered > MAX_BUFFERED:
                raise AssertionError(f"decoder holds {dec.buffered} bytes > {MAX_BUFFERED}")
        if not dec.buffered:
            label = "frames"
    except ProtocolError:
        label = "ProtocolError"
    for f in frames:
        again = _wire.FrameDecoder().feed(_wire.encode(f))
        if again != [f]:
            raise AssertionError(f"{f!r} re-encodes to {again!r}")
        if isinstance(f, _wire.Hello):
            for a, b in ((LOCAL_CAPS, f.caps), (f.caps, LOCAL_CAPS)):
                try:
                    _handshake.choose_transport(a, b)
                except _handshake.NoTransport:
                    pass
        elif isinstance(f, (_wire.Auth, _wire.Accept)):
            for client in (True, False):
                if _handshake.verify(TOKEN, client, N1, N2, f.proof):
                    raise AssertionError("a fuzzed proof verified")
    return f"{label}/{len(frames) and 'some' or 'no'}-frames"


def raise_sites(path: Path) -> set[int]:
    """Lines of ``path`` that raise ProtocolError (or call a checker that does) in decoding."""
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("def decode_prefix"))
    return {i + 1 for i, line in enumerate(lines) if i >= start and "raise ProtocolError" in line}


def fuzz_decoder(n: int, time_cap: float | None, figures: dict[str, Any]) -> None:
    seed = fault_seed()
    rng = random.Random(seed)
    print(f"\ndecoder fuzz: {n} inputs, seed {seed}")
    cov = Coverage([str(PKG_DIR / "_wire.py"), str(PKG_DIR / "_handshake.py")])
    corpus = seed_corpus()
    rss0 = rss_bytes()
    rss_samples = [rss0]
    t0 = time.monotonic()
    result = run_loop(decoder_target, n, rng, cov, corpus,
                      deadline=None if time_cap is None else t0 + time_cap, clock=time.monotonic,
                      on_progress=lambda i: rss_samples.append(rss_bytes()))
    elapsed = time.monotonic() - t0
    rss1 = rss_bytes()
    # Memory: the tracer itself costs a few MiB, so the decoder's own footprint is measured on
    # an untraced replay of fresh mutations of the final corpus.
    replay = max(20_000, result["inputs"] // 10)
    mut = Mutator(rng)
    rss_replay0 = rss_bytes()
    for _ in range(replay):
        try:
            decoder_target(mut.mutate(rng.choice(corpus), corpus), rng)
        except AssertionError:
            pass  # already counted as a crash above if it reproduces
    rss_replay1 = rss_bytes()
    sites = raise_sites(PKG_DIR / "_wire.py")
    hit = {ln for code, _, ln in cov.seen if isinstance(ln, int)
           and code.co_filename == str(PKG_DIR / "_wire.py")}
    missed = sorted(sites - hit)
    corpus_bytes = sum(len(c) for c in corpus)
    figures.update(
        seed=seed, inputs=result["inputs"], crashes=len(result["crashes"]),
        hangs=int(result["slowest_input_s"] > HANG_S),
        inputs_per_s=round(result["inputs"] / elapsed), edges=result["edges"],
        corpus=result["corpus"], outcomes=result["outcomes"],
        slowest_input_ms=round(result["slowest_input_s"] * 1000, 2),
        protocol_error_sites=f"{len(sites) - len(missed)}/{len(sites)} reached",
        missed_sites=[f"_wire.py:{ln}" for ln in missed],
        rss={"start_mib": round(rss0 / 2**20, 1), "max_mib": round(max(rss_samples + [rss1])
                                                                   / 2**20, 1),
             "end_mib": round(rss1 / 2**20, 1), "corpus_kib": corpus_bytes // 1024,
             "untraced_replay": replay,
             "untraced_growth_kib": (rss_replay1 - rss_replay0) // 1024},
        crash_examples=[(d[:64].hex(), why) for d, why in result["crashes"][:5]])
    assert not result["crashes"], result["crashes"][:5]
    assert result["slowest_input_s"] < HANG_S
    # The fuzzer must actually get deep: most ProtocolError raise sites are reached (a few are
    # defensive checks that decoding cannot trigger, e.g. the constructors' length checks).
    assert len(missed) <= 0.3 * len(sites), f"unreached raise sites: {figures['missed_sites']}"
    assert rss1 - rss0 < 64 * 2**20 + 2 * corpus_bytes, (rss0, rss1)
    assert rss_replay1 - rss_replay0 < 4 * 2**20, figures["rss"]


def test_fuzz_frame_decoder(figures: dict[str, Any]) -> None:
    fuzz_decoder(env_int("AIOKVPIPE_FUZZ_INPUTS", 40_000), 12.0, figures)


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_fuzz_frame_decoder_slow(figures: dict[str, Any]) -> None:
    n = env_int("AIOKVPIPE_FUZZ_INPUTS", 1_000_000)
    fuzz_decoder(n, None, figures)
    assert figures["inputs"] >= n


# -- atheris (optional) -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(7200)
def test_fuzz_frame_decoder_atheris(tmp_path: Path, figures: dict[str, Any]) -> None:
    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris is not installed (optional: pip install atheris)")
    import subprocess

    runs = env_int("AIOKVPIPE_FUZZ_INPUTS", 1_000_000)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, data in enumerate(seed_corpus()):
        (corpus / f"seed{i}").write_bytes(data)
    proc = subprocess.run([sys.executable, str(HERE / "atheris_wire.py"), f"-runs={runs}",
                           "-max_len=16384", "-timeout=5", "-rss_limit_mb=2048", str(corpus)],
                          check=False, capture_output=True, text=True, timeout=7000,
                          cwd=str(tmp_path))
    tail = proc.stderr[-3000:]
    stats = [line for line in proc.stderr.splitlines() if " cov: " in line or "Done " in line]
    figures.update(inputs=runs, crashes=int(proc.returncode != 0), libfuzzer=stats[-2:])
    assert proc.returncode == 0, tail


# -- the listener's handshake -----------------------------------------------------------------


def _session_seeds() -> list[dict[str, Any]]:
    frames = [_wire.encode(f) for f in seed_frames()]
    good_hello = hello_bytes(bytes(32))
    post = [b"", frames[9], frames[10] + bytes(24), frames[13], frames[15], frames[14] * 3,
            _wire.encode(_wire.Header(0, "k", _wire.Structure.TENSOR,
                                      (_wire.TensorSpec(14, (64,), 1),)))]
    seeds = [{"mode": "raw", "hello": f} for f in frames]
    for p in post:
        seeds.append({"mode": "interactive", "hello": good_hello, "auth": None, "c2s": None,
                      "s2c": None, "post": p, "data": bytes(64)})
    seeds.append({"mode": "interactive", "hello": good_hello, "auth": frames[3], "c2s": None,
                  "s2c": None, "post": b"", "data": b""})
    seeds.append({"mode": "interactive", "hello": good_hello, "auth": None, "c2s": frames[7],
                  "s2c": None, "post": b"", "data": b""})
    return seeds


_PARTS = ("hello", "auth", "c2s", "s2c", "post", "data")


def _mutate_session(s: dict[str, Any], corpus: list[dict[str, Any]], mut: Mutator,
                    rng: random.Random, byte_pool: list[bytes]) -> dict[str, Any]:
    s = dict(s)
    if rng.random() < 0.05:
        s["mode"] = "raw" if s["mode"] == "interactive" else "interactive"
        for k in _PARTS:
            s.setdefault(k, None if k in ("auth", "c2s", "s2c") else b"")
    if s["mode"] == "raw":
        s["hello"] = mut.mutate(s["hello"], byte_pool)
        return s
    part = rng.choice(_PARTS)
    if part in ("auth", "c2s", "s2c") and rng.random() < 0.3:
        s[part] = None if s[part] is not None else rng.choice(byte_pool)  # valid <-> fuzzed
    else:
        s[part] = mut.mutate(s[part] if s[part] is not None else rng.choice(byte_pool),
                             byte_pool)
    return s


BATCH = 8


async def _bounded(aw: Any, timeout: float) -> str:
    try:
        return await asyncio.wait_for(aw, timeout)
    except TimeoutError:
        return "HANG"


async def _read(conn: RawConn, timeout: float) -> _wire.Frame | None | str:
    try:
        return await conn.read_frame(timeout)
    except TimeoutError:
        return "timeout"
    except (ProtocolError, OSError):
        return "broken"


async def run_session(port: int, s: dict[str, Any]) -> str:
    conns: list[RawConn] = []
    try:
        ctl = await RawConn.open(HOST, port)
        conns.append(ctl)
        if s["mode"] == "raw":
            await ctl.write(s["hello"])
            ctl.writer.write_eof()
            _, how = await ctl.read_until_close(timeout=0.6)
            return f"raw/{how}"
        try:
            mine = _wire.FrameDecoder().feed(s["hello"])
        except ProtocolError:
            mine = []
        nonce = mine[0].nonce if mine and isinstance(mine[0], _wire.Hello) else bytes(32)
        await ctl.write(s["hello"])
        server = await _read(ctl, 0.2)
        if not isinstance(server, _wire.Hello):
            return "no-hello"
        auth = s["auth"] if s["auth"] is not None else _wire.encode(
            _wire.Auth(_handshake.proof(TOKEN, True, nonce, server.nonce)))
        await ctl.write(auth)
        accept = await _read(ctl, 0.2)
        if not isinstance(accept, _wire.Accept):
            return "no-accept"
        for part, direction in (("c2s", _wire.Direction.CLIENT_TO_SERVER),
                                ("s2c", _wire.Direction.SERVER_TO_CLIENT)):
            conn = await RawConn.open(HOST, port)
            conns.append(conn)
            await conn.write(s[part] if s[part] is not None else
                             _wire.encode(_wire.Attach(accept.session_id, direction)))
        ready = await _read(ctl, 0.2)
        if not isinstance(ready, _wire.Ready):
            return "no-ready"
        await ctl.write(s["post"])
        await conns[1].write(s["data"])
        _, how = await ctl.read_until_close(timeout=0.1)
        return f"ready/{how}"
    except OSError:
        return "reset"
    finally:
        for conn in conns:
            conn.abort()


class CrashLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.crashes: list[str] = []
        self.dropped: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            self.crashes.append(record.getMessage()[:500])
        elif record.msg.startswith("dropped incoming connection"):
            name = type(record.args[1]).__name__  # type: ignore[index]
            self.dropped[name] = self.dropped.get(name, 0) + 1


async def good_client(port: int, lst: aiokvpipe.Listener, pipes: asyncio.Queue[Any]) -> float:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    client = await asyncio.wait_for(aiokvpipe.connect(HOST, port, token=TOKEN), 10)
    try:
        server = await asyncio.wait_for(pipes.get(), 10)
        x = torch.arange(1000)
        await client.send(x, key="health")
        assert torch.equal(await asyncio.wait_for(server.recv(key="health"), 10), x)
        await asyncio.wait_for(server.aclose(), 10)
    finally:
        await asyncio.wait_for(client.aclose(), 10)
    return loop.time() - t0


async def fuzz_listener(n: int, time_cap: float | None, figures: dict[str, Any],
                        loop_errors: list[dict[str, Any]]) -> None:
    seed = fault_seed()
    rng = random.Random(seed)
    mut = Mutator(rng, max_len=4096)
    print(f"\nlistener fuzz: {n} connections, seed {seed}")
    logger = logging.getLogger("aiokvpipe")
    crash_log = CrashLog()
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(crash_log)
    loop = asyncio.get_running_loop()
    before = Snapshot.take()
    lst = await aiokvpipe.listen(HOST, 0, token=TOKEN, handshake_timeout=0.5,
                                 recv_buffer_bytes=1 << 20)
    port = lst.port
    fuzz_pipes: dict[str, int] = {}
    health_q: asyncio.Queue[aiokvpipe.Pipe] = asyncio.Queue()
    consumers: set[asyncio.Task[None]] = set()

    async def consume(pipe: aiokvpipe.Pipe) -> None:
        try:
            msg = await asyncio.wait_for(pipe.recv(), 0.3)
            label = f"received {type(msg).__name__}"
        except aiokvpipe.BrokenPipe as exc:
            label = f"BrokenPipe({type(exc.__cause__).__name__})"
        except (aiokvpipe.PipeError, TimeoutError) as exc:
            label = type(exc).__name__
        fuzz_pipes[label] = fuzz_pipes.get(label, 0) + 1
        try:
            await asyncio.wait_for(pipe.aclose(), 2)
        except TimeoutError:
            fuzz_pipes["aclose-timeout"] = fuzz_pipes.get("aclose-timeout", 0) + 1

    health_wanted = 0

    async def acceptor() -> None:
        nonlocal health_wanted
        async for pipe in lst:
            if health_wanted:
                health_wanted -= 1
                await health_q.put(pipe)
                continue
            task = asyncio.ensure_future(consume(pipe))
            consumers.add(task)
            task.add_done_callback(consumers.discard)

    async def health() -> float:
        nonlocal health_wanted
        health_wanted += 1
        return await good_client(port, lst, health_q)

    acc = asyncio.ensure_future(acceptor())
    cov = Coverage([str(PKG_DIR / f) for f in ("_wire.py", "_handshake.py", "_connect.py",
                                               "_control.py", "_pipe.py", "_tcp_plane.py")])
    corpus = _session_seeds()
    byte_pool = seed_corpus()
    outcomes: dict[str, int] = {}
    health_s: list[float] = []
    slowest = 0.0
    t_start = loop.time()
    i = 0
    try:
        done = 0
        while done < n:
            # A batch of sessions at once (most of a session is waiting for the listener);
            # coverage is judged per batch, and a batch that found new edges joins the corpus.
            batch = []
            for j in range(min(BATCH, n - done)):
                k = done + j
                batch.append(corpus[k] if k < len(corpus) else
                             _mutate_session(rng.choice(corpus), corpus, mut, rng, byte_pool))
            t0 = loop.time()
            cov.start()
            try:
                labels = await asyncio.gather(*(_bounded(run_session(port, s), 5)
                                                for s in batch))
            finally:
                new = cov.stop()
            slowest = max(slowest, loop.time() - t0)
            for label in labels:
                outcomes[label] = outcomes.get(label, 0) + 1
            if new and len(corpus) < 2000:
                for s in batch:
                    corpus.append(s)
                    for part in _PARTS:
                        if isinstance(s.get(part), bytes) and s[part] and len(byte_pool) < 4000:
                            byte_pool.append(s[part])
            before_health, done = done, done + len(batch)
            if done // 200 != before_health // 200:
                health_s.append(await health())
            if time_cap is not None and loop.time() - t_start > time_cap:
                break
        health_s.append(await health())
        i = done - 1
    finally:
        acc.cancel()
        await asyncio.gather(acc, return_exceptions=True)
        await lst.aclose()
        await asyncio.gather(*consumers, return_exceptions=True)
        logger.removeHandler(crash_log)
        logger.setLevel(old_level)
    leaks = await before.settle(timeout=3.0)
    figures.update(
        seed=seed, connections=i + 1, hangs=outcomes.get("HANG", 0),
        crashes=len(crash_log.crashes) + len(loop_errors), edges=len(cov.seen),
        corpus=len(corpus), outcomes=outcomes, listener_dropped=crash_log.dropped,
        pipes_opened_by_fuzz=fuzz_pipes, health_checks=len(health_s),
        health_check_max_s=round(max(health_s), 3), slowest_session_s=round(slowest, 3),
        leaks=leaks, elapsed_s=round(loop.time() - t_start, 1))
    assert not crash_log.crashes, crash_log.crashes[:5]
    assert not loop_errors, describe_loop_errors(loop_errors)
    assert not outcomes.get("HANG"), outcomes
    assert max(health_s) < 5.0
    assert not any(leaks.values()), (leaks, before.describe_tasks())


@pytest.mark.timeout(90)
async def test_fuzz_listener_handshake(figures: dict[str, Any],
                                       loop_errors: list[dict[str, Any]]) -> None:
    await fuzz_listener(env_int("AIOKVPIPE_FUZZ_CONNECTIONS", 600), 12.0, figures, loop_errors)


@pytest.mark.slow
@pytest.mark.timeout(7200)
async def test_fuzz_listener_handshake_slow(figures: dict[str, Any],
                                            loop_errors: list[dict[str, Any]]) -> None:
    n = env_int("AIOKVPIPE_FUZZ_CONNECTIONS", 20_000)
    await fuzz_listener(n, None, figures, loop_errors)
    assert figures["connections"] >= n
