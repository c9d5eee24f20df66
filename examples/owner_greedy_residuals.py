"""Greedy Residuals in the owner's own PyTorch loop, own model and own data: from the key to the release.

Run it in a folder of your choice (``python owner_greedy_residuals.py [OUT]``); it writes OUT/ (default
``gr_release``): keys/, model.safetensors, model.pt and owner_bundle.json. docs/owners.md walks through it.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from sequences import SequenceNet, data  # the owner's own model and data (examples/sequences.py)
from torch.utils.data import DataLoader

from auditor import keys
from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark
from auditor.toolkit.training import evaluate, save_model

out = Path(sys.argv[1] if len(sys.argv) > 1 else "gr_release")

# 1. The owner's key pair, once (`auditor keys new --out keys/` does the same); the private key stays here.
if not (out / "keys" / keys.PRIVATE_FILE).exists():
    keys.generate_keypair(out / "keys", algorithm="ed25519")
private_key = keys.load_private_key(out / "keys" / keys.PRIVATE_FILE)

# 2. The owner's model and data, and the watermark: the message is signed, the signature's bits are the mark.
torch.manual_seed(0)
train_set, test_set = data()
model = SequenceNet()
wm = GreedyResidualsWatermark.create(
    model, private_key=private_key, message="(c) 2026 Alice Example Ltd.: SequenceNet",
    layers=["conv1.weight", "conv2.weight"],  # or None: the default rule (docs/greedy_residuals.md)
)  # fmt: skip
del private_key  # only the signature is kept

# 3. The owner's own loop: one extra term in the loss.
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
loader = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
for _epoch in range(8):
    for x, y in loader:
        loss = F.cross_entropy(model(x), y) + wm.penalty(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
model.eval()

# 4. Would the detector find it? Every marked layer must carry the bits detection needs (raises, exit 1, if not).
check = wm.check(model).require()
for name, layer in check.measures["layers"].items():
    print(f"{name}: {layer['bits']}/{layer['of']} signature bits (detection needs {check.measures['bits_needed']})")

# 5. The release and the owner bundle (public: it holds the message, signature and public key, nothing secret).
files = save_model(model, out, overwrite=True)  # model.safetensors and model.pt
wm.save_bundle(out / "owner_bundle.json", model, model_file=files["safetensors"], architecture="SequenceNet")
print(f"test accuracy {evaluate(model, test_set):.2%}; wrote {files['safetensors']} and {out / 'owner_bundle.json'}")
