"""Golden values for the SGD optimiser and the schedules, from torch.optim.

Run with `cargo xtask golden`; writes `sgd.safetensors` next to this script. Two parameters get
fixed gradients for four steps; the learning rate drops from 0.1 to 0.02 before the fourth step.
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


def main(out_dir):
    torch.manual_seed(0)
    out = {}
    w0, b0 = torch.randn(4, 3), torch.randn(4)
    grads = [(torch.randn(4, 3), torch.randn(4)) for _ in range(4)]
    out.update({"w0": w0, "b0": b0})
    for i, (gw, gb) in enumerate(grads):
        out[f"grad{i}.w"], out[f"grad{i}.b"] = gw, gb
    configs = {
        "momentum": dict(momentum=0.9, nesterov=False, weight_decay=5e-4),
        "nesterov": dict(momentum=0.9, nesterov=True, weight_decay=5e-4),
        "plain": dict(momentum=0.0, nesterov=False, weight_decay=0.0),
    }
    for tag, kw in configs.items():
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        opt = torch.optim.SGD([w, b], lr=0.1, **kw)
        for i, (gw, gb) in enumerate(grads):
            if i == 3:
                for group in opt.param_groups:
                    group["lr"] = 0.02
            w.grad, b.grad = gw.clone(), gb.clone()
            opt.step()
            out[f"{tag}.step{i}.w"], out[f"{tag}.step{i}.b"] = w.detach().clone(), b.detach().clone()
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[60, 120, 160], gamma=0.2)
    lrs = []
    for _ in range(200):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    out["multistep.lr"] = torch.tensor(lrs, dtype=torch.float64)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=30)
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    out["cosine.lr"] = torch.tensor(lrs, dtype=torch.float64)
    save_file({k: v.contiguous() for k, v in out.items()}, str(Path(out_dir) / "sgd.safetensors"), metadata={"torch": torch.__version__})
    print(f"wrote {len(out)} tensors with torch {torch.__version__}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
