"""ResNets without torchvision: the CIFAR ResNet-34 (3x3 stem, no max-pool) and the ImageNet ResNet-50.

Module and parameter names and shapes follow torchvision's resnet exactly (conv1, bn1, layer1.0.conv1,
layerN.0.downsample.0, fc, ...), so torchvision's ImageNet state_dicts load into resnet50() unchanged.
ResNet-50 is "v1.5": the stride of a down-sampling Bottleneck sits on its 3x3 convolution.
"""

from __future__ import annotations

import torch
from torch import nn

from ..run_dirs import UserError

# torchvision's ResNet50_Weights (same files, same hashes)
RESNET50_WEIGHTS = {
    "IMAGENET1K_V1": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "IMAGENET1K_V2": "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
}


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, width, stride), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv3x3(width, width), nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1, self.bn1 = _conv1x1(cin, width), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv3x3(width, width, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = _conv1x1(width, width * 4), nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """stem -> layer1..layer4 (widths 64, 128, 256, 512) -> global average pool -> fc.

    stem="imagenet": 7x7 stride-2 convolution + 3x3 stride-2 max-pool (224 px inputs);
    stem="cifar": 3x3 stride-1 convolution, no max-pool (32 px inputs).
    """

    def __init__(self, block, layers: list[int], num_outputs: int, stem: str = "imagenet"):
        super().__init__()
        self.cin = 64
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = _conv3x3(3, 64)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._layer(block, 64, layers[0], 1)
        self.layer2 = self._layer(block, 128, layers[1], 2)
        self.layer3 = self._layer(block, 256, layers[2], 2)
        self.layer4 = self._layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_outputs)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _layer(self, block, width: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.cin != width * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.cin, width * block.expansion, stride), nn.BatchNorm2d(width * block.expansion)
            )
        layers = [block(self.cin, width, stride, downsample)]
        self.cin = width * block.expansion
        layers += [block(self.cin, width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet34_cifar(num_outputs: int) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], num_outputs, stem="cifar")


def resnet50(num_outputs: int, pretrained: str | None = None) -> ResNet:
    """ImageNet ResNet-50; pretrained="IMAGENET1K_V1" / "IMAGENET1K_V2" loads torchvision's weights
    (downloaded once into torch.hub's cache) and then replaces fc with a fresh num_outputs head."""
    if not pretrained:
        return ResNet(Bottleneck, [3, 4, 6, 3], num_outputs)
    if pretrained not in RESNET50_WEIGHTS:
        raise UserError(f"pretrained must be one of {sorted(RESNET50_WEIGHTS)}, got {pretrained!r}")
    url = RESNET50_WEIGHTS[pretrained]
    model = ResNet(Bottleneck, [3, 4, 6, 3], 1000)
    try:
        state = torch.hub.load_state_dict_from_url(
            url, map_location="cpu", check_hash=True, weights_only=True
        )
    except OSError as exc:  # URLError, no network, a full disk
        cache = f"{torch.hub.get_dir()}/checkpoints/{url.rsplit('/', 1)[1]}"
        raise UserError(
            f"could not get the ImageNet ResNet-50 weights {pretrained} from {url} ({exc}). "
            f"Without internet, copy that file to {cache}, or train from scratch (pretrained: null)."
        ) from exc
    model.load_state_dict(state)
    model.fc = nn.Linear(model.fc.in_features, num_outputs)
    return model
