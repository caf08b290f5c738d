"""The two models of the TrAct CIFAR experiments, in plain torch (no torchvision).

- :class:`ResNet` / :func:`resnet18`: the CIFAR variant of ResNet-18 (He et al. 2016, as used
  throughout the CIFAR literature and by the official TrAct script): a 3×3 stride-1 stem
  convolution ``conv1`` with no max-pool, four stages of two BasicBlocks with widths
  64/128/256/512 (strides 1/2/2/2), global average pooling and a linear classifier ``fc``.
  11.17M parameters for 10 classes.
- :class:`ViT` / :func:`vit_small`: a pre-norm Vision Transformer with 4×4 patches (64 tokens
  and a class token at 32×32), 12 layers, width 128, 4 heads, MLP width 512: 2.39M parameters
  for 10 classes. The patch embedding ``patch_embed`` is a Conv2d with kernel = stride = 4.

``width_mult`` scales every width (channels of the ResNet, token width of the ViT) for quick
runs on small machines. :data:`FIRST_LAYER` names the layer that TrAct wraps;
:func:`apply_tract` wraps it in place (parameters and state-dict keys stay the same).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "BasicBlock",
    "ResNet",
    "resnet18",
    "ViT",
    "vit_small",
    "build_model",
    "FIRST_LAYER",
    "apply_tract",
]

# attribute holding the input layer that TrAct wraps, per model name
FIRST_LAYER = {"resnet18": "conv1", "vit": "patch_embed"}


def _scaled(width: int, width_mult: float) -> int:
    return max(1, int(round(width * width_mult)))


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity shortcut (a 1×1 conv-BN when the shape changes)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet with BasicBlocks: 3×3 stem ``conv1``, no max-pool, 4 stages, ``fc`` head."""

    def __init__(
        self,
        blocks_per_stage=(2, 2, 2, 2),
        num_classes: int = 10,
        in_channels: int = 3,
        width_mult: float = 1.0,
    ):
        super().__init__()
        widths = [_scaled(w, width_mult) for w in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages = []
        channels = widths[0]
        for stage, (width, blocks) in enumerate(zip(widths, blocks_per_stage)):
            layers = []
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def resnet18(num_classes: int = 10, width_mult: float = 1.0) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes=num_classes, width_mult=width_mult)


class _SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"ViT width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    """Pre-norm transformer layer: x + attn(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = _SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_width), nn.GELU(), nn.Linear(mlp_width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision Transformer: Conv2d patch embedding ``patch_embed``, class token, learned
    positional embedding, ``depth`` pre-norm layers, final LayerNorm and linear ``head`` on the
    class token. No dropout, so training is deterministic given the data order."""

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        patch_size: int = 4,
        width: int = 128,
        depth: int = 12,
        heads: int = 4,
        mlp_ratio: int = 4,
        in_channels: int = 3,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of patch {patch_size}")
        tokens = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, width))
        self.blocks = nn.Sequential(*[_Block(width, heads, mlp_ratio * width) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # B × T × width
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def vit_small(num_classes: int = 10, width_mult: float = 1.0) -> ViT:
    """12 layers, width 128 · width_mult, 4 heads, patch 4, for 32×32 inputs."""
    return ViT(num_classes=num_classes, width=_scaled(128, width_mult), depth=12, heads=4)


def build_model(name: str, num_classes: int, width_mult: float = 1.0) -> nn.Module:
    if name == "resnet18":
        return resnet18(num_classes, width_mult)
    if name == "vit":
        return vit_small(num_classes, width_mult)
    raise ValueError(f"unknown model {name!r}; choose from {sorted(FIRST_LAYER)}")


def apply_tract(model: nn.Module, model_name: str, l: float) -> nn.Module:
    """Wrap the model's input layer (``FIRST_LAYER[model_name]``) with ``inf.tract.TrAct``.

    TrAct keeps the same parameter objects and state-dict keys, so build the optimizer after
    this call or before it, and checkpoints of either form load into the other.
    """
    from inf.tract import TrAct

    name = FIRST_LAYER[model_name]
    setattr(model, name, TrAct(getattr(model, name), l=l))
    return model
