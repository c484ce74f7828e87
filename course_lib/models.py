"""Model architectures, and the functional view of them that every method uses.

Every model is an ordinary ``nn.Module``; training and attribution work on its parameters as a dict of
tensors through ``torch.func.functional_call``, so that many models can share one module skeleton.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES = ("logreg", "mlp", "cnn", "resnet9")


class LogisticRegression(nn.Module):
    """Multinomial logistic regression on flattened pixels."""

    def __init__(self, in_shape, num_classes):
        super().__init__()
        self.linear = nn.Linear(int(torch.tensor(in_shape).prod()), num_classes)

    def forward(self, x):
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """Flatten -> (Linear -> ReLU) x depth -> Linear."""

    def __init__(self, in_shape, num_classes, width=64, depth=1):
        super().__init__()
        dims = [int(torch.tensor(in_shape).prod())] + [width] * depth
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.body = nn.Sequential(nn.Flatten(), *layers)
        self.head = nn.Linear(dims[-1], num_classes)

    def forward(self, x):
        return self.head(self.body(x))


class SmallCNN(nn.Module):
    """Two 5x5 stride-2 convolutions with ReLU, a hidden linear layer, and the head.

    With ``width=8`` on 28x28 digits it has about 30k parameters and reaches about 96-97% test accuracy on the
    4,000-image mnist5k pool. Strided convolutions instead of max-pooling make it about three times cheaper to
    train on a CPU. ``depth`` adds 3x3 convolutions after the second one (for chapter 01's fragility sweep).
    No batch norm, so a training step treats every example on its own: per-example gradients are exact in training
    mode too, and chapter 05 can replay and differentiate its training (``train.record_training``).
    """

    def __init__(self, in_shape, num_classes, width=8, depth=0, hidden=32):
        super().__init__()
        c, h, w = in_shape
        layers = [nn.Conv2d(c, width, 5, stride=2, padding=2), nn.ReLU(),
                  nn.Conv2d(width, 2 * width, 5, stride=2, padding=2), nn.ReLU()]
        for _ in range(depth):
            layers += [nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU()]
        flat = 2 * width * ((h + 3) // 4) * ((w + 3) // 4)
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(self.body(x))

    def forward_stacked(self, params: dict, x: torch.Tensor, shared_input: bool = False) -> torch.Tensor:
        """Logits (E, B, classes) of E models whose parameters are stacked along a leading axis
        (``params[name].shape == (E, *shape)``), on x (E, B, C, H, W), or on x (B, C, H, W) for all of them when
        ``shared_input``.

        The same computation as ``vmap(functional_call)`` over the models, laid out for speed on a CPU: the E
        models' convolutions run as one grouped convolution over channels-last activations (B, E * C, H, W), the
        linear layers as batched matrix products. Equal to the vmapped forward up to float round-off.
        """
        E = params["head.weight"].shape[0]
        if shared_input:
            h = x.repeat(1, E, 1, 1)
        else:
            h = x.transpose(0, 1).flatten(1, 2)  # (B, E * C, H, W)
        h = h.contiguous(memory_format=torch.channels_last)
        for name, layer in list(self.body.named_children()) + [("head", self.head)]:
            if isinstance(layer, nn.Conv2d):
                w, b = params[f"body.{name}.weight"], params[f"body.{name}.bias"]
                h = F.conv2d(h, w.flatten(0, 1), b.flatten(), stride=layer.stride, padding=layer.padding, groups=E)
            elif isinstance(layer, nn.ReLU):
                h = F.relu(h)
            elif isinstance(layer, nn.Flatten):
                h = h.contiguous().view(h.shape[0], E, -1).transpose(0, 1)  # (E, B, C * H * W), each model's order
            elif isinstance(layer, nn.Linear):
                prefix = "head" if name == "head" else f"body.{name}"
                w, b = params[f"{prefix}.weight"], params[f"{prefix}.bias"]
                h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            else:
                raise TypeError(f"forward_stacked does not know layer {layer!r}")
        return h


def _conv_bn(c_in, c_out):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class _Residual(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return x + self.block(x)


class ResNet9(nn.Module):
    """The ResNet-9 of the DAWNBench/TRAK CIFAR experiments (width-scalable), with batch norm."""

    def __init__(self, in_shape, num_classes, width=64):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            _conv_bn(in_shape[0], w), _conv_bn(w, 2 * w), nn.MaxPool2d(2),
            _Residual(nn.Sequential(_conv_bn(2 * w, 2 * w), _conv_bn(2 * w, 2 * w))),
            _conv_bn(2 * w, 4 * w), nn.MaxPool2d(2),
            _conv_bn(4 * w, 8 * w), nn.MaxPool2d(2),
            _Residual(nn.Sequential(_conv_bn(8 * w, 8 * w), _conv_bn(8 * w, 8 * w))),
            nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(8 * w, num_classes, bias=False)

    def forward(self, x):
        return self.head(self.body(x)) * 0.125


def build(arch: str, in_shape, num_classes, width=None, depth=0) -> nn.Module:
    """Return a freshly initialised model (uses torch's global RNG: seed it first)."""
    if arch == "logreg":
        return LogisticRegression(in_shape, num_classes)
    if arch == "mlp":
        return MLP(in_shape, num_classes, width=width or 64, depth=max(depth, 1))
    if arch == "cnn":
        return SmallCNN(in_shape, num_classes, width=width or 8, depth=depth)
    if arch == "resnet9":
        return ResNet9(in_shape, num_classes, width=width or 64)
    raise ValueError(f"unknown architecture {arch!r}; valid: {', '.join(ARCHITECTURES)}")


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
