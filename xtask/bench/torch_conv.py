"""PyTorch side of crates/at-kernels/examples/conv_bench.rs: the 3x3 convolutions of WRN-16-2 at
batch 128, forward, input gradient and weight gradient, median of 5 after one warm-up.

`torch_conv.py THREADS resnet [BATCH]`: ResNet-18's distinct convolutions at 224x224 instead (as
conv_bench.rs's `resnet` mode)."""

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

RESNET18 = [
    (3, 64, 224, 7, 2, 3, 1),
    (64, 64, 56, 3, 1, 1, 4),
    (64, 128, 56, 3, 2, 1, 1),
    (64, 128, 56, 1, 2, 0, 1),
    (128, 128, 28, 3, 1, 1, 3),
    (128, 256, 28, 3, 2, 1, 1),
    (128, 256, 28, 1, 2, 0, 1),
    (256, 256, 14, 3, 1, 1, 3),
    (256, 512, 14, 3, 2, 1, 1),
    (256, 512, 14, 1, 2, 0, 1),
    (512, 512, 7, 3, 1, 1, 3),
]

if len(sys.argv) > 2 and sys.argv[2] == "resnet":
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    for c, o, hw, k, s, pad, count in RESNET18:
        x = torch.randn(batch, c, hw, hw)
        w = torch.randn(o, c, k, k) * 0.1
        dy = torch.randn_like(F.conv2d(x, w, stride=s, padding=pad))
        fwd = median(lambda: F.conv2d(x, w, stride=s, padding=pad))
        dx = median(lambda: torch.nn.grad.conv2d_input(x.shape, w, dy, stride=s, padding=pad))
        dw = median(lambda: torch.nn.grad.conv2d_weight(x, w.shape, dy, stride=s, padding=pad))
        for op, ms in [("forward", fwd), ("input-grad", dx), ("weight-grad", dw)]:
            layer = f"{c}-{o}x{hw} k{k}/{s}"
            print(json.dumps({"layer": layer, "count": count, "op": op, "ms": [round(ms, 2)]}))
    sys.exit(0)

for c, hw in [(32, 32), (64, 16), (128, 8)]:
    x = torch.randn(128, c, hw, hw)
    w = torch.randn(c, c, 3, 3) * 0.1
    dy = torch.randn(128, c, hw, hw)
    fwd = median(lambda: F.conv2d(x, w, padding=1))
    dx = median(lambda: torch.nn.grad.conv2d_input(x.shape, w, dy, padding=1))
    dw = median(lambda: torch.nn.grad.conv2d_weight(x, w.shape, dy, padding=1))
    for op, ms in [("forward", fwd), ("input-grad", dx), ("weight-grad", dw)]:
        print(json.dumps({"layer": f"{c}x{hw}x{hw}", "op": op, "ms": [round(ms, 2)]}))
