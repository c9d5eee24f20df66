"""Both watermarks in one owner's loop: Greedy Residuals in the convolutions, HufuNet's EPH in fc1.

Run it in a folder of your choice (``python owner_both.py [OUT]``); it writes OUT/ (default
``both_release``): keys/, hufunet_secret.json, model.safetensors, model.pt, gr_bundle.json (public)
and hufunet_bundle.json (SECRET). docs/owners.md walks through it.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from sequences import SequenceNet, data  # the owner's own model and data (examples/sequences.py)
from torch.utils.data import DataLoader

from auditor import keys
from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark
from auditor.plugins.hufunet.owner import generate_hufunet, hmac_key, load_hufunet, plant, write_bundle
from auditor.toolkit.training import evaluate, save_model

out = Path(sys.argv[1] if len(sys.argv) > 1 else "both_release")

# 1. Secrets, once: the owner's key pair and the secret HufuNet.
if not (out / "keys" / keys.PRIVATE_FILE).exists():
    keys.generate_keypair(out / "keys", algorithm="ed25519")
if not (out / "hufunet_secret.json").exists():
    generate_hufunet(out=out / "hufunet_secret.json")
hufunet, secret = load_hufunet(out / "hufunet_secret.json")

# 2. The owner's model with both marks, in separate layers: EPH is planted (and frozen) in fc1 first,
#    then the Greedy Residuals signature goes into the two convolutions.
torch.manual_seed(0)
train_set, test_set = data()
model = SequenceNet()
embedded = plant(model, hufunet, hmac_key(secret), layers=["fc1"])
wm = GreedyResidualsWatermark.create(
    model, private_key=keys.load_private_key(out / "keys" / keys.PRIVATE_FILE),
    message="(c) 2026 Alice Example Ltd.: SequenceNet", layers=["conv1.weight", "conv2.weight"],
)  # fmt: skip

# 3. The owner's own loop: the penalty in the loss, EPH written back after every step.
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
loader = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
for _epoch in range(8):
    for x, y in loader:
        loss = F.cross_entropy(model(x), y) + wm.penalty(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        embedded.frozen.after_step(model)
embedded.frozen.detach()
model.eval()

# 4. Both checks (each raises, exit 1, if its detector would not find the mark).
gr = wm.check(model).require()
hu = embedded.check(model, hufunet, secret).require()
print(f"Greedy Residuals: {gr.measures['layers']} (detection needs {gr.measures['bits_needed']} bits)")
print(
    f"HufuNet: EPH {hu.measures['bit_identical_fraction']:.0%} bit-identical, "
    f"Acc_combined {hu.measures['acc_combined']:.2%}"
)

# 5. One release, two bundles: the Greedy Residuals one is public, the HufuNet one SECRET.
files = save_model(model, out, overwrite=True)
wm.save_bundle(out / "gr_bundle.json", model, model_file=files["safetensors"], architecture="SequenceNet")
write_bundle(out / "hufunet_bundle.json", model, embedded, hufunet, secret, files=files, architecture="SequenceNet")
print(
    f"test accuracy {evaluate(model, test_set):.2%}; wrote {files['safetensors']}, gr_bundle.json, hufunet_bundle.json"
)
