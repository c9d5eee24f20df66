"""Both watermarks in a transformer built from a ``transformers`` configuration, trained in the owner's own loop:
GPT-2, a Llama-style decoder (RMSNorm, rotary attention), BERT or ViT at width 128 on a built-in task (nothing is
downloaded); HufuNet's EPH in the attention matrices, Greedy Residuals in the layers its default rule picks.

Run it in a folder of your choice (``python owner_transformers.py [ARCH [OUT]]``, ARCH one of gpt2, llama, bert,
vit, default llama; needs the extra ``hf``); it writes OUT/ (default ``ARCH_release``): keys/,
hufunet_secret.json, the ``save_pretrained`` folder release/, gr_bundle.json and the SECRET hufunet_bundle.json.
docs/owners.md ("Transformers") walks through it.
"""

import sys
import time
from pathlib import Path

import torch

from auditor import keys
from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark
from auditor.plugins.hufunet.owner import generate_hufunet, hmac_key, load_hufunet, plant, write_bundle
from auditor.toolkit.hf_tasks import attention_layers, build, save_pretrained, task_for

arch = sys.argv[1] if len(sys.argv) > 1 else "llama"
out = Path(sys.argv[2] if len(sys.argv) > 2 else f"{arch}_release")

# 1. Secrets, once: the owner's key pair and the secret HufuNet.
if not (out / "keys" / keys.PRIVATE_FILE).exists():
    keys.generate_keypair(out / "keys", algorithm="ed25519")
if not (out / "hufunet_secret.json").exists():
    generate_hufunet(out=out / "hufunet_secret.json")
hufunet, secret = load_hufunet(out / "hufunet_secret.json")

# 2. The model from its config and its task; EPH planted (and frozen) in the attention matrices first, then
#    Greedy Residuals in the layers its default rule picks: the largest matrices, here the MLP's.
torch.manual_seed(0)
model, task = build(arch), task_for(arch)
embedded = plant(model, hufunet, hmac_key(secret), layers=attention_layers(model))
wm = GreedyResidualsWatermark.create(
    model, private_key=keys.load_private_key(out / "keys" / keys.PRIVATE_FILE),
    message=f"(c) 2026 Alice Example Ltd.: {type(model).__name__}",
)  # fmt: skip
shared = set(wm.layer_names) & {f"{name}.weight" for name in attention_layers(model)}
assert not shared, f"both marks in {shared}: name the Greedy Residuals layers (layers=[...])"

# 3. The owner's own loop: the penalty in the loss, EPH written back after every optimiser step.
began = time.perf_counter()
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
generator = torch.Generator().manual_seed(0)
model.train()
for _step in range(200):
    loss = task.loss(model, task.batch(generator, 32)) + wm.penalty(model)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    embedded.frozen.after_step(model)
embedded.frozen.detach()
model.eval()
seconds = time.perf_counter() - began

# 4. Both checks (each raises, exit 1, if its detector would not find the mark).
gr = wm.check(model).require()
hu = embedded.check(model, hufunet, secret).require()
print(f"{arch}: {task.name}, accuracy {task.accuracy(model):.2%} after 200 steps ({seconds:.0f} s)")
print(f"Greedy Residuals: {gr.measures['layers']} (detection needs {gr.measures['bits_needed']} bits)")
print(
    f"HufuNet: {len(embedded.positions)} EPH kernels in {len(embedded.entries)} attention matrices "
    f"({embedded.eph_fraction:.2%} of their kernels of nine weights), {hu.measures['bit_identical_fraction']:.0%} "
    f"bit-identical, Acc_combined {hu.measures['acc_combined']:.2%}"
)

# 5. The release as save_pretrained writes it (config.json and the weights), and two bundles that name each
#    layer as that file does: the Greedy Residuals one is public, the HufuNet one SECRET.
files = save_pretrained(model, out / "release")
architecture = type(model).__name__
wm.save_bundle(out / "gr_bundle.json", model, model_file=files["safetensors"], architecture=architecture)
write_bundle(out / "hufunet_bundle.json", model, embedded, hufunet, secret, files=files, architecture=architecture)
print(f"wrote {out / 'release'}, gr_bundle.json, hufunet_bundle.json")
