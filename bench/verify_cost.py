"""What checking a bundle's files against the manifest costs at load (``llava_edge/integrity.py``).

Loads the same bundle in fresh processes, interleaved, three ways: without the check
(``verify=False``), the first load after the files changed (every file hashed), and a
later load (the verified file versions are remembered: a ``stat`` each). Reports median
load seconds and the ratios against the unchecked load.

    python bench/verify_cost.py BUNDLE [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOAD = """
import sys, time
t = time.perf_counter()
from llava_edge import EdgeLLaVA
m = EdgeLLaVA.load(sys.argv[1], device="cpu", prefix_cache=False, verify=sys.argv[2] == "1")
print(time.perf_counter() - t)
m.close()
"""


def load_seconds(bundle: Path, verify: bool, cache: Path) -> float:
    env = {**os.environ, "LLAVA_EDGE_CACHE": str(cache)}
    r = subprocess.run([sys.executable, "-c", LOAD, str(bundle), "1" if verify else "0"], capture_output=True,
                       text=True, env=env, check=True)
    return float(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    sizes = {p.name: p.stat().st_size for p in args.bundle.iterdir() if p.is_file()}
    times: dict[str, list[float]] = {"unchecked": [], "first (hashes)": [], "later (remembered)": []}
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as cache:  # an empty record: the first checked load hashes
            times["unchecked"].append(load_seconds(args.bundle, False, Path(cache)))
            times["first (hashes)"].append(load_seconds(args.bundle, True, Path(cache)))
            times["later (remembered)"].append(load_seconds(args.bundle, True, Path(cache)))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"bundle": str(args.bundle), "bytes": sizes, "rounds": args.rounds, "seconds": times,
              "median_s": med, "ratio_vs_unchecked": {k: v / med["unchecked"] for k, v in med.items()},
              "date": time.strftime("%Y-%m-%d")}
    for k, v in med.items():
        print(f"{k:20} {v * 1e3:8.1f} ms  {v / med['unchecked']:.3f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
