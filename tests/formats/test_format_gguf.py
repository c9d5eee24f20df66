"""The GGUF loader: files written by the ``gguf`` package's writer (an independent implementation) and by
auditor's toolkit, dequantisation against the ``gguf`` package's reference, llama.cpp's conversion steps
undone, and hostile headers refused with one line before anything is allocated."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFWriter, quants
from gguf.constants import GGMLQuantizationType

from auditor.audit.load import load_model
from auditor.errors import EXIT_INPUT, InputError
from auditor.formats import gguf as gguf_format
from auditor.formats._gguf_quants import BLOCK_TYPES, CHUNK_BLOCKS, dequantize
from auditor.graph import LayerKind
from auditor.toolkit.gguf import GGUFTensor, hf_to_gguf, quantize, write_gguf

HEADS, KV_HEADS, HIDDEN = 4, 2, 64


def _rope_order(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, written out here independently."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    state = {"model.embed_tokens.weight": rng.standard_normal((96, HIDDEN)).astype(np.float32)}
    for i in range(2):
        p = f"model.layers.{i}"
        state |= {
            f"{p}.input_layernorm.weight": rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32),
            f"{p}.self_attn.q_proj.weight": rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32),
            f"{p}.self_attn.k_proj.weight": rng.standard_normal((KV_HEADS * head_dim, HIDDEN)).astype(np.float32),
            f"{p}.self_attn.v_proj.weight": rng.standard_normal((KV_HEADS * head_dim, HIDDEN)).astype(np.float32),
            f"{p}.self_attn.o_proj.weight": rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32),
            f"{p}.post_attention_layernorm.weight": rng.uniform(0.5, 1.5, HIDDEN).astype(np.float32),
            f"{p}.mlp.gate_proj.weight": rng.standard_normal((128, HIDDEN)).astype(np.float32),
            f"{p}.mlp.up_proj.weight": rng.standard_normal((128, HIDDEN)).astype(np.float32),
            f"{p}.mlp.down_proj.weight": rng.standard_normal((HIDDEN, 128)).astype(np.float32),
        }
    state["model.norm.weight"] = np.ones(HIDDEN, np.float32)
    state["lm_head.weight"] = rng.standard_normal((96, HIDDEN)).astype(np.float32)
    return state


_GGUF_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}  # fmt: skip


def _gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}  # fmt: skip
    if hf in top:
        return top[hf]
    _, _, i, *rest = hf.split(".")
    module = ".".join(rest[:-1])
    return f"blk.{i}.{_GGUF_NAMES[module]}.weight"


def _write_with_gguf_package(path: Path, state: dict[str, np.ndarray], qtype: str) -> Path:
    """A llama.cpp-style file written by the gguf package (its writer, its quantiser)."""
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_string("tokenizer.chat_template", "{% for m in messages %}{{ m.content }}{% endfor %}")
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(96)])
    for hf, original in state.items():
        name = _gguf_name(hf)
        w = original
        if name.endswith("attn_q.weight"):
            w = _rope_order(original, HEADS)
        elif name.endswith("attn_k.weight"):
            w = _rope_order(original, KV_HEADS)
        if w.ndim == 1 or qtype == "F32":
            writer.add_tensor(name, w)
        elif qtype == "F16":
            writer.add_tensor(name, w.astype(np.float16))
        else:
            t = GGMLQuantizationType[qtype]
            writer.add_tensor(name, quants.quantize(w, t), raw_dtype=t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q5_0", "Q5_1", "Q4_1"])
def test_llama_file_from_the_gguf_package_reads_back_as_the_checkpoint(tmp_path: Path, qtype: str) -> None:
    state = _llama_state()
    graph = load_model(_write_with_gguf_package(tmp_path / "m.gguf", state, qtype))
    assert graph.format == "gguf"
    names = [layer.name for layer in graph.layers]
    assert names[:3] == ["model.embed_tokens", "model.layers.0.input_layernorm", "model.layers.0.self_attn.q_proj"]
    assert graph.layer("model.embed_tokens").kind is LayerKind.EMBEDDING
    assert graph.layer("model.layers.1.mlp.down_proj").kind is LayerKind.LINEAR
    assert graph.layer("model.norm").kind is LayerKind.LAYER_NORM
    # the reference: what the gguf package itself dequantises, with the rotary order undone by hand
    tolerance = {"F32": 0.0, "F16": 2e-3}.get(qtype, 0.6)
    for hf, w in state.items():
        got = graph.layer(hf.rpartition(".")[0]).params["weight"].read(float32=True).numpy()
        assert got.shape == w.shape, hf
        assert np.abs(got - w).max() <= tolerance * max(1.0, np.abs(w).max()), hf
        if qtype not in ("F32", "F16") and w.ndim == 2:
            assert graph.layer(hf.rpartition(".")[0]).attrs["quantized"]["dtype"] == qtype
    # the q rows in their original order: correlation with the original rows, row by row
    q = graph.layer("model.layers.0.self_attn.q_proj").params["weight"].read(float32=True).numpy()
    w = state["model.layers.0.self_attn.q_proj.weight"]
    assert all(np.corrcoef(q[r], w[r])[0, 1] > 0.9 for r in range(w.shape[0]))
    notes = " ".join(graph.notes)
    assert "rotary row order" in notes and "never rendered" in notes
    assert "{%" not in str(graph.metadata)


def test_rotary_reorder_is_only_undone_for_architectures_llama_cpp_reorders(tmp_path: Path) -> None:
    state = _llama_state()
    tensors = hf_to_gguf(state, heads=HEADS, kv_heads=KV_HEADS, type_name="F32", architecture="qwen2")
    meta = {"general.architecture": "qwen2", "qwen2.attention.head_count": HEADS}
    graph = load_model(write_gguf(tmp_path / "q.gguf", tensors, meta))
    q = graph.layer("model.layers.0.self_attn.q_proj").params["weight"].read(float32=True).numpy()
    assert np.array_equal(q, state["model.layers.0.self_attn.q_proj.weight"])
    assert "does not reorder" in " ".join(graph.notes)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"])
def test_dequantisation_matches_the_gguf_reference_bit_for_bit(qtype: str) -> None:
    rng = np.random.default_rng(7)
    size = BLOCK_TYPES[qtype][1]
    raw = rng.integers(0, 256, size=(48, size), dtype=np.uint8)
    halves = [208] if qtype == "Q6_K" else [0, 2] if qtype in ("Q4_1", "Q5_1", "Q4_K", "Q5_K") else [0]
    for col in halves:  # finite f16 scales; every other byte random
        raw[:, col : col + 2] = rng.uniform(-2, 2, 48).astype("<f2").view(np.uint8).reshape(48, 2)
    ours = dequantize(qtype, raw.reshape(-1))
    reference = quants.dequantize(raw.reshape(-1), GGMLQuantizationType[qtype]).reshape(-1)
    assert np.array_equal(ours, reference)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_K", "Q6_K"])
def test_dequantisation_across_chunks_matches_the_reference(qtype: str) -> None:
    # Two whole chunks and a partial one: each chunk lands in its own place in the one result.
    rng = np.random.default_rng(8)
    blocks = 2 * CHUNK_BLOCKS + 5
    size = BLOCK_TYPES[qtype][1]
    raw = rng.integers(0, 256, size=(blocks, size), dtype=np.uint8)
    for col in [208] if qtype == "Q6_K" else [0, 2] if qtype == "Q4_K" else [0]:
        raw[:, col : col + 2] = rng.uniform(-2, 2, blocks).astype("<f2").view(np.uint8).reshape(blocks, 2)
    ours = dequantize(qtype, raw.reshape(-1))
    assert ours.dtype == np.float32 and ours.shape == (blocks * BLOCK_TYPES[qtype][0],)
    assert np.array_equal(ours, quants.dequantize(raw.reshape(-1), GGMLQuantizationType[qtype]).reshape(-1))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_toolkit_quantiser_writes_the_same_bytes_as_the_gguf_package(qtype: str) -> None:
    x = (np.random.default_rng(3).standard_normal((6, 256)) * 0.1).astype(np.float32)
    ours = np.frombuffer(quantize(x, qtype), dtype=np.uint8)
    assert np.array_equal(ours, quants.quantize(x, GGMLQuantizationType[qtype]).reshape(-1))


def test_toolkit_q4_k_round_trips_within_its_step() -> None:
    x = (np.random.default_rng(4).standard_normal((4, 512)) * 0.05).astype(np.float32)
    raw = np.frombuffer(quantize(x, "Q4_K"), dtype=np.uint8)
    back = quants.dequantize(raw, GGMLQuantizationType.Q4_K).reshape(x.shape)
    step = (x.reshape(-1, 32).max(1) - np.minimum(x.reshape(-1, 32).min(1), 0)) / 15
    assert (np.abs(back - x).reshape(-1, 32).max(1) <= step * 0.75 + 1e-3).all()


def test_toolkit_file_is_read_by_the_gguf_package(tmp_path: Path) -> None:
    from gguf import GGUFReader

    state = _llama_state(1)
    path = write_gguf(
        tmp_path / "t.gguf", hf_to_gguf(state, heads=HEADS, kv_heads=KV_HEADS, type_name="Q8_0"),
        {"general.architecture": "llama", "llama.attention.head_count": HEADS,
         "llama.attention.head_count_kv": KV_HEADS},
    )  # fmt: skip
    reader = GGUFReader(str(path))
    assert {t.name for t in reader.tensors} == {_gguf_name(k) for k in state}
    ours = load_model(path)
    for hf, w in state.items():
        got = ours.layer(hf.rpartition(".")[0]).params["weight"].read(float32=True).numpy()
        assert np.abs(got - w).max() <= 0.02 * np.abs(w).max() + 1e-6, hf


def test_sparse_file_reads_as_zeros_without_its_bytes(tmp_path: Path) -> None:
    tensors = [GGUFTensor("blk.0.ffn_up.weight", (4096, 4096), "Q8_0"), GGUFTensor("output_norm.weight", (64,), "F32")]
    path = write_gguf(tmp_path / "sparse.gguf", tensors, {"general.architecture": "llama"}, sparse=True)
    assert path.stat().st_size > 4096 * 4096
    graph = load_model(path)
    assert float(graph.layer("model.layers.0.mlp.up_proj").weight.read(float32=True).abs().sum()) == 0.0  # type: ignore[union-attr]


# -- hostile headers ----------------------------------------------------------------------------------------


def _header(n_tensors: int, n_kv: int, body: bytes = b"", version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + body


def _s(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


HOSTILE = {
    # the gguf package's reader hangs on this 43-byte file: an array of 2**63 elements
    "array of 2**63": _header(0, 1, _s("a") + struct.pack("<IIQ", 9, 0, 1 << 63)),
    "array of strings past the end": _header(0, 1, _s("a") + struct.pack("<IIQ", 9, 8, 1_000_000)),
    "string of 2**64-1": _header(0, 1, _s("k") + struct.pack("<IQ", 8, (1 << 64) - 1)),
    "key longer than the file": _header(0, 1, struct.pack("<Q", 10_000)),
    "2**63 tensors": _header(1 << 63, 0),
    "2**40 metadata entries": _header(0, 1 << 40),
    "more entries than bytes": _header(50, 50),
    "version 1": _header(0, 0, version=1),
    "big-endian": b"GGUF" + struct.pack(">IQQ", 3, 0, 0),
    "unknown value type": _header(0, 1, _s("k") + struct.pack("<I", 77) + b"\0" * 16),
    "arrays nested 10 deep": _header(0, 1, _s("k") + struct.pack("<IIQ", 9, 9, 1) * 10 + b"\0" * 64),
    "duplicate key": _header(0, 2, (_s("k") + struct.pack("<IB", 0, 1)) * 2 + b"\0" * 64),
    "alignment 3": _header(0, 1, _s("general.alignment") + struct.pack("<II", 4, 3) + b"\0" * 64),
    "alignment 0": _header(0, 1, _s("general.alignment") + struct.pack("<II", 4, 0) + b"\0" * 64),
    "tensor of 9 dimensions": _header(1, 0, _s("w") + struct.pack("<I", 9) + struct.pack("<Q", 2) * 9 + b"\0" * 40),
    "tensor with a zero dimension": _header(1, 0, _s("w") + struct.pack("<IQQIQ", 2, 0, 4, 0, 0) + b"\0" * 64),
    "tensor past the end": _header(1, 0, _s("w") + struct.pack("<IQQIQ", 2, 1 << 20, 1 << 20, 0, 0) + b"\0" * 64),
    "misaligned offset": _header(1, 0, _s("w") + struct.pack("<IQIQ", 1, 4, 0, 3) + b"\0" * 96),
    "Q8_0 row not whole blocks": _header(1, 0, _s("w") + struct.pack("<IQQIQ", 2, 33, 2, 8, 0) + b"\0" * 160),
    "two tensors share bytes": _header(
        2, 0, _s("a") + struct.pack("<IQIQ", 1, 16, 0, 0) + _s("b") + struct.pack("<IQIQ", 1, 16, 0, 32) + b"\0" * 160
    ),
    "duplicate tensor name": _header(
        2, 0, _s("a") + struct.pack("<IQIQ", 1, 8, 0, 0) + _s("a") + struct.pack("<IQIQ", 1, 8, 0, 32) + b"\0" * 160
    ),
    "name not UTF-8": _header(1, 0, struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<IQIQ", 1, 4, 0, 0) + b"\0" * 64),
    "truncated": _header(1, 1, _s("general.architecture")),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_header_is_one_line_input_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / "hostile.gguf"
    path.write_bytes(HOSTILE[name])
    with pytest.raises(InputError) as err:
        load_model(path)
    assert "\n" not in str(err.value)


def test_string_budget_refuses_before_walking(tmp_path: Path) -> None:
    count = gguf_format.MAX_ARRAY_ITEMS + 1
    path = tmp_path / "strings.gguf"
    path.write_bytes(_header(0, 1, _s("k") + struct.pack("<IIQ", 9, 8, count) + b"\0" * (8 * count)))
    with pytest.raises(InputError, match="strings and arrays"):
        load_model(path)


def test_long_string_arrays_are_walked_not_kept(tmp_path: Path) -> None:
    strings = [b"x" * (2_500_000 if i % 700 == 0 else i % 50) for i in range(3000)]  # some cross the read window
    body = _s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, len(strings))
    body += b"".join(struct.pack("<Q", len(t)) + t for t in strings)
    body += _s("general.architecture") + struct.pack("<I", 8) + _s("llama")
    path = tmp_path / "vocab.gguf"
    path.write_bytes(_header(0, 2, body))
    header = gguf_format.read_header(path)
    assert header.metadata["tokenizer.ggml.tokens"] == {"type": "array of string", "length": 3000}
    assert header.metadata["general.architecture"] == "llama"
    path.write_bytes(path.read_bytes()[:-30])  # cut inside the last strings: an error, not a hang or a crash
    with pytest.raises(InputError):
        gguf_format.read_header(path)


def test_hostile_file_through_the_cli_exits_with_the_input_code(tmp_path: Path, run_cli) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "hostile.gguf"
    path.write_bytes(HOSTILE["array of 2**63"])
    before = path.read_bytes()
    result = run_cli("inspect", str(path))
    assert result.code == EXIT_INPUT
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "claims" in result.stderr
    assert path.read_bytes() == before


def test_unread_type_is_named_when_read_not_when_loaded(tmp_path: Path) -> None:
    body = _s("general.architecture") + struct.pack("<I", 8) + _s("llama")
    body += _s("blk.0.ffn_up.weight") + struct.pack("<IQQIQ", 2, 256, 2, 16, 0)  # IQ2_XXS
    path = tmp_path / "iq.gguf"
    path.write_bytes(_header(1, 1, body) + b"\0" * 1024)
    graph = load_model(path)
    layer = graph.layer("model.layers.0.mlp.up_proj")
    assert "IQ2_XXS" in " ".join(graph.notes)
    with pytest.raises(InputError, match="IQ2_XXS"):
        layer.params["weight"].read()


def test_fuzzed_gguf_files_fail_only_on_purpose(tmp_path: Path, byte_edits) -> None:  # type: ignore[no-untyped-def]
    state = {k: v for k, v in _llama_state(2).items() if "layers.1" not in k}
    valid = write_gguf(
        tmp_path / "valid.gguf", hf_to_gguf(state, heads=HEADS, kv_heads=KV_HEADS, type_name="Q4_K"),
        {"general.architecture": "llama", "llama.attention.head_count": HEADS, "general.alignment": 32},
    ).read_bytes()  # fmt: skip
    rng = random.Random(11)
    loaded = 0
    for i in range(300):
        path = tmp_path / f"fuzz{i}.gguf"
        path.write_bytes(byte_edits(rng, valid))
        try:
            graph = gguf_format.load(path)
            for layer in graph.layers:
                for ref in layer.params.values():
                    ref.read(float32=True)
            loaded += 1
        except InputError as exc:
            assert "\n" not in str(exc)
    assert loaded > 0  # some edits hit tensor data only: those files still load


def test_reads_stay_lazy_and_copy_on_write(tmp_path: Path) -> None:
    state = _llama_state(3)
    path = write_gguf(
        tmp_path / "m.gguf", hf_to_gguf(state, heads=HEADS, kv_heads=KV_HEADS, type_name="F16"),
        {"general.architecture": "llama", "llama.attention.head_count": HEADS,
         "llama.attention.head_count_kv": KV_HEADS},
    )  # fmt: skip
    before = path.read_bytes()
    graph = load_model(path)
    t = graph.layer("model.layers.0.mlp.up_proj").params["weight"].read()
    assert t.dtype == torch.float16
    t.mul_(0)
    assert path.read_bytes() == before


def test_a_tensor_is_dequantised_only_when_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading, describing and inspecting a quantised file dequantise nothing; reading one layer dequantises
    that layer's tensor once (a detector that reads three layers of a 7B model pays for three)."""
    state = _llama_state(5)
    path = write_gguf(
        tmp_path / "m.gguf", hf_to_gguf(state, heads=HEADS, kv_heads=KV_HEADS, type_name="Q8_0"),
        {"general.architecture": "llama", "llama.attention.head_count": HEADS,
         "llama.attention.head_count_kv": KV_HEADS},
    )  # fmt: skip
    calls: list[int] = []

    def counted(type_name: str, raw: np.ndarray) -> np.ndarray:
        calls.append(raw.size)
        return dequantize(type_name, raw)

    monkeypatch.setattr(gguf_format, "dequantize", counted)
    graph = load_model(path)
    graph.describe(lazy=False)
    assert calls == []
    up = graph.layer("model.layers.1.mlp.up_proj").params["weight"]
    assert up.read(float32=True).shape == (128, HIDDEN)
    assert calls == [128 * HIDDEN // 32 * 34]
