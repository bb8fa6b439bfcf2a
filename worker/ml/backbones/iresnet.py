"""MagFace's improved ResNets (iResNet18/34/50/100), with module names matching MagFace checkpoints.

Every BatchNorm uses eps 2e-5 and momentum 0.9 as MagFace builds them. In PyTorch that momentum lets one batch
replace 90% of the running statistics, which is why fine-tuning keeps BatchNorm in eval mode.
"""

from __future__ import annotations

from torch import Tensor, nn

BN_EPS = 2e-5
BN_MOMENTUM = 0.9
EMBEDDING_SIZE = 512
STAGE_WIDTHS = (64, 128, 256, 512)
BLOCKS_PER_STAGE: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}
_FINAL_SIZE = 7  # 112 halved by each of the four stages


def _batch_norm2d(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation style block: BN, conv, BN, PReLU, strided conv, BN, plus the shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.bn1 = _batch_norm2d(in_channels)
        self.conv1 = _conv3x3(in_channels, channels)
        self.bn2 = _batch_norm2d(channels)
        self.prelu = nn.PReLU(channels)
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn3 = _batch_norm2d(channels)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """Maps a 3×112×112 face crop (BGR, [0, 1]) to a 512-d embedding whose norm is MagFace's quality score."""

    def __init__(self, blocks_per_stage: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.conv1 = _conv3x3(3, STAGE_WIDTHS[0])
        self.bn1 = _batch_norm2d(STAGE_WIDTHS[0])
        self.prelu = nn.PReLU(STAGE_WIDTHS[0])
        in_channels = STAGE_WIDTHS[0]
        stages = []
        for width, blocks in zip(STAGE_WIDTHS, blocks_per_stage, strict=True):
            stages.append(self._make_stage(in_channels, width, blocks))
            in_channels = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn2 = _batch_norm2d(in_channels)
        self.dropout = nn.Dropout(p=0.4)
        self.fc = nn.Linear(in_channels * _FINAL_SIZE * _FINAL_SIZE, EMBEDDING_SIZE)
        self.features = nn.BatchNorm1d(EMBEDDING_SIZE, eps=BN_EPS, momentum=BN_MOMENTUM)
        self._init_weights()

    @staticmethod
    def _make_stage(in_channels: int, channels: int, blocks: int) -> nn.Sequential:
        # Every stage halves the resolution, so its first block always needs a projected shortcut.
        downsample = nn.Sequential(
            nn.Conv2d(in_channels, channels, kernel_size=1, stride=2, bias=False),
            _batch_norm2d(channels),
        )
        layers = [IBasicBlock(in_channels, channels, stride=2, downsample=downsample)]
        layers += [IBasicBlock(channels, channels, stride=1, downsample=None) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        if next(self.parameters()).is_meta:  # to take a file's weights; init there imports torch._dynamo
            return
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn2(x))
        return self.features(self.fc(x.flatten(1)))


def iresnet18() -> IResNet:
    return IResNet(BLOCKS_PER_STAGE["iresnet18"])


def iresnet34() -> IResNet:
    return IResNet(BLOCKS_PER_STAGE["iresnet34"])


def iresnet50() -> IResNet:
    return IResNet(BLOCKS_PER_STAGE["iresnet50"])


def iresnet100() -> IResNet:
    return IResNet(BLOCKS_PER_STAGE["iresnet100"])
