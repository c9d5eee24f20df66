"""The embedders' shared helpers: built-in architectures, digits splits, factories, training, saving."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset

from auditor.errors import InputError, UsageError
from auditor.toolkit import data as datasets
from auditor.toolkit import models as zoo
from auditor.toolkit import training


@pytest.fixture(scope="module")
def data() -> datasets.Dataset:
    return datasets.digits()


# ----------------------------------------------------------------------------- architectures


@pytest.mark.parametrize("name", sorted(zoo.ARCHITECTURES))
def test_architectures_build_and_run(name: str) -> None:
    model = zoo.build(name, seed=0)
    logits = model(torch.rand(5, 1, 8, 8))
    assert logits.shape == (5, 10)
    other = zoo.build(name, num_classes=3, in_channels=2)
    assert other(torch.rand(2, 2, 8, 8)).shape == (2, 3)


@pytest.mark.parametrize("name", sorted(zoo.ARCHITECTURES))
def test_build_is_seeded(name: str) -> None:
    a, b = zoo.build(name, seed=3).state_dict(), zoo.build(name, seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cnn_and_resnet_take_other_image_sizes() -> None:
    assert zoo.build("cnn", in_channels=3)(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert zoo.build("resnet", in_channels=3)(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert zoo.build("lstm", in_channels=3, row_width=32)(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def test_every_body_layer_holds_a_signature() -> None:
    """The layers an embedder would mark hold thousands of weights, not a handful repeated."""
    from auditor.plugins.greedy_residuals.owner import default_layers

    for name in zoo.ARCHITECTURES:
        model = zoo.build(name)
        for layer in default_layers(model):
            assert model.get_parameter(layer).numel() >= 4096, (name, layer)


def test_unknown_architecture_lists_the_known_ones() -> None:
    with pytest.raises(UsageError, match=r"unknown architecture 'vgg'; known: cnn, lstm, resnet"):
        zoo.build("vgg")


# ----------------------------------------------------------------------------- data


def test_digits_split_is_fixed(data: datasets.Dataset) -> None:
    x, y = data.test.tensors
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8) and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert len(data.train) + len(data.test) == 1797 and len(data.test) == 359
    assert (data.num_classes, data.input_shape, data.split_seed) == (10, (1, 8, 8), 0)
    assert datasets.digits().test_sha256 == data.test_sha256
    assert datasets.digits(split_seed=1).test_sha256 != data.test_sha256
    assert data.test_sha256 == datasets.tensors_sha256(data.test)
    # stratified: every class is within one example of its share
    counts = torch.bincount(y, minlength=10).float()
    assert float(counts.max() - counts.min()) <= 3


def test_digits_rejects_bad_fraction() -> None:
    with pytest.raises(UsageError, match="test fraction"):
        datasets.digits(test_fraction=1.5)


def test_split_is_seeded_disjoint_and_stratified(data: datasets.Dataset) -> None:
    a, rest = datasets.split(data.train, 0.5, seed=7)
    again, _ = datasets.split(data, 0.5, seed=7)  # a Dataset is cut from its training split
    other, _ = datasets.split(data.train, 0.5, seed=8)
    assert len(a) + len(rest) == len(data.train)
    assert abs(len(a) - len(data.train) / 2) <= 1
    assert torch.equal(a.tensors[0], again.tensors[0])
    assert not torch.equal(a.tensors[0], other.tensors[0])
    labels = torch.bincount(a.tensors[1], minlength=10)
    assert int(labels.min()) >= 60
    with pytest.raises(UsageError):
        datasets.split(data.train, 0.0, seed=0)


def test_load_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "owner_code.py").write_text(
        "def make():\n    return 42\n\nclass Box:\n    def build():\n        return 7\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "owner_code", raising=False)
    assert datasets.load_factory("owner_code:make")() == 42
    assert datasets.load_factory("owner_code:Box.build")() == 7
    assert datasets.load_factory(f"{tmp_path / 'owner_code.py'}:make")() == 42


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "factory 'no_colon' is not of the form module:function"),
        ("mod:", "factory 'mod:' is not of the form module:function"),
        (":fn", "factory ':fn' is not of the form module:function"),
        ("no_such_module_xyz:make", "factory 'no_such_module_xyz:make': cannot import module 'no_such_module_xyz'"),
        ("json:no_such_function", "factory 'json:no_such_function': module 'json' has no attribute 'no_such_function'"),
        ("json:__doc__", "factory 'json:__doc__': '__doc__' is not callable"),
        ("missing_file.py:make", "factory 'missing_file.py:make': no such file missing_file.py"),
    ],
)
def test_load_factory_errors(spec: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        datasets.load_factory(spec)
    assert str(info.value).startswith(message)


def test_load_factory_module_that_fails(tmp_path: Path) -> None:
    bad = tmp_path / "broken.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(UsageError, match=r"importing .*broken.py' failed: RuntimeError: boom"):
        datasets.load_factory(f"{bad}:make")


def test_load_factory_checks_the_module_file_before_python_reads_it(
    tmp_path: Path, special_files: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    piped = tmp_path / "piped.py"
    os.mkfifo(piped)
    with pytest.raises(InputError) as info:
        datasets.load_factory(f"{piped}:make")
    assert str(info.value) == f"{piped}: is a named pipe (FIFO), not a regular file: auditor reads only regular files"
    big = tmp_path / "big.py"
    with big.open("wb") as fh:  # sparse: refused from its size, never read
        fh.truncate(datasets.MAX_FACTORY_BYTES + 1)
    with pytest.raises(InputError, match="too large for a factory's module"):
        datasets.load_factory(f"{big}:make")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    with pytest.raises(InputError, match="too large for a factory's module"):
        datasets.load_factory("big:make")


def test_factory_results(data: datasets.Dataset) -> None:
    assert datasets.from_factory_result(data, name="x") is data
    ds = datasets.from_factory_result((data.train, data.test), name="mine:data")
    assert (ds.name, ds.num_classes, ds.input_shape, ds.split_seed) == ("mine:data", 10, (1, 8, 8), None)
    assert ds.test_sha256 == data.test_sha256
    with pytest.raises(UsageError, match="must return"):
        datasets.from_factory_result([1, 2, 3], name="f")
    floats = TensorDataset(torch.zeros(4, 2), torch.zeros(4))
    with pytest.raises(UsageError, match="labels must be a 1-d integer tensor"):
        datasets.from_factory_result((floats, floats), name="f")


# ----------------------------------------------------------------------------- training


def test_resolve_device() -> None:
    assert training.resolve_device("cpu") == torch.device("cpu")
    assert training.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError, match="bad device 'tpu'"):
        training.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            training.resolve_device("cuda:0")


def test_train_config_checks() -> None:
    with pytest.raises(UsageError, match="unknown optimizer 'lbfgs'"):
        training.TrainConfig(optimizer="lbfgs")
    with pytest.raises(UsageError):
        training.TrainConfig(lr=0)
    with pytest.raises(UsageError, match="unknown learning-rate schedule 'step'"):
        training.TrainConfig(schedule="step")


def test_cosine_schedule_anneals_the_learning_rate(data: datasets.Dataset, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[float] = []
    step = torch.optim.Adam.step

    def recording_step(self: torch.optim.Adam, *args: object, **kwargs: object) -> object:
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    small = TensorDataset(data.train.tensors[0][:256], data.train.tensors[1][:256])
    config = training.TrainConfig(epochs=2, batch_size=64, lr=0.1, schedule="cosine")
    training.train(zoo.build("cnn", seed=0), small, config)
    assert len(seen) == 8 and seen[0] == pytest.approx(0.1)
    assert seen == sorted(seen, reverse=True) and seen[-1] < 0.01  # half a cosine period down to ~0


def _small(data: datasets.Dataset) -> TensorDataset:
    return TensorDataset(data.train.tensors[0][:300], data.train.tensors[1][:300])


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "adamw"])
def test_train_is_deterministic(data: datasets.Dataset, optimizer: str) -> None:
    config = training.TrainConfig(epochs=2, batch_size=32, lr=1e-2, optimizer=optimizer, seed=5)

    def run(seed: int) -> dict[str, torch.Tensor]:
        model = zoo.build("cnn", seed=0)
        training.train(model, _small(data), training.TrainConfig(**{**config.__dict__, "seed": seed}))
        return model.state_dict()

    a, b, c = run(5), run(5), run(6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_train_adds_penalty_and_calls_after_step(data: datasets.Dataset) -> None:
    model = zoo.build("cnn", seed=0)
    calls: list[int] = []
    config = training.TrainConfig(epochs=2, batch_size=100, seed=0)
    result = training.train(
        model,
        _small(data),
        config,
        penalty=lambda m: m.get_parameter("conv3.weight").abs().sum() * 0,
        after_step=lambda m: calls.append(1),
    )
    assert result.steps == len(calls) == 6
    assert len(result.losses) == len(result.penalties) == 2
    assert result.penalties == [0.0, 0.0] and result.losses[1] < result.losses[0]


def test_train_accepts_any_dataset(data: datasets.Dataset) -> None:
    class Plain(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
        def __len__(self) -> int:
            return 64

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return data.train.tensors[0][i], data.train.tensors[1][i]

    result = training.train(zoo.build("lstm"), Plain(), training.TrainConfig(epochs=1, batch_size=32))
    assert result.steps == 2


def test_evaluate_keeps_the_mode(data: datasets.Dataset) -> None:
    model = zoo.build("cnn", seed=0)
    model.train()
    acc = training.evaluate(model, data.test, "cpu")
    assert 0.0 <= acc <= 0.3  # untrained: about chance
    assert model.training


def test_save_model(tmp_path: Path) -> None:
    model = zoo.build("resnet", seed=0)
    paths = training.save_model(model, tmp_path / "out")
    assert paths == {"safetensors": tmp_path / "out/model.safetensors", "pt": tmp_path / "out/model.pt"}
    expected = model.state_dict()
    for loaded in (load_file(paths["safetensors"]), torch.load(paths["pt"], weights_only=True)):
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.pt", "model.safetensors"]
    modes = {p.stat().st_mode & 0o777 for p in paths.values()}
    assert modes == {0o666 & ~_umask()}  # an ordinary new file, not mkstemp's or safetensors' 0600
    with pytest.raises(UsageError, match="already exists"):
        training.save_model(model, tmp_path / "out")
    training.save_model(nn.Linear(3, 2), tmp_path / "out", overwrite=True)
    assert set(load_file(paths["safetensors"])) == {"weight", "bias"}


def test_save_model_writes_the_same_bytes_for_the_same_weights(tmp_path: Path) -> None:
    # torch.save named its records after the temporary file's random name: every .pt had another SHA-256,
    # and so had every owner bundle recording one (the shipped calibrations could not be reproduced).
    model = zoo.build("cnn", seed=0)
    first, second = training.save_model(model, tmp_path / "a"), training.save_model(model, tmp_path / "b", stem="x")
    assert first["pt"].read_bytes() == second["pt"].read_bytes()
    assert first["safetensors"].read_bytes() == second["safetensors"].read_bytes()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_save_model_breaks_tied_weights(tmp_path: Path) -> None:
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    paths = training.save_model(nn.Sequential(first, second), tmp_path, stem="tied")
    assert paths["safetensors"].name == "tied.safetensors"
    assert torch.equal(load_file(paths["safetensors"])["1.weight"], first.weight.detach())
