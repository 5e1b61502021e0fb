"""Shared by the benchmarks: timing, environment notes and writing results.

Each benchmark writes bench/out/<name>.json and replaces its own section of
bench/RESULTS.md (between `<!-- name:begin -->` and `<!-- name:end -->`), so sections
from different machines and runs sit side by side.
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"
RESULTS_MD = BENCH_DIR / "RESULTS.md"


def time_call(fn, *, repeat: int = 7, warmup: int = 2, min_time: float = 0.05) -> float:
    """Median seconds per call; each sample loops until it lasts at least `min_time`."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    samples = []
    for _ in range(repeat):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            sync()
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time:
                break
        samples.append(elapsed / n)
    return statistics.median(samples)


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def write_results(name: str, title: str, rows: list[dict], columns: list[str], notes: str = "") -> str:
    """Write JSON and the markdown section for one benchmark; returns the markdown."""
    OUT_DIR.mkdir(exist_ok=True)
    meta = {"machine": machine(), "torch": torch.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "ci": bool(os.environ.get("CI"))}
    (OUT_DIR / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = "".join("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |\n" for r in rows)
    md = (f"<!-- {name}:begin -->\n### {title}\n\nMachine: {meta['machine']}; torch {meta['torch']}; "
          f"{meta['date']}.\n\n{head}{body}\n{notes.strip()}\n<!-- {name}:end -->\n")
    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n\n"
    pattern = re.compile(rf"<!-- {re.escape(name)}:begin -->.*?<!-- {re.escape(name)}:end -->\n", re.S)
    text = pattern.sub(lambda _: md, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + md
    RESULTS_MD.write_text(text)
    return md


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)
