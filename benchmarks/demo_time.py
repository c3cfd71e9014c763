"""Wall-clock time of the default digits demo (``nodata-defense demo``), cold and warm.

    python benchmarks/demo_time.py

Runs the demo twice in a fresh temporary directory, each time in its own process as a user would:
*cold* (references synthesized and every model fitted) then *warm* (the fitted models loaded from
the work directory, only certification). Extra demo options are passed through, e.g.
``python benchmarks/demo_time.py -- --n-test 50``. Writes ``benchmarks/results/demo_time.json``:
the wall-clock seconds of each run, the demo's own seconds per stage, the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _machine import cpu_name

from nodata_defense._io import atomic_write_json

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "benchmarks" / "results" / "demo_time.json"



def run(demo_args: list[str], out_dir: Path) -> dict:
    command = [sys.executable, "-m", "nodata_defense.demo", "--quiet", "--out-dir", str(out_dir), *demo_args]
    load_before = os.getloadavg()
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"the demo failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    summary = json.loads((out_dir / "summary.json").read_text(encoding="utf-8"))
    return {
        "wall_clock_seconds": round(seconds, 1),
        "stage_seconds": summary["seconds"],
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "table": completed.stdout[completed.stdout.find("Certified accuracy") :].strip(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo_args", nargs=argparse.REMAINDER, help="options passed to the demo (after --)")
    parser.add_argument("--output", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    demo_args = [a for a in args.demo_args if a != "--"]
    with tempfile.TemporaryDirectory(prefix="demo-time-") as tmp:
        out = Path(tmp) / "demo"
        cold = run(demo_args, out)
        warm = run(demo_args, out)
    result = {
        "command": "python -m nodata_defense.demo --quiet --out-dir <fresh dir>" + "".join(f" {a}" for a in demo_args),
        "cold": cold,
        "warm": warm,
        "machine": {
            "cpu": cpu_name(),
            "logical_cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "measured_at_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    atomic_write_json(args.output, result)
    print(f"cold: {cold['wall_clock_seconds']:.0f} s, warm: {warm['wall_clock_seconds']:.0f} s -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
