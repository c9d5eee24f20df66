"""Greedy Residuals in a plain PyTorch training loop. Run it in a folder of your choice."""

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from auditor import keys
from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark
from auditor.toolkit.data import digits
from auditor.toolkit.models import SmallCNN
from auditor.toolkit.training import evaluate

out = Path("gr_example")
if not (out / "keys" / keys.PRIVATE_FILE).exists():
    keys.generate_keypair(out / "keys")  # once; owner_private.pem never leaves your hands
private_key = keys.load_private_key(out / "keys" / keys.PRIVATE_FILE)

torch.manual_seed(0)
data = digits()  # scikit-learn's bundled 8x8 digits, fixed split
model = SmallCNN()
wm = GreedyResidualsWatermark.create(model, private_key=private_key, message="(c) 2025 Alice Example Ltd.")
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
for _epoch in range(20):
    for x, y in DataLoader(data.train, batch_size=64, shuffle=True):
        loss = F.cross_entropy(model(x), y) + wm.penalty(model)  # the one change to the loop
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

save_file(model.state_dict(), out / "model.safetensors")
wm.save_bundle(out / "owner_bundle.json", model, model_file=out / "model.safetensors")
print(f"test accuracy {evaluate(model, data.test):.2%}")
for name, rate in wm.rates(model).items():
    print(f"detection rate {name}: {rate:.2%}")
