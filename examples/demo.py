"""One command for the whole example: prefill server + decode server + a few requests.

    python examples/demo.py                                   # CPU, pipe over TCP
    python examples/demo.py --device-prefill cuda:0 --device-decode cuda:1   # GPUs (NCCL if it can)

Starts both servers as uvicorn subprocesses on free ports, waits for their /health, sends a few
prompts (first one at a time, then all at once), prints a results table -- including whether
each text equals what tinygpt generates in a single process -- and shuts the servers down on
success, on error and on Ctrl-C. Server logs go to a temporary directory, shown on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import launch

PROMPTS = [
    "Hello, world",
    "The KV cache of a transformer",
    "Prefill is compute-bound; decode is memory-bound.",
    "asyncio",
    "Ünïcødé prompts are bytes too ✓",
    "Once upon a time, in a data center far, far away,",
    "0123456789",
    "def fib(n):",
]
SEQUENTIAL = 2  # the first prompts go one at a time (cold path), the rest concurrently


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device-prefill", default="cpu", help="prefill server device")
    p.add_argument("--device-decode", default="cpu", help="decode server device")
    p.add_argument("--transport", default="auto", choices=["auto", "tcp", "nccl"])
    p.add_argument(
        "--token", default=None, help="shared pipe secret (default: a random one per run)"
    )
    p.add_argument("--no-token", action="store_true", help="run the pipe without authentication")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--repeat", type=int, default=1, help="send the concurrent batch N times")
    p.add_argument("--no-check", action="store_true", help="skip the single-process comparison")
    p.add_argument("--startup-timeout", type=float, default=120.0)
    return p.parse_args(argv)


async def run_prompts(
    decode_url: str, prompts: list[str], max_tokens: int
) -> tuple[list[dict[str, Any]], list[float]]:
    """POST /generate for every prompt at once while probing GET /health.

    Returns one response body per prompt (``status`` added) and the health probes' latencies
    in ms. The probes use their own connection so they never queue behind the requests in the
    client's connection pool: what they measure is the server's responsiveness.
    """
    limits = httpx.Limits(max_connections=None)
    async with (
        httpx.AsyncClient(base_url=decode_url, timeout=60.0, limits=limits) as client,
        httpx.AsyncClient(base_url=decode_url, timeout=10.0) as prober,
    ):

        async def one(prompt: str) -> dict[str, Any]:
            resp = await client.post("/generate", json={"prompt": prompt, "max_tokens": max_tokens})
            body: dict[str, Any] = resp.json()
            body["status"] = resp.status_code
            return body

        batch = asyncio.ensure_future(asyncio.gather(*(one(p) for p in prompts)))
        # Interrupted runs end with the batch cancelled: mark its outcome retrieved, quietly.
        batch.add_done_callback(lambda f: f.cancelled() or f.exception())
        probes: list[float] = []
        try:
            while not batch.done():
                t0 = time.perf_counter()
                (await prober.get("/health")).raise_for_status()
                probes.append((time.perf_counter() - t0) * 1e3)
                await asyncio.wait([batch], timeout=0.01)
            return await batch, probes
        finally:
            batch.cancel()  # no-op when done; otherwise don't leave requests running


def references(
    prompts: list[str], max_tokens: int, prefill_device: str, decode_device: str
) -> list[str]:
    """What tinygpt generates for each prompt in this one process, without the pipe: prefill on
    ``prefill_device``, the cache copied to ``decode_device``, decode there -- the servers' exact
    computation, so the texts must be identical (CPU and GPU kernels may round differently)."""
    import tinygpt  # heavy import (transformers), only when checking

    tok = tinygpt.ByteTokenizer()
    prefill_model = tinygpt.build_model(prefill_device)
    decode_model = (
        prefill_model if decode_device == prefill_device else tinygpt.build_model(decode_device)
    )
    texts = []
    for prompt in prompts:
        cache, first = tinygpt.prefill(prefill_model, tok.encode(prompt))
        bundle = {k: t.to(decode_device) for k, t in tinygpt.kv_to_bundle(cache, first).items()}
        cache, first = tinygpt.bundle_to_kv(bundle)
        texts.append(tok.decode(tinygpt.decode(decode_model, cache, first, max_tokens)))
    return texts


def print_table(rows: list[tuple[str, str, dict[str, Any], str | None]]) -> None:
    head = f"{'mode':<5} {'prompt':<28} {'tok':>4} {'prefill':>8} {'KV KiB':>7} {'xfer':>7} "
    head += f"{'decode':>8} {'total':>8}  match  output"
    print(head)
    print(f"{'':<5} {'':<28} {'':>4} {'ms':>8} {'':>7} {'ms':>7} {'ms':>8} {'ms':>8}")
    print("-" * len(head))
    for mode, prompt, r, ref in rows:
        shown = (prompt[:25] + "...") if len(prompt) > 28 else prompt
        if r["status"] != 200:
            print(f"{mode:<5} {shown:<28} ERROR {r['status']}: {r.get('message', r)}")
            continue
        match = "-" if ref is None else ("yes" if r["text"] == ref else "NO")
        print(
            f"{mode:<5} {shown:<28} {r['tokens']:>4} {r['prefill_ms']:>8.2f} "
            f"{r['kv_bytes'] / 1024:>7.1f} {r['transfer_ms']:>7.2f} {r['decode_ms']:>8.2f} "
            f"{r['total_ms']:>8.2f}  {match:<5}  {r['text']!r}"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    token = None if args.no_token else (args.token or secrets.token_hex(16))
    logdir = Path(tempfile.mkdtemp(prefix="aiokvpipe-demo-"))
    ports = {name: launch.free_port() for name in ("prefill", "pipe", "decode")}
    extra = ["--transport", args.transport]
    prefill = launch.prefill_server(
        port=ports["prefill"], pipe_port=ports["pipe"], device=args.device_prefill,
        token=token, log_path=logdir / "prefill.log", extra=extra,
    )  # fmt: skip
    decode = launch.decode_server(
        port=ports["decode"], prefill_port=ports["prefill"], pipe_port=ports["pipe"],
        device=args.device_decode, token=token, log_path=logdir / "decode.log", extra=extra,
    )  # fmt: skip
    # Ctrl-C and `kill` both mean "stop, cleanly". Set explicitly: a shell may have started us
    # with SIGINT ignored, and SIGTERM's default would skip the cleanup below.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    ok = False
    try:
        print(f"prefill server {prefill.url} (pipe port {ports['pipe']}, {args.device_prefill})")
        print(f"decode  server {decode.url} ({args.device_decode}); logs in {logdir}")
        t0 = time.perf_counter()
        prefill.start()
        decode.start()
        prefill.wait_healthy(args.startup_timeout)
        decode.wait_healthy(args.startup_timeout, ready=launch.pipe_connected)
        print(f"both up, pipe connected in {time.perf_counter() - t0:.1f}s\n")

        rows: list[tuple[str, str, dict[str, Any], str | None]] = []
        for prompt in PROMPTS[:SEQUENTIAL]:
            (res,), _ = asyncio.run(run_prompts(decode.url, [prompt], args.max_tokens))
            rows.append(("seq", prompt, res, None))
        batch = PROMPTS[SEQUENTIAL:] * args.repeat
        t_batch = time.perf_counter()
        results, probes = asyncio.run(run_prompts(decode.url, batch, args.max_tokens))
        batch_ms = (time.perf_counter() - t_batch) * 1e3
        rows += [("conc", p, r, None) for p, r in zip(batch, results)]

        if not args.no_check:
            refs = references(PROMPTS, args.max_tokens, args.device_prefill, args.device_decode)
            by_prompt = dict(zip(PROMPTS, refs))
            rows = [(m, p, r, by_prompt[p]) for m, p, r, _ in rows]

        print_table(rows)
        print(
            f"\n{len(batch)} concurrent requests in {batch_ms:.0f} ms; /health answered "
            f"{len(probes)} times meanwhile (max {max(probes, default=0):.1f} ms)"
        )
        ok = all(r["status"] == 200 and (ref is None or r["text"] == ref) for *_, r, ref in rows)
        print("all outputs match single-process generation" if ok else "SOME REQUESTS FAILED")
    except KeyboardInterrupt:
        print("\ninterrupted; shutting down")
        return 130
    except Exception as exc:  # noqa: BLE001 -- report any failure, then clean up
        print(f"\ndemo failed: {exc!r}", file=sys.stderr)
        for server in (prefill, decode):
            print(f"--- {server.name} log tail ---\n{server.log_tail()}", file=sys.stderr)
    finally:
        # The servers run in their own sessions (no terminal Ctrl-C reaches them), so this is
        # what stops them; a second Ctrl-C must not cut it short (stop() is bounded anyway).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Decode first: it then sees a graceful close, not a dead peer.
        decode.stop()
        prefill.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
