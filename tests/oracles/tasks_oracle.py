"""Oracles for tests/tasks.rs: data files in parquet (pyarrow), and `predict`'s CSV re-scored
with scikit-learn / scipy against the gold labels of the data file.

  to_parquet SRC.jsonl DST.parquet
  score PRED.csv GOLD_FILE PROBLEM_TYPE LABEL_COLUMN NAMES METRICS
      NAMES: the label names in id order, comma-joined (unused for regression)
      METRICS: the metric keys, comma-joined; prints {key: value} as JSON
  weighted_ce PRED.csv GOLD_FILE TRAIN_FILE LABEL_COLUMN NAMES
      sklearn's balanced class weights of TRAIN_FILE's labels, and torch's
      CrossEntropyLoss(weight=) of predict's probabilities against the gold labels;
      prints {"weights": [...], "loss": x} as JSON
  report PRED.csv GOLD_FILE LABEL_COLUMN NAMES
      scikit-learn's classification_report (output_dict, labels in id order, zero_division=0)
      and confusion_matrix of predict's labels; prints {"report": ..., "confusion": ...,
      "errors": [index of each misclassified row]}
"""
import csv
import json
import sys

import numpy as np


def read_rows(path):
    if path.endswith(".jsonl"):
        with open(path) as f:
            return [json.loads(l) for l in f if l.strip()]
    if path.endswith(".csv"):
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise SystemExit(f"unknown format: {path}")


def to_parquet(src, dst):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(read_rows(src)), dst)


def score(pred_path, gold_path, problem, column, names, metrics):
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    names = names.split(",")
    with open(pred_path, newline="") as f:
        preds = list(csv.DictReader(f))
    gold = [r[column] for r in read_rows(gold_path)]
    assert len(preds) == len(gold), (len(preds), len(gold))
    order = [int(p["index"]) for p in preds]
    gold = [gold[i] for i in order]
    out = {}
    if problem == "single_label_classification":
        y = [names.index(str(g)) for g in gold]
        p = [names.index(r["prediction"]) for r in preds]
        fns = {
            "accuracy": lambda: accuracy_score(y, p),
            "f1": lambda: f1_score(y, p),
            "macro_f1": lambda: f1_score(y, p, average="macro"),
            "matthews_correlation": lambda: matthews_corrcoef(y, p),
        }
    elif problem == "multi_label_classification":
        def hot(items):
            return [int(n in items) for n in names]

        y = np.array([hot(g if isinstance(g, list) else str(g).split("|")) for g in gold])
        p = np.array([hot(r["prediction"].split("|") if r["prediction"] else []) for r in preds])
        fns = {
            "micro_f1": lambda: f1_score(y, p, average="micro", zero_division=0),
            "macro_f1": lambda: f1_score(y, p, average="macro", zero_division=0),
            "exact_match": lambda: accuracy_score(y, p),
        }
    else:
        y = [float(g) for g in gold]
        p = [float(r["prediction"]) for r in preds]
        fns = {
            "pearson": lambda: pearsonr(p, y)[0],
            "spearmanr": lambda: spearmanr(p, y)[0],
        }
    for m in metrics.split(","):
        out[m] = float(fns[m]())
    print(json.dumps(out))


def weighted_ce(pred_path, gold_path, train_path, column, names):
    import torch
    from sklearn.utils.class_weight import compute_class_weight

    names = names.split(",")
    train = [names.index(str(r[column])) for r in read_rows(train_path)]
    weights = compute_class_weight("balanced", classes=np.arange(len(names)), y=train)
    with open(pred_path, newline="") as f:
        preds = list(csv.DictReader(f))
    gold = [r[column] for r in read_rows(gold_path)]
    y = torch.tensor([names.index(str(gold[int(p["index"])])) for p in preds])
    probs = torch.tensor(
        [[float(p[f"prob_{c}"]) for c in range(len(names))] for p in preds], dtype=torch.float64
    )
    loss = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float64))
    print(json.dumps({"weights": weights.tolist(), "loss": loss(probs.log(), y).item()}))


def report(pred_path, gold_path, column, names):
    from sklearn.metrics import classification_report, confusion_matrix

    names = names.split(",")
    with open(pred_path, newline="") as f:
        preds = list(csv.DictReader(f))
    gold = [str(r[column]) for r in read_rows(gold_path)]
    order = [int(p["index"]) for p in preds]
    y = [gold[i] for i in order]
    p = [r["prediction"] for r in preds]
    rep = classification_report(y, p, labels=names, output_dict=True, zero_division=0)
    # scikit-learn reports `micro avg` instead of `accuracy` when `labels` leaves some out.
    cm = confusion_matrix(y, p, labels=names).tolist()
    errors = [i for i, a, b in zip(order, y, p) if a != b]
    print(json.dumps({"report": rep, "confusion": cm, "errors": errors}))


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"to_parquet": to_parquet, "score": score, "weighted_ce": weighted_ce,
     "report": report}[cmd](*args)
