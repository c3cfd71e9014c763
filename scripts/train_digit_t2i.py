"""Train the bundled digit text-to-image model on the "generator" split of the demo digits only.

    python scripts/train_digit_t2i.py --out nodata_defense/zoo/weights/digits-t2i

A pixel-space diffusion model (diffusers ``UNet2DConditionModel`` on 1×28×28 images, 1000-step DDPM
schedule, ε-prediction) conditioned on a tiny CLIP text encoder trained jointly from scratch, with a
word-level tokenizer. Prompts name the digit in varied templates; 15% of them are dropped to ``""``,
which gives classifier-free guidance and the class-agnostic denoiser used at certification time.

The run checkpoints every few minutes to ``--run-dir`` (safetensors + JSON, written atomically) and a
re-run with the same arguments resumes from the last checkpoint, ending bit-identical to an
uninterrupted run: every random draw of step ``k`` comes from a generator seeded by (seed, k).

At the end the EMA weights are exported in the diffusers pipeline layout to ``--out`` and evaluated:

- generation: DDIM samples with classifier-free guidance for each digit prompt, classified by the
  bundled digit classifier;
- one-shot denoising: accuracy of the bundled classifier on the held-out "test" split after Gaussian
  noise of std σ and one denoising step of the unconditional (``""``) model, versus no denoising.

``--evaluate-only`` evaluates an exported directory; ``--export-only`` exports the last checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from nodata_defense._io import atomic_save_safetensors, atomic_write_json, atomic_write_text
from nodata_defense._training import fingerprint, step_seed
from nodata_defense.zoo import DIGIT_CLASS_NAMES, load_digit_classifier, load_digits

NUMERALS = tuple(str(i) for i in range(10))
MAX_LENGTH = 16
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")

# "{name}" is the class name ("seven"), "{numeral}" its digit ("7"). The first is the library's
# default synthesis template.
PROMPT_TEMPLATES = (
    "This is a photo of a {name}",
    "a photo of the digit {name}",
    "a photo of the number {name}",
    "a photo of a handwritten {name}",
    "a handwritten digit {name}",
    "a handwritten {name}",
    "handwritten {numeral}",
    "handwritten {name}",
    "the number {name}",
    "the number {numeral}",
    "the digit {name}",
    "the digit {numeral}",
    "digit {numeral}",
    "number {numeral}",
    "an image of a {name}",
    "a picture of the digit {numeral}",
    "a black and white photo of a {name}",
    "a drawing of the number {name}",
    "{name}",
    "{numeral}",
    "a {name}",
    "a {numeral}",
)
# Words users are likely to write around a digit; in the vocabulary so they are not [UNK], although the
# model learns only the ones the templates use.
EXTRA_WORDS = (
    "an",
    "photograph",
    "image",
    "picture",
    "of",
    "the",
    "handwritten",
    "digit",
    "number",
    "numeral",
    "written",
    "by",
    "hand",
    "black",
    "white",
    "and",
    "on",
    "background",
    "drawing",
    "sketch",
    "mnist",
    "small",
    "large",
    "grey",
    "gray",
    "low",
    "resolution",
    "centered",
    ",",
    ".",
    "!",
    "?",
    "-",
    "'",
    ":",
)


# ---------------------------------------------------------------------------------- components
def build_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words: list[str] = []
    for template in PROMPT_TEMPLATES:
        for name, numeral in zip(DIGIT_CLASS_NAMES, NUMERALS, strict=True):
            words += template.format(name=name, numeral=numeral).lower().split()
    words += list(DIGIT_CLASS_NAMES) + list(NUMERALS) + list(EXTRA_WORDS)
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="[BOS]",
        eos_token="[EOS]",
        pad_token="[PAD]",
        unk_token="[UNK]",
        model_max_length=MAX_LENGTH,
    )


def build_text_encoder(tokenizer, hidden: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        projection_dim=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return CLIPTextModel(config)


def build_unet(args: argparse.Namespace):
    from diffusers import UNet2DConditionModel

    channels = tuple(args.channels)
    # Cross-attention only at the coarsest levels: at 28×28 and 14×14 it costs far more than it
    # brings on one CPU core, and the digit identity is decided at low resolution.
    plain = len(channels) - args.attention_levels
    return UNet2DConditionModel(
        sample_size=28,
        in_channels=1,
        out_channels=1,
        block_out_channels=channels,
        down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * args.attention_levels,
        up_block_types=("CrossAttnUpBlock2D",) * args.attention_levels + ("UpBlock2D",) * plain,
        layers_per_block=args.layers_per_block,
        cross_attention_dim=args.text_hidden,
        attention_head_dim=args.attention_heads,
        norm_num_groups=8,
    )


def build_scheduler(args: argparse.Namespace):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule=args.beta_schedule,
        prediction_type="epsilon",
        clip_sample=True,
        clip_sample_range=1.0,
    )


def prompt_table(tokenizer) -> tuple[Tensor, Tensor, Tensor]:
    """Token ids of every (class, template) prompt ``(10, T, L)`` and of the empty prompt ``(L,)``."""

    def ids(prompts: list[str]) -> Tensor:
        return tokenizer(
            prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
        )["input_ids"]

    table = torch.stack(
        [
            ids([t.format(name=name, numeral=num) for t in PROMPT_TEMPLATES])
            for name, num in zip(DIGIT_CLASS_NAMES, NUMERALS, strict=True)
        ]
    )
    return table, ids([""])[0], ids([f"{t}" for t in PROMPT_TEMPLATES])


# ------------------------------------------------------------------------------- checkpointing
def _flat_state(module: nn.Module, prefix: str) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def save_checkpoint(
    run_dir: Path, step: int, modules: dict[str, nn.Module], optimizer, history, run_id
) -> None:
    tensors: dict[str, Tensor] = {}
    for prefix, module in modules.items():
        tensors.update(_flat_state(module, prefix))
    scalars: dict[str, dict] = {}
    for index, slot in optimizer.state_dict()["state"].items():
        for key, value in slot.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    name = f"checkpoint-{step:07d}"
    atomic_save_safetensors(run_dir / f"{name}.safetensors", tensors)
    atomic_write_json(
        run_dir / f"{name}.json",
        {"step": step, "run_id": run_id, "optimizer_scalars": scalars, "history": history},
    )
    # The pointer moves only after both files of the new checkpoint are complete.
    atomic_write_json(run_dir / "latest.json", {"checkpoint": name, "step": step, "run_id": run_id})
    for old in run_dir.glob("checkpoint-*"):
        if not old.name.startswith(name):
            old.unlink(missing_ok=True)


def load_checkpoint(run_dir: Path, modules: dict[str, nn.Module], optimizer, run_id: str):
    pointer = run_dir / "latest.json"
    if not pointer.exists():
        return 0, []
    latest = json.loads(pointer.read_text())
    if latest["run_id"] != run_id:
        raise SystemExit(
            f"{run_dir} holds a checkpoint of a different run ({latest['run_id']} != {run_id}); "
            "use another --run-dir or delete it."
        )
    name = latest["checkpoint"]
    tensors = load_file(str(run_dir / f"{name}.safetensors"))
    meta = json.loads((run_dir / f"{name}.json").read_text())
    for prefix, module in modules.items():
        module.load_state_dict(
            {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        )
    if optimizer is not None:
        state = optimizer.state_dict()
        slots: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, field = key.split(".", 2)
                slots.setdefault(int(index), {})[field] = value
        for index, values in meta["optimizer_scalars"].items():
            slots.setdefault(int(index), {}).update(values)
        state["state"] = slots
        optimizer.load_state_dict(state)
    return int(meta["step"]), list(meta["history"])


# ---------------------------------------------------------------------------------------- model
class TextToImage(nn.Module):
    """UNet + text encoder, trained together; the encoder output (last hidden state) conditions the UNet."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder

    def forward(self, x_t: Tensor, t: Tensor, input_ids: Tensor) -> Tensor:
        # No attention mask: the diffusers pipelines (and nodata_defense.denoiser) pass none for CLIP.
        hidden = self.text_encoder(input_ids)[0]
        return self.unet(x_t, t, encoder_hidden_states=hidden, return_dict=False)[0]


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    if max_shift == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def learning_rate(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr_min + (args.lr - args.lr_min) * 0.5 * (1 + math.cos(math.pi * progress))


def export(out: Path, ema: TextToImage, tokenizer, scheduler, info: dict) -> None:
    """Write the diffusers pipeline layout to a staging directory, then move it into place."""
    staging = out.parent / f".{out.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    ema.unet.save_pretrained(staging / "unet", safe_serialization=True)
    ema.text_encoder.save_pretrained(staging / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(staging / "tokenizer")
    # The generic fast-tokenizer class name loads with transformers 4.x and 5.x alike.
    config_path = staging / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    atomic_write_json(config_path, config)
    scheduler.save_pretrained(staging / "scheduler")
    atomic_write_text(staging / "README.md", readme(out.name, info))
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def readme(name: str, info: dict) -> str:
    if info.get("style", "handwritten") == "printed":
        intro = "Not bundled: a printed-digit model of `benchmarks/style_shift.py`."
        data = (
            f"Trained from scratch on {10 * info['printed_per_class']:,} printed digits rendered from the fonts"
            " matplotlib ships (`scripts/printed_digits.py`): no handwritten digit, a style unlike the"
            " bundled classifier's data."
        )
    else:
        intro = (
            "Bundled with nodata-defense as the embedded default off-the-shelf denoiser (the generator is"
            " the larger `digits-t2i`)."
            if name == "digits-denoiser"
            else "Bundled with nodata-defense as the embedded default generator *and* off-the-shelf denoiser."
        )
        data = (
            'Trained from scratch on the "generator" split of `nodata_defense.zoo.load_digits` only\n'
            "(1,500 real MNIST digits, 150 per class), disjoint from the bundled classifier's data and from\n"
            "the test split."
        )
    return f"""# {name}: a tiny text-to-image pixel diffusion model for 28×28 digits

{intro} UNet channels {tuple(info["channels"])},
{info["unet_parameters"]:,} parameters. {data} See `docs/zoo.md` and `training_log.json`.

Layout (diffusers pipeline directory, one folder per component):

| folder | component | loader |
|---|---|---|
| `unet/` | `UNet2DConditionModel`, 1×28×28 in/out, ε-prediction, EMA weights | `UNet2DConditionModel.from_pretrained(dir, subfolder="unet")` |
| `scheduler/` | `DDPMScheduler`, 1000 steps, `{info["beta_schedule"]}` | `DDPMScheduler.from_pretrained(dir, subfolder="scheduler")` |
| `text_encoder/` | `CLIPTextModel` (hidden {info["text_hidden"]}, 2 layers), trained jointly | `CLIPTextModel.from_pretrained(dir, subfolder="text_encoder")` |
| `tokenizer/` | word-level fast tokenizer, lower-cased, padded to {MAX_LENGTH} | `AutoTokenizer.from_pretrained(dir / "tokenizer")` |

Images are in [-1, 1] in model space (`2x - 1` of [0, 1] pixels). Prompts are encoded as the
Stable Diffusion pipeline does for CLIP: padded to {MAX_LENGTH} tokens, no attention mask, last hidden
state. The empty prompt `""` is the class-agnostic (unconditional) model.

Example prompts: "This is a photo of a seven", "a photo of the digit seven", "handwritten 7",
"the number seven", "seven".
"""


# ----------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def encode(model: TextToImage, tokenizer, prompts: list[str]) -> Tensor:
    ids = tokenizer(
        prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    )
    return model.text_encoder(ids["input_ids"])[0]


@torch.no_grad()
def ddim_sample(
    model: TextToImage,
    scheduler,
    cond: Tensor,
    uncond: Tensor,
    *,
    steps: int,
    guidance: float,
    generator: torch.Generator,
) -> Tensor:
    """Deterministic DDIM (η = 0) with classifier-free guidance; returns images in [0, 1]."""
    alphas = scheduler.alphas_cumprod.to(torch.float64)
    n = cond.shape[0]
    x = torch.randn(n, 1, 28, 28, generator=generator)
    ts = torch.linspace(len(alphas) - 1, 0, steps).round().long().tolist()
    for i, t in enumerate(ts):
        a_t = float(alphas[t])
        a_prev = float(alphas[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        tt = torch.full((n,), t, dtype=torch.long)
        eps_c = model.unet(x, tt, encoder_hidden_states=cond, return_dict=False)[0]
        eps_u = model.unet(x, tt, encoder_hidden_states=uncond.expand(n, -1, -1), return_dict=False)[0]
        eps = eps_u + guidance * (eps_c - eps_u)
        x0 = ((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return ((x + 1) / 2).clamp(0, 1)


def t_star_for_sigma(scheduler, sigma: float) -> int:
    """First t whose noise-to-signal ratio sqrt(1-ᾱ)/sqrt(ᾱ) reaches 2σ (σ in [0,1], ×2 in [-1,1])."""
    a = scheduler.alphas_cumprod.to(torch.float64)
    ratio = torch.sqrt(1 - a) / torch.sqrt(a)
    hits = torch.nonzero(ratio >= 2 * sigma)
    if len(hits) == 0:
        raise ValueError(f"sigma={sigma} is beyond the schedule's largest noise level.")
    return int(hits[0])


@torch.no_grad()
def one_shot_denoise(model: TextToImage, scheduler, x_noisy: Tensor, sigma: float, uncond: Tensor) -> Tensor:
    t = t_star_for_sigma(scheduler, sigma)
    a = float(scheduler.alphas_cumprod[t])
    x_t = math.sqrt(a) * (2 * x_noisy - 1)
    tt = torch.full((x_noisy.shape[0],), t, dtype=torch.long)
    eps = model.unet(
        x_t, tt, encoder_hidden_states=uncond.expand(x_noisy.shape[0], -1, -1), return_dict=False
    )[0]
    x0 = ((x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)).clamp(-1, 1)
    return (x0 + 1) / 2


def save_grid(images: Tensor, path: Path, rows: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = math.ceil(len(images) / rows)
    grid = torch.ones(rows * 29, cols * 29)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        grid[r * 29 : r * 29 + 28, c * 29 : c * 29 + 28] = img[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, grid.numpy(), cmap="gray", vmin=0, vmax=1)


def evaluate(directory: Path, args: argparse.Namespace, figures: Path) -> dict:
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(directory, subfolder="unet").eval()
    text_encoder = CLIPTextModel.from_pretrained(directory, subfolder="text_encoder").eval()
    tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
    scheduler = DDPMScheduler.from_pretrained(directory, subfolder="scheduler")
    model = TextToImage(unet, text_encoder).eval()
    classifier = load_digit_classifier()
    uncond = encode(model, tokenizer, [""])
    result: dict = {"guidance_scale": args.guidance, "ddim_steps": args.ddim_steps}

    # Generation: per class, the library's default template and a second phrasing.
    start = time.time()
    generator = torch.Generator().manual_seed(args.seed + 1)
    templates = {"default": "This is a photo of a {name}", "numeral": "handwritten {numeral}"}
    result["generation"] = {}
    for key, template in templates.items():
        per_class, samples = [], []
        for c, (name, numeral) in enumerate(zip(DIGIT_CLASS_NAMES, NUMERALS, strict=True)):
            prompt = template.format(name=name, numeral=numeral)
            cond = encode(model, tokenizer, [prompt]).expand(args.samples_per_class, -1, -1)
            images = ddim_sample(
                model,
                scheduler,
                cond,
                uncond,
                steps=args.ddim_steps,
                guidance=args.guidance,
                generator=generator,
            )
            predictions = classifier.predict(images)
            per_class.append(float((predictions == c).float().mean()))
            samples.append(images[:10])
        result["generation"][key] = {
            "template": template,
            "samples_per_class": args.samples_per_class,
            "classifier_accuracy": sum(per_class) / len(per_class),
            "classifier_accuracy_per_class": per_class,
        }
        save_grid(torch.cat(samples), figures / f"samples_{key}.png", rows=10)
        print(f"generation [{template}]: accuracy {sum(per_class) / len(per_class):.4f}", flush=True)
    uncond_images = ddim_sample(
        model,
        scheduler,
        uncond.expand(100, -1, -1),
        uncond,
        steps=args.ddim_steps,
        guidance=1.0,
        generator=generator,
    )
    save_grid(uncond_images, figures / "samples_unconditional.png", rows=10)
    result["generation_seconds"] = round(time.time() - start, 1)

    # One-shot denoising of the held-out test split.
    test = load_digits("test")
    noise_gen = torch.Generator().manual_seed(args.seed + 2)
    result["denoising"] = {}
    for sigma in (0.25, 0.5, 1.0):
        noisy = test.images + sigma * torch.randn(test.images.shape, generator=noise_gen)
        denoised = torch.cat(
            [
                one_shot_denoise(model, scheduler, noisy[i : i + 250], sigma, uncond)
                for i in range(0, len(noisy), 250)
            ]
        )
        with torch.no_grad():
            # The classifier takes the noisy image as it is (no clamping), as inside smoothing.
            noisy_pred = torch.cat(
                [classifier(noisy[i : i + 500]).argmax(1) for i in range(0, len(noisy), 500)]
            )
        acc_noisy = float((noisy_pred == test.labels).float().mean())
        acc_denoised = float((classifier.predict(denoised) == test.labels).float().mean())
        result["denoising"][str(sigma)] = {
            "t_star": t_star_for_sigma(scheduler, sigma),
            "accuracy_noisy": acc_noisy,
            "accuracy_denoised": acc_denoised,
        }
        save_grid(
            torch.cat([test.images[:12], noisy[:12].clamp(0, 1), denoised[:12]]),
            figures / f"denoise_sigma{sigma}.png",
            rows=3,
        )
        print(f"sigma {sigma}: noisy {acc_noisy:.4f} -> denoised {acc_denoised:.4f}", flush=True)
    result["test_size"] = len(test)
    return result


# ----------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("nodata_defense/zoo/weights/digits-t2i"))
    p.add_argument("--run-dir", type=Path, default=Path("runs/digits-t2i"))
    p.add_argument("--steps", type=int, default=2200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-min", type=float, default=1e-5)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--ema-decay", type=float, default=0.998)
    p.add_argument("--prompt-dropout", type=float, default=0.15)
    p.add_argument("--max-shift", type=int, default=1, help="random translation augmentation, in pixels")
    p.add_argument("--channels", type=int, nargs="+", default=[32, 64, 64])
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--attention-levels", type=int, default=1, help="lowest resolutions with cross-attention")
    p.add_argument("--attention-heads", type=int, default=4)
    p.add_argument("--text-hidden", type=int, default=64)
    p.add_argument("--beta-schedule", default="squaredcos_cap_v2", choices=["squaredcos_cap_v2", "linear"])
    p.add_argument(
        "--style",
        choices=["handwritten", "printed"],
        default="handwritten",
        help="training images: the real 'generator' split, or digits rendered from fonts"
        " (scripts/printed_digits.py), a style unlike the classifier's handwritten digits",
    )
    p.add_argument("--printed-per-class", type=int, default=500, help="with --style printed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--ddim-steps", type=int, default=25)
    p.add_argument("--samples-per-class", type=int, default=100)
    p.add_argument("--time-steps", type=int, default=0, help="time this many steps, print s/step, exit")
    p.add_argument("--stop-after", type=int, default=0, help="checkpoint and exit after this step")
    p.add_argument("--export-only", action="store_true", help="export the last checkpoint's EMA to --out")
    p.add_argument("--evaluate-only", action="store_true", help="evaluate the model at --out")
    p.add_argument("--no-evaluate", action="store_true")
    return p.parse_args(argv)


# Arguments that do not change the trained weights (so they may differ on resume).
_NON_TRAINING = {
    "out",
    "run_dir",
    "threads",
    "checkpoint_minutes",
    "log_every",
    "guidance",
    "ddim_steps",
    "samples_per_class",
    "time_steps",
    "stop_after",
    "export_only",
    "evaluate_only",
    "no_evaluate",
}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    figures = args.run_dir / "figures"
    if args.evaluate_only:
        evaluation = evaluate(args.out, args, figures)
        log_path = args.out / "training_log.json"
        log = json.loads(log_path.read_text()) if log_path.exists() else {}
        log["evaluation"] = evaluation
        log["evaluation_command"] = command
        atomic_write_json(log_path, log)
        return

    hyper = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in _NON_TRAINING
    }
    if args.style == "handwritten":
        # Runs from before --style existed keep their fingerprint, so they still resume and export.
        del hyper["style"], hyper["printed_per_class"]
    run_id = fingerprint(hyper)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer()
    model = TextToImage(build_unet(args), build_text_encoder(tokenizer, args.text_hidden))
    ema = copy.deepcopy(model).requires_grad_(False)
    scheduler = build_scheduler(args)
    n_unet = sum(p.numel() for p in model.unet.parameters())
    n_text = sum(p.numel() for p in model.text_encoder.parameters())
    print(f"parameters: unet {n_unet:,}, text encoder {n_text:,}, run id {run_id}", flush=True)

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.dim() < 2 or "norm" in name or "embedding" in name else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
    )
    args.run_dir.mkdir(parents=True, exist_ok=True)
    start, history = load_checkpoint(args.run_dir, {"model": model, "ema": ema}, optimizer, run_id)
    info = {**hyper, "unet_parameters": n_unet, "text_encoder_parameters": n_text, "run_id": run_id}
    if args.export_only:
        export(args.out, ema, tokenizer, scheduler, info)
        print(f"exported the EMA of step {start} to {args.out}", flush=True)
        return
    if start:
        print(f"resumed from step {start}", flush=True)

    if args.style == "printed":
        from printed_digits import render_printed_digits  # beside this script

        data = render_printed_digits(args.printed_per_class, seed=args.seed)
    else:
        data = load_digits("generator")
    table, empty_ids, _ = prompt_table(tokenizer)
    alphas = scheduler.alphas_cumprod.to(torch.float32)
    model.train()
    last_checkpoint = time.time()
    t0 = time.time()
    window: list[float] = []
    steps = args.steps
    end = min(steps, args.stop_after) if args.stop_after else steps
    if args.time_steps:
        end = min(steps, start + args.time_steps)
    for step in range(start, end):
        g = torch.Generator().manual_seed(step_seed(args.seed, step))
        torch.manual_seed(step_seed(args.seed, step, 1))  # any global draw (dropout) is per-step too
        idx = torch.randint(0, len(data), (args.batch_size,), generator=g)
        x0 = random_shift(data.images[idx], args.max_shift, g) * 2 - 1
        labels = data.labels[idx]
        template = torch.randint(0, table.shape[1], (args.batch_size,), generator=g)
        ids = table[labels, template]
        drop = torch.rand(args.batch_size, generator=g) < args.prompt_dropout
        ids = torch.where(drop[:, None], empty_ids[None], ids)
        t = torch.randint(0, len(alphas), (args.batch_size,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(model(x_t, t, ids), noise)

        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        optimizer.step()
        # EMA warm-up: early averages do not drag in the random initialisation.
        d = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - d)
        window.append(float(loss.detach()))
        done = step + 1
        if done % args.log_every == 0 or done == end:
            entry = {
                "step": done,
                "loss": sum(window) / len(window),
                "lr": learning_rate(step, args),
                "grad_norm": grad_norm,
                "elapsed_s": round(time.time() - t0, 1),
            }
            history.append(entry)
            window = []
            rate = (time.time() - t0) / (done - start)
            print(
                f"{json.dumps(entry)} s/step={rate:.3f} eta_min={(steps - done) * rate / 60:.1f}", flush=True
            )
        if not args.time_steps and (
            time.time() - last_checkpoint > 60 * args.checkpoint_minutes or done == end
        ):
            save_checkpoint(args.run_dir, done, {"model": model, "ema": ema}, optimizer, history, run_id)
            last_checkpoint = time.time()
    if args.time_steps:
        print(f"timing: {(time.time() - t0) / max(1, end - start):.3f} s/step", flush=True)
        return
    if end < steps:
        print(f"stopped at step {end} of {steps}; re-run without --stop-after to continue", flush=True)
        return

    ema.eval()
    info.update({"steps_done": steps, "history": history})
    export(args.out, ema, tokenizer, scheduler, info)
    log = {
        "command": command,
        "seed": args.seed,
        "train_split": "generator" if args.style == "handwritten" else "printed (rendered fonts)",
        "train_size": len(data),
        "hyperparameters": hyper,
        "run_id": run_id,
        "unet_parameters": n_unet,
        "text_encoder_parameters": n_text,
        "prompt_templates": list(PROMPT_TEMPLATES),
        "loss_history": history,
        "torch_version": torch.__version__,
        "train_seconds_this_session": round(time.time() - t0, 1),
    }
    atomic_write_json(args.out / "training_log.json", log)
    print(f"exported to {args.out}", flush=True)
    if not args.no_evaluate:
        log["evaluation"] = evaluate(args.out, args, figures)
        atomic_write_json(args.out / "training_log.json", log)


if __name__ == "__main__":
    main()
