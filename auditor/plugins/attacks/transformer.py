"""Function-preserving edits of transformers: heads, MLP units, head scales, norm folding, residual rotation,
rotary row order.

The edits are :mod:`auditor.toolkit.transformers`' (the ones ``restore-transformer`` undoes). Each attack
reads a Hugging Face-style model (a ``save_pretrained`` folder, or a ``.safetensors`` file with the model's
``config.json`` beside it), edits its state dict, checks that the function is kept, and writes
``.safetensors``. The check builds the model from ``config.json`` with ``transformers`` (the optional extra
``hf``) and compares the logits on seeded token ids (or images, for a ViT); an edit that changes them by more
than :data:`FUNCTION_TOLERANCE` is not written. ``rope-reorder`` is made for llama.cpp's interleaved rotary
kernel, so its check compares attention scores under that kernel with the original's under Hugging Face's.
Without ``transformers`` installed the check is skipped and the summary says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from auditor.errors import NotApplicableError, UsageError
from auditor.toolkit.attack import BuiltinAttack, Param

if TYPE_CHECKING:
    from auditor.toolkit.transformers import Layout, State

__all__ = [
    "FUNCTION_TOLERANCE",
    "HeadPermute",
    "HeadScale",
    "MlpPermute",
    "NormFold",
    "ResidualRotate",
    "RopeReorder",
]

#: Largest logit (or attention-score) change accepted before refusing to write (float32 rounding is ~1e-6).
FUNCTION_TOLERANCE = 1e-4

_LAYERS = Param("layers", None, "Comma-separated block numbers to edit (default: every block).")
_PAPER = "issue 16: function-preserving edits of transformers"


def _layers(value: str | None) -> list[int] | None:
    if not value:
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"layers must be comma-separated block numbers, not {value!r}") from None


class _TransformerAttack(BuiltinAttack):
    suffixes = (".safetensors",)
    function_preserving = True
    paper = _PAPER
    #: Whether the check runs under llama.cpp's interleaved rotary kernel instead of the model itself.
    interleaved_check = False

    def run(self, model: Path, out: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Read, edit, check the function, write."""
        from auditor.toolkit import transformers as tt
        from auditor.toolkit.modelio import read_model, write_model

        config = tt.read_config(model)
        if config is None:
            raise NotApplicableError(f"{model}: no config.json beside the model: the heads are not in the weights")
        state = read_model(model).state_dict()
        layout = tt.layout_of(state, config)
        if layout is None:
            raise NotApplicableError(f"{model}: not a transformer these edits know (a Llama-style or GPT-2 "
                                     "decoder, BERT or ViT)")  # fmt: skip
        edited, info = self.edit(state, layout, options)
        check = self.check(config, state, edited, layout, options["seed"])
        if check is not None and not check <= FUNCTION_TOLERANCE:
            raise UsageError(f"{model}: the edit changed the outputs by {check:.3g} (over {FUNCTION_TOLERANCE:g}):"
                             " not written")  # fmt: skip
        write_model(edited, out)
        what = "attention scores under llama.cpp's interleaved rotary kernel" if self.interleaved_check else "logits"
        shown = "not run: transformers is not installed" if check is None else check
        return {"layout": layout.kind, "heads": layout.heads, "kv_heads": layout.kv_heads,
                "max_output_change": shown, "checked": what, **info}  # fmt: skip

    def check(self, config: dict[str, Any], before: State, after: State, layout: Layout, seed: int) -> float | None:
        """The largest output change (None when ``transformers`` is not installed)."""
        from auditor.toolkit import transformers as tt

        if self.interleaved_check:
            return tt.max_rotary_score_change(config, before, after, layout, seed=seed)
        try:
            import transformers  # noqa: F401
        except ImportError:
            return None
        return tt.max_logit_change(config, before, after, seed=seed)

    def edit(self, state: State, layout: Layout, options: dict[str, Any]) -> tuple[State, dict[str, Any]]:
        """The edited state and what was done."""
        raise NotImplementedError


class HeadPermute(_TransformerAttack):
    """Attention heads in a random order per block (Q, K, V rows per head, O columns; GQA groups kept)."""

    id = "head-permute"
    description = "Permute every block's attention heads (key/value groups, query heads within them)."
    params = (_LAYERS,)

    def edit(self, state: State, layout: Layout, options: dict[str, Any]) -> tuple[State, dict[str, Any]]:
        """Permute heads."""
        from auditor.toolkit import transformers as tt

        edited, orders = tt.permute_heads(state, layout, seed=options["seed"], layers=_layers(options["layers"]))
        return edited, {"query_head_orders": orders}


class MlpPermute(_TransformerAttack):
    """MLP hidden units in a random order per block (gate/up rows, down columns)."""

    id = "mlp-permute"
    description = "Permute every block's MLP hidden units (gate/up rows and down columns)."
    params = (_LAYERS,)

    def edit(self, state: State, layout: Layout, options: dict[str, Any]) -> tuple[State, dict[str, Any]]:
        """Permute units."""
        from auditor.toolkit import transformers as tt

        edited, moved = tt.permute_mlp(state, layout, seed=options["seed"], layers=_layers(options["layers"]))
        return edited, {"units_moved": moved}


class HeadScale(_TransformerAttack):
    """Per key/value group: Q by c and K by 1/c, V by c' and O by 1/c'."""

    id = "head-scale"
    description = "Scale each head's Q by c and K by 1/c, its V by c' and O columns by 1/c'."
    params = (
        _LAYERS,
        Param("low", 0.25, "Smallest factor (log-uniform in [low, high]).", float),
        Param("high", 4.0, "Largest factor.", float),
    )

    def edit(self, state: State, layout: Layout, options: dict[str, Any]) -> tuple[State, dict[str, Any]]:
        """Scale heads."""
        from auditor.toolkit import transformers as tt

        edited = tt.scale_heads(state, layout, seed=options["seed"], low=options["low"], high=options["high"],
                                layers=_layers(options["layers"]))  # fmt: skip
        return edited, {}


class NormFold(_TransformerAttack):
    """Every pre-norm's weight (and bias) folded into the linear layers that read it."""

    id = "norm-fold"
    description = "Fold LayerNorm/RMSNorm weights into the following linear layers; the norm weights become 1."

    def edit(self, state: State, layout: Layout, options: dict[str, Any]) -> tuple[State, dict[str, Any]]:
        """Fold."""
        from auditor.toolkit import transformers as tt

        edited, folded = tt.fold_norms(state, layout)
        return edited, {"folded": folded}


class ResidualRotate(_TransformerAttack):
    """The residual stream rotated by a random orthogonal matrix (norms folded first; RMSNorm models)."""

    id = "residual-rotate"
    description = "Rotate the residual stream by a random orthogonal R: embedding and writers by R, readers by R^T."
    paper = "issue 16; QuaRot (2024), SliceGPT (2024): computational invariance of RMSNorm transformers"

    def edit(self, state: State, layout: Layout, options: dict[str, Any]) -> tuple[State, dict[str, Any]]:
        """Rotate."""
        from auditor.toolkit import transformers as tt

        edited, rotation = tt.rotate_residual(state, layout, seed=options["seed"])
        return edited, {"hidden": int(rotation.shape[0])}


class RopeReorder(_TransformerAttack):
    """llama.cpp's per-head Q/K row order for its interleaved rotary kernel, written as safetensors."""

    id = "rope-reorder"
    description = "Reorder each head's Q and K rows as llama.cpp's converter does (interleaved rotary pairs)."
    paper = "issue 16; llama.cpp convert_hf_to_gguf.py LlamaModel.permute"
    params = (_LAYERS,)
    interleaved_check = True

    def edit(self, state: State, layout: Layout, options: dict[str, Any]) -> tuple[State, dict[str, Any]]:
        """Reorder."""
        from auditor.toolkit import transformers as tt

        return tt.rope_reorder(state, layout, layers=_layers(options["layers"])), {}
