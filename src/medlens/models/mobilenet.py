"""MobileNetV2 (Sandler et al. 2018) and the uint8 resize the lite tower uses, in plain
``torch``, so an analysis never imports torchvision.

Importing torchvision costs about 2 s of a cold start on the 2-core box: its package
import pulls ``torchvision.ops`` → ``torch._dynamo`` → ``sympy`` (``python -X
importtime``; benchmarks/cold_start.py). Inference needs two things from it, rebuilt here
to give the *same numbers*: the network (module names, and so state-dict keys, as
``torchvision.models.mobilenet_v2``, so the published ImageNet file loads unchanged) and
``transforms.v2.functional.resize``/``center_crop`` on uint8 tensors (bilinear,
antialiased, with torchvision's output-size rule and its native-uint8 path on AVX2 CPUs).
``tests/test_models.py`` checks both against torchvision bit for bit. Training keeps
torchvision's augmentations.
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import nn

from medlens.models._util import center_crop_offsets

# (expansion t, channels c, repeats n, first stride s): torchvision's width 1.0 setting.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
LAST_CHANNELS = 1280


def conv_bn_relu6(
    inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """Conv (no bias) → BatchNorm → ReLU6, indexed 0/1/2 like torchvision's
    ``Conv2dNormActivation``."""
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1, unless t = 1) → depthwise 3x3 → linear project, with the identity
    shortcut when the shape is kept; the layers live in ``conv`` as in torchvision."""

    def __init__(self, inp: int, out: int, stride: int, expand: int):
        super().__init__()
        hidden = round(inp * expand)
        self.use_res_connect = stride == 1 and inp == out
        layers: list[nn.Module] = [] if expand == 1 else [conv_bn_relu6(inp, hidden, kernel=1)]
        layers += [
            conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def mobilenet_v2_features() -> nn.Sequential:
    """torchvision's ``mobilenet_v2().features``: the stem, 17 inverted residual blocks
    and the 1x1 conv to 1280 channels (19 modules; ``tune_from`` indexes them)."""
    layers: list[nn.Module] = [conv_bn_relu6(3, 32, stride=2)]
    inp = 32
    for t, c, n, s in INVERTED_RESIDUAL_SETTING:
        for i in range(n):
            layers.append(InvertedResidual(inp, c, s if i == 0 else 1, t))
            inp = c
    layers.append(conv_bn_relu6(inp, LAST_CHANNELS, kernel=1))
    return nn.Sequential(*layers)


def features_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``features.*`` entries of a torchvision MobileNetV2 state dict, prefix removed
    (the classifier is not part of the tower)."""
    return {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}


# -- the uint8 resize and centre crop of torchvision.transforms.v2 -----------------------
# (the geometry, shorter_side_size and center_crop_offsets, is in models._util)


def _native_uint8() -> bool:
    """torchvision resizes uint8 natively (no float round trip) on these CPUs."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in (
        "aarch64",
        "arm64",
    )


def resize_uint8(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A uint8 (C, H, W) tensor resized to ``size`` (h, w), bilinear and antialiased,
    exactly as ``torchvision.transforms.v2.functional.resize`` does it on the CPU."""
    c, h, w = image.shape
    if (h, w) == tuple(size):
        return image
    x = image.reshape(1, c, h, w)
    strides = x.stride()
    if x.is_contiguous(memory_format=torch.channels_last) and x.numel() != strides[0]:
        # torchvision's restride, so interpolate keeps channels_last (its uint8 kernel's
        # fast path); values are what the kernel computes either way
        x = x.as_strided((1, c, h, w), (x.numel(), *strides[1:]))
    native = image.device.type == "cpu" and _native_uint8()
    src = x if native else x.float()
    out = F.interpolate(src, size=list(size), mode="bilinear", align_corners=False, antialias=True)
    if not native:
        out = out.round_().to(torch.uint8)
    return out[0]


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """The centred ``size`` x ``size`` crop (torchvision's rounding of the offsets); the
    image is at least ``size`` on each side."""
    top, left = center_crop_offsets(*image.shape[-2:], size)
    return image[..., top : top + size, left : left + size]
