"""Whether the code running now may read a value back from the device, and capturing a CUDA graph.

A CUDA graph's capture fails at any host read (`bool(t)`, `.item()`, `.tolist()`, `nonzero`), and on a
GPU every such read stalls the queue. Code with a shortcut that needs one (e.g. an adapter that skips its
work when no shower in the batch is gated) asks `host_reads_allowed()` first; the static decoder's step
runs under `no_host_reads()` (generation/static_decode.py). A flag rather than
torch.cuda.is_current_stream_capturing(), so that the CPU tests can run the same step and catch a read.
"""

from __future__ import annotations

import contextlib

import torch

_forbidden = 0  # nesting depth of no_host_reads()


@contextlib.contextmanager
def no_host_reads():
    global _forbidden
    _forbidden += 1
    try:
        yield
    finally:
        _forbidden -= 1


def host_reads_allowed() -> bool:
    return _forbidden == 0


def capture(fn, pool=None) -> tuple:
    """fn() run once eagerly on a side stream (the warm-up that capture needs: lazy initializations,
    kernel choices), then recorded as a CUDA graph in `pool` (a graph's pool() to share it; None: its
    own) -> (the graph, what fn returned while recorded: buffers each replay rewrites)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out
