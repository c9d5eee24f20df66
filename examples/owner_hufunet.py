"""HufuNet in the owner's own PyTorch loop, own model and own data: from the secret HufuNet to the release.

Run it in a folder of your choice (``python owner_hufunet.py [OUT]``); it writes OUT/ (default
``hufunet_release``): hufunet_secret.json, model.safetensors, model.pt and the SECRET owner_bundle.json.
docs/owners.md walks through it.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from sequences import SequenceNet, data  # the owner's own model and data (examples/sequences.py)
from torch.utils.data import DataLoader

from auditor.plugins.hufunet.owner import generate_hufunet, hmac_key, load_hufunet, plant, write_bundle
from auditor.toolkit.training import evaluate, save_model

out = Path(sys.argv[1] if len(sys.argv) > 1 else "hufunet_release")
secret_file = out / "hufunet_secret.json"

# 1. The owner's secret HufuNet, once (`auditor hufunet generate --out hufunet_secret.json` does the same):
#    a small network trained on public digits, with a fresh random placement key. Never share this file.
if not secret_file.exists():
    generate_hufunet(out=secret_file)
hufunet, secret = load_hufunet(secret_file)

# 2. The owner's model; EPH (HufuNet's kernels) placed at the positions the key gives and frozen there.
#    SequenceNet has no 3x3 convolution, so its linear layers host EPH as groups of nine weights.
torch.manual_seed(0)
train_set, test_set = data()
model = SequenceNet()
embedded = plant(model, hufunet, hmac_key(secret), layers=["fc1"])

# 3. The owner's own loop: one extra line after every optimiser step writes EPH back.
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
loader = DataLoader(train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
for _epoch in range(6):
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        embedded.frozen.after_step(model)
embedded.frozen.detach()
model.eval()

# 4. Would the detector find it? EPH read back bit for bit, Acc_combined above its bar (raises, exit 1, if not).
check = embedded.check(model, hufunet, secret).require()
print(
    f"EPH: {len(embedded.positions)} kernels, {check.measures['bit_identical_fraction']:.0%} bit-identical; "
    f"Acc_combined {check.measures['acc_combined']:.2%} (needs above {check.measures['acc_combined_needed']:.2%})"
)

# 5. The release, and the SECRET owner bundle (mode 0600: the HufuNet and the key; only for the analyst).
files = save_model(model, out, overwrite=True)  # model.safetensors and model.pt
write_bundle(out / "owner_bundle.json", model, embedded, hufunet, secret, files=files, architecture="SequenceNet")
print(f"test accuracy {evaluate(model, test_set):.2%}; wrote {files['safetensors']} and {out / 'owner_bundle.json'}")
