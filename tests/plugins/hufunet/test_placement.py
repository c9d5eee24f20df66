"""HufuNet keyed placement (paper Algorithm 1): messages, positions, probing, host views."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import numpy as np
import pytest
import torch

from auditor.errors import UsageError
from auditor.graph import Layer, LayerGraph, LayerKind, TensorRef
from auditor.plugins.hufunet import placement
from auditor.plugins.hufunet.placement import (
    HostSlot,
    HostView,
    embed,
    eph_kernels,
    host_kernel_count,
    host_refs,
    kernel_message,
    place,
    position,
    retrieve,
)

KEY = bytes(range(32))


def golden_eph() -> torch.Tensor:
    # exact in float32: multiples of 1/64
    return ((torch.arange(360, dtype=torch.float32) - 180) / 64).reshape(40, 3, 3)


# These positions must never change: owners' bundles store the EPH and key, not
# the positions, so a changed list means every bundle made before no longer verifies.
GOLDEN_POSITIONS = [
    342, 385, 628, 605, 102, 623, 164, 71, 816, 565, 893, 148, 352, 92, 149, 197, 169, 627, 459, 487,
    398, 355, 447, 130, 327, 393, 367, 811, 356, 493, 440, 533, 477, 671, 259, 416, 95, 972, 500, 744,
]  # fmt: skip


def test_golden_positions() -> None:
    assert place(golden_eph(), KEY, 1000) == GOLDEN_POSITIONS
    # the vectorised messages in place() agree with kernel_message() one kernel at a time
    assert _reference_place(golden_eph(), KEY, 1000)[1] == GOLDEN_POSITIONS


def test_kernel_message_hand_computed() -> None:
    # 1.0 = 0x3F800000, 2.0 = 0x40000000, -1.0 = 0xBF800000, 0.5 = 0x3F000000, 0.0 = 0
    # XOR = 0xFF000000; ^ 5 = 0xFF000005; little-endian bytes 05 00 00 ff
    values = [1.0, 2.0, -1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert kernel_message(torch.tensor(values).reshape(3, 3), 5) == b"\x05\x00\x00\xff"
    assert kernel_message(np.array(values, dtype=np.float32), 5) == b"\x05\x00\x00\xff"
    assert kernel_message(torch.tensor([1.0] + [0.0] * 8), 1) == b"\x01\x00\x80\x3f"
    # -0.0 has its own bit pattern (0x80000000)
    assert kernel_message(torch.tensor([-0.0] + [0.0] * 8), 1) == b"\x01\x00\x00\x80"


def test_kernel_message_refuses_bad_input() -> None:
    with pytest.raises(UsageError, match="a kernel has 9 values"):
        kernel_message(torch.zeros(8), 1)
    with pytest.raises(UsageError, match="a kernel has 9 values"):
        kernel_message(torch.zeros(2, 3, 3), 1)
    with pytest.raises(UsageError, match="index"):
        kernel_message(torch.zeros(3, 3), 0)


def test_position_is_hmac_sha256_mod_n() -> None:
    message = b"\x05\x00\x00\xff"
    digest = hmac.new(KEY, message, hashlib.sha256).digest()
    assert position(KEY, message, 977) == int.from_bytes(digest, "big") % 977
    with pytest.raises(UsageError):
        position(KEY, message, 0)


def _reference_place(eph: torch.Tensor, key: bytes, n: int) -> tuple[list[int], list[int]]:
    raw = [position(key, kernel_message(eph[i - 1], i), n) for i in range(1, len(eph) + 1)]
    taken: set[int] = set()
    out = []
    for first in raw:
        p = first
        while p in taken:
            p = (p + 1) % n
        taken.add(p)
        out.append(p)
    return raw, out


def test_place_matches_reference_with_real_collisions() -> None:
    eph = torch.randn(10, 3, 3, generator=torch.Generator().manual_seed(1))
    collided = 0
    for seed in range(10):
        key = hashlib.sha256(bytes([seed])).digest()
        raw, expected = _reference_place(eph, key, 40)
        collided += len(set(raw)) < len(raw)
        got = place(eph, key, 40)
        assert got == expected
        assert len(set(got)) == len(got)
    assert collided > 0


def test_forced_collision_probes_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(placement, "position", lambda key, message, n: 3)
    assert place(torch.zeros(3, 3, 3), KEY, 12) == [3, 4, 5]


def test_probing_wraps_around(monkeypatch: pytest.MonkeyPatch) -> None:
    raws = iter([11, 11, 10, 11])
    monkeypatch.setattr(placement, "position", lambda key, message, n: next(raws))
    assert place(torch.zeros(4, 3, 3), KEY, 16) == [11, 12, 10, 13]
    raws = iter([15, 15, 15])
    monkeypatch.setattr(placement, "position", lambda key, message, n: next(raws))
    assert place(torch.zeros(3, 3, 3), KEY, 16) == [15, 0, 1]


def test_keys_and_values_change_positions() -> None:
    eph = golden_eph()
    other_key = bytes(range(1, 33))
    assert place(eph, other_key, 1000) != GOLDEN_POSITIONS
    changed = eph.clone()
    changed[0, 0, 0] += 1.0
    assert place(changed, KEY, 1000)[0] != GOLDEN_POSITIONS[0]
    # the index enters the message: identical kernels land in different places
    same = place(torch.ones(8, 3, 3), KEY, 1000)
    assert len(set(same)) == 8


def test_place_refuses_small_host_and_short_key() -> None:
    with pytest.raises(UsageError) as err:
        place(golden_eph(), KEY, 100)
    assert str(err.value) == (
        "host too small for EPH: 40 EPH kernels need a host of at least 160 kernels "
        "(EPH may take at most 25% of the host's kernels), but the host has 100"
    )
    assert len(place(golden_eph(), KEY, 160)) == 40
    with pytest.raises(UsageError, match="host too small"):
        place(golden_eph(), KEY, 30)
    with pytest.raises(UsageError, match="at least 16 bytes"):
        place(golden_eph(), b"short", 1000)
    with pytest.raises(UsageError, match=r"shape \(K, 3, 3\)"):
        place(torch.zeros(4, 9), KEY, 1000)


def test_eph_kernels_order() -> None:
    a = torch.randn(4, 3, 3, 3)
    b = torch.randn(2, 4, 3, 3)
    eph = eph_kernels([a, b])
    assert eph.shape == (4 * 3 + 2 * 4, 3, 3)
    assert torch.equal(eph[1 * 3 + 2], a[1, 2])  # out-major, then in
    assert torch.equal(eph[12 + 1 * 4 + 3], b[1, 3])
    with pytest.raises(UsageError, match="3x3"):
        eph_kernels([torch.zeros(4, 3, 5, 5)])


def test_host_view_conv_numbering_and_write() -> None:
    w1 = torch.randn(4, 3, 3, 3)
    w2 = torch.randn(5, 4, 3, 3)
    host = HostView.from_tensors([("conv1.weight", w1), ("block.conv2.weight", w2)])
    assert host.n == 12 + 20 == host_kernel_count([w1.shape, w2.shape])
    assert torch.equal(host.read(1 * 3 + 2), w1[1, 2])
    assert torch.equal(host.read(12 + 3 * 4 + 1), w2[3, 1])
    assert host.slot(12 + 3 * 4 + 1) == HostSlot("block.conv2", "weight", (3 * 4 + 1) * 9)
    assert host.slot(12 + 3 * 4 + 1).name == "block.conv2.weight"
    assert host.key(0) == "conv1.weight"
    kernel = torch.arange(9, dtype=torch.float32).reshape(3, 3)
    host.write(5, kernel)
    assert torch.equal(w1[1, 2], kernel)  # the view writes into the tensors it was given
    other = {"conv1.weight": torch.zeros(4, 3, 3, 3), "block.conv2.weight": torch.zeros(5, 4, 3, 3)}
    host.write(13, kernel, other)
    assert torch.equal(other["block.conv2.weight"][0, 1], kernel)
    with pytest.raises(IndexError):
        host.read(32)


def test_host_view_flat_groups_ignore_tail() -> None:
    w = torch.randn(5, 7)  # 35 weights: 3 kernels, the last 8 weights carry nothing
    host = HostView.from_tensors([("fc.weight", w)])
    assert host.n == 3
    assert torch.equal(host.read(2), w.reshape(-1)[18:27].reshape(3, 3))
    with pytest.raises(UsageError, match="cannot host EPH kernels"):
        HostView.from_tensors([("conv.weight", torch.zeros(4, 3, 5, 5))])
    with pytest.raises(UsageError, match="cannot host EPH kernels"):
        HostView.from_tensors([("bn.weight", torch.zeros(8))])


def test_embed_retrieve_roundtrip_and_masks() -> None:
    torch.manual_seed(0)
    w1 = torch.randn(8, 4, 3, 3)
    fc = torch.randn(10, 30).t()  # non-contiguous: written through a copy
    host = HostView.from_tensors([("conv.weight", w1), ("fc.weight", fc)])
    eph = torch.randn(8, 3, 3)
    positions = place(eph, KEY, host.n)
    embed(host, eph, positions)
    assert torch.equal(retrieve(host, positions), eph)
    assert all(torch.equal(host.read(p), eph[r]) for r, p in enumerate(positions))
    masks = host.masks(positions)
    assert sum(int(m.sum()) for m in masks.values()) == 9 * len(eph)
    for name, mask in masks.items():
        assert mask.shape == host.tensors[name].shape and mask.dtype == torch.bool
    # into another state dict with the same names
    state = {"conv.weight": torch.zeros_like(w1), "fc.weight": torch.zeros(30, 10)}
    embed(host, eph, positions, state)
    assert torch.equal(retrieve(HostView.from_tensors(list(state.items())), positions), eph)
    with pytest.raises(UsageError, match="positions"):
        embed(host, eph, positions[:-1])


def _graph(layers: list[Layer]) -> LayerGraph:
    return LayerGraph(format="test", path=Path("model"), layers=layers)


def _layer(name: str, kind: LayerKind, **params: torch.Tensor) -> Layer:
    return Layer(name=name, kind=kind, params={r: TensorRef.from_tensor(f"{name}.{r}", t) for r, t in params.items()})


def test_host_view_from_graph_conv_host() -> None:
    torch.manual_seed(0)
    c1, c2, pw, fc = torch.randn(8, 3, 3, 3), torch.randn(8, 8, 3, 3), torch.randn(8, 8, 1, 1), torch.randn(10, 72)
    graph = _graph(
        [
            _layer("conv1", LayerKind.CONV2D, weight=c1),
            _layer("bn1", LayerKind.BATCH_NORM, weight=torch.ones(8)),
            _layer("pw", LayerKind.CONV2D, weight=pw),
            _layer("conv2", LayerKind.CONV2D, weight=c2),
            _layer("fc", LayerKind.LINEAR, weight=fc),
        ]
    )
    host = HostView.from_graph(graph)  # 3x3 convolutions only
    assert host.n == 24 + 64 == host_kernel_count(ref.shape for _, _, ref in host_refs(graph))
    direct = HostView.from_tensors([("conv1.weight", c1), ("conv2.weight", c2)])
    positions = place(torch.randn(20, 3, 3), KEY, host.n)
    assert torch.equal(retrieve(host, positions), retrieve(direct, positions))
    assert host.slot(30) == HostSlot("conv2", "weight", 6 * 9)
    # explicit names: graph order, any eligible kind
    picked = HostView.from_graph(graph, ["fc", "conv1"])
    assert picked.n == 24 + 80 and picked.key(0) == "conv1.weight"
    with pytest.raises(UsageError, match="no layer named 'nope'"):
        HostView.from_graph(graph, ["nope"])
    with pytest.raises(UsageError, match="cannot host EPH kernels"):
        HostView.from_graph(graph, ["bn1"])


def test_host_view_from_graph_recurrent_host() -> None:
    lstm = torch.nn.LSTM(6, 5, num_layers=2)
    sd = lstm.state_dict()
    # a loader may list the parameters in any order: the view uses PyTorch's
    shuffled = dict(sorted(sd.items(), reverse=True))
    fc = torch.randn(3, 5)
    graph = _graph([_layer("rnn", LayerKind.LSTM, **shuffled), _layer("head", LayerKind.LINEAR, weight=fc)])
    host = HostView.from_graph(graph)
    order = ["weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1"]
    named = [(f"rnn.{r}", sd[r]) for r in order] + [("head.weight", fc)]
    assert host.n == HostView.from_tensors(named).n == (120 // 9) + (100 // 9) * 3 + 15 // 9
    assert [host.key(host.n - 1)] == ["head.weight"]
    assert host.slot(13) == HostSlot("rnn", "weight_hh_l0", 0)
    positions = list(range(host.n))
    assert torch.equal(retrieve(host, positions), retrieve(HostView.from_tensors(named), positions))
