"""Loads a merged checkpoint the way a user would, with transformers alone.

    merge_oracle.py logits MODEL_DIR TEXTS.json
    merge_oracle.py logits_ids MODEL_DIR IDS.json

A 4-bit checkpoint computes as `bnb_reference.pin_fp32` says (fp32, any CPU).

prints JSON: the loading report (missing / unexpected / mismatched keys), the config fields a
classifier needs, and the fp32 logits of the texts, tokenized by the checkpoint's own
tokenizer and padded as a batch (so the pad token must be set); or of the token ids given
({"input_ids": [[...]], "attention_mask": [[...]]}, for checkpoints without a tokenizer).
"""
import json
import sys

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from bnb_reference import pin_fp32


def logits(model_dir, texts_path):
    texts = json.load(open(texts_path))
    model, info = AutoModelForSequenceClassification.from_pretrained(
        model_dir, output_loading_info=True, dtype=torch.float32
    )
    pin_fp32(model)  # a 4-bit checkpoint: bitsandbytes' portable math in fp32, any CPU
    model.eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch).logits
    c = model.config
    print(json.dumps({
        "missing": sorted(info["missing_keys"]),
        "unexpected": sorted(info["unexpected_keys"]),
        "mismatched": [str(m) for m in info["mismatched_keys"]],
        "architectures": c.architectures,
        "num_labels": c.num_labels,
        "id2label": {str(k): v for k, v in c.id2label.items()},
        "label2id": c.label2id,
        "problem_type": c.problem_type,
        "pad_token_id": c.pad_token_id,
        "tokenizer_pad_id": tok.pad_token_id,
        "input_ids": [[i for i, m in zip(r, k) if m] for r, k in
                      zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist())],
        "logits": out.tolist(),
    }))


def logits_ids(model_dir, ids_path):
    batch = {k: torch.tensor(v) for k, v in json.load(open(ids_path)).items()}
    model, info = AutoModelForSequenceClassification.from_pretrained(
        model_dir, output_loading_info=True, dtype=torch.float32
    )
    pin_fp32(model)  # a 4-bit checkpoint: bitsandbytes' portable math in fp32, any CPU
    model.eval()
    with torch.no_grad():
        out = model(**batch).logits
    print(json.dumps({
        "missing": sorted(info["missing_keys"]),
        "unexpected": sorted(info["unexpected_keys"]),
        "mismatched": [str(m) for m in info["mismatched_keys"]],
        "architectures": model.config.architectures,
        "class": type(model).__name__,
        "num_labels": model.config.num_labels,
        "logits": out.tolist(),
    }))


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("logits", "logits_ids"):
        sys.exit(__doc__)
    {"logits": logits, "logits_ids": logits_ids}[sys.argv[1]](sys.argv[2], sys.argv[3])
