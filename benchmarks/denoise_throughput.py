"""Throughput of one-shot denoising (images/s) on this machine's CPU.

Two random-weight UNets built from config (no download): one of google/ddpm-cifar10-32's exact
shape (~35.7 M parameters, 32x32 RGB) and a small one; each in eager fp32, channels_last and
torch.compile. A compile failure is recorded, not raised. Inference runs under
``torch.inference_mode`` as certification does (no gradients).

Usage (writes the JSON and the docs/performance.md section):
    python benchmarks/denoise_throughput.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from _report import cpu_name, write_section
from diffusers import DDPMScheduler, UNet2DModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nodata_defense._io import atomic_write_json  # noqa: E402
from nodata_defense.denoiser import DiffusionDenoiser  # noqa: E402

COMMAND = "python benchmarks/denoise_throughput.py"

# google/ddpm-cifar10-32 config.json (UNet2DModel), attention at 16x16.
DDPM_CIFAR10 = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 256, 256),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
    norm_num_groups=32,
    mid_block_scale_factor=1,
    act_fn="silu",
    attention_head_dim=None,
)
SMALL = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=32,
)
MODELS = {"ddpm-cifar10-32 shape": (DDPM_CIFAR10, 16), "small": (SMALL, 64)}
VARIANTS = ("fp32", "channels_last", "torch.compile")


def _build(config: dict, variant: str) -> DiffusionDenoiser:
    torch.manual_seed(0)
    unet = UNet2DModel(**config).eval()
    if variant == "channels_last":
        unet = unet.to(memory_format=torch.channels_last)
    elif variant == "torch.compile":
        unet.compile()
    return DiffusionDenoiser(unet, DDPMScheduler(beta_schedule="linear"))


def _timed(denoiser: DiffusionDenoiser, x: torch.Tensor) -> float:
    start = time.perf_counter()
    denoiser(x, 0.25)
    return time.perf_counter() - start


def _measure_model(name: str, config: dict, batch: int, batches: int) -> list[dict]:
    """Rounds interleave the variants (one batch each per round), so a burst of load from another
    process hits them alike; each batch is timed on its own. The best batch is the machine's speed
    when left alone, the median what a run on the shared machine got."""
    params = sum(p.numel() for p in UNet2DModel(**config).parameters())
    rows: dict[str, dict] = {}
    live: dict[str, tuple[DiffusionDenoiser, torch.Tensor]] = {}
    times: dict[str, list[float]] = {}
    with torch.inference_mode():
        for variant in VARIANTS:
            rows[variant] = {"model": name, "parameters": params, "variant": variant, "batch_size": batch}
            x = torch.rand(batch, 3, 32, 32) + 0.25 * torch.randn(batch, 3, 32, 32)
            if variant == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            try:
                denoiser = _build(config, variant)
                # Warm-up; for torch.compile this call is the compilation.
                rows[variant]["first_call_s"] = round(_timed(denoiser, x), 2)
            except Exception as exc:  # a compile failure is a result on this machine, not a crash
                rows[variant]["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                continue
            live[variant], times[variant] = (denoiser, x), []
        for _ in range(batches):
            for variant, (denoiser, x) in live.items():
                times[variant].append(_timed(denoiser, x))
    for variant, ts in times.items():
        best, median = min(ts), statistics.median(ts)
        rows[variant].update(
            timed_batches=batches,
            images_per_s_best=round(batch / best, 2),
            images_per_s_median=round(batch / median, 2),
            ms_per_image_best=round(1000 * best / batch, 3),
        )
    for row in rows.values():
        print(row, flush=True)
    return list(rows.values())


def run(batches: int) -> dict:
    load_before = [round(v, 2) for v in os.getloadavg()]
    results = []
    for name, (config, batch) in MODELS.items():
        results += _measure_model(name, config, batch, batches)
    return {
        "command": COMMAND,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_before": load_before,
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "sigma": 0.25,
        "results": results,
    }


def _section(report: dict) -> str:
    lines = [
        "## One-shot denoising throughput",
        "",
        f"Measured {report['date']} on `{report['cpu']}` ({report['cpu_count']} cores, torch"
        f" {report['torch']}, {report['torch_threads']} threads), random-weight UNets built from config,"
        " `torch.inference_mode`, σ = 0.25, one UNet call per image. The machine is shared: load average"
        f" {report['load_average_before']} before and {report['load_average_after']} after the run. Another"
        " busy process makes OpenMP threads spin and can cut these numbers several-fold.",
        "",
        "| UNet | parameters | variant | batch | images/s (best batch) | images/s (median) | ms/image (best)"
        " | first call (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(
                f"| {r['model']} | {r['parameters'] / 1e6:.1f} M | {r['variant']} | – | failed: {r['error']} | – | – | – |"
            )
        else:
            lines.append(
                f"| {r['model']} | {r['parameters'] / 1e6:.1f} M | {r['variant']} | {r['batch_size']} |"
                f" {r['images_per_s_best']} | {r['images_per_s_median']} | {r['ms_per_image_best']} |"
                f" {r['first_call_s']} |"
            )
    lines += [
        "",
        'Each batch is timed on its own after one warm-up call ("first call", which includes compilation'
        " for torch.compile; inductor's on-disk cache makes a repeated run compile faster); the variants"
        " take turns batch by batch so that load from other processes hits them alike. Certifying one"
        " image with N = 10,000 noise draws costs N / (images/s) seconds of denoising alone.",
        "",
        f"Reproduce: `{report['command']}` (writes `benchmarks/results/denoise_throughput.json`"
        " and this section).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=5, help="timed batches per configuration")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/denoise_throughput.json")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs/performance.md")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report = run(args.batches)
    atomic_write_json(args.output, report)
    write_section(args.docs, "denoise_throughput", _section(report))
    print(f"wrote {args.output} and the section of {args.docs}")


if __name__ == "__main__":
    main()
