"""Function-preserving edits of transformer state dicts, and the layout they need.

A transformer computes the same function after edits that no channel restorer
sees: its attention heads in another order (Q, K, V rows per head and the
matching O columns; with grouped-query attention the key/value groups and the
query heads within each group), its MLP units in another order (gate/up rows
and down columns), a factor per head moved between Q and K or V and O, its
norm weights folded into the linear layers that read the norm's output, and,
for an RMSNorm model, the whole residual stream rotated by an orthogonal R
(embedding and every writer times R, every reader times R^T, as QuaRot and
SliceGPT do). llama.cpp's converter also reorders each head's Q and K rows for
its interleaved rotary kernel; a thief may apply that to safetensors too.

Everything here works on a flat Hugging Face-style state dict (``name ->
tensor``) and a :class:`Layout` read off its keys (:func:`layout_of`): a
Llama-style decoder (``model.layers.N.self_attn.q_proj`` ...), a GPT-2 decoder
(``transformer.h.N.attn.c_attn``: fused Q/K/V in Conv1D layers, which the edits
split and transpose, :func:`split_conv1d`, and write back as they were,
:func:`merge_conv1d`), or a BERT/ViT encoder
(``encoder.layer.N.attention.self.query`` ...). The number of heads is not in
the weights: it comes from the model's ``config.json`` (:func:`read_config`) or
the caller. ``transformers`` is imported only by :func:`max_logit_change`, which
builds the model to check an edit; nothing else here needs it. Every function
returns new tensors and leaves its inputs alone.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from auditor.errors import UsageError

__all__ = [
    "Block",
    "Layout",
    "State",
    "fold_norms",
    "merge_conv1d",
    "layout_of",
    "max_logit_change",
    "max_rotary_score_change",
    "permute_heads",
    "permute_mlp",
    "random_orthogonal",
    "read_config",
    "rope_reorder",
    "rope_unreorder",
    "rotate_residual",
    "scale_heads",
    "split_conv1d",
]

#: A flat state dict.
State = dict[str, torch.Tensor]
#: The largest config.json read (a real one is a few KiB).
CONFIG_LIMIT = 1 << 20

_LLAMA = re.compile(r"^(.*layers\.(\d+))\.self_attn\.q_proj\.weight$")
_BERT = re.compile(r"^(.*layer\.(\d+))\.attention\.(self|attention)\.query\.weight$")
_GPT2 = re.compile(r"^(.*h\.(\d+))\.attn\.c_attn\.weight$")  # GPT-2: fused Q/K/V, Conv1D (in x out)
_VIT = re.compile(r"^(.*layers\.(\d+))\.attention\.q_proj\.weight$")  # ViT in transformers 5


@dataclasses.dataclass(frozen=True)
class Block:
    """One transformer block's module names (each a prefix of ``.weight``/``.bias``)."""

    q: str
    k: str
    v: str
    o: str
    up: str
    down: str
    gate: str | None
    attn_norm: str | None  # the norm whose output Q, K, V read (pre-norm models only)
    mlp_norm: str | None  # the norm whose output gate/up read (pre-norm models only)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a transformer's parts are in its state dict, and its head geometry."""

    kind: str  # "llama" (RMSNorm, rotary, pre-norm) or "encoder" (BERT/ViT)
    blocks: tuple[Block, ...]
    heads: int
    kv_heads: int
    head_dim: int
    embed: str | None
    final_norm: str | None
    lm_head: str | None
    rms: bool
    rotary: bool
    pre_norm: bool

    @property
    def group(self) -> int:
        """Query heads per key/value head."""
        return self.heads // self.kv_heads


def read_config(path: Path) -> dict[str, Any] | None:
    """The ``config.json`` beside ``path`` (or in it, for a folder) as a dict, or None when there is none or it
    is not a small JSON object (a hostile file never raises here: the caller then guesses or asks)."""
    folder = path if path.is_dir() else path.parent
    candidate = folder / "config.json"
    try:
        if not candidate.is_file() or candidate.stat().st_size > CONFIG_LIMIT:
            return None
        value = json.loads(candidate.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _count(config: Mapping[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1 << 20:
            return value
    return None


def layout_of(state: Mapping[str, Any], config: Mapping[str, Any] | None = None, *,
              head_dim: int | None = None) -> Layout | None:  # fmt: skip
    """The layout of ``state`` (None when it is no transformer this module knows); its values need only a
    ``shape`` (tensors, or a graph's unread tensor references).

    Heads come from ``config`` (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``), else from
    ``head_dim`` (a guess the caller makes), else 64 when it divides the query rows (logged by callers as a
    guess). Raises :class:`~auditor.errors.UsageError` when the geometry does not fit the weights.
    """
    llama = sorted((int(m.group(2)), m.group(1)) for k in state if (m := _LLAMA.match(k)))
    bert = sorted((int(m.group(2)), m.group(1), m.group(3)) for k in state if (m := _BERT.match(k)))
    vit5 = sorted((int(m.group(2)), m.group(1)) for k in state if (m := _VIT.match(k)))
    gpt2 = sorted((int(m.group(2)), m.group(1)) for k in state if (m := _GPT2.match(k)))
    blocks: list[Block] = []
    if gpt2 and not llama:
        state = split_conv1d(state, gpt2=True)
        kind = "gpt2"
        for _, p in gpt2:
            blocks.append(Block(f"{p}.attn.q", f"{p}.attn.k", f"{p}.attn.v", f"{p}.attn.c_proj", f"{p}.mlp.c_fc",
                                f"{p}.mlp.c_proj", None, f"{p}.ln_1", f"{p}.ln_2"))  # fmt: skip
        base = gpt2[0][1].rsplit("h.", 1)[0]
        embed, final, rms = f"{base}wte", f"{base}ln_f", False
        lm_head = "lm_head" if "lm_head.weight" in state and not _tied(state, f"{base}wte") else None
    elif vit5 and not llama:
        kind = "encoder"
        for _, p in vit5:
            blocks.append(Block(f"{p}.attention.q_proj", f"{p}.attention.k_proj", f"{p}.attention.v_proj",
                                f"{p}.attention.o_proj", f"{p}.mlp.fc1", f"{p}.mlp.fc2", None,
                                f"{p}.layernorm_before", f"{p}.layernorm_after"))  # fmt: skip
        embed, final, lm_head, rms = None, None, None, False
    elif llama:
        kind = "llama"
        for _, p in llama:
            gate = f"{p}.mlp.gate_proj" if f"{p}.mlp.gate_proj.weight" in state else None
            blocks.append(Block(f"{p}.self_attn.q_proj", f"{p}.self_attn.k_proj", f"{p}.self_attn.v_proj",
                                f"{p}.self_attn.o_proj", f"{p}.mlp.up_proj", f"{p}.mlp.down_proj", gate,
                                f"{p}.input_layernorm", f"{p}.post_attention_layernorm"))  # fmt: skip
        base = llama[0][1].rsplit("layers.", 1)[0]
        embed, final = f"{base}embed_tokens", f"{base}norm"
        lm_head = "lm_head" if "lm_head.weight" in state else None
        rms = f"{final}.bias" not in state
    elif bert:
        kind = "encoder"
        vit = bert[0][2] == "attention"
        for _, p, _ in bert:
            if vit:  # ViT: pre-norm (layernorm_before/after), output.dense is the MLP's down projection
                blocks.append(Block(f"{p}.attention.attention.query", f"{p}.attention.attention.key",
                                    f"{p}.attention.attention.value", f"{p}.attention.output.dense",
                                    f"{p}.intermediate.dense", f"{p}.output.dense", None, f"{p}.layernorm_before",
                                    f"{p}.layernorm_after"))  # fmt: skip
            else:  # BERT: post-norm; the norms sit on the residual stream and fold into nothing
                blocks.append(Block(f"{p}.attention.self.query", f"{p}.attention.self.key",
                                    f"{p}.attention.self.value", f"{p}.attention.output.dense",
                                    f"{p}.intermediate.dense", f"{p}.output.dense", None, None, None))  # fmt: skip
        embed, final, lm_head, rms = None, None, None, False
    else:
        return None
    if any(f"{name}.weight" not in state for b in blocks for name in (b.q, b.k, b.v, b.o, b.up, b.down)):
        return None
    q_rows = state[f"{blocks[0].q}.weight"].shape[0]
    k_rows = state[f"{blocks[0].k}.weight"].shape[0]
    config = config or {}
    heads = _count(config, "num_attention_heads", "n_head")
    d = _count(config, "head_dim") or (q_rows // heads if heads else None) or head_dim
    if d is None:
        d = 64 if q_rows % 64 == 0 and k_rows % 64 == 0 else q_rows
    if q_rows % d or k_rows % d:
        raise UsageError(f"heads of {d} dimensions do not divide the query ({q_rows}) and key ({k_rows}) rows")
    heads, kv = q_rows // d, k_rows // d
    if heads % kv:
        raise UsageError(f"{heads} query heads do not split into {kv} key/value groups")
    if embed is not None and f"{embed}.weight" not in state:
        embed = None
    if final is not None and f"{final}.weight" not in state:
        final = None
    return Layout(kind, tuple(blocks), heads, kv, d, embed, final, lm_head, rms, rotary=kind == "llama",
                  pre_norm=blocks[0].attn_norm is not None)  # fmt: skip


def _tied(state: Mapping[str, Any], embed: str) -> bool:
    a, b = state.get("lm_head.weight"), state.get(f"{embed}.weight")
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)


class _Shape:
    """A stand-in with only a shape, for reading a layout off unread tensors."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape


def split_conv1d(state: Mapping[str, Any], *, gpt2: bool | None = None) -> dict[str, Any]:
    """GPT-2's state in the layout every edit uses: ``c_attn`` split into ``attn.q``/``attn.k``/``attn.v`` and
    every Conv1D weight transposed to ``out x in``. Other keys, and other models' states, are returned as is.
    Values need only a ``shape`` (then shapes are mapped, nothing is read)."""
    blocks = [m.group(1) for k in state if (m := _GPT2.match(k))]
    if not blocks or gpt2 is False:
        return dict(state)
    out = dict(state)
    for p in blocks:
        w = out.pop(f"{p}.attn.c_attn.weight")
        b = out.pop(f"{p}.attn.c_attn.bias", None)
        hidden = w.shape[1] // 3
        for i, part in enumerate("qkv"):
            if isinstance(w, torch.Tensor):
                out[f"{p}.attn.{part}.weight"] = w[:, i * hidden : (i + 1) * hidden].T.contiguous()
                if b is not None:
                    out[f"{p}.attn.{part}.bias"] = b[i * hidden : (i + 1) * hidden].clone()
            else:
                out[f"{p}.attn.{part}.weight"] = _Shape((hidden, w.shape[0]))
        for name in (f"{p}.attn.c_proj", f"{p}.mlp.c_fc", f"{p}.mlp.c_proj"):
            v = out[f"{name}.weight"]
            out[f"{name}.weight"] = v.T.contiguous() if isinstance(v, torch.Tensor) else _Shape(tuple(v.shape)[::-1])
    return out


def merge_conv1d(state: Mapping[str, torch.Tensor], layout: Layout) -> State:
    """:func:`split_conv1d` undone (GPT-2); any other layout's state is returned as is."""
    out = dict(state)
    if layout.kind != "gpt2":
        return out
    for b in layout.blocks:
        p = b.q.rsplit(".attn.", 1)[0]
        out[f"{p}.attn.c_attn.weight"] = torch.cat([out.pop(f"{x}.weight").T for x in (b.q, b.k, b.v)], dim=1)
        if f"{b.q}.bias" in out:
            out[f"{p}.attn.c_attn.bias"] = torch.cat([out.pop(f"{x}.bias") for x in (b.q, b.k, b.v)])
        for name in (b.o, b.up, b.down):
            out[f"{name}.weight"] = out[f"{name}.weight"].T.contiguous()
    return out


def _copy(state: Mapping[str, torch.Tensor]) -> State:
    return {k: v.clone() for k, v in state.items()}


def _enter(state: Mapping[str, torch.Tensor], layout: Layout) -> State:
    """A copy of ``state`` in the edits' layout (GPT-2's Conv1D weights split and transposed)."""
    return split_conv1d(_copy(state)) if layout.kind == "gpt2" else _copy(state)


def _rows(state: State, name: str, index: torch.Tensor, bias: bool = True) -> None:
    state[f"{name}.weight"] = state[f"{name}.weight"][index]
    if bias and f"{name}.bias" in state:
        state[f"{name}.bias"] = state[f"{name}.bias"][index]


def _scale_rows(state: State, name: str, factors: torch.Tensor) -> None:
    state[f"{name}.weight"] = state[f"{name}.weight"] * factors[:, None]
    if f"{name}.bias" in state:
        state[f"{name}.bias"] = state[f"{name}.bias"] * factors


def _chosen(layout: Layout, layers: list[int] | None) -> list[int]:
    chosen = list(range(len(layout.blocks))) if layers is None else layers
    bad = [i for i in chosen if not 0 <= i < len(layout.blocks)]
    if bad:
        raise UsageError(f"no block {bad[0]}: the model has blocks 0..{len(layout.blocks) - 1}")
    return chosen


def head_rows(layout: Layout, heads: torch.Tensor) -> torch.Tensor:
    """Row indices of ``heads`` (head order) in a projection of ``head_dim``-row blocks."""
    d = layout.head_dim
    return (heads[:, None] * d + torch.arange(d)).reshape(-1)


def apply_head_order(state: State, layout: Layout, block: Block, groups: torch.Tensor, q_heads: torch.Tensor) -> None:
    """Put key/value group ``groups[j]`` in slot ``j`` and query head ``q_heads[i]`` in slot ``i`` (in place);
    the O columns follow the query heads."""
    k_index, q_index = head_rows(layout, groups), head_rows(layout, q_heads)
    _rows(state, block.q, q_index)
    _rows(state, block.k, k_index)
    _rows(state, block.v, k_index)
    state[f"{block.o}.weight"] = state[f"{block.o}.weight"][:, q_index]


def permute_heads(state: Mapping[str, torch.Tensor], layout: Layout, *, seed: int,
                  layers: list[int] | None = None) -> tuple[State, dict[str, list[int]]]:  # fmt: skip
    """Attention heads in a random order per block: key/value groups permuted, query heads permuted within
    their group and moved with it. Returns the state and, per block, the query-head order."""
    out = _enter(state, layout)
    gen = torch.Generator().manual_seed(seed)
    orders: dict[str, list[int]] = {}
    r = layout.group
    for i in _chosen(layout, layers):
        block = layout.blocks[i]
        groups = torch.randperm(layout.kv_heads, generator=gen)
        q_heads = torch.cat([g * r + torch.randperm(r, generator=gen) for g in groups.tolist()])
        apply_head_order(out, layout, block, groups, q_heads)
        orders[block.q] = q_heads.tolist()
    return merge_conv1d(out, layout), orders


def apply_unit_order(state: State, block: Block, index: torch.Tensor) -> None:
    """MLP unit ``index[j]`` in slot ``j`` (in place): gate/up rows and down columns."""
    for name in (block.gate, block.up):
        if name is not None:
            _rows(state, name, index)
    state[f"{block.down}.weight"] = state[f"{block.down}.weight"][:, index]


def permute_mlp(state: Mapping[str, torch.Tensor], layout: Layout, *, seed: int,
                layers: list[int] | None = None) -> tuple[State, int]:  # fmt: skip
    """MLP hidden units in a random order per block; returns the state and how many units moved."""
    out = _enter(state, layout)
    gen = torch.Generator().manual_seed(seed)
    moved = 0
    for i in _chosen(layout, layers):
        block = layout.blocks[i]
        index = torch.randperm(out[f"{block.up}.weight"].shape[0], generator=gen)
        apply_unit_order(out, block, index)
        moved += int((index != torch.arange(len(index))).sum())
    return merge_conv1d(out, layout), moved


def _factors(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    if not 0 < low <= high:
        raise UsageError(f"scale factors need 0 < low <= high, not low={low}, high={high}")
    u = torch.rand(n, generator=gen, dtype=torch.float64)
    return torch.exp(torch.log(torch.tensor(low, dtype=torch.float64)) * (1 - u)
                     + torch.log(torch.tensor(high, dtype=torch.float64)) * u).float()  # fmt: skip


def scale_heads(state: Mapping[str, torch.Tensor], layout: Layout, *, seed: int, low: float = 0.25,
                high: float = 4.0, layers: list[int] | None = None) -> State:  # fmt: skip
    """Per key/value group: its query heads' rows times ``c`` and its key rows over ``c``; its value rows times
    ``c'`` and its query heads' O columns over ``c'``; factors log-uniform in [low, high]."""
    out = _enter(state, layout)
    gen = torch.Generator().manual_seed(seed)
    d, r = layout.head_dim, layout.group
    for i in _chosen(layout, layers):
        block = layout.blocks[i]
        qk, vo = _factors(layout.kv_heads, low, high, gen), _factors(layout.kv_heads, low, high, gen)
        per_k = qk.repeat_interleave(d)
        per_q = qk.repeat_interleave(d * r)
        _scale_rows(out, block.q, per_q)
        _scale_rows(out, block.k, 1 / per_k)
        _scale_rows(out, block.v, vo.repeat_interleave(d))
        out[f"{block.o}.weight"] = out[f"{block.o}.weight"] / vo.repeat_interleave(d * r)[None, :]
    return merge_conv1d(out, layout)


def readers(layout: Layout) -> list[tuple[str | None, list[str]]]:
    """Each pre-norm's name and the linear layers that read its output (the final norm's: the LM head)."""
    pairs: list[tuple[str | None, list[str]]] = []
    for b in layout.blocks:
        pairs.append((b.attn_norm, [b.q, b.k, b.v]))
        pairs.append((b.mlp_norm, [x for x in (b.gate, b.up) if x is not None]))
    if layout.lm_head is not None:
        pairs.append((layout.final_norm, [layout.lm_head]))
    return pairs


def fold_norms(state: Mapping[str, torch.Tensor], layout: Layout) -> tuple[State, list[str]]:
    """Every pre-norm's weight (and bias) folded into the linear layers that read it: ``W diag(g)``, bias
    ``b + W beta``; the norm's weight set to 1 and its bias to 0. Returns the state and the norms folded."""
    if not layout.pre_norm:
        raise UsageError("a post-norm model's norms sit on the residual stream: there is nothing to fold them into")
    out = _enter(state, layout)
    folded = []
    for norm, names in readers(layout):
        if norm is None or f"{norm}.weight" not in out:
            continue
        g = out[f"{norm}.weight"]
        beta = out.get(f"{norm}.bias")
        for name in names:
            w = out[f"{name}.weight"]
            if beta is not None:
                out[f"{name}.bias"] = out.get(f"{name}.bias", torch.zeros(w.shape[0])) + w @ beta
            out[f"{name}.weight"] = w * g[None, :]
        out[f"{norm}.weight"] = torch.ones_like(g)
        if beta is not None:
            out[f"{norm}.bias"] = torch.zeros_like(beta)
        folded.append(norm)
    return merge_conv1d(out, layout), folded


def random_orthogonal(n: int, *, seed: int) -> torch.Tensor:
    """A Haar-random ``n x n`` orthogonal matrix (QR of a Gaussian, signs fixed), computed in float64."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def writers(layout: Layout) -> list[str]:
    """The linear layers that add to the residual stream (O and down projections)."""
    return [name for b in layout.blocks for name in (b.o, b.down)]


def rotate_residual(state: Mapping[str, torch.Tensor], layout: Layout, *, seed: int,
                    rotation: torch.Tensor | None = None) -> tuple[State, torch.Tensor]:  # fmt: skip
    """The residual stream rotated by an orthogonal ``R`` (random unless given): norms folded first, then the
    embedding and every writer's output times ``R``, every reader's input (and the LM head's) times ``R^T``.
    Only for RMSNorm models (a LayerNorm's mean does not commute with a rotation). Returns the state and R."""
    if not layout.rms or layout.embed is None:
        raise UsageError("the residual stream can be rotated only in an RMSNorm decoder with an embedding")
    if layout.lm_head is None:
        raise UsageError("tied embeddings: the LM head shares the embedding, and the final norm cannot be folded")
    out, _ = fold_norms(state, layout)
    hidden = out[f"{layout.embed}.weight"].shape[1]
    rot = random_orthogonal(hidden, seed=seed) if rotation is None else rotation.double()
    for name in [layout.embed] + [n for _, names in readers(layout) for n in names]:
        out[f"{name}.weight"] = (out[f"{name}.weight"].double() @ rot).float()
    for name in writers(layout):
        out[f"{name}.weight"] = (rot.T @ out[f"{name}.weight"].double()).float()
        if f"{name}.bias" in out:
            out[f"{name}.bias"] = (out[f"{name}.bias"].double() @ rot).float()
    return out, rot.float()


def _reorder(w: torch.Tensor, heads: int, inverse: bool) -> torch.Tensor:
    half = w.shape[0] // heads // 2
    if inverse:
        return w.reshape(heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
    return w.reshape(heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_reorder(state: Mapping[str, torch.Tensor], layout: Layout, *, inverse: bool = False,
                 layers: list[int] | None = None) -> State:  # fmt: skip
    """llama.cpp's converter's row order for its interleaved rotary kernel (``LlamaModel.permute``) applied to
    every Q and K projection (``inverse``: undone)."""
    if not layout.rotary or layout.head_dim % 2:
        raise UsageError("rotary row reordering needs a rotary decoder with even head dimensions")
    out = _copy(state)
    for i in _chosen(layout, layers):
        b = layout.blocks[i]
        for name, n in ((b.q, layout.heads), (b.k, layout.kv_heads)):
            for role in ("weight", "bias"):
                if f"{name}.{role}" in out:
                    out[f"{name}.{role}"] = _reorder(out[f"{name}.{role}"], n, inverse)
    return out


def rope_unreorder(state: Mapping[str, torch.Tensor], layout: Layout, *, layers: list[int] | None = None) -> State:
    """:func:`rope_reorder` undone."""
    return rope_reorder(state, layout, inverse=True, layers=layers)


def _model(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """The model ``config`` names with ``state`` loaded through ``from_pretrained`` (which maps a file's legacy
    key names, such as ViT's ``encoder.layer.N.attention.attention.query``, to the class's own)."""
    import tempfile

    import transformers
    from safetensors.torch import save_file

    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "transformers_version"})
    architectures = cfg.architectures or []
    cls = getattr(transformers, architectures[0], None) if architectures else transformers.AutoModel
    if cls is None:
        raise UsageError(f"transformers has no class {architectures[0]!r}")
    with tempfile.TemporaryDirectory() as folder:
        cfg.save_pretrained(folder)
        save_file({k: v.detach().contiguous() for k, v in state.items()}, f"{folder}/model.safetensors",
                  metadata={"format": "pt"})  # fmt: skip
        model, info = cls.from_pretrained(folder, output_loading_info=True)
    missing = [k for k in info["missing_keys"] if not any(x in k for x in ("rotary", "position_ids", "pooler"))]
    if missing or info["unexpected_keys"]:
        raise UsageError(f"the state dict does not fit {type(model).__name__}: missing {missing[:3]},"
                         f" unexpected {list(info['unexpected_keys'])[:3]}")  # fmt: skip
    return model.float().eval()


def max_logit_change(config: Mapping[str, Any], before: Mapping[str, torch.Tensor],
                     after: Mapping[str, torch.Tensor], *, seed: int = 0, tokens: int = 16) -> float:  # fmt: skip
    """The largest change of the model's outputs (logits, or the last hidden state of an encoder without a
    head) between two state dicts, on a seeded batch of token ids or images. Imports ``transformers``."""
    gen = torch.Generator().manual_seed(seed)
    outputs = []
    for state in (before, after):
        model = _model(config, state)
        if "image_size" in config:
            size, channels = int(config["image_size"]), int(config.get("num_channels", 3))
            inputs: dict[str, torch.Tensor] = {"pixel_values": torch.randn(2, channels, size, size, generator=gen)}
        else:
            vocab = int(config["vocab_size"])
            inputs = {"input_ids": torch.randint(0, vocab, (2, tokens), generator=gen)}
        gen = torch.Generator().manual_seed(seed)  # the same inputs for both
        with torch.no_grad():
            result = model(**inputs)
        outputs.append(result.logits if getattr(result, "logits", None) is not None else result.last_hidden_state)
    return float((outputs[0].double() - outputs[1].double()).abs().max())


def _rope(x: torch.Tensor, positions: torch.Tensor, base: float, interleaved: bool) -> torch.Tensor:
    """Rotary embedding of ``x`` (positions x heads x d): HF's half-split pairs, or interleaved pairs."""
    d = x.shape[-1]
    angles = positions[:, None].double() * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = torch.cos(angles)[:, None, :], torch.sin(angles)[:, None, :]
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).reshape(x.shape)
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def max_rotary_score_change(config: Mapping[str, Any], before: Mapping[str, torch.Tensor],
                            after: Mapping[str, torch.Tensor], layout: Layout, *, seed: int = 0) -> float:  # fmt: skip
    """The largest change of the attention scores ``q . k`` of every block on seeded residual vectors at
    positions 0..31: ``before`` under Hugging Face's rotary kernel, ``after`` under llama.cpp's interleaved one
    (the runtime a reordered file is made for). Needs no ``transformers``."""
    gen = torch.Generator().manual_seed(seed)
    base = float(config.get("rope_theta", 10000.0))
    positions = torch.arange(32)
    worst = 0.0
    for block in layout.blocks:
        x = torch.randn(32, before[f"{block.q}.weight"].shape[1], generator=gen, dtype=torch.float64)
        scores = []
        for state, interleaved in ((before, False), (after, True)):
            q = (x @ state[f"{block.q}.weight"].double().T).reshape(32, layout.heads, layout.head_dim)
            k = (x @ state[f"{block.k}.weight"].double().T).reshape(32, layout.kv_heads, layout.head_dim)
            q, k = _rope(q, positions, base, interleaved), _rope(k, positions, base, interleaved)
            k = k.repeat_interleave(layout.group, dim=1)
            scores.append(torch.einsum("phd,shd->hps", q, k))
        worst = max(worst, float((scores[0] - scores[1]).abs().max()))
    return worst
