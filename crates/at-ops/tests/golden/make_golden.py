"""Golden values for at-ops, computed with PyTorch in float64.

Run with `cargo xtask golden` (or `python make_golden.py OUT_DIR`); it writes `at_ops.safetensors`
next to this script. Inputs are stored as float32 (what the Rust tests feed in), references as
float64. The formulas are written from the paper (section 3.1, eq. (2)) and from what the
authors' code computes (REFERENCE.md), not taken from any implementation.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file


def raw_map(a, reduce, p):
    """F(A): |A|^p combined over channels. [b, c, h, w] -> [b, h, w]."""
    x = a.abs().pow(p)
    if reduce == "sum":
        return x.sum(1)
    if reduce == "mean":
        return x.mean(1)
    if reduce == "max":
        return x.amax(1)
    raise ValueError(reduce)


def normalise(q, norm):
    """Per-sample normalisation of maps [b, ...] over all their positions."""
    flat = q.flatten(1)
    if norm == "l2":
        flat = F.normalize(flat, p=2, dim=1)
    elif norm == "l1":
        flat = F.normalize(flat, p=1, dim=1)
    return flat.view_as(q)


def resize(q, size, mode):
    if tuple(q.shape[1:]) == tuple(size):
        return q
    if mode == "area":
        return F.interpolate(q[:, None], size=size, mode="area")[:, 0]
    return F.interpolate(q[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def at_loss(s, t, cfg):
    size = cfg["size"] or (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
    qs = normalise(resize(raw_map(s, cfg["reduce"], cfg["p"]), size, cfg["resize"]), cfg["norm"]).flatten(1)
    qt = normalise(resize(raw_map(t, cfg["reduce"], cfg["p"]), size, cfg["resize"]), cfg["norm"]).flatten(1)
    diff = qs - qt.detach()
    if cfg["distance"] == "code":
        return diff.pow(2).mean()
    order = cfg["distance_p"]
    return (0.5 * torch.linalg.vector_norm(diff, ord=order, dim=1)).mean()


def cfg(reduce="mean", p=2.0, norm="l2", distance="code", distance_p=2.0, resize="area", size=None):
    return dict(reduce=reduce, p=p, norm=norm, distance=distance, distance_p=distance_p, resize=resize, size=size)


# name, student shape, teacher shape, config. Mirrored by the table in tests/golden.rs.
CASES = [
    ("code_default_b1_h5_w7", (1, 3, 5, 7), (1, 6, 5, 7), cfg()),
    ("code_sum_p1", (2, 4, 6, 6), (2, 8, 6, 6), cfg(reduce="sum", p=1.0)),
    ("code_sum_p4_h4_w6", (3, 5, 4, 6), (3, 5, 4, 6), cfg(reduce="sum", p=4.0)),
    ("code_max_p2", (2, 6, 5, 5), (2, 3, 5, 5), cfg(reduce="max")),
    ("code_sum_p3_unnormalised", (2, 3, 4, 4), (2, 5, 4, 4), cfg(reduce="sum", p=3.0, norm="none")),
    ("paper_p2_l2", (4, 8, 8, 8), (4, 16, 8, 8), cfg(distance="paper", distance_p=2.0)),
    ("paper_p1_l1_h6_w4", (2, 3, 6, 4), (2, 3, 6, 4), cfg(reduce="sum", p=1.0, norm="l1", distance="paper", distance_p=1.0)),
    ("area_16_to_8", (2, 4, 8, 8), (2, 8, 16, 16), cfg()),
    ("bilinear_16_to_8", (2, 4, 8, 8), (2, 8, 16, 16), cfg(resize="bilinear")),
    ("area_to_6x5", (2, 4, 8, 8), (2, 8, 16, 16), cfg(size=(6, 5))),
    ("bilinear_to_12x10", (2, 4, 8, 8), (2, 8, 16, 16), cfg(resize="bilinear", size=(12, 10))),
    # After a ReLU many activations are exactly 0, where |x| must pass a zero gradient.
    ("paper_p1_l1_sum_p1_relu", (2, 4, 5, 5), (2, 4, 5, 5), cfg(reduce="sum", p=1.0, norm="l1", distance="paper", distance_p=1.0)),
    ("paper_p2_max_p4_bilinear_7_14", (3, 4, 7, 7), (3, 4, 14, 14), cfg(reduce="max", p=4.0, distance="paper", resize="bilinear")),
]

# Three WRN-like group pairs summed with beta = 1e3.
SUM_GROUPS = [((2, 4, 8, 8), (2, 8, 8, 8)), ((2, 8, 4, 4), (2, 16, 4, 4)), ((2, 16, 2, 2), (2, 32, 2, 2))]
SUM_BETA = 1e3


def main(out_dir):
    torch.manual_seed(0)
    tensors = {}

    def put(name, t):
        tensors[name] = t.detach().contiguous()

    for name, s_shape, t_shape, c in CASES:
        s32 = torch.randn(s_shape, dtype=torch.float32)
        t32 = torch.randn(t_shape, dtype=torch.float32) * 2.0 + 0.5
        if name.endswith("_relu"):
            s32, t32 = s32.relu(), t32.relu()
        s = s32.double().requires_grad_()
        t = t32.double()
        loss = at_loss(s, t, c)
        (grad,) = torch.autograd.grad(loss, s)
        put(f"{name}.student", s32)
        put(f"{name}.teacher", t32)
        put(f"{name}.map_student", normalise(raw_map(s, c["reduce"], c["p"]), c["norm"]))
        put(f"{name}.map_teacher", normalise(raw_map(t, c["reduce"], c["p"]), c["norm"]))
        put(f"{name}.loss", loss.reshape(1))
        put(f"{name}.grad_student", grad)

    students, teachers = [], []
    for i, (s_shape, t_shape) in enumerate(SUM_GROUPS):
        s32 = torch.randn(s_shape, dtype=torch.float32)
        t32 = torch.randn(t_shape, dtype=torch.float32)
        put(f"sum.student{i}", s32)
        put(f"sum.teacher{i}", t32)
        students.append(s32.double().requires_grad_())
        teachers.append(t32.double())
    total = SUM_BETA * sum(at_loss(s, t, cfg()) for s, t in zip(students, teachers))
    grads = torch.autograd.grad(total, students)
    put("sum.loss", total.reshape(1))
    for i, g in enumerate(grads):
        put(f"sum.grad_student{i}", g)

    # Resizing alone, both ways, both modes.
    q = torch.rand((2, 7, 9), dtype=torch.float32)
    put("resize.input", q)
    put("resize.area_3x4", resize(q.double(), (3, 4), "area"))
    put("resize.area_10x13", resize(q.double(), (10, 13), "area"))
    put("resize.bilinear_3x4", resize(q.double(), (3, 4), "bilinear"))
    put("resize.bilinear_10x13", resize(q.double(), (10, 13), "bilinear"))

    out = Path(out_dir) / "at_ops.safetensors"
    save_file(tensors, str(out), metadata={"torch": torch.__version__, "script": "make_golden.py"})
    print(f"wrote {len(tensors)} tensors to {out} with torch {torch.__version__}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
