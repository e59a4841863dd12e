"""Calibration of `predict`'s probabilities, computed the reference way: scikit-learn's
`log_loss` and `brier_score_loss` (binary: the positive class's probability), NumPy for the
top-label ECE over 15 equal-width bins (Guo et al. 2017: a bin holds confidences in
(lo, hi]), and SciPy's bounded scalar minimiser for the temperature minimising the NLL of
softmax(log p / T) (log p is the logits up to a constant per row).

usage: calibration_oracle.py PRED_CSV LABELS_TSV
  PRED_CSV: index,prediction,prob_0..prob_{K-1}; LABELS_TSV: GLUE MRPC layout, label first,
  row `index` below the header. Prints JSON: nll, brier, ece, accuracy, temperature.
"""
import csv
import json
import sys

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.metrics import brier_score_loss, log_loss


def main():
    pred_csv, labels_tsv = sys.argv[1], sys.argv[2]
    with open(labels_tsv, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    with open(pred_csv, newline="") as f:
        r = list(csv.reader(f))
    header, body = r[0], r[1:]
    k = sum(1 for h in header if h.startswith("prob_"))
    idx = np.array([int(x[0]) for x in body])
    p = np.array([[float(v) for v in x[2:2 + k]] for x in body])
    y = np.array([int(rows[i][0]) for i in idx])
    labels = list(range(k))
    nll = log_loss(y, p, labels=labels)
    brier = brier_score_loss(y, p[:, 1]) if k == 2 else brier_score_loss(y, p, labels=labels)
    conf, top = p.max(1), p.argmax(1)
    right = (top == y).astype(float)
    edges = np.linspace(0.0, 1.0, 16)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(right[m].mean() - conf[m].mean())
    logp = np.log(np.clip(p, 1e-300, None))

    def nll_at(t):
        z = logp / t
        z = z - z.max(1, keepdims=True)
        lse = np.log(np.exp(z).sum(1))
        return float(np.mean(lse - z[np.arange(len(y)), y]))

    t = minimize_scalar(nll_at, bounds=(0.01, 100.0), method="bounded",
                        options={"xatol": 1e-10}).x
    print(json.dumps({"nll": float(nll), "brier": float(brier), "ece": float(ece),
                      "accuracy": float(right.mean()), "temperature": float(t)}))


if __name__ == "__main__":
    main()
