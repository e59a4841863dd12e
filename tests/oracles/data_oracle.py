"""Oracle for tests/data.rs: MRPC read independently with Python csv / pyarrow, copies of it in
the other layouts, a Llama-3-like tokenizer trained with Python `tokenizers`, HF tokenisation
and padding, and checks that transformers loads the demo assets.

    data_oracle.py layouts MRPC_DIR OUT_DIR
    data_oracle.py train_tokenizer MRPC_DIR OUT_DIR
    data_oracle.py hf_encode MRPC_DIR OUT_JSON MAX_LENGTH[:SIDE] TOKDIR...   (MAX_LENGTH 0 = none; SIDE right|left)
    data_oracle.py check_demo DEMO_DIR OUT_JSON
    data_oracle.py lora_probe DEMO_DIR LR EPOCHS   (manual: is the demo learnable by LoRA q/v
                                                    + head on the frozen random model? ~1 min/epoch on 2 CPUs)
"""
import csv
import json
import os
import shutil
import sys

PROMPTS = {
    "none": "",
    "perfect": "Does sentence 1 mean the same as sentence 2?",
    "conflicting": "Bob sent a message to Alice, which one is better?",
    "insufficient": "Cut the crap, what's your GPA?",
}
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def read_tsv(path):
    """Rows as dicts, quoting off (a tab is the only separator), BOM stripped."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        rows = list(reader)
    out = []
    for n, r in enumerate(rows):
        assert None not in r and None not in r.values(), f"{path}: ragged row {n}"
        label = int(r["Quality"]) if "Quality" in r else None
        idx = int(r["index"]) if "index" in r else n
        out.append({"sentence1": r["#1 String"], "sentence2": r["#2 String"], "label": label, "idx": idx})
    return out


def pyarrow_counts(path):
    """Row and label counts via pyarrow's own CSV parser (a second, independent reading)."""
    import pyarrow.csv as pc

    t = pc.read_csv(
        path,
        parse_options=pc.ParseOptions(delimiter="\t", quote_char=False, double_quote=False),
        convert_options=pc.ConvertOptions(column_types={"#1 String": "string", "#2 String": "string"}),
    )
    names = [n.lstrip("\ufeff") for n in t.column_names]
    t = t.rename_columns(names)
    counts = {}
    if "Quality" in names:
        for v in t.column("Quality").to_pylist():
            counts[str(v)] = counts.get(str(v), 0) + 1
    return t.num_rows, counts


def label_counts(rows):
    c = {}
    for r in rows:
        if r["label"] is not None:
            c[str(r["label"])] = c.get(str(r["label"]), 0) + 1
    return c


def layouts(mrpc, out):
    import pyarrow as pa
    import pyarrow.csv as pc
    import pyarrow.parquet as pq

    splits = {
        "train": read_tsv(os.path.join(mrpc, "train.tsv")),
        "validation": read_tsv(os.path.join(mrpc, "dev.tsv")),
        "test": read_tsv(os.path.join(mrpc, "test.tsv")),
        "msr_test": read_tsv(os.path.join(mrpc, "msr_paraphrase_test.txt")),
    }
    counts = {}
    for name, fname in [("train", "train.tsv"), ("validation", "dev.tsv"), ("test", "test.tsv"),
                        ("msr_test", "msr_paraphrase_test.txt")]:
        n, c = pyarrow_counts(os.path.join(mrpc, fname))
        assert n == len(splits[name]), (name, n, len(splits[name]))
        assert c == label_counts(splits[name]), (name, c, label_counts(splits[name]))
        counts[name] = {"rows": n, "labels": c}
    # MSR test is GLUE test with its labels: same pairs, same order.
    for a, b in zip(splits["test"], splits["msr_test"]):
        assert (a["sentence1"], a["sentence2"]) == (b["sentence1"], b["sentence2"])

    def table(rows, label=True, idx=True, test_label=None):
        cols = {
            "sentence1": pa.array([r["sentence1"] for r in rows], pa.string()),
            "sentence2": pa.array([r["sentence2"] for r in rows], pa.string()),
        }
        if label:
            cols["label"] = pa.array(
                [r["label"] if r["label"] is not None else test_label for r in rows], pa.int64())
        if idx:
            cols["idx"] = pa.array([r["idx"] for r in rows], pa.int32())
        return pa.table(cols)

    # Hugging Face glue/mrpc: label -1 on the unlabelled test split.
    os.makedirs(os.path.join(out, "parquet", "mrpc"))
    for split in ["train", "validation", "test"]:
        pq.write_table(table(splits[split], test_label=-1),
                       os.path.join(out, "parquet", "mrpc", f"{split}-00000-of-00001.parquet"))
    # CSV: dev.csv (the GLUE name) without idx; test with empty labels.
    os.makedirs(os.path.join(out, "csv"))
    pc.write_csv(table(splits["train"]), os.path.join(out, "csv", "train.csv"))
    pc.write_csv(table(splits["validation"], idx=False), os.path.join(out, "csv", "dev.csv"))
    pc.write_csv(table(splits["test"]), os.path.join(out, "csv", "test.csv"))
    # JSONL: validation without idx, test without label.
    os.makedirs(os.path.join(out, "jsonl"))
    for split, drop in [("train", None), ("validation", "idx"), ("test", "label")]:
        with open(os.path.join(out, "jsonl", f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for r in splits[split]:
                d = {k: v for k, v in r.items() if k != drop}
                f.write(json.dumps(d, ensure_ascii=False) + "\n")
    # The MSR release alone (in the real folder test.tsv would win).
    os.makedirs(os.path.join(out, "msr"))
    shutil.copy(os.path.join(mrpc, "msr_paraphrase_test.txt"), os.path.join(out, "msr"))
    with open(os.path.join(out, "expected.json"), "w", encoding="utf-8") as f:
        json.dump({"splits": splits, "counts": counts}, f, ensure_ascii=False)


def train_tokenizer(mrpc, out):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    rows = read_tsv(os.path.join(mrpc, "train.tsv"))
    text = [r["sentence1"] for r in rows] + [r["sentence2"] for r in rows] + list(PROMPTS.values())
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=3000, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    # Like Llama-3: special tokens after the BPE vocabulary.
    tok.add_special_tokens([BOS, EOS])
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1",
                                      special_tokens=[(BOS, bos)]),
    ])
    spec = json.loads(tok.to_str())
    spec["model"]["ignore_merges"] = True  # as in Llama-3's tokenizer.json
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": BOS, "eos_token": EOS, "tokenizer_class": "PreTrainedTokenizerFast",
                   "model_max_length": 131072, "clean_up_tokenization_spaces": True}, f)
    print(json.dumps({"vocab": tok.get_vocab_size(), "bos": bos, "eos": tok.token_to_id(EOS)}))


def hf_encode(mrpc, out_json, max_length, tokdirs, side="right"):
    from transformers import AutoTokenizer

    rows = read_tsv(os.path.join(mrpc, "dev.tsv"))
    result = []
    for d in tokdirs:
        tok = AutoTokenizer.from_pretrained(d)
        tok.pad_token = tok.eos_token
        tok.truncation_side = side
        per_prompt = {}
        for name, prompt in PROMPTS.items():
            texts = [f"{prompt} Sentence 1: {r['sentence1']} Sentence 2: {r['sentence2']}" for r in rows]
            batches = []
            for i in range(0, len(texts), 8):
                kw = {"truncation": True, "max_length": max_length} if max_length else {}
                enc = tok(texts[i:i + 8], padding=True, return_tensors="np", **kw)
                batches.append({"input_ids": enc["input_ids"].tolist(),
                                "attention_mask": enc["attention_mask"].tolist()})
            per_prompt[name] = batches
        result.append({"dir": d, "class": type(tok).__name__, "pad_id": tok.pad_token_id,
                       "len": len(tok), "prompts": per_prompt})
    with open(out_json, "w") as f:
        json.dump(result, f)


def check_demo(demo, out_json):
    import numpy as np
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    model_dir = os.path.join(demo, "model")
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.eos_token
    model, info = LlamaForSequenceClassification.from_pretrained(
        model_dir, num_labels=2, output_loading_info=True, torch_dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    model.eval()
    stored = load_file(os.path.join(model_dir, "model.safetensors"))
    params = dict(model.named_parameters())
    max_diff = max(float((params[k].float() - v.float()).abs().max()) for k, v in stored.items())
    stds = {k: float(v.float().std()) for k, v in stored.items() if v.dim() == 2}
    norms_one = all(bool((v == 1).all()) for k, v in stored.items() if k.endswith("norm.weight"))

    train = read_tsv(os.path.join(demo, "data", "train.tsv"))
    dev = read_tsv(os.path.join(demo, "data", "dev.tsv"))
    test = read_tsv(os.path.join(demo, "data", "test.tsv"))
    texts = [f"{PROMPTS['perfect']} Sentence 1: {r['sentence1']} Sentence 2: {r['sentence2']}" for r in dev[:8]]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    lengths = [len(tok(f" Sentence 1: {r['sentence1']} Sentence 2: {r['sentence2']}")["input_ids"])
               for r in train]

    # Learnability: a bag of words over sentence 2 (logistic regression, plain gradient descent).
    vocab = sorted({w for r in train for w in r["sentence2"].lower().split()})
    index = {w: i for i, w in enumerate(vocab)}

    def bow(rows):
        x = np.zeros((len(rows), len(vocab)))
        for n, r in enumerate(rows):
            for w in r["sentence2"].lower().split():
                if w in index:
                    x[n, index[w]] = 1.0
        return x

    xtr, ytr = bow(train), np.array([r["label"] for r in train], dtype=float)
    xdv, ydv = bow(dev), np.array([r["label"] for r in dev], dtype=float)
    w, b = np.zeros(len(vocab)), 0.0
    for _ in range(500):
        p = 1 / (1 + np.exp(-(xtr @ w + b)))
        g = p - ytr
        w -= 0.5 * xtr.T @ g / len(ytr)
        b -= 0.5 * g.mean()
    dev_acc = float((((xdv @ w + b) > 0) == (ydv > 0.5)).mean())

    summary = {
        "tokenizer_class": type(tok).__name__,
        "len_tokenizer": len(tok),
        "bos_id": tok.bos_token_id,
        "eos_id": tok.eos_token_id,
        "config_vocab": model.config.vocab_size,
        "missing": sorted(info["missing_keys"]),
        "unexpected": sorted(info["unexpected_keys"]),
        "mismatched": [list(map(str, m)) for m in info["mismatched_keys"]],
        "max_weight_diff": max_diff,
        "weight_std_min": min(stds.values()),
        "weight_std_max": max(stds.values()),
        "norms_one": norms_one,
        "logits_shape": list(logits.shape),
        "logits_finite": bool(torch.isfinite(logits).all()),
        "first_ids": enc["input_ids"][0].tolist(),
        "rows": [len(train), len(dev), len(test)],
        "train_labels": label_counts(train),
        "dev_labels": label_counts(dev),
        "test_labelled": any(r["label"] is not None for r in test),
        "max_len_none_prompt": max(lengths),
        "bow_dev_accuracy": dev_acc,
    }
    with open(out_json, "w") as f:
        json.dump(summary, f)


def lora_probe(demo, lr, epochs):
    import random

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    torch.manual_seed(0)
    random.seed(0)
    model_dir = os.path.join(demo, "model")
    train = read_tsv(os.path.join(demo, "data", "train.tsv"))
    dev = read_tsv(os.path.join(demo, "data", "dev.tsv"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.eos_token
    model = LlamaForSequenceClassification.from_pretrained(model_dir, num_labels=2, torch_dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)

    def enc(rows):
        return tok([f"{PROMPTS['perfect']} Sentence 1: {r['sentence1']} Sentence 2: {r['sentence2']}"
                    for r in rows], padding=True, return_tensors="pt")

    for epoch in range(epochs):
        model.train()
        order = list(range(len(train)))
        random.shuffle(order)
        for i in range(0, len(order), 16):
            rows = [train[j] for j in order[i:i + 16]]
            loss = model(**enc(rows), labels=torch.tensor([r["label"] for r in rows])).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(dev), 64):
                rows = dev[i:i + 64]
                pred = model(**enc(rows)).logits.argmax(-1).tolist()
                correct += sum(p == r["label"] for p, r in zip(pred, rows))
        print(json.dumps({"epoch": epoch, "dev_accuracy": correct / len(dev)}), flush=True)


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "layouts":
        layouts(*args)
    elif cmd == "train_tokenizer":
        train_tokenizer(*args)
    elif cmd == "hf_encode":
        length, _, side = args[2].partition(":")
        hf_encode(args[0], args[1], int(length) or None, args[3:], side or "right")
    elif cmd == "check_demo":
        check_demo(*args)
    elif cmd == "lora_probe":
        lora_probe(args[0], float(args[1]), int(args[2]))
    else:
        raise SystemExit(f"unknown command {cmd}")
