"""``python -m aiokvpipe bench``: our pipe beside its baselines, between two local processes.

A tool beside the runtime, not part of it: nothing in the runtime imports this package (only
the command line, ``aiokvpipe.__main__``, does, when it builds its parser). Its modules, each
importing only those listed after it, so there is no cycle:

* :mod:`.cli`       the command's options; the registry of suites, by what selects them
* :mod:`.ipc`       the one-host suite: ipc plane vs the raw CUDA IPC copy, pipe memory
* :mod:`.cpu`       the CPU suite: tcp plane vs asyncio streams and the zero-copy ceiling
* :mod:`.gpu`       the GPU suite: nccl plane vs raw NCCL
* :mod:`.blocks`    the paged-KV suite (``--blocks``): send_blocks pool to pool vs one buffer
* :mod:`.suite`     what every suite does around its plan and table: run, summarise, report
* :mod:`.runner`    the coordinator's side: the two measured processes, cases through them
* :mod:`.child`     a measured process: runs the cases it is sent
* :mod:`.report`    medians, the table and its targets, the JSON document, the plot
* :mod:`.impls`     the registry of implementations (ours, each baseline) a case can name
* :mod:`.measure`   the phases of an asyncio case, the loop-lag probe and the CPU clock
* :mod:`.block_endpoint` our side of the paged-KV case: send_blocks/recv_blocks of pools
* :mod:`.endpoints` one side of one connection: ours, asyncio streams, the ceiling
* :mod:`.raw_ipc`   the one-host baseline's side (CUDA IPC copy); GPU memory of one pipe
* :mod:`.raw_nccl`  the GPU baseline's side: raw NCCL through CuPy, blocking
* :mod:`.blocks_ipc_copy` the paged-KV ipc baseline: one contiguous copy through CUDA IPC
* :mod:`.common`    units, sizes, statistics, a case's phases as JSON

How it runs: the command (the *coordinator*) starts two copies of itself with the hidden
``--role sender|receiver`` option and drives them with JSON lines. Each *case* is one
connection of one implementation -- ours or a baseline -- between the two, running a list of
*phases* (throughput at one size, latency at one size...). Cases of all implementations are
interleaved within each repeat, so drifting noise on a shared machine hits them alike; figures
are medians over the repeats.
"""
