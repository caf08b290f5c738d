"""Models of the basis-function paper's harness, written here (torchvision cannot be imported
on this machine: its PyPI wheel must match the installed torch build, and does not).

Every model has ``features(x)`` — the penultimate features that its last layer reads — and a
bias-free last linear layer ``W``, so ``model(x) = features(x) @ W.T`` exactly, as in the
authors' code (they replace each torchvision head by ``nn.Linear(..., bias=False)``); the
basis of ``inf.analysis.decomposition.function_basis`` then has ``β_i = s_i`` at the end.

CIFAR-sized variants (inputs ``C × 32 × 32``, or ``1 × 28 × 28`` MNIST), following the
authors' modifications of the torchvision models: the first convolution is a 3 × 3, stride-1
convolution with ``2 · image_size`` output channels and no bias, and the first max-pool is
removed. Differences from the torchvision originals, to keep the heads CIFAR-sized:

* ``alexnet``: torchvision's feature stack (with the changes above), then an adaptive average
  pool to 2 × 2 (not 6 × 6) and a 1024-1024 classifier (not 4096-4096), dropout 0.5.
* ``vgg11``: torchvision's configuration A feature stack (changes above), global average pool
  and a 512-512 classifier (not 25088-4096-4096), dropout 0.5.
* ``resnet18``, ``resnet34``: :class:`experiments.tract.models.ResNet` (BasicBlocks, 3 × 3
  stem, no max-pool) with stages (2, 2, 2, 2) and (3, 4, 6, 3); ``resnet50``: the same layout
  with Bottleneck blocks (3, 4, 6, 3), written here.
* ``vit``: :class:`experiments.tract.models.ViT` (12 pre-norm layers, width 128, 4 heads,
  patch 4; the authors used a different, relative-position ViT of width 256, 8 blocks, patch 2).
* ``cnn2``, ``cnn3``, ``cnn4``: the paper's MNIST CNNs (``mnist.py``): blocks of conv 3 × 3 ·
  ReLU · max-pool 2, channels (256, 64), (256, 128, 64), (256, 128, 128, 64) times
  ``width_mult``, flatten, linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from experiments.tract.models import ResNet, ViT

__all__ = [
    "MODELS",
    "build_model",
    "PaperCNN",
    "AlexNet",
    "VGG11",
    "CifarResNet",
    "ResNet50",
    "CifarViT",
    "scale_init",
]

MODELS = ("alexnet", "vgg11", "resnet18", "resnet34", "resnet50", "vit", "cnn2", "cnn3", "cnn4")


class _Head(nn.Module):
    """``forward = fc(features(x))`` with a bias-free ``fc``."""

    fc: nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class PaperCNN(_Head):
    """The paper's MNIST CNN of depth 2, 3 or 4 (module docstring)."""

    WIDTHS = {2: (256, 64), 3: (256, 128, 64), 4: (256, 128, 128, 64)}

    def __init__(
        self,
        depth: int = 3,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        width_mult: float = 1.0,
    ):
        super().__init__()
        if depth not in self.WIDTHS:
            raise ValueError(f"the paper's CNN has depth 2, 3 or 4, got {depth}")
        widths = [max(1, round(w * width_mult)) for w in self.WIDTHS[depth]]
        layers, c, size = [], in_channels, image_size
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, size = w, size // 2
        if size < 1:
            raise ValueError(f"{image_size}-pixel images are too small for {depth} pooling blocks")
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c * size * size, num_classes, bias=False)

    def features(self, x):
        return self.body(x).flatten(1)


def _stem(in_channels: int, image_size: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, 2 * image_size, 3, stride=1, padding=1, bias=False)


class AlexNet(_Head):
    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, hidden: int = 1024):
        super().__init__()
        c0 = 2 * image_size
        self.body = nn.Sequential(
            _stem(in_channels, image_size),
            nn.ReLU(inplace=True),
            nn.Conv2d(c0, 192, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(256 * 4, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(hidden, num_classes, bias=False)

    def features(self, x):
        return self.classifier(self.body(x))


class VGG11(_Head):
    CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, hidden: int = 512):
        super().__init__()
        layers, c, first = [], in_channels, True
        for item in self.CFG:
            if item == "M":
                if first:  # the authors replace torchvision's first max-pool by Identity
                    first = False
                    continue
                layers.append(nn.MaxPool2d(2))
            else:
                conv = (
                    _stem(c, image_size)
                    if c == in_channels and not layers
                    else nn.Conv2d(c, item, 3, padding=1)
                )
                layers += [conv, nn.ReLU(inplace=True)]
                c = conv.out_channels
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Sequential(
            nn.Linear(c, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
        )
        self.fc = nn.Linear(hidden, num_classes, bias=False)

    def features(self, x):
        return self.classifier(self.body(x))


class CifarResNet(ResNet):
    """:class:`experiments.tract.models.ResNet` with a bias-free ``fc`` and ``features``."""

    def __init__(self, blocks_per_stage, in_channels: int = 3, num_classes: int = 10, image_size: int = 32):
        super().__init__(
            blocks_per_stage, num_classes=num_classes, in_channels=in_channels, width_mult=2 * image_size / 64
        )
        self.fc = nn.Linear(self.fc.in_features, num_classes, bias=False)

    def features(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x):
        return self.fc(self.features(x))


class _Bottleneck(nn.Module):
    def __init__(self, in_channels: int, width: int, stride: int = 1, expansion: int = 4):
        super().__init__()
        out = width * expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and in_channels == out
            else nn.Sequential(nn.Conv2d(in_channels, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
        )

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        return F.relu(self.bn3(self.conv3(y)) + self.shortcut(x))


class ResNet50(_Head):
    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        c = 2 * image_size
        self.conv1 = nn.Conv2d(in_channels, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        stages = []
        for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
            layers = []
            for b in range(blocks):
                layers.append(_Bottleneck(c, width, 2 if stage > 0 and b == 0 else 1))
                c = width * 4
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(c, num_classes, bias=False)

    def features(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


class CifarViT(ViT):
    """:class:`experiments.tract.models.ViT` with a bias-free ``head`` and ``features``."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32):
        super().__init__(
            num_classes=num_classes,
            image_size=image_size,
            patch_size=4,
            width=128,
            depth=12,
            heads=4,
            in_channels=in_channels,
        )
        self.head = nn.Linear(128, num_classes, bias=False)
        nn.init.trunc_normal_(self.head.weight, std=0.02)

    @property
    def fc(self):
        return self.head

    def features(self, x):
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        return self.norm(self.blocks(tokens))[:, 0]

    def forward(self, x):
        return self.head(self.features(x))


def build_model(
    name: str, in_channels: int, num_classes: int, image_size: int, width_mult: float = 1.0
) -> nn.Module:
    """A fresh model by name (:data:`MODELS`); ``width_mult`` only scales the paper's CNNs."""
    if name == "alexnet":
        return AlexNet(in_channels, num_classes, image_size)
    if name == "vgg11":
        return VGG11(in_channels, num_classes, image_size)
    if name == "resnet18":
        return CifarResNet((2, 2, 2, 2), in_channels, num_classes, image_size)
    if name == "resnet34":
        return CifarResNet((3, 4, 6, 3), in_channels, num_classes, image_size)
    if name == "resnet50":
        return ResNet50(in_channels, num_classes, image_size)
    if name == "vit":
        if image_size % 4:
            raise ValueError(f"the ViT needs an image size divisible by its patch size 4, got {image_size}")
        return CifarViT(in_channels, num_classes, image_size)
    if name in ("cnn2", "cnn3", "cnn4"):
        return PaperCNN(int(name[-1]), in_channels, num_classes, image_size, width_mult)
    raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")


@torch.no_grad()
def scale_init(model: nn.Module, scale: float) -> nn.Module:
    """Multiply every floating-point parameter and buffer by ``scale`` (the authors'
    ``--init_scale``: the initial state is ``scale`` × the default one)."""
    if scale != 1:
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.mul_(scale)
    return model
