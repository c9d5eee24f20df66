"""The names an owner's tensors have in the file the owner released, which are not always their module names.

A bundle names the owner's layers so that the detector finds them in a suspect by name. The owner knows
them by their module paths (``model.named_parameters()``), but a saver may write other names:
``transformers`` 5 builds a ViT under new module names (``vit.layers.0.mlp.fc1``) and its
``save_pretrained`` writes the checkpoint names every released ViT has
(``vit.encoder.layer.0.intermediate.dense``); a tied head is written once, under the embedding's name.
:func:`names_in_file` finds, for each of the owner's tensors, the tensor of the released safetensors file
(or sharded checkpoint) that holds it bit for bit, so the bundle records the name as the file has it.

Matching by value, not by a table of renamings, works for any saver that writes the weights unchanged,
needs no ``transformers`` import, and leaves a name as it is where the file holds the tensor under that
name, holds it converted (another dtype, a transposed or fused layout), or holds it more than once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

__all__ = ["checkpoint_files", "names_in_file", "saved_layer"]

#: safetensors' dtype names of the dtypes an owner's weights have.
_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
}
#: The index of a sharded checkpoint (``save_pretrained`` past its shard size).
INDEX_SUFFIX = ".safetensors.index.json"


def checkpoint_files(model_file: Path) -> list[Path]:
    """The safetensors files of a released checkpoint: the file itself, every shard an index names (in
    name order), or, for a folder, its ``model.safetensors`` or ``model.safetensors.index.json``. Empty for
    anything else (a ``.pt`` file, a missing path), for which no name can be read."""
    path = Path(model_file)
    if path.is_dir():
        for name in ("model.safetensors", "model" + INDEX_SUFFIX):
            if (path / name).is_file():
                return checkpoint_files(path / name)
        return []
    if path.name.endswith(INDEX_SUFFIX) and path.is_file():
        weight_map = json.loads(path.read_text(encoding="utf-8")).get("weight_map", {})
        shards = sorted({str(v) for v in weight_map.values()} if isinstance(weight_map, dict) else set())
        # A shard outside the index's folder is not the owner's checkpoint: left out.
        return [path.parent / s for s in shards if Path(s).name == s and (path.parent / s).is_file()]
    if path.suffix == ".safetensors" and path.is_file():
        return [path]
    return []


def _opened(files: list[Path], stack: ExitStack) -> Iterator[tuple[str, Any]]:
    from safetensors import safe_open

    for file in files:
        handle = stack.enter_context(safe_open(str(file), framework="pt"))
        for key in handle.keys():
            yield key, handle


def names_in_file(tensors: Mapping[str, torch.Tensor], model_file: Path) -> dict[str, str]:
    """For each of ``tensors`` (name -> the owner's tensor), the name of the tensor of ``model_file``
    (see :func:`checkpoint_files`) that holds it: its own name when the file holds it bit for bit under
    that name; else the one other tensor of the same shape and dtype that is bit-identical to it; else
    (nothing identical, or several) its own name."""
    result = {name: name for name in tensors}
    files = checkpoint_files(Path(model_file))
    if not files:
        return result
    with ExitStack() as stack:
        handles = dict(_opened(files, stack))
        slices = {key: handle.get_slice(key) for key, handle in handles.items()}
        by_shape: dict[tuple[tuple[int, ...], str], list[str]] = {}
        for key, sl in slices.items():
            by_shape.setdefault((tuple(sl.get_shape()), str(sl.get_dtype())), []).append(key)

        def same(key: str, tensor: torch.Tensor) -> bool:
            # The first row is a cheap filter: only a tensor that agrees there is read whole (and not kept,
            # so that a large model's file is never held in memory at once).
            if tensor.ndim and not torch.equal(slices[key][0:1], tensor[0:1]):
                return False
            return torch.equal(handles[key].get_tensor(key), tensor)

        for name, value in tensors.items():
            tensor = value.detach().to("cpu").contiguous()
            dtype = _DTYPES.get(tensor.dtype)
            if dtype is None:
                continue
            candidates = by_shape.get((tuple(tensor.shape), dtype), [])
            if name in candidates and same(name, tensor):
                continue
            equal = [key for key in candidates if key != name and same(key, tensor)]
            if len(equal) == 1:
                result[name] = equal[0]
    return result


def saved_layer(saved_name: str, layer: str, param: str) -> tuple[str, str]:
    """``(layer, param)`` of a tensor the file holds as ``saved_name`` (:func:`names_in_file`), for a bundle
    entry that was ``(layer, param)`` in the owner's model: split at the last dot, where the file's name
    still ends in a weight's name (``weight``, ``weight_hh_l0``); else the entry as it was."""
    if saved_name == (f"{layer}.{param}" if layer else param):
        return layer, param
    head, _, tail = saved_name.rpartition(".")
    return (head, tail) if tail.startswith("weight") else (layer, param)
