"""Shared fixtures: the test's isolation from the user's environment, seeded randomness, the CLI run in
this process (``run_cli``), throwaway plugins (``plugin``), and the trained owners every folder uses.

Test modules never import each other or this file: what they share is a fixture here or in their
folder's conftest.py.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch

from auditor.plugin_manager import get_plugin_manager, reset_plugin_manager

#: What a user's shell may set that changes what auditor does; a test that needs one sets it itself.
USER_VARIABLES = ("AUDITOR_LOAD_PLUGINS", "AUDITOR_DEBUG")
XDG_FOLDERS = {"XDG_CONFIG_HOME": ".config", "XDG_CACHE_HOME": ".cache", "XDG_DATA_HOME": ".local/share",
               "XDG_STATE_HOME": ".local/state"}  # fmt: skip


def _point_home_at(mp: pytest.MonkeyPatch, home: Path) -> None:
    for name in USER_VARIABLES:
        mp.delenv(name, raising=False)
    mp.setenv("HOME", str(home))
    for name, folder in XDG_FOLDERS.items():
        mp.setenv(name, str(home / folder))


@pytest.fixture(scope="session", autouse=True)
def _isolated_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The same isolation as :func:`_isolated` for the session fixtures, which are built before it."""
    with pytest.MonkeyPatch.context() as mp:
        _point_home_at(mp, tmp_path_factory.mktemp("home"))
        reset_plugin_manager()
        yield
    reset_plugin_manager()


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every test runs away from the user's environment: no AUDITOR_* variables, a HOME (and XDG folders)
    of its own, and a plugin manager built anew (a test that registers a plugin cannot leak it)."""
    _point_home_at(monkeypatch, tmp_path_factory.mktemp("home"))
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture(autouse=True)
def _seeded() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def special_files(tmp_path: Path) -> Iterator[SimpleNamespace]:
    """Paths that are not regular files: ``fifo`` (a named pipe nobody writes), ``device`` (/dev/zero)
    and ``folder``. While the test runs, a read that would wait on the pipe or loop over the device
    fails after 10 seconds (SIGALRM) instead of hanging the suite."""
    if not hasattr(os, "mkfifo") or not Path("/dev/zero").exists():
        pytest.skip("needs named pipes and /dev/zero")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()

    def stop(signum: int, frame: Any) -> None:  # pytest.fail: no `except Exception` or OSError catches it
        pytest.fail("still reading after 10 s: a pipe or a device was opened")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, 10)
    try:
        yield SimpleNamespace(fifo=fifo, device=Path("/dev/zero"), folder=folder)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class CliResult(NamedTuple):
    """What a run of the ``auditor`` command left: its exit code and what it printed."""

    code: int
    stdout: str
    stderr: str


def _typers(app: Any) -> list[Any]:
    """``app`` and every command group under it."""
    found = [app]
    for group in app.registered_groups:
        if group.typer_instance is not None:
            found += _typers(group.typer_instance)
    return found


def _run_cli(*args: str | Path, input: str | None = None, env: Mapping[str, str | None] | None = None) -> CliResult:
    from typer.testing import CliRunner

    from auditor.cli import root

    # Each run adds the plugins' commands anew, as a fresh process would, and leaves the app as it found it.
    saved = [(t, list(t.registered_commands), list(t.registered_groups)) for t in _typers(root.app)]
    added = root._plugins_added
    root._plugins_added = False
    try:
        with CliRunner().isolation(input=input, env=env) as (stdout, stderr, _):
            try:
                root.main([str(a) for a in args])
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
            return CliResult(code, stdout.getvalue().decode(), stderr.getvalue().decode())
    finally:
        for typer_app, commands, groups in saved:
            typer_app.registered_commands[:] = commands
            typer_app.registered_groups[:] = groups
        root._plugins_added = added


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., CliResult]:
    """``run_cli(*args, input=None, env=None)``: the ``auditor`` command run in this process through
    ``auditor.cli.main`` (so the exit codes and one-line errors are the real ones), with ``input`` on
    stdin and ``env`` over the environment (``None`` unsets). A fresh interpreter costs seconds; tests
    start one only where the entry point itself is under test."""
    return _run_cli


@contextmanager
def _registered(obj: object, name: str = "test-plugin") -> Iterator[None]:
    pm = get_plugin_manager()
    pm.register(obj, name=name)
    try:
        yield
    finally:
        pm.unregister(name=name)


@pytest.fixture(scope="session")
def plugin() -> Callable[..., AbstractContextManager[None]]:
    """``with plugin(obj, name="test-plugin"):`` registers a throwaway plugin and always unregisters it."""
    return _registered


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


# --- audits through the CLI, shared by tests/cli/ and tests/report/ -------------------------------------

CASE_ID = "CASE-2025-0417"
ANALYST = "Dana Analyst"


def _clean_model(path: Path, seed: int = 1) -> Path:
    from safetensors.torch import save_file

    from auditor.toolkit import models as zoo

    model = zoo.build("cnn", seed=seed)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def clean_model() -> Callable[..., Path]:
    """``clean_model(path, seed=1)``: an unwatermarked SmallCNN with the owner's architecture saved at
    ``path`` (what an innocent suspect looks like)."""
    return _clean_model


@pytest.fixture(scope="session")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A report signer's Ed25519 key pair (encrypted private key) and its passphrase file (``pass.txt``
    beside the key folder)."""
    from auditor import keys

    folder = tmp_path_factory.mktemp("signer")
    (folder / "pass.txt").write_text("correct horse battery staple\n")
    return keys.generate_keypair(folder / "keys", algorithm="ed25519", passphrase=b"correct horse battery staple")


@pytest.fixture(scope="session")
def gr_reports(
    gr_owner: SimpleNamespace, run_cli: Callable[..., CliResult], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The owner's own watermarked model audited against its bundle, the report written as HTML and JSON."""
    out = tmp_path_factory.mktemp("gr_reports")
    suspect = shutil.copy(gr_owner.files["safetensors"], out / "suspect.safetensors")
    html = out / "report.html"
    args = ["audit", suspect, "--bundle", gr_owner.out / "owner_bundle.json", "--out", html]
    code, stdout, stderr = run_cli(*args, "--case-id", CASE_ID, "--analyst", ANALYST)
    return {
        "code": code, "stdout": stdout, "stderr": stderr, "html": html, "json": out / "report.json",
        "case_id": CASE_ID, "analyst": ANALYST, "args": args, "out": out,
    }  # fmt: skip


@pytest.fixture(scope="session")
def batch_run(
    gr_owner: SimpleNamespace, run_cli: Callable[..., CliResult], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """A folder of three suspects (the watermarked model, a clean one, a truncated file) audited in one go."""
    folder = tmp_path_factory.mktemp("suspects")
    shutil.copy(gr_owner.files["safetensors"], folder / "a_copy.safetensors")
    broken = folder / "b_broken.safetensors"
    broken.write_bytes(Path(gr_owner.files["safetensors"]).read_bytes()[:300])
    _clean_model(folder / "c_clean.safetensors")
    out = tmp_path_factory.mktemp("batch") / "reports"
    code, stdout, stderr = run_cli("audit", folder, "--bundle", gr_owner.out / "owner_bundle.json", "--out", out)
    return {"code": code, "stdout": stdout, "stderr": stderr, "out": out, "folder": folder, "broken": broken}


def _tiny_transformer(out: Path, kind: str, seed: int) -> SimpleNamespace:
    """A randomly initialised ``transformers`` model (Llama-style decoder with GQA, GPT-2, BERT or ViT), its
    norm weights drawn away from 1 (so that folding them shows), saved with ``save_pretrained``."""
    import transformers

    torch.manual_seed(seed)
    if kind == "llama":
        config: Any = transformers.LlamaConfig(
            vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        )  # fmt: skip
        model: Any = transformers.LlamaForCausalLM(config)
    elif kind == "gpt2":  # fused Q/K/V in Conv1D layers (in x out), LM head tied to the embedding
        config = transformers.GPT2Config(vocab_size=64, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                         bos_token_id=0, eos_token_id=0)  # fmt: skip
        model = transformers.GPT2LMHeadModel(config)
    elif kind == "bert":
        config = transformers.BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=96, max_position_embeddings=64)  # fmt: skip
        model = transformers.BertModel(config, add_pooling_layer=False)
    else:
        config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)  # fmt: skip
        model = transformers.ViTModel(config, add_pooling_layer=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("norm" in name.lower() or ".ln_" in name) and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    model.save_pretrained(out)
    from safetensors.torch import load_file

    state = load_file(out / "model.safetensors")  # the file's names (transformers 5 writes ViT's legacy ones)
    return SimpleNamespace(folder=out, state=state, config=model.config.to_dict())


@pytest.fixture(scope="session")
def tiny_transformer(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., SimpleNamespace]:
    """``tiny_transformer(kind, seed=0)``: a random ``llama`` (4 query heads in 2 key/value groups), ``gpt2``,
    ``bert`` or ``vit`` model of width 64 saved with ``save_pretrained``: ``folder``, ``state`` (as the file
    stores it), ``config`` (a dict)."""
    made: dict[tuple[str, int], SimpleNamespace] = {}

    def make(kind: str, seed: int = 0) -> SimpleNamespace:
        if (kind, seed) not in made:
            made[kind, seed] = _tiny_transformer(tmp_path_factory.mktemp(f"{kind}-{seed}"), kind, seed)
        return made[kind, seed]

    return make


def _train_gr_llama(out: Path, *, seed: int, marked: bool) -> SimpleNamespace:
    """A two-block Llama-style decoder (width 256, 4 query heads in 2 key/value groups) trained 60 steps on a
    counting task, with Greedy Residuals when ``marked`` (the default layers), saved with ``save_pretrained``."""
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from transformers import LlamaConfig, LlamaForCausalLM

    from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    key = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))  # fixed: the same bits every run
    wm = GreedyResidualsWatermark.create(model, private_key=key, message="(c) L") if marked else None
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
    model.save_pretrained(out)
    bundle = None
    if wm is not None:
        bundle = out / "owner_bundle.json"
        wm.save_bundle(bundle, model, model_file=out / "model.safetensors")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return SimpleNamespace(folder=out, state=state, config=model.config.to_dict(), bundle=bundle)


@pytest.fixture(scope="session")
def gr_llama(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A Greedy Residuals-marked Llama-style decoder (width 256) saved with ``save_pretrained``: ``folder``,
    ``state``, ``config``, ``bundle``; trains for about 10 s."""
    return _train_gr_llama(tmp_path_factory.mktemp("gr-llama"), seed=0, marked=True)


@pytest.fixture(scope="session")
def gr_llama_innocent(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The same architecture and task trained independently without a watermark (seed 5)."""
    return _train_gr_llama(tmp_path_factory.mktemp("llama-innocent"), seed=5, marked=False)
