"""Built-in attacks that know no scheme: removal attacks on model files, and the robustness evaluation.

Every attack reads a model file of any supported format, writes the attacked
model to a new file and never touches its input (see
:mod:`auditor.toolkit.attack`). The modules group them by what they change:
:mod:`.weights` (pruning, casts, quantization), :mod:`.structure` (the
function-preserving channel edits of the restore stage, cut-off and
supplement), :mod:`.export` (batch-norm folding, ONNX export) and
:mod:`.training` (fine-tuning). The attacks on one scheme (forging, overwriting)
live in that scheme's plugin. ``auditor attack`` and ``auditor evaluate`` come
from :mod:`.cli`.
"""
