"""Models (torchvision-compatible ResNet-50 names and shapes, pretrained loading) and every shipped config."""

import json
import urllib.error
from pathlib import Path

import pytest
import torch

from train.config import CONFIG_DIR, Config, from_authors_json, load_config
from train.losses import build_loss, num_outputs
from train.models import build_model
from train.models.resnet import RESNET50_WEIGHTS, resnet50
from train.run_dirs import UserError

# torchvision.models.resnet50().state_dict(), recorded from torchvision (not importable next to the CPU
# torch wheel): 161 parameters + 159 BatchNorm buffers, 25,557,032 parameters for 1000 classes.
RESNET50_KEYS = {
    "conv1.weight": (64, 3, 7, 7),
    "bn1.running_var": (64,),
    "bn1.num_batches_tracked": (),
    "layer1.0.conv1.weight": (64, 64, 1, 1),
    "layer1.0.conv3.weight": (256, 64, 1, 1),
    "layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "layer1.0.downsample.1.running_mean": (256,),
    "layer2.0.conv2.weight": (128, 128, 3, 3),
    "layer2.0.downsample.0.weight": (512, 256, 1, 1),
    "layer3.5.bn3.weight": (1024,),
    "layer4.2.conv3.weight": (2048, 512, 1, 1),
    "fc.weight": (1000, 2048),
    "fc.bias": (1000,),
}


def test_resnet50_matches_torchvision_state_dict_layout():
    model = resnet50(1000)
    state = model.state_dict()
    assert len(state) == 320 and len(list(model.parameters())) == 161
    assert sum(p.numel() for p in model.parameters()) == 25_557_032
    for key, shape in RESNET50_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    assert model.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv1.stride == (1, 1)  # v1.5
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_resnet50_keys_equal_torchvision_when_available():
    torchvision = pytest.importorskip("torchvision", exc_type=ImportError)
    reference = torchvision.models.resnet50().state_dict()
    ours = resnet50(1000).state_dict()
    assert list(ours) == list(reference)
    assert all(ours[k].shape == reference[k].shape for k in ours)


def test_pretrained_loads_imagenet_weights_then_replaces_the_head(monkeypatch):
    source = resnet50(1000)
    asked = {}

    def fake_download(url, **kw):
        asked.update(url=url, **kw)
        return source.state_dict()

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    model = build_model("resnet50", 15, pretrained="IMAGENET1K_V2")
    assert asked["url"] == RESNET50_WEIGHTS["IMAGENET1K_V2"] and asked["weights_only"] and asked["check_hash"]
    assert torch.equal(model.layer3[2].conv2.weight, source.layer3[2].conv2.weight)
    assert model.fc.weight.shape == (15, 2048)


def test_pretrained_without_internet_says_what_to_do(monkeypatch):
    def offline(url, **kw):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError, match="resnet50-0676ba61.pth"):
        build_model("resnet50", 50, pretrained="IMAGENET1K_V1")
    with pytest.raises(ValueError, match="resnet50 only"):
        build_model("cnn8", 10, pretrained="IMAGENET1K_V1")


@pytest.mark.parametrize(
    "name, shape",
    [
        ("digits_mlp", (2, 1, 8, 8)),
        ("digits_cnn", (2, 1, 8, 8)),
        ("cnn4", (2, 1, 28, 28)),
        ("cnn8", (2, 3, 32, 32)),
        ("resnet34", (2, 3, 32, 32)),
        ("toymodel8l", (2, 3, 32, 32)),
    ],
)
def test_models_emit_num_outputs(name, shape):
    assert build_model(name, 11)(torch.randn(*shape)).shape == (2, 11)


CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
NUM_CLASSES = {
    "digits": 10,
    "mnist": 10,
    "cifar10": 10,
    "cifar100": 100,
    "cifar10n": 10,
    "cifar100n": 100,
    "webvision": 50,
    "clothing1m": 14,
}


def test_every_authors_experiment_has_a_config():
    authors = {
        f"{d}_{loss}"
        for d in ("cifar10", "cifar100")
        for loss in ("drainage", "anl_ce", "anl_fl", "ce", "gce", "nce_rce", "sce")
    }
    authors |= {
        "cifar10_nce_agce",
        "clothing1m_drainage",
        "clothing1m_nce_agce",
        "clothing1m_nce_rce",
        "clothing1m_sce",
    } | {f"webvision_{x}" for x in ("drainage", "anl_ce", "ce", "gce", "nce_agce", "nce_rce", "sce")}
    assert authors <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_builds_its_model_and_loss(name, monkeypatch):
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kw: resnet50(1000).state_dict())
    cfg = load_config(name)
    C = NUM_CLASSES[cfg.dataset]
    K = num_outputs(cfg.loss, C)
    model = build_model(cfg.model, K, cfg.pretrained)
    loss = build_loss(cfg.loss, C, **cfg.loss_params)
    logits = torch.randn(4, K, requires_grad=True)
    loss(logits, torch.randint(0, C, (4,))).backward()
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert last.out_features == K and torch.isfinite(logits.grad).all()


def test_paper_hyper_parameters_survive():
    """The presets table of docs/design.md, "Datasets and noise"."""
    c10, c100 = load_config("cifar10_drainage"), load_config("cifar100_drainage")
    wv, cl = load_config("webvision_drainage"), load_config("clothing1m_drainage")
    assert (c10.model, c10.loss_params, c10.l1_delta, c10.lr, c10.epochs, c10.batch_size) == (
        "cnn8",
        {"alpha": 1},
        2e-4,
        0.01,
        120,
        128,
    )
    assert (c100.model, c100.loss_params["alpha"], c100.l1_delta, c100.lr, c100.epochs) == (
        "resnet34",
        0.1,
        1e-4,
        0.01,
        200,
    )
    assert (
        wv.lr,
        wv.nesterov,
        wv.scheduler,
        wv.gamma,
        wv.step_size,
        wv.epochs,
        wv.batch_size,
        wv.l1_delta,
    ) == (0.4, True, "step", 0.97, 1, 250, 512, 1e-5)
    assert (
        cl.pretrained,
        cl.loss_params["alpha"],
        cl.l1_delta,
        cl.lr,
        cl.weight_decay,
        cl.epochs,
        cl.batch_size,
    ) == ("IMAGENET1K_V2", 0.01, 0, 1e-4, 1e-3, 15, 32)
    assert all(load_config(n).grad_clip == 5.0 for n in CONFIGS)


def test_authors_json_and_name_load(tmp_path):
    authors = {
        "model": {"name": "toymodel8l"},
        "loss": {
            "name": "alpha_dl",
            "alpha": 1,
            "delta": 2e-4,
            "drainage_idx": 10,
            "pass_model_to_loss": True,
        },
        "dataset": {"name": "cifar10", "num_classes": 10, "train_batchsize": 128, "test_batchsize": 256},
        "optim": {
            "total_epoch": 120,
            "optimizer": "sgd",
            "learning_rate": 0.01,
            "momentum": 0.9,
            "weight_decay": 0,
            "grad_bound": 5.0,
            "scheduler": "cosine",
            "T_max": 120,
            "eta_min": 0,
        },
    }
    path = tmp_path / "cifar10_alpha_dl.json"
    path.write_text(json.dumps(authors))
    ours = load_config("cifar10_alpha_dl")  # the authors' name resolves to our preset
    theirs = load_config(str(path))
    for field in (
        "model",
        "loss",
        "loss_params",
        "l1_delta",
        "lr",
        "epochs",
        "batch_size",
        "scheduler",
        "grad_clip",
    ):
        assert getattr(theirs, field) == getattr(ours, field), field
    assert from_authors_json(authors)["loss_params"] == {"alpha": 1}


def test_overrides_and_validation():
    cfg = load_config("digits", ["noise_rate=0.2", "loss_params.alpha=0.5", "name=x", "pretrained=null"])
    assert cfg.noise_rate == 0.2 and cfg.loss_params["alpha"] == 0.5
    assert cfg.name == "x" and cfg.pretrained is None
    with pytest.raises(ValueError, match="unknown config key 'lrr'"):
        load_config("digits", ["lrr=0.1"])
    with pytest.raises(ValueError, match="noise_type"):
        load_config("digits", {"noise_type": "symmetric"})
    with pytest.raises(ValueError, match="unknown \\['q'\\]"):
        load_config("digits", {"loss_params.q": 0.7})
    with pytest.raises(UserError, match="cifar10_drainage"):
        load_config("cifar10_dranage")
    assert Config().validate().loss == "drainage"


def test_config_files_have_only_known_keys():
    for path in Path(CONFIG_DIR).glob("*.json"):
        assert set(json.loads(path.read_text())) <= set(Config.__dataclass_fields__), path.name


# The official code (https://github.com/ZKI-PH-ImageAnalysis/Drainage, commit 3359c4b): trainer.py trains
# without autocast (fp32); utils.py get_model builds resnet50(weights=ResNet50_Weights.IMAGENET1K_V2) for
# every dataset but WebVision; loss.py detaches the focal weight. Its config/clothing1m_alpha_dl.json:
OFFICIAL_CLOTHING1M = {
    "model": {"name": "resnet50"},
    "loss": {"name": "alpha_dl", "alpha": 0.01, "delta": 0, "drainage_idx": 14, "pass_model_to_loss": True},
    "dataset": {
        "name": "clothing1m",
        "data_path": "Clothing1M/",
        "num_classes": 14,
        "num_classes_model": 15,
        "train_batchsize": 32,
        "test_batchsize": 1024,
        "num_workers": 8,
    },
    "optim": {
        "total_epoch": 15,
        "optimizer": "sgd",
        "learning_rate": 0.0001,
        "momentum": 0.9,
        "weight_decay": 1e-3,
        "nesterov": False,
        "grad_bound": 5.0,
        "scheduler": "steplr",
        "step_size": 10,
        "gamma": 0.1,
    },
}
PAPER_PRESETS = [
    n
    for n in CONFIGS
    if json.loads((CONFIG_DIR / f"{n}.json").read_text())
    .get("description", "")
    .startswith("The Drainage authors'")
]


def test_paper_presets_train_in_fp32_and_bf16_is_opt_in():
    assert len(PAPER_PRESETS) == 8 + 7 + 7 + 4  # cifar10, cifar100, webvision, clothing1m
    assert Config().amp is False
    for name in PAPER_PRESETS:
        assert load_config(name).amp is False, name
        assert load_config(name, ["amp=true"]).amp is True, name


def test_authors_json_trains_clothing1m_like_the_official_code(tmp_path):
    flat = from_authors_json(OFFICIAL_CLOTHING1M)
    assert (flat["pretrained"], flat["amp"], flat["model"], flat["dataset"]) == (
        "IMAGENET1K_V2",
        False,
        "resnet50",
        "clothing1m",
    )
    path = tmp_path / "clothing1m_alpha_dl.json"
    path.write_text(json.dumps(OFFICIAL_CLOTHING1M))
    theirs, ours = load_config(str(path)), load_config("clothing1m_drainage")
    for field in (
        "model",
        "pretrained",
        "amp",
        "loss",
        "loss_params",
        "l1_delta",
        "lr",
        "weight_decay",
        "epochs",
        "batch_size",
        "scheduler",
        "step_size",
        "gamma",
        "grad_clip",
    ):
        assert getattr(theirs, field) == getattr(ours, field), field
    clothing = [n for n in PAPER_PRESETS if n.startswith("clothing1m")]
    assert all(load_config(n).pretrained == "IMAGENET1K_V2" for n in clothing)


def test_authors_json_keeps_webvision_from_scratch():
    webvision = {**OFFICIAL_CLOTHING1M, "dataset": {"name": "webvision", "train_batchsize": 512}}
    assert "pretrained" not in from_authors_json(webvision)
    assert all(load_config(n).pretrained is None for n in PAPER_PRESETS if n.startswith("webvision"))


def test_authors_presets_detach_the_focal_weight():
    for name in PAPER_PRESETS:
        cfg = load_config(name)
        if cfg.loss in ("fl", "nfl", "nnfl", "anl_fl", "nfl_rce", "nfl_mae"):
            assert cfg.loss_params["detach_focal_weight"] is True, name
    assert (
        load_config("cifar10_anl_fl", ["loss_params.detach_focal_weight=false"]).loss_params[
            "detach_focal_weight"
        ]
        is False
    )
