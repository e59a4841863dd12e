"""Loads a merged checkpoint the way a user would, with transformers alone.

    merge_oracle.py logits MODEL_DIR TEXTS.json

prints JSON: the loading report (missing / unexpected / mismatched keys), the config fields a
classifier needs, and the fp32 logits of the texts, tokenized by the checkpoint's own
tokenizer and padded as a batch (so the pad token must be set).
"""
import json
import sys

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def logits(model_dir, texts_path):
    texts = json.load(open(texts_path))
    model, info = AutoModelForSequenceClassification.from_pretrained(
        model_dir, output_loading_info=True, dtype=torch.float32
    )
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


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "logits":
        sys.exit(__doc__)
    logits(sys.argv[2], sys.argv[3])
