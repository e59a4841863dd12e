#!/usr/bin/env python3
"""The reference stack's QLoRA training steps, timed: transformers + PEFT + bitsandbytes.

    reference_qlora.py --model_dir M --data_dir D --order order.json --warmup 2 --steps 20 \
        --threads 2 --out result.json

What runs is the seed recipe: LlamaForSequenceClassification loaded in 4 bit
(BitsAndBytesConfig: nf4, double quantization, blocksize 64, compute dtype fp32 on the CPU,
bf16 on a GPU, or `--compute_dtype`), `prepare_model_for_kbit_training` (gradient
checkpointing on), PEFT LoRA
(r=8, alpha=16, dropout 0.1, q_proj/v_proj, SEQ_CLS: the `score` head is trained too),
bnb.optim.AdamW8bit (lr 3e-4, weight decay 0.01) and get_linear_schedule_with_warmup (6%).
Rows are GLUE TSV rows of `data_dir/train.tsv`, batched exactly as `order.json` says (the
batches our trainer draws, written by `bench_kernels order`), text
f"{prompt} Sentence 1: {s1} Sentence 2: {s2}", right padding with pad = eos; `--max_length N`
truncates each text to N tokens on the right, special tokens included (as our trainer's
`max_length` does: one text, HF's truncation=True).

Throughput counts non-pad tokens over the timed steps (after `--warmup` untimed ones);
step times are wall-clock per step (synchronised on a GPU). Peak memory: VmHWM (resident
high-water mark) of this process and, on a GPU, torch.cuda.max_memory_allocated/reserved.
`--load_only` just loads the 4-bit model (row 4 of the benchmark) and reports the peak.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

PERFECT = "Does sentence 1 mean the same as sentence 2?"


def vm_hwm_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def read_glue_tsv(path: Path):
    """(sentence1, sentence2, label) per row of a GLUE MRPC TSV, in file order."""
    with open(path, encoding="utf-8-sig") as f:
        lines = f.read().splitlines()
    rows = []
    for line in lines[1:]:
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 5:
            sys.exit(f"{path}: malformed row {line!r}")
        rows.append((cols[3], cols[4], int(cols[0])))
    return rows


def load_4bit_classifier(model_dir, device, compute_dtype=None):
    """The reference's model: NF4 with double quantization (bf16 compute on a GPU, fp32 on a
    CPU unless `compute_dtype` says), a 2-label head, EOS as the pad token, right padding.
    Returns (model, tokenizer, compute dtype)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BitsAndBytesConfig

    compute = getattr(torch, compute_dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    qcfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=2, quantization_config=qcfg, device_map={"": device}, dtype=compute
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, compute


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--data_dir", type=Path)
    ap.add_argument("--order", type=Path, help="JSON list of batches (lists of row indices)")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compute_dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    ap.add_argument("--prompt", default=PERFECT)
    ap.add_argument("--max_length", type=int, default=None,
                    help="truncate each text to this many tokens, special tokens included, on the right "
                         "(our trainer's max_length: the tokenizer's truncation=True)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--lora_alpha", type=float, default=16)
    ap.add_argument("--target_modules", default="q_proj,v_proj", help="comma list, or all-linear (PEFT's)")
    ap.add_argument("--use_dora", action="store_true")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--load_only", action="store_true")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    import bitsandbytes as bnb
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training
    from transformers import get_linear_schedule_with_warmup

    cuda = a.device.startswith("cuda")
    t_load = time.perf_counter()
    model, tokenizer, compute = load_4bit_classifier(a.model_dir, a.device, a.compute_dtype)
    load_s = time.perf_counter() - t_load
    result = {
        "stack": "transformers+peft+bitsandbytes",
        "versions": {
            "torch": torch.__version__,
            "bitsandbytes": bnb.__version__,
            "transformers": __import__("transformers").__version__,
            "peft": __import__("peft").__version__,
        },
        "device": a.device,
        "threads": torch.get_num_threads(),
        "load_s": load_s,
    }
    if a.load_only:
        result["peak_rss_bytes"] = vm_hwm_bytes()
        if cuda:
            result["peak_gpu_allocated_bytes"] = torch.cuda.max_memory_allocated()
            result["peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved()
        a.out.write_text(json.dumps(result, indent=2))
        print(json.dumps(result))
        return

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    result["gradient_checkpointing"] = True
    result["compute_dtype"] = str(compute).replace("torch.", "")
    targets = "all-linear" if a.target_modules == "all-linear" else a.target_modules.split(",")
    lora = LoraConfig(
        r=a.r,
        lora_alpha=a.lora_alpha,
        lora_dropout=0.1,
        target_modules=targets,
        use_dora=a.use_dora,
        task_type=TaskType.SEQ_CLS,
        bias="none",
    )
    result["lora"] = {"r": a.r, "lora_alpha": a.lora_alpha, "target_modules": a.target_modules,
                      "use_dora": a.use_dora}
    model = get_peft_model(model, lora)
    trainable, total = model.get_nb_trainable_parameters()
    result["trainable_params"], result["all_params"] = trainable, total

    rows = read_glue_tsv(a.data_dir / "train.tsv")
    if a.order:
        batches = json.loads(a.order.read_text())
    else:
        batches = [list(range(i, min(i + a.batch_size, len(rows)))) for i in range(0, len(rows), a.batch_size)]
    need = a.warmup + a.steps
    if len(batches) < need:
        sys.exit(f"only {len(batches)} batches for {need} steps")
    batches = batches[:need]
    steps_per_epoch = len(batches)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.AdamW8bit(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, int(0.06 * steps_per_epoch), steps_per_epoch)
    model.train()

    step_s, tokens, losses, seq_lens = [], [], [], []
    for k, batch in enumerate(batches):
        texts = [f"{a.prompt} Sentence 1: {rows[i][0]} Sentence 2: {rows[i][1]}" for i in batch]
        labels = torch.tensor([rows[i][2] for i in batch])
        if a.max_length:
            enc = tokenizer(texts, padding=True, truncation=True, max_length=a.max_length, return_tensors="pt")
        else:
            enc = tokenizer(texts, padding=True, return_tensors="pt")
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        enc = {k2: v.to(a.device) for k2, v in enc.items()}
        out = model(**enc, labels=labels.to(a.device))
        out.loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        step_s.append(dt)
        tokens.append(int(enc["attention_mask"].sum().item()))
        seq_lens.append(enc["attention_mask"].shape[1])
        losses.append(loss)
        print(f"step {k + 1}/{need} loss {loss:.4f} {dt:.2f} s {tokens[-1]} tokens", flush=True)

    timed_s, timed_tok = step_s[a.warmup :], tokens[a.warmup :]
    result.update(
        {
            "warmup_steps": a.warmup,
            "steps": a.steps,
            "batch_size": a.batch_size,
            "max_length": a.max_length,
            "seq_len": [int(n) for n in seq_lens],
            "tokens": timed_tok,
            "step_s": timed_s,
            "losses": losses,
            "median_step_s": statistics.median(timed_s),
            "tokens_per_s": sum(timed_tok) / sum(timed_s),
            "peak_rss_bytes": vm_hwm_bytes(),
        }
    )
    if cuda:
        result["peak_gpu_allocated_bytes"] = torch.cuda.max_memory_allocated()
        result["peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved()
    a.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k not in ("tokens", "step_s", "losses", "seq_len")}))


if __name__ == "__main__":
    main()
