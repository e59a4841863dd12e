#!/usr/bin/env python3
"""The reference stack's inference on a trained adapter, timed: rows/s of scoring a split.

    reference_infer.py --model_dir M --adapter A --data_dir D --split dev --batch_size 8 \
        --threads 2 --out result.json

The model is loaded as bench/reference_qlora.py loads it (AutoModelForSequenceClassification
in 4 bit through BitsAndBytesConfig: nf4, double quantization, compute dtype fp32 on the CPU
unless `--compute_dtype`), then PEFT's `PeftModel.from_pretrained(model, adapter)` (LoRA and
the `score` head our trainer saved). Rows are the GLUE TSV rows of `data_dir/<split>.tsv` in
file order, the text f"{prompt} Sentence 1: {s1} Sentence 2: {s2}", batches of `--batch_size`
with right padding (pad = eos), `torch.inference_mode()`, softmax and argmax per row. The
figure is rows over the wall time of the scoring loop (tokenising included, loading not), the
same span our `eval`/`predict` report as "scored N rows in S s"; the load time is reported
apart. Accuracy is reported as a sanity check against ours.
"""
import argparse
import json
import time
from pathlib import Path

from reference_qlora import PERFECT, read_glue_tsv, vm_hwm_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--data_dir", type=Path, required=True)
    ap.add_argument("--split", default="dev", help="the TSV file's stem: dev -> dev.tsv")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compute_dtype", default=None)
    ap.add_argument("--prompt", default=PERFECT)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from peft import PeftModel
    from reference_qlora import load_4bit_classifier

    cuda = a.device.startswith("cuda")
    t_load = time.perf_counter()
    model, tokenizer, compute = load_4bit_classifier(a.model_dir, a.device, a.compute_dtype)
    model = PeftModel.from_pretrained(model, a.adapter)
    model.eval()
    load_s = time.perf_counter() - t_load

    rows = read_glue_tsv(a.data_dir / f"{a.split}.tsv")
    preds, tokens = [], 0
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(rows), a.batch_size):
            chunk = rows[i : i + a.batch_size]
            texts = [f"{a.prompt} Sentence 1: {s1} Sentence 2: {s2}" for s1, s2, _ in chunk]
            enc = tokenizer(texts, padding=True, return_tensors="pt").to(a.device)
            logits = model(**enc).logits.float()
            preds += logits.softmax(-1).argmax(-1).tolist()
            tokens += int(enc["attention_mask"].sum().item())
    if cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    correct = sum(int(p == r[2]) for p, r in zip(preds, rows))
    result = {
        "rows": len(rows),
        "tokens": tokens,
        "batch_size": a.batch_size,
        "load_s": load_s,
        "scoring_s": secs,
        "rows_per_s": len(rows) / secs,
        "accuracy": correct / len(rows) if rows else None,
        "compute_dtype": str(compute).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "peak_rss_bytes": vm_hwm_bytes(),
    }
    a.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
