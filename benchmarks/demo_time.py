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
from _report import cpu_name, write_section

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
        "certified_accuracy": {
            row: {sigma: cell["certified_accuracy"] for sigma, cell in entry["sigmas"].items()}
            for row, entry in summary["rows"].items()
        },
        "settings": summary["settings"],
    }


def _stage_total(stages: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in stages.items() if k.startswith(prefix))


def render(result: dict) -> str:
    """The markdown of docs/demo.md's measured section: times, then the cold run's table."""
    cold, warm, machine = result["cold"], result["warm"], result["machine"]
    settings = cold["settings"]
    radii = settings["radii"]
    lines = [
        f"Measured {result['measured_at_utc']} UTC on `{machine['cpu']}` ({machine['logical_cpus']} logical CPUs,"
        f" torch {machine['torch']}, {machine['torch_threads']} threads); 1-minute load average"
        f" {cold['load_average_before'][0]} before the cold run.",
        "",
        "| run | wall clock | synthesis | fits | certification |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, run_ in (("cold (first run)", cold), ("warm (fits cached)", warm)):
        stages = run_["stage_seconds"]
        lines.append(
            f"| {name} | **{run_['wall_clock_seconds'] / 60:.1f} min** | {_stage_total(stages, 'references'):.0f} s"
            f" | {_stage_total(stages, 'fit') + _stage_total(stages, 'load fitted'):.0f} s"
            f" | {_stage_total(stages, 'certify'):.0f} s |"
        )
    lines += [
        "",
        f"Certified accuracy (%) of the cold run, {settings['n_test']} test digits, N0 = {settings['n0']},"
        f" N = {settings['n']}, α = {settings['alpha']:g}:",
        "",
        "| σ | base classifier | " + " | ".join(f"r = {r:g}" for r in radii) + " |",
        "|---|---|" + "---:|" * len(radii),
    ]
    from nodata_defense.demo import ROW_TITLES

    accuracy = cold["certified_accuracy"]
    sigmas = sorted({s for per_sigma in accuracy.values() for s in per_sigma}, key=float)
    for sigma in sigmas:
        for row in ROW_TITLES:
            if sigma in accuracy.get(row, {}):
                cells = " | ".join(f"{100 * a:.0f}" for a in accuracy[row][sigma])
                lines.append(f"| {sigma} | {ROW_TITLES[row]} | {cells} |")
    lines += [
        "",
        f"Reproduce: `python benchmarks/demo_time.py` (runs `{result['command']}` cold, then warm).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo_args", nargs=argparse.REMAINDER, help="options passed to the demo (after --)")
    parser.add_argument("--output", type=Path, default=RESULT)
    parser.add_argument(
        "--docs", type=Path, default=ROOT / "docs" / "demo.md", help="page with the demo_time section"
    )
    args = parser.parse_args(argv)
    demo_args = [a for a in args.demo_args if a != "--"]
    with tempfile.TemporaryDirectory(prefix="demo-time-") as tmp:
        out = Path(tmp) / "demo"
        cold = run(demo_args, out)
        warm = run(demo_args, out)
    result = {
        "command": "python -m nodata_defense.demo --quiet --out-dir <fresh dir>"
        + "".join(f" {a}" for a in demo_args),
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
    write_section(args.docs, "demo_time", render(result))
    print(
        f"cold: {cold['wall_clock_seconds']:.0f} s, warm: {warm['wall_clock_seconds']:.0f} s -> {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
