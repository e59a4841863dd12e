#!/usr/bin/env python3
"""The reference for the serving row: transformers' `pipeline("text-classification")` on the
merged checkpoint (`qlora-cls merge`, fp32), answering the same requests one batch at a time:
the requests of C concurrent clients arrive together, are run as one pipeline call of batch
size C, and each waits for its batch. Prints one JSON line like serve_client.py.

    reference_serve.py --model_dir MERGED --concurrency C --requests N --pairs PAIRS.json
"""
import argparse
import json
import statistics
import time

import torch
from transformers import pipeline

PERFECT = "Does sentence 1 mean the same as sentence 2?"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model_dir", required=True)
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--requests", type=int, required=True)
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    pairs = json.load(open(a.pairs))
    # The text our server builds from a pair (`predict`'s rendering).
    texts = [f"{PERFECT} Sentence 1: {s1} Sentence 2: {s2}" for s1, s2 in pairs]
    pipe = pipeline("text-classification", model=a.model_dir, device="cpu", dtype=torch.float32)
    pipe(texts[: a.concurrency], batch_size=a.concurrency, top_k=None)  # warm-up
    lat = []
    t0 = time.perf_counter()
    for start in range(0, a.requests, a.concurrency):
        batch = [texts[i % len(texts)] for i in range(start, min(a.requests, start + a.concurrency))]
        b0 = time.perf_counter()
        out = pipe(batch, batch_size=len(batch), top_k=None)
        dt = time.perf_counter() - b0
        assert len(out) == len(batch)
        lat.extend([dt] * len(batch))
    wall = time.perf_counter() - t0
    lat.sort()
    print(json.dumps({"requests": len(lat), "wall_s": wall, "rps": len(lat) / wall,
                      "p50_ms": 1e3 * statistics.median(lat),
                      "p99_ms": 1e3 * lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]}))


if __name__ == "__main__":
    main()
