"""One GPU, one process: moving an 8B-Llama request's KV blocks pool to pool.

32 layers, K and V, block_size 16, 8 KV heads, head_dim 128, bf16; 256 blocks at random ids
in pools of 4,096 blocks (256 × 32 × 2 × 32 KiB = 512 MiB). Compares, on one stream, medians
of CUDA-event timings:

* a contiguous copy of 512 MiB (the baseline),
* ``copy_runs`` (one kernel; what the ipc plane's pull does) and its torch fallback,
* ``gather`` into staging and ``scatter`` back (what the nccl plane does around its sends).

Usage: ``python benchmarks/blocks_copy.py [--layout vllm|split] [--repeat 20]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from aiokvpipe._blocks import BlockPool, merge_runs, normalize_ids
from aiokvpipe._blocks_move import copy_runs, gather, iter_chunks, kernel_available, scatter

LAYERS, NUM_BLOCKS, BLOCKS, SHAPE = 32, 4096, 256, (16, 8, 128)


def pools(layout: str, device: torch.device) -> tuple[BlockPool, BlockPool]:
    def make() -> BlockPool:
        if layout == "vllm":  # per layer [2, num_blocks, 16, 8, 128], block_dim 1
            return BlockPool([torch.randn(2, NUM_BLOCKS, *SHAPE, device=device)
                              .to(torch.bfloat16) for _ in range(LAYERS)], block_dim=1)
        return BlockPool([torch.randn(NUM_BLOCKS, *SHAPE, device=device).to(torch.bfloat16)
                          for _ in range(2 * LAYERS)], block_dim=0)
    return make(), make()


def timed(fn: object, repeat: int) -> tuple[float, float]:
    """(median device ms, median host ms per call).

    The stream is first held by a sleeping kernel, so the host has enqueued everything
    before ``start`` runs: the device time excludes the host's preparation."""
    dev, host = [], []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(50_000_000)
        t0 = time.perf_counter()
        start.record()
        fn()  # type: ignore[operator]
        end.record()
        host.append((time.perf_counter() - t0) * 1e3)
        end.synchronize()
        dev.append(start.elapsed_time(end))
    return statistics.median(dev), statistics.median(host)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layout", choices=["vllm", "split"], default="vllm")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--staging-mib", type=int, default=64)
    args = ap.parse_args()
    dev = torch.device("cuda", 0)
    src, dst = pools(args.layout, dev)
    g = torch.Generator().manual_seed(0)
    src_ids = normalize_ids(src, torch.randperm(NUM_BLOCKS, generator=g)[:BLOCKS],
                            destination=False)
    dst_ids = normalize_ids(dst, torch.randperm(NUM_BLOCKS, generator=g)[:BLOCKS],
                            destination=True)
    layers = tuple(range(len(src.tensors)))
    runs = merge_runs(src_ids, dst_ids)
    nbytes = BLOCKS * src.block_bytes
    flat_a = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    flat_b = torch.empty_like(flat_a)
    staging = torch.empty(args.staging_mib << 20, dtype=torch.uint8, device=dev)
    whole = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    chunks = list(iter_chunks(src.layout, layers, BLOCKS, staging.numel()))
    one = list(iter_chunks(src.layout, layers, BLOCKS, nbytes))

    def staged(method: str) -> None:
        for c in chunks:
            gather(src, src_ids, c, staging, method=method)  # type: ignore[arg-type]
            scatter(dst, dst_ids, c, staging, method=method)  # type: ignore[arg-type]

    cases = {
        "contiguous copy (baseline)": lambda: flat_b.copy_(flat_a),
        "copy_runs, kernel": lambda: copy_runs(src, dst, layers, runs, method="kernel"),
        "copy_runs, torch": lambda: copy_runs(src, dst, layers, runs, method="torch"),
        "gather whole, kernel": lambda: gather(src, src_ids, one[0], whole, method="kernel"),
        "scatter whole, kernel": lambda: scatter(dst, dst_ids, one[0], whole, method="kernel"),
        f"gather+scatter {args.staging_mib} MiB chunks, kernel": lambda: staged("kernel"),
        f"gather+scatter {args.staging_mib} MiB chunks, torch": lambda: staged("torch"),
    }
    if not kernel_available(dev):
        cases = {k: v for k, v in cases.items() if "kernel" not in k}
    for fn in cases.values():  # warm-up: compile, allocator, pinned cache
        fn()
    torch.cuda.synchronize()
    copy_runs(src, dst, layers, runs)
    torch.cuda.synchronize()
    for i in layers:  # correctness of the measured pull
        sbd, dbd = src.layout.tensors[i].block_dim, dst.layout.tensors[i].block_dim
        s = src.tensors[i].index_select(sbd, torch.tensor(src_ids, device=dev))
        d = dst.tensors[i].index_select(dbd, torch.tensor(dst_ids, device=dev))
        assert torch.equal(s, d), i
    base, _ = timed(cases["contiguous copy (baseline)"], args.repeat)
    print(f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, layout "
          f"{args.layout}: {len(layers)} tensors, {BLOCKS} blocks of {src.block_bytes} B at "
          f"random ids out of {NUM_BLOCKS}, {len(runs)} runs, {nbytes / 2**20:.0f} MiB")
    print("| case | device ms | GB/s | × contiguous | host ms/call |")
    print("|---|---|---|---|---|")
    for name, fn in cases.items():
        ms, host = timed(fn, args.repeat)
        print(f"| {name} | {ms:.3f} | {nbytes / ms / 1e6:.0f} | {base / ms:.2f} | "
              f"{host:.2f} |")


if __name__ == "__main__":
    main()
