"""Oracle for tests/metrics.rs.

usage: metrics_oracle.py DIR

Reads DIR/cases.json: {"classes": [{"pred": [ids], "gold": [ids]}, ...],
"multihot": [{"pred": [[0/1, ...], ...], "gold": [...]}, ...],
"values": [{"pred": [floats], "gold": [floats]}, ...]} and writes DIR/expected.json with, per
case and in the same order, the scikit-learn / scipy figures:
classes: accuracy (accuracy_score), f1 (f1_score of class 1: binary when only ids 0/1 occur,
else labels=[1]), matthews_correlation (matthews_corrcoef), macro_f1 (f1_score average="macro");
multihot: micro_f1, macro_f1 (f1_score average="micro"/"macro"), exact_match (accuracy_score);
values: pearson (scipy.stats.pearsonr), spearmanr (scipy.stats.spearmanr). Every F1 uses
zero_division=0. A NaN is written as null; so is a figure scipy refuses to compute (fewer than
two points).
"""
import json
import math
import sys
import warnings

import numpy as np
import scipy.stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


def nan_to_null(v):
    v = float(v)
    return None if math.isnan(v) else v


def classes(case):
    gold = np.asarray(case["gold"], dtype=np.int64)
    pred = np.asarray(case["pred"], dtype=np.int64)
    if set(gold.tolist()) | set(pred.tolist()) <= {0, 1}:
        f1 = f1_score(gold, pred, zero_division=0)
    else:
        f1 = f1_score(gold, pred, labels=[1], average=None, zero_division=0)[0]
    return {
        "accuracy": float(accuracy_score(gold, pred)),
        "f1": float(f1),
        "matthews_correlation": float(matthews_corrcoef(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0)),
    }


def multihot(case):
    gold = np.asarray(case["gold"], dtype=np.int64)
    pred = np.asarray(case["pred"], dtype=np.int64)
    return {
        "micro_f1": float(f1_score(gold, pred, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0)),
        "exact_match": float(accuracy_score(gold, pred)),
    }


def values(case):
    gold = np.asarray(case["gold"], dtype=np.float64)
    pred = np.asarray(case["pred"], dtype=np.float64)
    if len(gold) < 2:
        return {"pearson": None, "spearmanr": None}
    return {
        "pearson": nan_to_null(scipy.stats.pearsonr(pred, gold).statistic),
        "spearmanr": nan_to_null(scipy.stats.spearmanr(pred, gold).statistic),
    }


def main():
    d = sys.argv[1]
    with open(f"{d}/cases.json") as f:
        cases = json.load(f)
    warnings.simplefilter("ignore")
    out = {
        "classes": [classes(c) for c in cases["classes"]],
        "multihot": [multihot(c) for c in cases["multihot"]],
        "values": [values(c) for c in cases["values"]],
    }
    with open(f"{d}/expected.json", "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
