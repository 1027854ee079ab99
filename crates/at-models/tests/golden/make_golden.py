"""Golden values for at-models, computed with PyTorch (and torchvision for ResNet).

Run with `cargo xtask golden`. Writes next to this script:
- `models.safetensors`: for each model, the input, then logits and group activations in eval mode,
  in train mode, the batch-norm running statistics after that train-mode forward, and the logits
  of an eval-mode forward after it. Weights are not stored: both sides compute them with the same
  integer generator (`formula_weights`), so the fixture stays small.
- `max_pool.safetensors`: max pooling with kernel != stride, its gradient, and the second-order
  gradient of a small conv net through it (double backpropagation).
- `torchvision_resnet_state_dicts.json`: the names and shapes of torchvision's ResNet-18/34 state
  dicts, which our models must load with nothing missing and nothing left over.

The reference WRN and NIN are written here from their descriptions (REFERENCE.md and the module
docs of at-models); ResNet-18 is torchvision's own.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x):
    """SplitMix64 of each uint64 in x (wrapping arithmetic, as the Rust side)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def formula_values(index, name, shape):
    """The value of every element of tensor number `index` (in sorted name order)."""
    n = int(np.prod(shape)) if len(shape) else 1
    x = (np.uint64(index) << np.uint64(32)) | np.arange(n, dtype=np.uint64)
    u = (splitmix64(x) >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # [0, 1)
    if name.endswith("running_var"):
        v = 0.5 + u
    elif name.endswith("running_mean"):
        v = 0.2 * (u - 0.5)
    elif len(shape) == 1 and name.endswith("weight"):
        v = 0.5 + u
    elif len(shape) == 1:
        v = 0.2 * (u - 0.5)
    else:
        fan_in = n // shape[0]
        v = (2.0 * u - 1.0) * np.sqrt(3.0) * np.sqrt(2.0 / fan_in)
    return torch.from_numpy(v.astype(np.float32)).reshape(shape)


def formula_weights(model):
    names = sorted(k for k in model.state_dict() if not k.endswith("num_batches_tracked"))
    state = {name: formula_values(i, name, tuple(model.state_dict()[name].shape)) for i, name in enumerate(names)}
    model.load_state_dict(state, strict=False)


class WrnBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn0 = nn.BatchNorm2d(c_in)
        self.conv0 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv1 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        if c_in != c_out:
            self.convdim = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x):
        o1 = F.relu(self.bn0(x))
        y = self.conv1(F.relu(self.bn1(self.conv0(o1))))
        return y + (self.convdim(o1) if hasattr(self, "convdim") else x)


class Wrn(nn.Module):
    def __init__(self, depth, width, in_channels, num_classes):
        super().__init__()
        n = (depth - 4) // 6
        self.conv0 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        c_in = 16
        for g, c_out in enumerate([16 * width, 32 * width, 64 * width]):
            blocks = {}
            for i in range(n):
                blocks[f"block{i}"] = WrnBlock(c_in, c_out, 2 if (i == 0 and g > 0) else 1)
                c_in = c_out
            setattr(self, f"group{g}", nn.ModuleDict(blocks))
        self.bn = nn.BatchNorm2d(c_in)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        o = self.conv0(x)
        groups = []
        for g in range(3):
            for block in getattr(self, f"group{g}").values():
                o = block(o)
            groups.append(o)
        o = F.relu(self.bn(o))
        return self.fc(o.mean((2, 3))), groups


class Nin(nn.Module):
    def __init__(self, widths, batch_norm, in_channels=3, num_classes=10):
        super().__init__()
        w0, w1, w2, w3 = widths
        layout = [
            [(in_channels, w0, 5), (w0, w1, 1), (w1, w2, 1)],
            [(w2, w3, 5), (w3, w3, 1), (w3, w3, 1)],
            [(w3, w3, 3), (w3, w3, 1), (w3, w3, 1)],
        ]
        self.batch_norm = batch_norm
        for b, convs in enumerate(layout):
            block = {}
            for i, (c_in, c_out, k) in enumerate(convs):
                block[f"conv{i}"] = nn.Conv2d(c_in, c_out, k, 1, k // 2, bias=not batch_norm)
                if batch_norm:
                    block[f"bn{i}"] = nn.BatchNorm2d(c_out)
            setattr(self, f"block{b}", nn.ModuleDict(block))
        self.fc = nn.Linear(w3, num_classes)

    def forward(self, x):
        o = x
        groups = []
        for b in range(3):
            if b > 0:
                o = F.max_pool2d(o, 3, 2, 1)
            block = getattr(self, f"block{b}")
            for i in range(3):
                o = block[f"conv{i}"](o)
                if self.batch_norm:
                    o = block[f"bn{i}"](o)
                o = F.relu(o)
            groups.append(o)
        return self.fc(o.mean((2, 3))), groups


class TorchvisionResNet(nn.Module):
    """torchvision's ResNet, returning the outputs of layer1..layer4 too."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        n = self.net
        o = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        groups = []
        for layer in [n.layer1, n.layer2, n.layer3, n.layer4]:
            o = layer(o)
            groups.append(o)
        return n.fc(torch.flatten(n.avgpool(o), 1)), groups


def record(tensors, tag, model, x):
    """Eval forward, train forward, running statistics, eval forward again."""
    put = lambda k, v: tensors.__setitem__(f"{tag}.{k}", v.detach().contiguous().float())
    put("input", x)
    with torch.no_grad():
        model.eval()
        logits, groups = model(x)
        put("eval.logits", logits)
        for i, g in enumerate(groups):
            put(f"eval.group{i}", g)
        model.train()
        logits, groups = model(x)
        put("train.logits", logits)
        for i, g in enumerate(groups):
            put(f"train.group{i}", g)
        for name, t in model.state_dict().items():
            if name.endswith("running_mean") or name.endswith("running_var"):
                put(f"after_train.{name.removeprefix('net.')}", t)
        model.eval()
        logits, _ = model(x)
        put("eval_after_train.logits", logits)


def max_pool_fixtures():
    torch.manual_seed(1)
    t = {}
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    out = F.max_pool2d(x, 3, 2, 1)
    (dx,) = torch.autograd.grad((out * g).sum(), x)
    t.update({"pool.x": x, "pool.g": g, "pool.out": out, "pool.dx": dx})
    # Second order: L = sum(J^2) with J = d/dx sum(g2 * pool2(conv2(pool1(relu(conv1(x)))))).
    xs = torch.randn(2, 2, 10, 10, dtype=torch.float64, requires_grad=True)
    w1 = (torch.randn(4, 2, 3, 3, dtype=torch.float64) * 0.4).requires_grad_()
    w2 = (torch.randn(3, 4, 3, 3, dtype=torch.float64) * 0.4).requires_grad_()
    g2 = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    h = F.max_pool2d(F.relu(F.conv2d(xs, w1, padding=1)), 3, 2, 1)  # 10 -> 5
    y = F.max_pool2d(F.conv2d(h, w2, padding=1), 2, 2, 0)  # 5 -> 2
    (j,) = torch.autograd.grad((y * g2).sum(), xs, create_graph=True)
    loss = j.pow(2).sum()
    dw1, dw2 = torch.autograd.grad(loss, (w1, w2))
    t.update({"dbp.x": xs, "dbp.w1": w1, "dbp.w2": w2, "dbp.g": g2, "dbp.loss": loss.reshape(1), "dbp.dw1": dw1, "dbp.dw2": dw2})
    return {k: v.detach().contiguous() for k, v in t.items()}


def main(out_dir):
    out_dir = Path(out_dir)
    torch.manual_seed(0)
    tensors = {}
    cases = [
        ("wrn_16_1", Wrn(16, 1, 3, 10), (2, 3, 16, 16)),
        ("wrn_16_2_gray_7_classes", Wrn(16, 2, 1, 7), (2, 1, 20, 20)),
        ("nin_thin", Nin([88, 72, 48, 88], True), (2, 3, 16, 16)),
        ("nin_thin_nobn", Nin([88, 72, 48, 88], False), (2, 3, 16, 16)),
        ("resnet18", TorchvisionResNet(torchvision.models.resnet18()), (2, 3, 64, 64)),
    ]
    for tag, model, shape in cases:
        target = model.net if isinstance(model, TorchvisionResNet) else model
        formula_weights(target)
        record(tensors, tag, model, torch.randn(shape))
    meta = {"torch": torch.__version__, "torchvision": torchvision.__version__}
    save_file(tensors, str(out_dir / "models.safetensors"), metadata=meta)
    save_file(max_pool_fixtures(), str(out_dir / "max_pool.safetensors"), metadata=meta)

    shapes = {}
    for name, ctor in [("resnet18", torchvision.models.resnet18), ("resnet34", torchvision.models.resnet34)]:
        shapes[name] = {k: list(v.shape) for k, v in ctor().state_dict().items()}
    (out_dir / "torchvision_resnet_state_dicts.json").write_text(json.dumps(shapes, indent=1) + "\n")
    print(f"wrote {len(tensors)} model tensors to {out_dir} with torch {torch.__version__}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
