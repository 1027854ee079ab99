"""PyTorch side of crates/at-kernels/examples/conv_bench.rs: the 3x3 convolutions of WRN-16-2 at
batch 128, forward, input gradient and weight gradient, median of 5 after one warm-up."""

import json
import sys
import time

import torch
import torch.nn.functional as F


def median(f):
    f()
    t = []
    for _ in range(5):
        s = time.perf_counter()
        f()
        t.append((time.perf_counter() - s) * 1e3)
    return sorted(t)[2]


if len(sys.argv) > 1:
    torch.set_num_threads(int(sys.argv[1]))

for c, hw in [(32, 32), (64, 16), (128, 8)]:
    x = torch.randn(128, c, hw, hw)
    w = torch.randn(c, c, 3, 3) * 0.1
    dy = torch.randn(128, c, hw, hw)
    fwd = median(lambda: F.conv2d(x, w, padding=1))
    dx = median(lambda: torch.nn.grad.conv2d_input(x.shape, w, dy, padding=1))
    dw = median(lambda: torch.nn.grad.conv2d_weight(x, w.shape, dy, padding=1))
    for op, ms in [("forward", fwd), ("input-grad", dx), ("weight-grad", dw)]:
        print(json.dumps({"layer": f"{c}x{hw}x{hw}", "op": op, "ms": [round(ms, 2)]}))
