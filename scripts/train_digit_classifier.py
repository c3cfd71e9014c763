"""Train the bundled digit classifier (DigitCNN) on the "classifier" split of the demo digits only.

    python scripts/train_digit_classifier.py --out nodata_defense/zoo/weights/digits-cnn

Writes ``config.json`` + ``model.safetensors`` (PyTorchModelHubMixin layout) and ``training_log.json``
(per-epoch losses, the seed, the command, and the clean accuracy on the held-out "test" split, measured
after reloading the saved weights so the number is exactly what users get).
"""

from __future__ import annotations

import argparse
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nodata_defense._io import atomic_write_json, atomic_write_text
from nodata_defense.zoo import DigitCNN, load_digits

MODEL_CARD = """# digits-cnn: the bundled digit classifier of nodata-defense

A small CNN (`nodata_defense.zoo.DigitCNN`, saved with `PyTorchModelHubMixin`: `config.json` +
`model.safetensors`) for 28×28 grey digits. Input: `[0, 1]` images `(N, 1, 28, 28)` (it normalizes
internally); output: 10 logits for "zero" … "nine".

Trained by `scripts/train_digit_classifier.py` on the "classifier" split of
`nodata_defense.zoo.load_digits` only (2,000 real MNIST digits, 200 per class), disjoint from the
bundled text-to-image model's data and from the "test" split. Clean accuracy on the test split, the
seed and the per-epoch losses are in `training_log.json`.

```python
from nodata_defense.zoo import load_digit_classifier

model = load_digit_classifier()  # DigitCNN.from_pretrained(<this folder>), eval mode
```
"""


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero fill), a light MNIST augmentation."""
    n = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    h, w = x.shape[-2:]
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("nodata_defense/zoo/weights/digits-cnn"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--max-shift", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train = load_digits("classifier")
    test = load_digits("test")

    model = DigitCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    total = steps_per_epoch * args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    epochs_log = []
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(train), args.batch_size):
            idx = order[i : i + args.batch_size]
            x = (
                random_shift(train.images[idx], args.max_shift, generator)
                if args.max_shift
                else train.images[idx]
            )
            logits = model(x)
            loss = F.cross_entropy(logits, train.labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == train.labels[idx]).sum())
        entry = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / len(train),
            "train_accuracy_augmented": correct / len(train),
            "seconds": round(time.time() - start, 1),
        }
        epochs_log.append(entry)
        print(entry, flush=True)

    # Save to a staging directory and move it into place, so an interrupted run leaves no half model.
    out: Path = args.out
    staging = out.parent / f".{out.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    model.eval().save_pretrained(staging)
    atomic_write_text(staging / "README.md", MODEL_CARD)
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)

    reloaded = DigitCNN.from_pretrained(out).eval()
    predictions = reloaded.predict(test.images)
    n_correct = int((predictions == test.labels).sum())
    accuracy = n_correct / len(test)
    per_class = [
        float((predictions[test.labels == c] == c).float().mean()) for c in range(reloaded.num_classes)
    ]
    log = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "seed": args.seed,
        "train_split": "classifier",
        "train_size": len(train),
        "test_split": "test",
        "test_size": len(test),
        "hyperparameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "parameters": sum(p.numel() for p in reloaded.parameters()),
        "epochs": epochs_log,
        "test_correct": n_correct,
        "test_accuracy": accuracy,
        "test_accuracy_per_class": per_class,
        "torch_version": torch.__version__,
        "wall_clock_seconds": round(time.time() - start, 1),
    }
    atomic_write_json(out / "training_log.json", log)
    print(f"test accuracy {accuracy:.4f} ({n_correct}/{len(test)}) -> {out}", flush=True)


if __name__ == "__main__":
    main()
