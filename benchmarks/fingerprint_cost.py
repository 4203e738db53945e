"""Cost of the content fingerprint a stage's config hash takes of its input files.

    python benchmarks/fingerprint_cost.py [--mb 100] [--repeats 3]

Writes one file of `--mb` MB of random JSONL-like bytes to a temp folder and times, in this process:
a cold sha256 of it (`Fingerprints` without cache), and a rerun that finds it in the run dir's cache
(`fingerprints.json`, keyed by path, size and mtime_ns). Prints one line to paste into docs/benchmarks.md.
The cold figure includes the page cache being warm after the file was written; a first read from disk adds
the disk's read time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_align.fingerprint import CACHE_FILE, Fingerprints  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "big.jsonl"
        line = (b'{"messages": [{"role": "user", "content": "' + os.urandom(48).hex().encode() + b'"}]}\n')
        with open(data, "wb") as f:
            for _ in range(args.mb * 2**20 // len(line)):
                f.write(line)
        size_mb = data.stat().st_size / 2**20
        cold, cached = [], []
        for _ in range(args.repeats):
            (Path(tmp) / CACHE_FILE).unlink(missing_ok=True)
            t0 = time.perf_counter()
            prints = Fingerprints(tmp)
            prints.of(str(data))
            prints.save()
            cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            Fingerprints(tmp).of(str(data))
            cached.append(time.perf_counter() - t0)
    c, w = statistics.median(cold), statistics.median(cached)
    print(f"fingerprint_cost: {size_mb:.0f} MB file: sha256 {c:.3f} s ({size_mb / c:.0f} MB/s), "
          f"cached rerun {w * 1000:.2f} ms (median of {args.repeats})")


if __name__ == "__main__":
    main()
