"""Noisy samples per second of ``SmoothedClassifier.certify`` versus a naive per-image loop.

The naive loop is the structure of Cohen et al.'s reference code: for each image, for each batch of
that image's own noise samples, repeat the image, add noise, classify, count. ``certify`` instead
lays the samples of all images end to end and cuts that into batches of the batch size, so small
per-image sample counts still make full batches. Both run the same small CNN (random weights,
28x28x1, ~106k parameters), the same n0 / n / batch size, under ``torch.inference_mode``.

    python benchmarks/certify_throughput.py                    # defaults: ~40 s on 2 idle cores
    python benchmarks/certify_throughput.py --setting 8,100,1000,256 --threads 1

Writes ``benchmarks/results/certify_throughput.json`` and the section between the
``certify_throughput`` markers of ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from _report import cpu_name, write_section
from torch import nn

from nodata_defense._io import atomic_write_json
from nodata_defense.smoothing import ABSTAIN, SmoothedClassifier, certified_radius, clopper_pearson_lower

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Certification throughput"
# (images, n0, n, batch size). The paper's N = 10,000 at batch 1000 and at 128 (the fastest batch
# size of this CNN on a small CPU: a batch of 1000 overflows the cache); with n >= batch size each
# image fills its own batches, so 2 images measure the same throughput as 16 in an eighth of the
# time. Then runs where the naive loop's per-image batches are small because n0 and n are.
DEFAULT_SETTINGS = ["2,100,10000,1000", "2,100,10000,128", "100,10,100,128", "500,2,16,128"]


def make_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def naive_certify(model, x, *, n0, n, sigma, alpha, batch_size, generator, num_classes=10):
    """Cohen et al.'s reference structure: one image at a time, each image's samples in its own batches."""

    def counts_of(image: torch.Tensor, num: int) -> torch.Tensor:
        counts = torch.zeros(num_classes, dtype=torch.long)
        remaining = num
        while remaining > 0:
            size = min(batch_size, remaining)
            remaining -= size
            batch = image.unsqueeze(0).repeat(size, 1, 1, 1)
            noise = torch.randn(batch.shape, generator=generator) * sigma
            labels = model(batch + noise).argmax(1)
            counts += torch.bincount(labels, minlength=num_classes).cpu()
        return counts

    results = []
    with torch.inference_mode():
        for image in x:
            guess = int(counts_of(image, n0).argmax())
            pa_lower = clopper_pearson_lower(int(counts_of(image, n)[guess]), n, alpha)
            results.append((guess, certified_radius(pa_lower, sigma)) if pa_lower > 0.5 else (ABSTAIN, 0.0))
    return results


def run_setting(model, *, images, n0, n, batch_size, sigma, alpha, repeats, seed):
    x = torch.rand(images, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    smooth = SmoothedClassifier(model, num_classes=10, sigma=sigma)
    samples = images * (n0 + n)
    naive_times, packed_times = [], []
    for r in range(repeats):
        # Alternate the two so that load from other processes hits both alike.
        start = time.perf_counter()
        naive = naive_certify(
            model, x, n0=n0, n=n, sigma=sigma, alpha=alpha, batch_size=batch_size,
            generator=torch.Generator().manual_seed(seed + r),
        )  # fmt: skip
        naive_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        packed = smooth.certify(x, n0=n0, n=n, alpha=alpha, batch_size=batch_size, generator=seed + r)
        packed_times.append(time.perf_counter() - start)
    agree = sum(a[0] == c.label for a, c in zip(naive, packed, strict=True)) / images
    naive_s, packed_s = min(naive_times), min(packed_times)
    return {
        "images": images,
        "n0": n0,
        "n": n,
        "batch_size": batch_size,
        "samples": samples,
        "naive_largest_batch": min(batch_size, max(n0, n)),
        "naive_seconds": naive_s,
        "packed_seconds": packed_s,
        "naive_samples_per_second": samples / naive_s,
        "packed_samples_per_second": samples / packed_s,
        "speedup": naive_s / packed_s,
        "label_agreement": agree,
    }


def render_section(results: dict) -> str:
    lines = [
        f"Command: `{results['command']}`",
        "",
        f"Machine: {results['machine']['cpu']} ({results['machine']['logical_cpus']} logical CPUs),"
        f" torch {results['machine']['torch']}, `torch.set_num_threads({results['threads']})`."
        f" Model: small CNN, 28x28x1, {results['model_parameters']:,} parameters, random weights;"
        f" sigma = {results['sigma']}, alpha = {results['alpha']}, best of {results['repeats']} interleaved"
        " run(s); 1-minute load average before / after:"
        f" {' / '.join(str(v) for v in results['machine']['load_average_1min_before_after'])}.",
        "",
        "| images | n0 | n | batch | naive per-image batch | naive samples/s | `certify` samples/s | speed-up |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in results["settings"]:
        lines.append(
            f"| {s['images']} | {s['n0']} | {s['n']:,} | {s['batch_size']} | {s['n0']} / {s['naive_largest_batch']}"
            f" | {s['naive_samples_per_second']:,.0f} | {s['packed_samples_per_second']:,.0f}"
            f" | **{s['speedup']:.2f}x** |"
        )
    lines += [
        "",
        "Samples counted are all noisy forward passes (n0 + n per image). The naive loop is the"
        " reference code's structure (per image, per batch of that image's samples); `certify` packs"
        " the samples of several images into each batch. When n is at least the batch size both"
        " run the same batch shapes, so only a small difference is expected there; packing pays"
        " where the naive loop's per-image batches (n0, n) are smaller than the batch size. Compare"
        " the rows at batch 1000 and 128 for the effect of the batch size itself on this CPU.",
    ]
    load = results["machine"]["load_average_1min_before_after"]
    if max(load) >= results["machine"]["logical_cpus"]:
        lines += [
            "",
            f"The machine was busy during this run (1-minute load {max(load)} on"
            f" {results['machine']['logical_cpus']} CPUs, other jobs running): absolute rates are"
            " lower and noisier than on an idle machine, and only the ratios of interleaved runs are"
            " meaningful.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--setting",
        action="append",
        metavar="IMAGES,N0,N,BATCH",
        help=f"a run to time; repeatable (default: {' '.join(DEFAULT_SETTINGS)})",
    )
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument(
        "--repeats", type=int, default=3, help="time each method this many times, keep the best"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--output", type=Path, default=ROOT / "benchmarks" / "results" / "certify_throughput.json"
    )
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "performance.md")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    model = make_cnn(args.seed).eval()
    # Warm-up: the first forward passes allocate and pick kernels.
    with torch.inference_mode():
        for size in (1, 10, 128, 1000):
            model(torch.rand(size, 1, 28, 28))

    # Other processes on the machine slow both methods unevenly; the load is recorded to judge that.
    load_before = round(os.getloadavg()[0], 2)
    settings = []
    for spec in args.setting or DEFAULT_SETTINGS:
        images, n0, n, batch_size = (int(v) for v in spec.split(","))
        result = run_setting(
            model, images=images, n0=n0, n=n, batch_size=batch_size, sigma=args.sigma,
            alpha=args.alpha, repeats=args.repeats, seed=args.seed,
        )  # fmt: skip
        print(
            f"images={images} n0={n0} n={n} batch={batch_size}: naive {result['naive_samples_per_second']:,.0f}/s,"
            f" certify {result['packed_samples_per_second']:,.0f}/s, speed-up {result['speedup']:.2f}x"
        )
        settings.append(result)

    results = {
        "command": shlex.join(["python", "benchmarks/certify_throughput.py", *argv]),
        "threads": args.threads,
        "sigma": args.sigma,
        "alpha": args.alpha,
        "repeats": args.repeats,
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "machine": {
            "cpu": cpu_name(),
            "logical_cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_average_1min_before_after": [load_before, round(os.getloadavg()[0], 2)],
        },
        "settings": settings,
    }
    atomic_write_json(args.output, results)
    write_section(args.docs, "certify_throughput", f"{HEADING}\n\n{render_section(results)}")
    return results


if __name__ == "__main__":
    main()
