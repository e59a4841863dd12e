#!/usr/bin/env python3
"""Drives `qlora-cls serve`'s /predict with C concurrent clients (one keep-alive connection
each), N requests of one sentence pair in all; prints one JSON line: requests/s and the
p50/p99 latency in ms.

    serve_client.py --addr 127.0.0.1:PORT --concurrency C --requests N --pairs PAIRS.json
"""
import argparse
import http.client
import json
import statistics
import threading
import time


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--requests", type=int, required=True)
    ap.add_argument("--pairs", required=True)
    a = ap.parse_args()
    pairs = json.load(open(a.pairs))
    host, port = a.addr.rsplit(":", 1)
    lock, nxt, lat, errors = threading.Lock(), [0], [], []

    def client():
        conn = http.client.HTTPConnection(host, int(port), timeout=600)
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= a.requests:
                break
            body = json.dumps({"inputs": pairs[i % len(pairs)]})
            t0 = time.perf_counter()
            conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            data = r.read()
            dt = time.perf_counter() - t0
            with lock:
                if r.status != 200:
                    errors.append(f"{r.status} {data[:200]!r}")
                lat.append(dt)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(a.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"{len(errors)} failed requests, e.g. {errors[0]}")
    print(json.dumps({"requests": len(lat), "wall_s": wall, "rps": len(lat) / wall,
                      "p50_ms": 1e3 * statistics.median(lat), "p99_ms": 1e3 * percentile(lat, 0.99)}))


if __name__ == "__main__":
    main()
