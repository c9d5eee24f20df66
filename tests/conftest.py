"""Shared fixtures: seeded randomness, a clean plugin manager, one trained Greedy Residuals owner."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from auditor.plugin_manager import reset_plugin_manager


@pytest.fixture(autouse=True)
def _seeded() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def fresh_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A plugin manager built anew for the test and forgotten after it."""
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Small models on a shared 2-core box train several times faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: The test HufuNet owner's HMAC key: fixed, so that its EPH positions (and every figure) repeat.
TEST_HMAC_KEY = hashlib.sha256(b"auditor tests: the HufuNet owner's key").digest()

GR_MESSAGE = "(c) 2025 Alice Example Labs: SmallCNN digits model"


@pytest.fixture(scope="session")
def gr_owner(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A Greedy Residuals owner, trained once per test run: the watermarked SmallCNN on
    digits, its files and its bundle. Tests must not modify ``model`` in place."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from auditor.bundle import load_bundle
    from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark
    from auditor.toolkit import data as datasets
    from auditor.toolkit import models as zoo
    from auditor.toolkit import training

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        out = tmp_path_factory.mktemp("gr_owner")
        key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))  # a fixed key: same bits every run
        data = datasets.digits(split_seed=0)
        model = zoo.build("cnn", seed=0)
        wm = GreedyResidualsWatermark.create(model, private_key=key, message=GR_MESSAGE)
        training.train(model, data.train, training.TrainConfig(epochs=8, lr=1e-2, seed=0), penalty=wm.penalty)
        model.eval()
        files = training.save_model(model, out, "model")
        wm.save_bundle(out / "owner_bundle.json", model, model_file=files["safetensors"], architecture="cnn")
        return SimpleNamespace(
            model=model, wm=wm, data=data, out=out, files=files, bundle=load_bundle(out / "owner_bundle.json"),
            accuracy=training.evaluate(model, data.test),
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def hufunet_owner(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A HufuNet owner, trained once per test run: the secret HufuNet (digits, seed 0), a
    width-2 SmallCNN host trained with EPH frozen, its files and its secret bundle."""
    from auditor.bundle import load_bundle
    from auditor.plugins.hufunet.embedder import embed_hufunet
    from auditor.plugins.hufunet.generate import generate_hufunet, load_hufunet
    from auditor.toolkit import data as datasets

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("hufunet_owner")
        secret = out / "hufunet_secret.json"
        generate_hufunet(out=secret, seed=0, hmac_key=TEST_HMAC_KEY)
        summary = embed_hufunet(hufunet=secret, out_dir=out / "owner", epochs=12, seed=0, device="cpu")
        net, payload = load_hufunet(secret)
        return SimpleNamespace(
            secret=secret, net=net, payload=payload, out=out / "owner", summary=summary,
            model_file=out / "owner" / "model.safetensors", pt_file=out / "owner" / "model.pt",
            bundle=load_bundle(out / "owner" / "owner_bundle.json"), data=datasets.digits(),
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def owner_factories(tmp_path: Path) -> dict[str, str]:
    """An owner's own model and data (``module:function`` options): a small MLP over 12 features and
    three separable classes, 60 training and 30 test examples."""
    (tmp_path / "mine.py").write_text(
        "import torch\nfrom torch import nn\nfrom torch.utils.data import TensorDataset\n"
        "def model():\n    return nn.Sequential(nn.Flatten(), nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 3))\n"
        "def data():\n    g = torch.Generator().manual_seed(0)\n"
        "    x = torch.randn(90, 12, generator=g); y = torch.arange(90) % 3; x[:, 0] += 3 * y\n"
        "    return TensorDataset(x[:60], y[:60]), TensorDataset(x[60:], y[60:])\n"
    )
    return {"model_factory": f"{tmp_path / 'mine.py'}:model", "data_factory": f"{tmp_path / 'mine.py'}:data"}
