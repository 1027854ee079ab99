"""Golden values for at-losses, computed with PyTorch in float64 from float32 inputs.

Run with `cargo xtask golden`; writes `losses.safetensors` (first-order losses) and
`gradient.safetensors` (the gradient-based losses and their second-order gradients) next to it. The KD term is
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




def gradient_fixtures(out_dir):
    """Second-order gradients of the gradient-based losses on a small NIN-like net without batch
    norm: conv-relu-maxpool(3,2,1)-conv-relu-global mean-linear, in float64."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([1, 2])
    ws = {
        "w1": torch.randn(4, 3, 3, 3, dtype=torch.float64) * 0.5,
        "b1": torch.randn(4, dtype=torch.float64) * 0.1,
        "w2": torch.randn(5, 4, 3, 3, dtype=torch.float64) * 0.4,
        "b2": torch.randn(5, dtype=torch.float64) * 0.1,
        "fc": torch.randn(3, 5, dtype=torch.float64) * 0.5,
    }
    teacher_ws = {k: v * 1.3 + 0.05 for k, v in ws.items()}

    def net(p, inp):
        h = F.max_pool2d(F.relu(F.conv2d(inp, p["w1"], p["b1"], padding=1)), 3, 2, 1)
        h = F.relu(F.conv2d(h, p["w2"], p["b2"], padding=1)).mean((2, 3))
        return h @ p["fc"].t()

    def jac(p, inp, create_graph):
        inp = inp.clone().requires_grad_()
        logits = net(p, inp)
        ce = F.cross_entropy(logits, y)
        (j,) = torch.autograd.grad(ce, inp, create_graph=create_graph)
        return ce, logits, j

    out = {"x": x, "y": y.to(torch.int64)}
    out.update({f"w.{k}": v for k, v in ws.items()})
    out.update({f"teacher.{k}": v for k, v in teacher_ws.items()})
    _, _, j_t = jac(teacher_ws, x, False)
    flip = lambda t: t.flip(3)
    penalties = {
        "jacobian": lambda p: 0.5 * jac(p, x, True)[2].pow(2).sum(),
        "symmetry": lambda p: 0.5 * ((jac(p, x, True)[2] - flip(jac(p, flip(x), True)[2])).pow(2).sum() + (net(p, x) - net(p, flip(x))).pow(2).sum()),
        "transfer": lambda p: 0.5 * (jac(p, x, True)[2] - j_t).pow(2).sum(),
    }
    for name, penalty in penalties.items():
        p = {k: v.clone().requires_grad_() for k, v in ws.items()}
        value = penalty(p)
        grads = torch.autograd.grad(value, list(p.values()))
        out[f"{name}.penalty"] = value.reshape(1)
        for k, g in zip(p.keys(), grads):
            out[f"{name}.d{k}"] = g
    out = {k: v.detach().contiguous() for k, v in out.items()}
    save_file(out, str(Path(out_dir) / "gradient.safetensors"), metadata={"torch": torch.__version__})
    print(f"wrote {len(out)} gradient-loss tensors")


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent
    main(target)
    gradient_fixtures(target)
