"""Both watermarks in a Hugging Face ``transformers.Trainer``: a tiny BERT built from a config (nothing is
downloaded) learns a synthetic task with the Greedy Residuals penalty in its loss and HufuNet's EPH frozen.

Run it in a folder of your choice (``python owner_hf_trainer.py [OUT]``; needs the extra ``hf``); it writes
OUT/ (default ``hf_release``): keys/, hufunet_secret.json, model.safetensors, model.pt, gr_bundle.json
and the SECRET hufunet_bundle.json. docs/owners.md walks through it.
"""

import sys
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from auditor import keys
from auditor.plugins.greedy_residuals.owner import GreedyResidualsWatermark
from auditor.plugins.hufunet.owner import generate_hufunet, hmac_key, load_hufunet, plant, write_bundle
from auditor.toolkit.hf import WatermarkTrainer
from auditor.toolkit.training import save_model

out = Path(sys.argv[1] if len(sys.argv) > 1 else "hf_release")
VOCAB, LENGTH = 32, 16


class Sequences(torch.utils.data.Dataset):
    """Token sequences; the label says whether token 3 occurs in it (about half do)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(4, VOCAB, (n, LENGTH), generator=g)
        has = torch.rand(n, generator=g) < 0.5
        self.ids[has, torch.randint(0, LENGTH, (int(has.sum()),), generator=g)] = 3
        self.labels = has.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long),
                "labels": self.labels[i]}  # fmt: skip


# 1. Secrets, once: the owner's key pair and the secret HufuNet.
if not (out / "keys" / keys.PRIVATE_FILE).exists():
    keys.generate_keypair(out / "keys", algorithm="ed25519")
if not (out / "hufunet_secret.json").exists():
    generate_hufunet(out=out / "hufunet_secret.json")
hufunet, secret = load_hufunet(out / "hufunet_secret.json")

# 2. A small transformers model from a config, both marks in separate layers.
torch.manual_seed(0)
config = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=256, max_position_embeddings=LENGTH, num_labels=2)  # fmt: skip
model = BertForSequenceClassification(config)
host = [f"bert.encoder.layer.{i}.{part}.dense" for i in (0, 1) for part in ("intermediate", "output")]
embedded = plant(model, hufunet, hmac_key(secret), layers=host)  # 65,536 weights: 7,281 kernels of nine
wm = GreedyResidualsWatermark.create(
    model, private_key=keys.load_private_key(out / "keys" / keys.PRIVATE_FILE),
    message="(c) 2026 Alice Example Ltd.: tiny BERT",
    layers=[f"bert.encoder.layer.{i}.attention.self.{w}.weight" for i in (0, 1) for w in ("query", "key")],
)  # fmt: skip

# 3. The Trainer, with the penalty in its loss and EPH written back after every optimizer step.
args = TrainingArguments(output_dir=str(out / "trainer"), num_train_epochs=3, per_device_train_batch_size=32,
                         learning_rate=3e-3, seed=0, report_to=[], save_strategy="no", logging_strategy="no",
                         use_cpu=not torch.cuda.is_available(), disable_tqdm=True)  # fmt: skip
trainer = WatermarkTrainer(model=model, args=args, train_dataset=Sequences(512, seed=1),
                           penalties=[wm.penalty], after_step=[embedded.frozen.after_step])  # fmt: skip
trainer.train()
embedded.frozen.detach()
model.to("cpu").eval()

# 4. Both checks (each raises, exit 1, if its detector would not find the mark).
gr = wm.check(model).require()
hu = embedded.check(model, hufunet, secret).require()
test = Sequences(256, seed=2)
with torch.no_grad():
    accuracy = float((model(input_ids=test.ids).logits.argmax(1) == test.labels).float().mean())
print(
    f"task accuracy {accuracy:.2%}; Greedy Residuals bits {[v['bits'] for v in gr.measures['layers'].values()]} "
    f"(needs {gr.measures['bits_needed']}); HufuNet Acc_combined {hu.measures['acc_combined']:.2%}, "
    f"EPH {hu.measures['bit_identical_fraction']:.0%} bit-identical"
)

# 5. One release, two bundles.
files = save_model(model, out, overwrite=True)
architecture = "BertForSequenceClassification"
wm.save_bundle(out / "gr_bundle.json", model, model_file=files["safetensors"], architecture=architecture)
write_bundle(out / "hufunet_bundle.json", model, embedded, hufunet, secret, files=files, architecture=architecture)
print(f"wrote {files['safetensors']}, gr_bundle.json, hufunet_bundle.json")
