"""Golden values for at-losses, computed with PyTorch in float64 from float32 inputs.

Run with `cargo xtask golden`; writes `losses.safetensors` next to this script. The KD term is
`F.kl_div(log_softmax(s/T), softmax(t/T), reduction="batchmean") * T^2`, the total as the authors'
cifar.py combines it (REFERENCE.md): (1 - alpha) CE + alpha KD + beta * sum of AT distances.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file


def at(x):
    return F.normalize(x.pow(2).mean(1).flatten(1), dim=1)


def at_loss(s, t):
    return (at(s) - at(t)).pow(2).mean()


def main(out_dir):
    torch.manual_seed(0)
    out = {}
    b, c = 8, 10
    s32 = torch.randn(b, c) * 3
    t32 = torch.randn(b, c) * 3
    y = torch.randint(0, c, (b,))
    groups_s32 = [torch.randn(b, 4, 8, 8), torch.randn(b, 8, 4, 4)]
    groups_t32 = [torch.randn(b, 16, 8, 8), torch.randn(b, 32, 4, 4)]
    out.update({"student": s32, "teacher": t32, "labels": y.to(torch.int64)})
    for i, (gs, gt) in enumerate(zip(groups_s32, groups_t32)):
        out[f"student_group{i}"] = gs
        out[f"teacher_group{i}"] = gt

    s = s32.double().requires_grad_()
    t = t32.double()
    for temperature in [1.0, 4.0]:
        kd = F.kl_div(F.log_softmax(s / temperature, 1), F.softmax(t / temperature, 1), reduction="batchmean") * temperature**2
        (g,) = torch.autograd.grad(kd, s)
        out[f"kd_t{int(temperature)}.loss"] = kd.reshape(1)
        out[f"kd_t{int(temperature)}.grad"] = g

    ce = F.cross_entropy(s, y)
    (g,) = torch.autograd.grad(ce, s)
    out["ce.loss"] = ce.reshape(1)
    out["ce.grad"] = g

    alpha, temperature, beta = 0.9, 4.0, 1e3
    gs = [g.double().requires_grad_() for g in groups_s32]
    gt = [g.double() for g in groups_t32]
    kd = F.kl_div(F.log_softmax(s / temperature, 1), F.softmax(t / temperature, 1), reduction="batchmean") * temperature**2
    total = (1 - alpha) * F.cross_entropy(s, y) + alpha * kd + beta * sum(at_loss(a, b) for a, b in zip(gs, gt))
    grads = torch.autograd.grad(total, [s] + gs)
    out["total.loss"] = total.reshape(1)
    out["total.grad_logits"] = grads[0]
    for i, g in enumerate(grads[1:]):
        out[f"total.grad_group{i}"] = g

    out = {k: v.detach().contiguous() for k, v in out.items()}
    save_file(out, str(Path(out_dir) / "losses.safetensors"), metadata={"torch": torch.__version__})
    print(f"wrote {len(out)} tensors with torch {torch.__version__}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
