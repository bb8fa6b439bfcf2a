"""MobileFaceNet (128-d), laid out so the shared pretrained state_dict loads strictly.

Submodules are registered in the order of that file's keys, so a saved checkpoint lists them the same way.
"""

from __future__ import annotations

from torch import Tensor, nn

EMBEDDING_SIZE = 128
STEM_CHANNELS = 64
LAST_CHANNELS = 512
# (expansion t, output channels c, repeats n, first stride s), MobileNetV2 notation.
INVERTED_RESIDUAL_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)


class ConvBNReLU6(nn.Sequential):
    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__(
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=(kernel_size - 1) // 2,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )


class DepthwiseSeparableConv(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.depthwise(x)))
        return self.relu(self.bn2(self.pointwise(x)))


class GlobalDepthwiseConv(nn.Module):
    """A 7×7 depthwise conv over the final 7×7 map: a learned, position-aware global pooling."""

    def __init__(self, channels: int, kernel_size: int = 7) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, kernel_size, groups=channels, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.depthwise(x))


class InvertedResidual(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            ConvBNReLU6(in_channels, hidden, kernel_size=1),
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileFaceNet(nn.Module):
    """Maps a 3×112×112 face crop (RGB, ImageNet mean/std) to an unnormalised 128-d embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = ConvBNReLU6(3, STEM_CHANNELS, stride=2)
        self.dw_conv = DepthwiseSeparableConv(STEM_CHANNELS)
        self.conv2 = ConvBNReLU6(INVERTED_RESIDUAL_SETTINGS[-1][1], LAST_CHANNELS, kernel_size=1)
        self.gdconv = GlobalDepthwiseConv(LAST_CHANNELS)
        self.conv3 = nn.Conv2d(LAST_CHANNELS, EMBEDDING_SIZE, 1)
        self.bn = nn.BatchNorm2d(EMBEDDING_SIZE)
        blocks: list[nn.Module] = []
        in_channels = STEM_CHANNELS
        for expansion, out_channels, repeats, first_stride in INVERTED_RESIDUAL_SETTINGS:
            for index in range(repeats):
                stride = first_stride if index == 0 else 1
                blocks.append(InvertedResidual(in_channels, out_channels, stride, expansion))
                in_channels = out_channels
        self.features = nn.Sequential(*blocks)
        self._init_weights()

    def _init_weights(self) -> None:
        if next(self.parameters()).is_meta:  # to take a file's weights; init there imports torch._dynamo
            return
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dw_conv(self.conv1(x))
        x = self.features(x)
        x = self.bn(self.conv3(self.gdconv(self.conv2(x))))
        return x.flatten(1)


def mobilefacenet() -> MobileFaceNet:
    return MobileFaceNet()
