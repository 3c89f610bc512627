"""One command for the whole example: prefill server + decode server + a few requests.

    python examples/demo.py                                   # CPU, pipe over TCP
    python examples/demo.py --device-prefill cuda:0 --device-decode cuda:1   # GPUs (NCCL if it can)
    python examples/demo.py --model gpt2 --ttft-trials 15   # time to first token, GPT-2 small

Starts both servers as uvicorn subprocesses on free ports, waits for their /health, sends a few
prompts (first one at a time, then all at once), prints a results table -- including whether
each text equals what tinygpt generates in a single process -- then measures time to first
token of a long prompt with the KV streamed layer by layer against sent whole after the
prefill (alternating, medians), checks that the decode server's KV pool is all free again,
and shuts the servers down on success, on error and on Ctrl-C. Server logs go to a temporary
directory, shown on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import launch

STREAMING_MODES = ("layer", "whole")

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
    p.add_argument("--transport", default="auto", choices=["auto", "tcp", "nccl", "ipc"])
    p.add_argument("--model", default="tiny", choices=["tiny", "gpt2"],
                   help="model shape (gpt2: GPT-2 small's, random weights)")
    p.add_argument("--num-blocks", type=int, default=512, help="KV pool blocks per server")
    p.add_argument("--kv-streaming", default="layer", choices=STREAMING_MODES,
                   help="how the prefill server sends KV blocks in the main runs")
    p.add_argument("--ttft-trials", type=int, default=5,
                   help="requests per streaming mode in the time-to-first-token comparison "
                        "(0: skip)")
    p.add_argument("--ttft-prompt-bytes", type=int, default=1000,
                   help="prompt length (bytes of text, about as many tokens for this "
                        "byte-level model) of the time-to-first-token comparison")
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
    decode_url: str, prompts: list[str], max_tokens: int, kv_streaming: str | None = None
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
            body = {"prompt": prompt, "max_tokens": max_tokens, "kv_streaming": kv_streaming}
            resp = await client.post("/generate", json=body)
            answer: dict[str, Any] = resp.json()
            answer["status"] = resp.status_code
            return answer

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


def ttft_prompt(n_bytes: int) -> str:
    """A prompt of exactly ``n_bytes`` ASCII bytes (= tokens)."""
    text = "Time to first token is what a user waits for. " * (n_bytes // 40 + 1)
    return text[:n_bytes]


def compare_ttft(
    decode_url: str, prompt: str, trials: int
) -> tuple[dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """``trials`` single-token requests of ``prompt`` per streaming mode, one at a time, the
    modes alternating (so a change of load on a shared machine hits both alike). Returns the
    successful answers per mode and the failed ones."""
    answers: dict[str, list[dict[str, Any]]] = {mode: [] for mode in STREAMING_MODES}
    failed: list[dict[str, Any]] = []
    for i in range(trials * len(STREAMING_MODES)):
        mode = STREAMING_MODES[i % 2] if (i // 2) % 2 == 0 else STREAMING_MODES[1 - i % 2]
        (res,), _ = asyncio.run(run_prompts(decode_url, [prompt], 1, mode))
        (answers[mode] if res["status"] == 200 else failed).append(res)
    return answers, failed


def references(
    prompts: list[str], max_tokens: int, prefill_device: str, decode_device: str,
    model: str = "tiny",
) -> list[str]:
    """What tinygpt generates for each prompt in this one process, without the pipe: prefill on
    ``prefill_device``, the cache copied to ``decode_device``, decode there -- the servers' exact
    computation, so the texts must be identical (CPU and GPU kernels may round differently)."""
    import tinygpt  # heavy import (transformers), only when checking

    tok = tinygpt.ByteTokenizer()
    shape = tinygpt.MODELS[model]
    prefill_model = tinygpt.build_model(prefill_device, **shape)
    decode_model = (
        prefill_model if decode_device == prefill_device
        else tinygpt.build_model(decode_device, **shape)
    )
    texts = []
    for prompt in prompts:
        cache, first = tinygpt.prefill(prefill_model, tok.encode(prompt))
        bundle = {k: t.to(decode_device) for k, t in tinygpt.kv_to_bundle(cache, first).items()}
        cache, first = tinygpt.bundle_to_kv(bundle)
        texts.append(tok.decode(tinygpt.decode(decode_model, cache, first, max_tokens)))
    return texts


def print_table(rows: list[tuple[str, str, dict[str, Any], str | None]]) -> None:
    head = f"{'mode':<5} {'prompt':<28} {'tok':>4} {'prefill':>8} {'KV KiB':>7} {'ttft':>7} "
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
            f"{r['kv_bytes'] / 1024:>7.1f} {r['ttft_ms']:>7.2f} {r['decode_ms']:>8.2f} "
            f"{r['total_ms']:>8.2f}  {match:<5}  {r['text']!r}"
        )


def print_ttft(answers: dict[str, list[dict[str, Any]]], failed: list[dict[str, Any]],
               prompt_tokens: int) -> None:
    """The time-to-first-token comparison's summary lines (medians, ms)."""
    def med(mode: str, field: str) -> float:
        return statistics.median(r[field] for r in answers[mode]) if answers[mode] else 0.0

    n = min(len(rs) for rs in answers.values())
    if not n:
        print("time to first token: no successful request")
    else:
        print(f"time to first token, {prompt_tokens}-token prompt "
              f"({answers['layer'][0]['kv_bytes'] / 2**20:.1f} MiB of KV), median of {n} "
              f"per mode: layer-by-layer {med('layer', 'ttft_ms'):.1f} ms, whole request "
              f"{med('whole', 'ttft_ms'):.1f} ms; of which after the prefill's forward pass "
              f"{med('layer', 'transfer_ms'):.1f} ms vs {med('whole', 'transfer_ms'):.1f} ms")
    for r in failed:
        print(f"  ttft request failed: {r['status']} {r.get('message', r)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    token = None if args.no_token else (args.token or secrets.token_hex(16))
    logdir = Path(tempfile.mkdtemp(prefix="aiokvpipe-demo-"))
    ports = {name: launch.free_port() for name in ("prefill", "pipe", "decode")}
    extra = ["--transport", args.transport, "--model", args.model,
             "--num-blocks", str(args.num_blocks)]
    prefill = launch.prefill_server(
        port=ports["prefill"], pipe_port=ports["pipe"], device=args.device_prefill,
        token=token, log_path=logdir / "prefill.log",
        extra=[*extra, "--kv-streaming", args.kv_streaming],
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
        print(f"both up, pipe connected in {time.perf_counter() - t0:.1f}s; KV streamed "
              f"{'layer by layer' if args.kv_streaming == 'layer' else 'whole'} into a paged "
              f"pool of {args.num_blocks} blocks\n")

        rows: list[tuple[str, str, dict[str, Any], str | None]] = []
        for prompt in PROMPTS[:SEQUENTIAL]:
            (res,), _ = asyncio.run(run_prompts(decode.url, [prompt], args.max_tokens))
            rows.append(("seq", prompt, res, None))
        batch = PROMPTS[SEQUENTIAL:] * args.repeat
        t_batch = time.perf_counter()
        results, probes = asyncio.run(run_prompts(decode.url, batch, args.max_tokens))
        batch_ms = (time.perf_counter() - t_batch) * 1e3
        rows += [("conc", p, r, None) for p, r in zip(batch, results)]

        long_prompt = ttft_prompt(args.ttft_prompt_bytes)
        ttft, ttft_failed = compare_ttft(decode.url, long_prompt, args.ttft_trials)
        ttft_ok = not ttft_failed
        if not args.no_check:
            refs = references(PROMPTS, args.max_tokens, args.device_prefill, args.device_decode,
                              args.model)
            by_prompt = dict(zip(PROMPTS, refs))
            rows = [(m, p, r, by_prompt[p]) for m, p, r, _ in rows]
            if args.ttft_trials:
                (first,) = references([long_prompt], 1, args.device_prefill, args.device_decode,
                                      args.model)
                ttft_ok = ttft_ok and all(r["text"] == first for rs in ttft.values() for r in rs)

        print_table(rows)
        print(
            f"\n{len(batch)} concurrent requests in {batch_ms:.0f} ms; /health answered "
            f"{len(probes)} times meanwhile (max {max(probes, default=0):.1f} ms)"
        )
        if args.ttft_trials:
            print_ttft(ttft, ttft_failed, args.ttft_prompt_bytes)
        pool = decode.wait_healthy(5.0)["kv_blocks"]
        print(f"decode server's KV pool: {pool['free']} of {pool['total']} blocks free")
        ok = all(r["status"] == 200 and (ref is None or r["text"] == ref) for *_, r, ref in rows)
        ok = ok and ttft_ok and pool["free"] == pool["total"]
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
        # what stops them; a second Ctrl-C or kill must not cut it short (stop() is bounded
        # anyway), and one server failing to stop must not leave the other running.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            decode.stop()  # decode first: it then sees a graceful close, not a dead peer
        finally:
            prefill.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
