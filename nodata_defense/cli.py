"""``nodata-defense``: the command line, over the public API only.

    nodata-defense info MODEL                  print a saved model's config.json
    nodata-defense certify MODEL IMAGES_DIR    certify every image of a folder
    nodata-defense demo [...]                  the offline digits demo (nodata_defense.demo)

``MODEL`` is a directory written by ``RobustModel.save_pretrained`` or a Hub repo id.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_EXIT_ERROR = 1
_KNOWN_ERRORS = (ValueError, TypeError, OSError, ImportError, KeyError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nodata-defense",
        description="Certifiably robust image classifiers without training data (randomized smoothing"
        " over a personalized diffusion denoiser).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = commands.add_parser("info", help="print a saved model's configuration")
    info.add_argument("model", metavar="MODEL", help="directory written by save_pretrained, or a Hub repo id")
    info.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    info.add_argument("--json", action="store_true", help="print config.json only, as JSON")

    certify = commands.add_parser(
        "certify",
        help="certify every image of a folder",
        description="Certify each image file of IMAGES_DIR (png, jpg, bmp, webp; read in sorted order) and"
        " print its smoothed label and certified l2 radius. Images are converted to the model's channels and"
        " resized to its image shape.",
    )
    certify.add_argument(
        "model", metavar="MODEL", help="directory written by save_pretrained, or a Hub repo id"
    )
    certify.add_argument("images", metavar="IMAGES_DIR", type=Path, help="folder of image files")
    certify.add_argument("--revision", help="Hub revision (branch, tag or commit)")
    certify.add_argument(
        "--classifier-factory",
        metavar="MODULE:FUNCTION",
        help="for a model whose classifier is not stored with it: a function returning the base classifier",
    )
    certify.add_argument("--sigma", type=float, help="noise level (default: the model's own)")
    certify.add_argument("--n0", type=int, default=100, help="selection samples (default 100)")
    certify.add_argument("--n", type=int, default=10_000, help="estimation samples (default 10000)")
    certify.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    certify.add_argument("--batch-size", type=int, default=256, help="noisy samples per forward pass")
    certify.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    certify.add_argument("--device", help="torch device, e.g. cuda (default: cpu)")
    certify.add_argument("--output", type=Path, help="also write the certificates to this JSON file")
    certify.add_argument("--progress", action="store_true", help="show a progress bar")

    demo = commands.add_parser("demo", help="run the offline digits demo", add_help=False)
    demo.add_argument("demo_args", nargs=argparse.REMAINDER, help="arguments of the demo (see demo --help)")
    return parser


# ------------------------------------------------------------------------------------ commands
def _info(args: argparse.Namespace) -> int:
    from .robust_model import load_saved_config

    config = load_saved_config(args.model, revision=args.revision)
    if args.json:
        print(json.dumps(config.model_dump(mode="json"), indent=2, sort_keys=True))
        return 0
    denoiser, classifier = config.base_denoiser, config.base_classifier
    rows = [
        ("model", args.model),
        ("format version", config.format_version),
        ("sigma", f"{config.sigma:g}"),
        ("image shape", tuple(config.image_shape)),
        (
            "classes",
            f"{len(config.class_names)}: {', '.join(config.class_names[:10])}"
            + (", ..." if len(config.class_names) > 10 else ""),
        ),
        ("denoiser", f"{denoiser.id} ({denoiser.kind}{', personalized' if config.personalized else ''})"),
        (
            "classifier",
            f"{classifier.model_class} ({classifier.kind}{': ' + classifier.id if classifier.id else ''})",
        ),
        ("adaptation", config.adaptation_mode),
        ("versions", ", ".join(f"{k} {v}" for k, v in sorted(config.versions.items()))),
    ]
    table = config.certified_accuracy
    if table is not None:
        cells = ", ".join(
            f"r={r:g}: {100 * a:.1f}%" for r, a in zip(table.radii, table.accuracy, strict=True)
        )
        rows.append(("certified accuracy", f"{cells} ({table.num_images} images, N={table.n})"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def _load_factory(spec: str) -> Any:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--classifier-factory must look like MODULE:FUNCTION; got {spec!r}.")
    factory = getattr(importlib.import_module(module_name), attribute, None)
    if not callable(factory):
        raise ValueError(f"--classifier-factory {spec!r} is not a callable.")
    return factory()


def read_images(folder: Path, image_shape: Sequence[int]) -> tuple[list[Path], Any]:
    """Image files of ``folder`` (sorted) as a float tensor (N, C, H, W) in [0, 1] of ``image_shape``."""
    import numpy as np
    import torch
    from PIL import Image

    if not folder.is_dir():
        raise FileNotFoundError(f"IMAGES_DIR {str(folder)!r} is not a directory.")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(
            f"IMAGES_DIR {str(folder)!r} holds no image file ({', '.join(IMAGE_SUFFIXES)})."
        )
    channels, height, width = image_shape
    if channels not in (1, 3):
        raise ValueError(f"image files can be read for 1- or 3-channel models; this one has {channels}.")
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for path in files:
        with Image.open(path) as image:
            image = image.convert(mode)
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BICUBIC)
            array = np.asarray(image, dtype=np.float32) / 255.0
        arrays.append(array[None] if channels == 1 else array.transpose(2, 0, 1))
    return files, torch.from_numpy(np.stack(arrays))


def _certify(args: argparse.Namespace) -> int:
    from ._io import atomic_write_json
    from .robust_model import RobustModel
    from .smoothing import ABSTAIN

    options: dict[str, Any] = {"revision": args.revision}
    if args.classifier_factory:
        options["classifier"] = _load_factory(args.classifier_factory)
    if args.device:
        options["device"] = args.device
    try:
        robust = RobustModel.from_pretrained(args.model, **options)
    except ValueError as error:
        if "cannot be rebuilt" in str(error):
            raise ValueError(
                f"{error} On the command line: --classifier-factory MODULE:FUNCTION (a function returning it)."
            ) from error
        raise
    files, x = read_images(args.images, robust.image_shape)
    certificates = robust.certify(
        x,
        sigma=args.sigma,
        n0=args.n0,
        n=args.n,
        alpha=args.alpha,
        batch_size=args.batch_size,
        generator=args.seed,
        show_progress=args.progress,
    )
    names = robust.class_names
    width = max(len(p.name) for p in files)
    print(f"{'image':<{width}}  {'label':<16} {'radius':>8} {'pA_lower':>9}")
    rows = []
    for path, c in zip(files, certificates, strict=True):
        label = "abstain" if c.label == ABSTAIN else names[c.label]
        print(f"{path.name:<{width}}  {label:<16} {c.radius:>8.4f} {c.pa_lower:>9.4f}")
        rows.append({"image": path.name, "class": None if c.label == ABSTAIN else label, **c.__dict__})
    if args.output is not None:
        atomic_write_json(args.output, {"model": args.model, "certificates": rows})
    return 0


def _demo(args: argparse.Namespace) -> int:
    try:
        demo = importlib.import_module("nodata_defense.demo")
    except ModuleNotFoundError as error:
        if error.name != "nodata_defense.demo":
            raise
        print(
            "nodata-defense: the demo is not available in this installation (nodata_defense.demo is missing).",
            file=sys.stderr,
        )
        return _EXIT_ERROR
    return int(demo.main(list(args.demo_args)) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``nodata-defense`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        # Everything after "demo" belongs to the demo's own parser (argparse would claim its options).
        args = argparse.Namespace(command="demo", demo_args=argv[1:])
    else:
        args = _parser().parse_args(argv)
    command = {"info": _info, "certify": _certify, "demo": _demo}[args.command]
    try:
        return command(args)
    except _KNOWN_ERRORS as error:
        print(f"nodata-defense {args.command}: error: {error}", file=sys.stderr)
        return _EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
