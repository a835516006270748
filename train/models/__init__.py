"""Model zoo: build_model(name, num_outputs, pretrained=None) -> nn.Module emitting (N, num_outputs) logits.

    digits_mlp   64 -> 256 -> 256 -> K MLP for the 8x8 digits (the default job; trains in seconds on a CPU)
    digits_cnn   two 3x3 conv layers + linear head, for the 8x8 digits
    cnn4         the paper's 4-layer CNN (2 conv + 2 fc; MNIST, 1 x 28 x 28)        ("toymodel4l")
    cnn8         the paper's 8-layer CNN (6 conv + 2 fc; CIFAR-10, 3 x 32 x 32)     ("toymodel8l")
    resnet34     CIFAR ResNet-34 (3x3 stem, no max-pool; CIFAR-100)
    resnet50     ImageNet ResNet-50, torchvision-compatible names (WebVision, Clothing1M)

cnn4, cnn8 and resnet34 use the initialisation of the authors' code (Kaiming-uniform fan-in convolutions,
Xavier-uniform linear layers); resnet50 uses torchvision's. Drainage models get num_outputs = C + 1.
"""

from __future__ import annotations

from torch import nn

from ..run_dirs import UserError
from .resnet import resnet34_cifar, resnet50

ALIASES = {"toymodel4l": "cnn4", "toymodel8l": "cnn8"}  # the authors' names


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]


def paper_init(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
    return model


def digits_mlp(num_outputs: int, width: int = 256) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, num_outputs),
    )


def digits_cnn(num_outputs: int) -> nn.Module:
    return nn.Sequential(
        *_conv_bn_relu(1, 32),
        *_conv_bn_relu(32, 64),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 128),
        nn.ReLU(),
        nn.Linear(128, num_outputs),
    )


def cnn4(num_outputs: int) -> nn.Module:
    """The paper's MNIST model: conv32-pool-conv64-pool-fc128-fc (28x28 -> 7x7)."""
    return paper_init(
        nn.Sequential(
            *_conv_bn_relu(1, 32),
            nn.MaxPool2d(2),
            *_conv_bn_relu(32, 64),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 128),
            nn.BatchNorm1d(128),
            nn.ReLU(),
            nn.Linear(128, num_outputs),
        )
    )


def cnn8(num_outputs: int) -> nn.Module:
    """The paper's CIFAR-10 model: (conv64 x2, pool, conv128 x2, pool, conv196 x2, pool), fc256, fc."""
    return paper_init(
        nn.Sequential(
            *_conv_bn_relu(3, 64),
            *_conv_bn_relu(64, 64),
            nn.MaxPool2d(2),
            *_conv_bn_relu(64, 128),
            *_conv_bn_relu(128, 128),
            nn.MaxPool2d(2),
            *_conv_bn_relu(128, 196),
            *_conv_bn_relu(196, 196),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(196 * 4 * 4, 256),
            nn.BatchNorm1d(256),
            nn.ReLU(),
            nn.Linear(256, num_outputs),
        )
    )


MODELS = {
    "digits_mlp": digits_mlp,
    "digits_cnn": digits_cnn,
    "cnn4": cnn4,
    "cnn8": cnn8,
    "resnet34": lambda k: paper_init(resnet34_cifar(k)),
    "resnet50": resnet50,
}


def canonical_model_name(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in MODELS:
        raise UserError(f"model={name}: unknown model; choose from {sorted(MODELS)}")
    return name


def build_model(name: str, num_outputs: int, pretrained: str | None = None) -> nn.Module:
    """The model `name` with num_outputs logits. pretrained ("IMAGENET1K_V1" / "IMAGENET1K_V2") is only
    for resnet50; asking it of another model, or an unknown name, raises UserError."""
    name = canonical_model_name(name)
    if pretrained:
        if name != "resnet50":
            raise UserError(
                f"pretrained={pretrained}: pretrained weights exist for resnet50 only, not {name!r}"
            )
        return resnet50(num_outputs, pretrained)
    return MODELS[name](num_outputs)
