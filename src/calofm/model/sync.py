"""Capturing a CUDA graph (the decoder's step, generation/decode.py; the diffusion baseline's U-Net)."""

from __future__ import annotations

import torch


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
