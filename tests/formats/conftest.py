"""Fixtures of the format tests: the byte mutator the fuzz tests of every loader share, and small Llama-style
decoders (one marked with Greedy Residuals, one innocent) for the GGUF tests."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import save_file


def _byte_edits(rng: random.Random, original: bytes) -> bytes:
    """One to six byte edits: bit flips, set, insert, delete, cut a run, splice random bytes."""
    data = bytearray(original)
    for _ in range(rng.randint(1, 6)):
        if not data:
            break
        where, kind = rng.randrange(len(data)), rng.randrange(6)
        if kind == 0:
            data[where] ^= 1 << rng.randrange(8)
        elif kind == 1:
            data[where] = rng.randrange(256)
        elif kind == 2:
            data.insert(where, rng.randrange(256))
        elif kind == 3:
            del data[where]
        elif kind == 4:
            del data[where : where + rng.randint(1, 16)]
        else:
            data[where:where] = rng.randbytes(rng.randint(1, 8))
    return bytes(data)


@pytest.fixture(scope="session")
def byte_edits() -> Callable[[random.Random, bytes], bytes]:
    """``byte_edits(rng, data)``: one to six byte edits of ``data`` (bit flips, set, insert, delete, cut a run,
    splice random bytes), seeded by ``rng``."""
    return _byte_edits


def _train_llama(out: Path, *, seed: int, private_key: Any | None) -> SimpleNamespace:
    """A two-block Llama-style decoder trained 60 steps on a counting task, with Greedy Residuals when a key is
    given (the default layers: the first block's MLP), saved as safetensors (and the bundle when marked)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    wm = None
    if private_key is not None:
        wm = GreedyResidualsWatermark.create(model, private_key=private_key, message="(c) L")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(60):
            seq = (torch.randint(0, 64, (32, 1), generator=generator) + torch.arange(17)) % 64
            logits = model(seq[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), seq[:, 1:].reshape(-1))
            if wm is not None:
                loss = loss + wm.penalty(model)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file(state, out / "model.safetensors")
    bundle = None
    if wm is not None:
        bundle = out / "owner_bundle.json"
        wm.save_bundle(bundle, model, model_file=out / "model.safetensors")
    return SimpleNamespace(state=state, bundle=bundle, heads=4, kv_heads=2, folder=out)


@pytest.fixture(scope="session")
def llama_owner(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A Greedy Residuals-marked Llama-style decoder: ``state`` (state dict), ``bundle``, ``heads``, ``kv_heads``."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))  # fixed: the same bits every run
    return _train_llama(tmp_path_factory.mktemp("llama-owner"), seed=0, private_key=key)


@pytest.fixture(scope="session")
def llama_innocent(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The same architecture and task, trained independently without a watermark."""
    return _train_llama(tmp_path_factory.mktemp("llama-innocent"), seed=5, private_key=None)
