"""Load on ``mosaic-embed index serve`` over loopback: 8 and 32 concurrent clients, query batching on vs off.

The server runs in its own process (the real command, ``python -m mosaic_embed.cli index serve``) on a free
127.0.0.1 port; clients are threads with keep-alive connections, each sending POST /search with one query
(round-robin over ``--queries``) until the row's request cap or time cap is reached, whichever comes first.
Every non-200 answer or transport error counts as an error (target: 0).

Writes ``{"device", "rows": [{"clients", "requests", "errors", "qps", "p50_ms", "p99_ms", "batching"}],
"batching_gain": {clients: qps_on / qps_off}, ...}``.

Usage::

    python benchmarks/serve_load.py --store runs/store_news/store                  # CPU: ~2 min
    python benchmarks/serve_load.py --store STORE --device cuda --seconds 20       # GPU host
"""

from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: Path, port: int, device: str, batching: bool, extra: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mosaic_embed.cli", "index", "serve", str(store), "--host", "127.0.0.1",
           "--port", str(port), "--device", device, *extra] + ([] if batching else ["--no-batching"])
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                conn.close()
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not answer /health within 180 s")


def client(port: int, queries: list[str], start: int, k: int, stop_at: float, budget: list[int], lock) -> tuple:
    """One client: requests until the shared budget or the time is spent; returns (latencies s, errors)."""
    lat, errors = [], 0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    i = start
    while time.monotonic() < stop_at:
        with lock:
            if budget[0] <= 0:
                break
            budget[0] -= 1
        body = json.dumps({"texts": [queries[i % len(queries)]], "k": k})
        i += 1
        t = time.perf_counter()
        try:
            conn.request("POST", "/search", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            ok = resp.status == 200
        except (OSError, http.client.HTTPException):
            ok = False
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        lat.append(time.perf_counter() - t)
        errors += not ok
    conn.close()
    return lat, errors


def load_row(port: int, queries: list[str], clients: int, seconds: float, max_requests: int, k: int) -> dict:
    import threading

    lock = threading.Lock()
    budget = [max_requests]
    t0 = time.perf_counter()
    stop_at = time.monotonic() + seconds
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        parts = list(pool.map(lambda c: client(port, queries, c * 7919, k, stop_at, budget, lock), range(clients)))
    wall = time.perf_counter() - t0
    lat = np.asarray([x for p, _ in parts for x in p]) * 1000
    errors = sum(e for _, e in parts)
    return {"clients": clients, "requests": int(len(lat)), "errors": int(errors),
            "qps": round(len(lat) / wall, 2), "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None, "seconds": round(wall, 2)}


def read_queries(path: Path | None, store: Path) -> list[str]:
    from mosaic_embed.data.corpus import iter_jsonl

    if path is not None:
        return [obj.get("text") or obj.get("query") for _, obj in iter_jsonl(path)]
    from mosaic_embed.index.store import VectorStore

    rows = VectorStore(store).db.execute("SELECT text FROM documents WHERE text IS NOT NULL LIMIT 2000").fetchall()
    return [" ".join(r[0].split()[:12]) for r in rows]  # document openings as stand-in queries


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", type=Path, required=True, help="a store folder (e.g. built by store_news.py)")
    p.add_argument("--queries", type=Path, default=None, help="queries JSON lines (default: document openings)")
    p.add_argument("--clients", default="8,32")
    p.add_argument("--seconds", type=float, default=15.0, help="time cap per row")
    p.add_argument("--max-requests", type=int, default=5000, help="request cap per row")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--device", default="auto", help="where the server's encoder runs")
    p.add_argument("--server-arg", action="append", default=[], help="extra `index serve` argument (repeatable)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_load.json")
    args = p.parse_args(argv)

    import torch

    from mosaic_embed.artifacts import atomic_write_json, environment

    queries = read_queries(args.queries, args.store)
    rows = []
    for batching in (True, False):
        port = free_port()
        server = start_server(args.store, port, args.device, batching, args.server_arg)
        try:
            load_row(port, queries, 4, 2.0, 50, args.k)  # warm-up (first forwards, allocator)
            for clients in (int(c) for c in args.clients.split(",")):
                row = {**load_row(port, queries, clients, args.seconds, args.max_requests, args.k),
                       "batching": batching}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
    gain = {}
    for r in rows:
        if r["batching"]:
            off = next(o for o in rows if not o["batching"] and o["clients"] == r["clients"])
            gain[str(r["clients"])] = round(r["qps"] / off["qps"], 3) if off["qps"] else None
    on_cuda = args.device != "cpu" and torch.cuda.is_available()
    doc = {"device": torch.cuda.get_device_name(0) if on_cuda else f"cpu ({os.cpu_count()} cores)",
           "rows": rows, "batching_gain": gain, "store": str(args.store.resolve()), "k": args.k,
           "caps": {"seconds": args.seconds, "max_requests": args.max_requests}, "environment": environment()}
    atomic_write_json(args.out, doc)
    print(f"\n{'clients':>7s} {'batching':>8s} {'requests':>8s} {'errors':>6s} {'QPS':>8s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for r in rows:
        print(f"{r['clients']:7d} {'on' if r['batching'] else 'off':>8s} {r['requests']:8d} {r['errors']:6d} "
              f"{r['qps']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f}")
    print(f"batching gain (QPS on / off): {gain}; wrote {args.out}")
    return doc


if __name__ == "__main__":
    main()
