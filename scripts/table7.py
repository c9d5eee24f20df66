"""The HufuNet paper's Table 7 synthetic attack at digits scale, audited with restore (docs/restore.md).

Takes the owner's model from `make demo` (one SmallCNN carrying both
watermarks, `demo-out/owner/`), then, as a thief would: fine-tunes it (3
epochs, Adam 1e-3, on the thief's own split), expands conv2 by 10% of its
channels (paper Appendix B: the new channels' readers get zero weights),
permutes every channel, rescales every channel by a random factor in
[0.25, 4], and finally prunes 10%-50% of every convolution by magnitude. Each
result is audited against both owner bundles with the owner's released model
as reference (restore on), as `auditor audit --reference` does.

    make demo && python scripts/table7.py [--owner demo-out/owner]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from auditor.audit.detect import run_detectors
from auditor.audit.load import load_model
from auditor.audit.restore import run_restorers
from auditor.bundle import load_bundle
from auditor.toolkit import data as datasets
from auditor.toolkit import models as zoo
from auditor.toolkit import training
from auditor.toolkit.channels import graph_with_tensors, tensors_of
from auditor.toolkit.edits import expand, permute, scale


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--owner", type=Path, default=Path("demo-out/owner"), help="the owner's folder from make demo")
    args = parser.parse_args()
    torch.set_num_threads(1)
    reference_file = args.owner / "released" / "model.safetensors"
    bundles = [load_bundle(args.owner / f"{name}_bundle.json") for name in ("greedy_residuals", "hufunet")]
    reference = load_model(reference_file)

    model = zoo.build("cnn", width=2)
    model.load_state_dict(load_file(reference_file))
    training.train(model, datasets.digits(split_seed=7).train, training.TrainConfig(epochs=3, lr=1e-3, seed=7))
    graph = zoo.model_graph(model.eval())
    tensors = tensors_of(graph)
    extra = tensors["conv2"]["weight"].shape[0] // 10
    tensors = expand(graph, tensors, "conv2", extra, seed=7)
    graph = graph_with_tensors(graph, tensors)
    tensors, _ = permute(graph, tensors, seed=7)
    tensors = scale(graph, tensors, seed=7)

    print("| pruning | Greedy Residuals (best layer) | HufuNet Acc_combined (DiffAcc) | restore guard |")
    print("|---:|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for rate in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5):
            pruned = {name: dict(params) for name, params in tensors.items()}
            for params in pruned.values():
                w = params.get("weight")
                if w is not None and w.dim() == 4 and rate > 0:
                    w = w.clone()
                    w[w.abs() <= w.abs().flatten().kthvalue(int(rate * w.numel())).values] = 0.0
                    params["weight"] = w
            path = Path(tmp) / f"attacked-{rate:.1f}.safetensors"
            save_file({f"{la}.{r}": t.contiguous() for la, ps in pruned.items() for r, t in ps.items()}, path)
            restored, log = run_restorers(load_model(path), reference)
            findings = {f.scheme: f for f in run_detectors(restored, bundles=bundles)}
            gr, hf = findings["greedy-residuals"], findings["hufunet"]
            derived = [e["log"]["evidence"].get("derived") for e in log if e.get("status") == "ok"]
            score = min((e["log"]["evidence"].get("score") or 0.0 for e in log if e.get("status") == "ok"), default=0.0)
            gr_text = f"{gr.verdict.value}: {gr.metrics.get('best_k')}/256 bits in {gr.metrics.get('best_layer')}"
            hf_text = (
                f"{hf.verdict.value}: {hf.metrics['acc_combined']:.2%} ({hf.metrics['diff_acc']:.3f})"
                if "acc_combined" in hf.metrics else f"{hf.verdict.value}"
            )  # fmt: skip
            guard = f"derived (score {score:.3f}), restored" if derived and all(derived) else "left alone"
            print(f"| {rate:.0%} | {gr_text} | {hf_text} | {guard} |", flush=True)


if __name__ == "__main__":
    main()
