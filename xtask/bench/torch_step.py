"""The PyTorch side of `cargo xtask bench`: the same training steps as
`crates/at-trainer/examples/step_bench.rs`, on the same CPU, in eager PyTorch.

Usage: python torch_step.py STUDENT STEP [TEACHER] [BATCH] [WARMUP] [STEPS] [THREADS] [DEVICE] [SIDE]

SIDE: the images' side, 32 by default; the ResNets (resnet18, resnet34: torchvision's, 10
classes) run at 224, attention transfer on their first three groups as the Rust side's pairs.

DEVICE: cpu (default) or cuda; on cuda each step ends with a synchronisation, as the Rust side
reads its loss back.

STEP: student (cross-entropy), at (attention transfer from TEACHER on every group, beta 1e3),
at-kd (plus distillation, alpha 0.9, T 4), teacher (the teacher's forward alone, no gradient).
Prints one JSON line with every timed step in milliseconds, like the Rust side.

The WRN here is written from the paper's description (pre-activation blocks, 1x1 shortcut where
the shape changes), as in crates/at-models; the losses as in crates/at-losses.
"""

import json
import resource
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(c_in)
        self.conv0 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv1 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.convdim = (
            nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)
            if c_in != c_out or stride != 1
            else None
        )

    def forward(self, x):
        o1 = F.relu(self.bn0(x))
        y = self.conv1(F.relu(self.bn1(self.conv0(o1))))
        return y + (self.convdim(o1) if self.convdim is not None else x)


class Wrn(nn.Module):
    def __init__(self, depth, width, num_classes=10):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.conv0 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        groups, c = [], 16
        for g, w in enumerate(widths):
            blocks = []
            for i in range(n):
                blocks.append(Block(c, w, (1 if g == 0 else 2) if i == 0 else 1))
                c = w
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.ModuleList(groups)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.conv0(x)
        acts = []
        for g in self.groups:
            x = g(x)
            acts.append(x)
        x = F.relu(self.bn(x))
        x = F.avg_pool2d(x, 8).flatten(1)
        return self.fc(x), acts


class ResNet(nn.Module):
    """torchvision's ResNet returning its logits and the outputs of its four groups."""

    def __init__(self, name):
        super().__init__()
        import torchvision

        self.net = getattr(torchvision.models, name)(num_classes=10)

    def forward(self, x):
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        acts = []
        for layer in (n.layer1, n.layer2, n.layer3, n.layer4):
            x = layer(x)
            acts.append(x)
        return n.fc(torch.flatten(n.avgpool(x), 1)), acts


def build(name):
    if name.startswith("resnet"):
        return ResNet(name)
    _, depth, width = name.split("-")
    return Wrn(int(depth), int(width))


def at_map(x):
    return F.normalize(x.pow(2).mean(1).flatten(1))


def main():
    args = sys.argv[1:]
    arg = lambda i, d: args[i] if len(args) > i else d
    student_name, step, teacher_name = arg(0, "wrn-16-1"), arg(1, "student"), arg(2, "wrn-16-2")
    batch, warmup, steps = int(arg(3, "128")), int(arg(4, "2")), int(arg(5, "5"))
    torch.set_num_threads(int(arg(6, "0")) or torch.get_num_threads())
    device = torch.device(arg(7, "cpu"))
    torch.manual_seed(0)
    student = build(student_name).train().to(device)
    teacher = build(teacher_name).eval().to(device) if step != "student" else None
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    side = int(arg(8, "32"))
    x = torch.randn(batch, 3, side, side, device=device)
    y = torch.arange(batch, device=device) % 10
    alpha = 0.9 if step == "at-kd" else 0.0
    times = []
    for i in range(warmup + steps):
        started = time.perf_counter()
        if step == "teacher":
            with torch.no_grad():
                teacher(x)[0].sum().item()
        else:
            logits, acts = student(x)
            loss = F.cross_entropy(logits, y) * (1 - alpha)
            if teacher is not None:
                with torch.no_grad():
                    t_logits, t_acts = teacher(x)
                if alpha > 0:
                    kd = F.kl_div(
                        F.log_softmax(logits / 4, 1), F.softmax(t_logits / 4, 1),
                        reduction="batchmean",
                    )
                    loss = loss + alpha * 16 * kd
                # The Rust side pairs the first three groups (all of a WRN's).
                for s, t in list(zip(acts, t_acts))[:3]:
                    loss = loss + 1e3 * (at_map(s) - at_map(t)).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()
        if i >= warmup:
            times.append((time.perf_counter() - started) * 1e3)
    print(json.dumps({
        "model": student_name, "step": step, "teacher": teacher_name if teacher else "",
        "batch": batch, "device": str(device), "ms": [round(t, 1) for t in times],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        # The vector code ATen's kernels dispatch to (ATEN_CPU_CAPABILITY caps it).
        "isa": torch.backends.cpu.get_cpu_capability(),
        # The process's peak resident size in KiB (Linux's ru_maxrss unit).
        "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }))


if __name__ == "__main__":
    main()
