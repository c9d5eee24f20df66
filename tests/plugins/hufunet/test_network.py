"""HufuNet network, EPH/SPH split, reassembly, and the owner's secret HufuNet file."""

from __future__ import annotations

import base64
import json
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import typer

from auditor.bundle import load_bundle, save_bundle
from auditor.errors import InputError, UsageError
from auditor.plugins.hufunet import generate as gen
from auditor.plugins.hufunet.network import (
    DIGITS_WIDTHS,
    PAPER_WIDTHS,
    HufuNet,
    accuracy,
    assemble,
    eph_count,
    eph_of,
    sph_of,
)
from auditor.plugins.hufunet.placement import eph_kernels
from auditor.toolkit import data as datasets


@pytest.mark.parametrize(("side", "channels"), [(8, 1), (28, 1), (28, 3)])
def test_shapes_for_8x8_and_28x28(side: int, channels: int) -> None:
    net = HufuNet(in_channels=channels)
    assert net(torch.zeros(2, channels, side, side)).shape == (2, 10)
    assert [c.weight.shape[:2] for c in net.conv_layers()] == [
        (4, channels), (8, 4), (16, 8), (16, 16), (8, 16)
    ]  # fmt: skip
    assert all(c.bias is None and c.kernel_size == (3, 3) and c.padding == (1, 1) for c in net.conv_layers())
    assert net.fc.weight.shape == (10, 8) and net.fc.bias is not None


def test_default_and_paper_widths() -> None:
    assert DIGITS_WIDTHS == (4, 8, 16, 16, 8)
    assert eph_count(DIGITS_WIDTHS) == 548
    assert eph_count(PAPER_WIDTHS, 3) == 3 * 32 + 32 * 64 + 64 * 128 + 128 * 128 + 128 * 64
    paper = HufuNet(PAPER_WIDTHS, in_channels=3)
    assert paper(torch.zeros(1, 3, 28, 28)).shape == (1, 10)
    assert eph_kernels(eph_of(paper)).shape == (eph_count(PAPER_WIDTHS, 3), 3, 3)


@pytest.mark.parametrize("widths", [(4, 8, 16), (4, 8, 16, 16, 0), (4, 8, 16, 16, 5000)])
def test_bad_widths_are_refused(widths: tuple[int, ...]) -> None:
    with pytest.raises(UsageError, match="five convolution widths"):
        HufuNet(widths)


def test_eph_sph_split_and_assemble_round_trip() -> None:
    net = HufuNet()
    eph, sph = eph_of(net), sph_of(net)
    names = {name for name, _ in net.named_parameters()}
    assert names == {f"convs.{i}.weight" for i in range(5)} | {"fc.weight", "fc.bias"}
    assert sum(w.numel() for w in eph) == 9 * 548 and set(sph) == {"weight", "bias"}
    kernels = eph_kernels(eph)
    rebuilt = assemble(kernels, sph, DIGITS_WIDTHS, 1)
    x = torch.rand(16, 1, 8, 8)
    assert torch.equal(rebuilt(x), net(x))
    with pytest.raises(UsageError, match=r"needs 548 EPH kernels of 3x3, got a tensor of shape \(547, 3, 3\)"):
        assemble(kernels[:-1], sph, DIGITS_WIDTHS, 1)
    with pytest.raises(UsageError, match="the SPH has shapes"):
        assemble(kernels, {"weight": torch.zeros(10, 9), "bias": torch.zeros(10)}, DIGITS_WIDTHS, 1)


def test_kernel_dropout_acts_only_in_training() -> None:
    torch.manual_seed(0)
    plain = HufuNet()
    dropping = HufuNet(kernel_dropout=0.5)
    dropping.load_state_dict(plain.state_dict())
    x = torch.rand(8, 1, 8, 8)
    plain.eval()
    dropping.eval()
    assert torch.equal(dropping(x), plain(x))
    dropping.train()
    first, second = dropping(x), dropping(x)
    assert not torch.allclose(first, second) and not torch.allclose(first, plain(x))
    for bad in (-0.1, 1.0):
        with pytest.raises(UsageError, match="kernel dropout"):
            HufuNet(kernel_dropout=bad)


def _zeroed_kernel_accuracies(net: HufuNet, fraction: float, seeds: int = 5) -> list[float]:
    """Accuracies of ``net`` with a random ``fraction`` of every convolution's kernels zeroed."""
    state = {k: v.clone() for k, v in net.state_dict().items()}
    out = []
    for seed in range(seeds):
        gen_ = torch.Generator().manual_seed(seed)
        damaged = {
            k: v * (torch.rand(v.shape[:2], generator=gen_) >= fraction)[..., None, None]
            if k.startswith("convs")
            else v
            for k, v in state.items()
        }
        net.load_state_dict(damaged)
        out.append(accuracy(net, datasets.digits()))
    net.load_state_dict(state)
    return out


def test_kernel_dropout_makes_the_network_tolerate_lost_kernels(
    owner: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """A tenth of the kernels zeroed (what a 5% channel cut-off of the host costs EPH, padded
    back as zeros) keeps the default network within the detector's tau of its accuracy; the same
    network trained without kernel dropout is not."""
    from auditor.plugins.hufunet.detector import TAU_ACC

    net, payload = gen.load_hufunet(owner[0])
    assert payload["training"]["kernel_dropout"] == gen.DEFAULTS["kernel_dropout"] > 0
    robust = _zeroed_kernel_accuracies(net, 0.1)
    assert min(robust) >= payload["acc_original"] - TAU_ACC, robust
    gen.generate_hufunet(out=tmp_path / "plain.json", kernel_dropout=0.0)
    plain_net, plain = gen.load_hufunet(tmp_path / "plain.json")
    fragile = _zeroed_kernel_accuracies(plain_net, 0.1)
    assert plain["training"]["kernel_dropout"] == 0.0
    assert min(fragile) < plain["acc_original"] - TAU_ACC and sorted(fragile)[2] < sorted(robust)[2], (fragile, robust)


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Iterator[tuple[Path, dict[str, Any]]]:
    path = tmp_path_factory.mktemp("hufunet") / "hufunet.secret.json"
    yield path, gen.generate_hufunet(out=path)


def test_generate_on_digits_writes_a_secret_file(owner: tuple[Path, dict[str, Any]]) -> None:
    path, summary = owner
    assert summary["accuracy"] >= 0.95
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    bundle = load_bundle(path)
    assert bundle.scheme == "hufunet-secret" and bundle.secret
    p = bundle.payload
    assert p["widths"] == [4, 8, 16, 16, 8] and p["in_channels"] == 1 and p["num_classes"] == 10
    assert p["dataset"]["name"] == "digits" and p["dataset"]["split_seed"] == 0
    assert p["dataset"]["test_sha256"] == datasets.digits().test_sha256 and p["dataset"]["test_size"] == 359
    assert len(gen.hmac_key(p)) == 32
    assert "hmac_key" not in json.dumps(summary) and p["hmac_key"] not in json.dumps(summary)


def test_load_hufunet_round_trips_weights_and_accuracy(owner: tuple[Path, dict[str, Any]]) -> None:
    path, summary = owner
    net, payload = gen.load_hufunet(path)
    assert accuracy(net, datasets.digits()) == payload["acc_original"] == summary["accuracy"]
    # rebuilding from the flat EPH kernels (what the detector does) gives the same network
    rebuilt = assemble(eph_kernels(eph_of(net)), sph_of(net), payload["widths"], payload["in_channels"])
    x = datasets.digits().test.tensors[0]
    assert torch.equal(rebuilt(x), net(x))
    raw = base64.b64decode(payload["eph"]["data"])
    assert raw == b"".join(w.numpy().astype("<f4").tobytes() for w in eph_of(net))


def test_cli_generate_prints_no_key_and_draws_a_fresh_key(
    tmp_path: Path, owner: tuple[Path, dict[str, Any]], one_thread: None, run_cli: Callable[..., Any]
) -> None:
    app = typer.Typer()
    gen.register_commands(app)
    gen.register_commands(app)  # twice in one process: added once
    assert len(app.registered_groups) == 1
    out = tmp_path / "second.json"
    result = run_cli("hufunet", "generate", "--out", str(out), "--no-progress")
    output = result.stdout + result.stderr
    assert result.code == 0, output
    assert "test accuracy:" in output and "SECRET" in output and str(out) in output
    first, second = load_bundle(owner[0]).payload, load_bundle(out).payload
    key = gen.hmac_key(second)
    for shown in (second["hmac_key"], key.hex(), base64.b64encode(key).decode()):
        assert shown not in output
    # same seed, same network; a different key (drawn from the OS, not the seed)
    assert second["eph"] == first["eph"] and second["sph"] == first["sph"]
    assert gen.hmac_key(first) != key
    refused = run_cli("hufunet", "generate", "--out", str(out), "--no-progress")
    assert refused.code != 0 and "already exists" in refused.stderr


def test_digits_below_the_bar_is_refused(tmp_path: Path, one_thread: None) -> None:
    out = tmp_path / "weak.json"
    with pytest.raises(UsageError, match=r"reached \d+\.\d\d% on the digits test split, below the required 95%"):
        gen.generate_hufunet(out=out, epochs=1, lr=1e-5)
    assert not out.exists()


def test_bad_options(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown HufuNet data set 'cifar'"):
        gen.generate_hufunet(out=tmp_path / "x.json", dataset="cifar")
    with pytest.raises(UsageError, match="fashion-mnist needs the folder"):
        gen.generate_hufunet(out=tmp_path / "x.json", dataset="fashion-mnist")
    with pytest.raises(UsageError, match="--width must be five comma-separated integers"):
        gen.parse_widths("4,8,x")
    assert gen.parse_widths("32,64,128,128,64") == PAPER_WIDTHS


def _tampered(path: Path, tmp_path: Path, change: Any, scheme: str = "hufunet-secret") -> Path:
    payload = json.loads(json.dumps(load_bundle(path).payload))
    change(payload)
    target = tmp_path / "tampered.json"
    save_bundle(target, scheme=scheme, payload=payload, secret=True)
    return target


def _set(path: list[str], value: Any) -> Any:
    def change(p: dict[str, Any]) -> None:
        for name in path[:-1]:
            p = p[name]
        p[path[-1]] = value

    return change


def _shapes(widths: list[int]) -> list[list[int]]:
    chans = [1, *widths]
    return [[chans[i + 1], chans[i], 3, 3] for i in range(5)]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set(["widths"], [4, 8, 16]), "HufuNet needs five convolution widths between 1 and 4096, not [4, 8, 16]"),
        (_set(["widths"], [4, 8, 16, 16, 9]), "the EPH shapes"),
        (_set(["eph", "data"], "AAAA"), "the EPH data holds 3 bytes, the shapes need 19,728"),
        (_set(["eph", "data"], "not base64!"), "the EPH data is not valid base64"),
        (_set(["sph", "bias"], base64.b64encode(b"\x00\x00\xc0\x7f" * 10).decode()), "the SPH bias holds a NaN"),
        (_set(["sph", "weight_shape"], [10, 9]), "the SPH shapes do not fit the network"),
        (_set(["hmac_key"], base64.b64encode(b"k" * 16).decode()), '"hmac_key" must be 32 bytes, not 16'),
        (_set(["acc_original"], 1.5), '"acc_original" must be a number between 0 and 1'),
        (lambda p: p.pop("sph"), 'lacks the field "sph"'),
        (_set(["in_channels"], 0), "HufuNet input channels must be between 1 and 16, not 0"),
        (
            lambda p: p.update(widths=[4096] * 5, eph={"shapes": _shapes([4096] * 5), "data": "AAAA"}),
            "the EPH data holds 3 bytes, the shapes need 2,416,066,560",
        ),
    ],
)
def test_load_hufunet_refuses_damaged_files(
    owner: tuple[Path, dict[str, Any]], tmp_path: Path, change: Any, message: str
) -> None:
    target = _tampered(owner[0], tmp_path, change)
    with pytest.raises(InputError) as info:
        gen.load_hufunet(target)
    assert str(info.value).startswith(f"{target}: ") and message in str(info.value)
    key = load_bundle(owner[0]).payload["hmac_key"]
    assert key not in str(info.value)


def test_load_hufunet_refuses_another_scheme(owner: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    target = _tampered(owner[0], tmp_path, lambda p: None, scheme="greedy-residuals")
    with pytest.raises(InputError, match="not a secret HufuNet file: its scheme is 'greedy-residuals'"):
        gen.load_hufunet(target)
