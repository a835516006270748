"""Generated JPEG trees (train/scale/smoke.py) in the WebVision, ILSVRC12 and Clothing1M layouts, made
once per test session; small images (36-48 px) so the whole directory runs in a few minutes on 2 cores."""

from __future__ import annotations

import pytest

from drainage_fast._ext import cache_root
from tests.scale.support import SIZE
from train.scale.smoke import make_clothing1m_tree, make_ilsvrc12_tree, make_webvision_tree


@pytest.fixture(scope="session", autouse=True)
def list_check_cache(tmp_path_factory):
    """The list checks' cache (train/scale/validate.py default_cache_dir) in a session folder, for this
    process and the commands it starts, instead of the user's ~/.cache. The compiled CPU extension stays
    where it is (moving XDG_CACHE_HOME alone would rebuild it in every session: 15 s)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DRAINAGE_FAST_CACHE_DIR", str(cache_root()))
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
        yield


@pytest.fixture(scope="session")
def webvision_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("webvision")
    expected = make_webvision_tree(root, train_per_class=2, val_per_class=1, size=SIZE, seed=0)
    ilsvrc = make_ilsvrc12_tree(root / "imagenet", classes=52, per_class=1, size=SIZE, seed=1)
    return root, expected, ilsvrc


@pytest.fixture(scope="session")
def clothing_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("clothing1m")
    return root, make_clothing1m_tree(root, train_per_class=4, clean_per_class=2, size=SIZE)
