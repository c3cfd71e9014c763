"""One-shot diffusion denoiser (Carlini et al., ICLR 2023) for any pixel-space diffusers UNet.

Noise of std σ added to an image in [0, 1] is noise of std 2σ in the model space [-1, 1]. The
forward process at step t is ``x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε``, i.e. ``x_t / sqrt(ᾱ_t)`` is
``x0`` plus noise of std ``sqrt(1 - ᾱ_t) / sqrt(ᾱ_t)``. So with t* the first step where that ratio
reaches 2σ, ``sqrt(ᾱ_t*) (2(x + δ) - 1)`` is (up to the rounding of t*) a sample of the forward
process, and one UNet call gives ``x̂0 = (x_t - sqrt(1 - ᾱ_t*) ε̂) / sqrt(ᾱ_t*)``.

Model kinds (``DiffusionDenoiser.kind``):

- ``"unconditional"``: ``UNet2DModel`` without class embedding (google/ddpm-cifar10-32).
- ``"class_conditional"``: ``UNet2DModel`` with a class embedding; ``labels`` are required.
- ``"text"``: ``UNet2DConditionModel`` fed prompt embeddings (``encoder_hidden_states``).
- ``"if_superres"``: DeepFloyd IF stage II (IF-II-L/M): the noisy image is both the noisy input and
  the low-resolution condition (channel concat), ``class_labels = min(1.8 t, T)``, prompt
  embeddings, no classifier-free guidance (Choi et al., ECCV 2024).

See docs/denoiser.md for the math, the reference timestep table and the channel/resolution policy.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validation import _short, check_images, check_positive_float

DenoiserKind = Literal["unconditional", "class_conditional", "text", "if_superres"]
KINDS: tuple[str, ...] = get_args(DenoiserKind)
PredictionType = Literal["epsilon", "v_prediction", "sample"]

# The factor Choi et al. found best for IF-II's noise-level (class_labels) input in one-shot use.
IF_NOISE_LEVEL_FACTOR = 1.8
# IF trained T5 prompts at this length (diffusers IFPipeline.encode_prompt).
_T5_MAX_LENGTH = 77
_T5_MODEL_TYPES = ("t5", "mt5", "umt5")
# Tokenizers without a real limit report a huge model_max_length (transformers' VERY_LARGE_INTEGER).
_UNBOUNDED_LENGTH = 100_000
_ENCODE_CHUNK = 16


def _alphas_from(source: Any) -> Tensor:
    """ᾱ_t as a float64 CPU tensor from a scheduler, a tensor, an array or a sequence."""
    if hasattr(source, "alphas_cumprod"):
        source = source.alphas_cumprod
    if isinstance(source, Tensor):
        alphas = source.detach().to("cpu", torch.float64)
    elif isinstance(source, (np.ndarray, Sequence)) and not isinstance(source, str):
        alphas = torch.as_tensor(np.asarray(source, dtype=np.float64))
    else:
        raise TypeError(
            "`alphas_cumprod_or_scheduler` must be a diffusers scheduler (with .alphas_cumprod) or a 1-D"
            f" sequence of ᾱ_t values; got {type(source).__name__}."
        )
    if alphas.dim() != 1 or alphas.numel() < 2:
        raise ValueError(
            f"`alphas_cumprod` must be 1-D with at least 2 steps; got shape {tuple(alphas.shape)}."
        )
    if not bool(torch.isfinite(alphas).all()) or bool((alphas <= 0).any()) or bool((alphas > 1).any()):
        raise ValueError(
            "`alphas_cumprod` values must lie in (0, 1]; got values in"
            f" [{float(alphas.min()):.4g}, {float(alphas.max()):.4g}]."
        )
    if bool((alphas[1:] > alphas[:-1]).any()):
        raise ValueError("`alphas_cumprod` must be non-increasing in t (ᾱ_t is a cumulative product).")
    return alphas


def _config_get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _module_device_dtype(module: Any) -> tuple[torch.device | None, torch.dtype | None]:
    """Device and dtype of the first parameter (else floating buffer); ``None`` where there is none."""
    if isinstance(module, nn.Module):
        for tensor in module.parameters():
            return tensor.device, tensor.dtype
        for tensor in module.buffers():
            if torch.is_floating_point(tensor):
                return tensor.device, tensor.dtype
    return None, None


class DiffusionDenoiser(nn.Module):
    """One-shot denoiser: noisy images in [0, 1] at noise std σ → denoised images in [0, 1].

    Args:
        unet: a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` (or a module with the same call
            signature and a ``config`` carrying ``in_channels``, ``out_channels``, ``sample_size``).
        alphas_cumprod_or_scheduler: the training noise schedule: a diffusers scheduler or the ᾱ_t
            values themselves.
        text_encoder, tokenizer: prompt encoder of text-conditioned kinds (transformers models); the
            encoder is frozen (``requires_grad_(False)``).
        prompt: prompt used when no ``labels`` select a class prompt; the default ``""`` is the
            class-agnostic mode certification needs.
        class_prompts: optional per-class prompts, selected by ``labels`` (personalization).
        kind: one of :data:`KINDS`; ``None`` detects it from the UNet class and config.
        prompt_embeds: precomputed prompt embeddings ``{prompt: (1, L, D) tensor}`` that fill the
            cache (lets a text-conditioned denoiser run without its text encoder).
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``; ``None`` reads the
            scheduler's config (default ``"epsilon"``).
        resize: resize inputs to the UNet's ``sample_size`` and back when they differ.
        noise_level_factor: IF-II only: ``class_labels = min(noise_level_factor · t, T)``.
    """

    alphas_cumprod: Tensor

    def __init__(
        self,
        unet: nn.Module,
        alphas_cumprod_or_scheduler: Any,
        *,
        text_encoder: nn.Module | None = None,
        tokenizer: Any = None,
        prompt: str = "",
        class_prompts: Sequence[str] | None = None,
        kind: DenoiserKind | None = None,
        prompt_embeds: Mapping[str, Tensor] | None = None,
        prediction_type: PredictionType | None = None,
        resize: bool = True,
        noise_level_factor: float = IF_NOISE_LEVEL_FACTOR,
    ) -> None:
        super().__init__()
        if not isinstance(unet, nn.Module):
            raise TypeError(
                f"`unet` must be a torch.nn.Module (a diffusers UNet); got {type(unet).__name__}."
            )
        config = getattr(unet, "config", None)
        if config is None or _config_get(config, "in_channels") is None:
            raise TypeError(
                f"`unet` must carry a diffusers-style `config` with in_channels/out_channels; got {type(unet).__name__}."
            )
        self.unet = unet

        alphas = _alphas_from(alphas_cumprod_or_scheduler)
        # ᾱ follows the module's device; the σ → t* table stays float64 so t* never depends on dtype.
        self.register_buffer("alphas_cumprod", alphas.to(torch.float32), persistent=False)
        self._noise_ratio = np.sqrt((1.0 - alphas.numpy()) / alphas.numpy())
        self.num_train_timesteps = int(alphas.numel())

        if prediction_type is None:
            sched_config = getattr(alphas_cumprod_or_scheduler, "config", None)
            prediction_type = _config_get(sched_config, "prediction_type", None) or "epsilon"
        if prediction_type not in get_args(PredictionType):
            raise ValueError(
                f"`prediction_type` must be one of {get_args(PredictionType)}; got {_short(prediction_type)}."
            )
        self.prediction_type: str = prediction_type
        if not isinstance(resize, bool):
            raise TypeError(f"`resize` must be a bool; got {_short(resize)}.")
        self.resize = resize
        self.noise_level_factor = check_positive_float("noise_level_factor", noise_level_factor)

        self.kind: str = self._resolve_kind(kind)
        in_channels = int(_config_get(config, "in_channels"))
        out_channels = int(_config_get(config, "out_channels", in_channels) or in_channels)
        if self.kind == "if_superres":
            if in_channels % 2:
                raise ValueError(
                    f"kind='if_superres' needs a UNet whose in_channels is 2x the image channels; got {in_channels}."
                )
            self.image_channels = in_channels // 2
        else:
            self.image_channels = in_channels
        if out_channels == 2 * self.image_channels:
            self.learned_variance = True
        elif out_channels == self.image_channels:
            self.learned_variance = False
        else:
            raise ValueError(
                f"the UNet outputs {out_channels} channels for {self.image_channels}-channel images; expected"
                f" {self.image_channels} (ε) or {2 * self.image_channels} (ε and learned variance)."
            )
        # Read once: a peft/compile wrapper around `unet` need not forward `.config`.
        self._num_class_embeds = _config_get(config, "num_class_embeds")
        embed_dim = _config_get(config, "encoder_hid_dim") or _config_get(config, "cross_attention_dim")
        self._embed_dim: int | None = embed_dim if isinstance(embed_dim, int) else None
        sample_size = _config_get(config, "sample_size")
        if isinstance(sample_size, int):
            sample_size = (sample_size, sample_size)
        elif sample_size is not None:
            sample_size = tuple(int(s) for s in sample_size)
        self.sample_size: tuple[int, int] | None = sample_size

        # Text conditioning: embeddings are computed once per prompt and are constants, so the
        # encoder is frozen and an optimizer over denoiser.parameters() never sees it as trainable.
        if text_encoder is not None:
            if not isinstance(text_encoder, nn.Module):
                raise TypeError(
                    f"`text_encoder` must be a torch.nn.Module (a transformers model); got {type(text_encoder).__name__}."
                )
            text_encoder.requires_grad_(False)
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self._prompt_cache: dict[str, Tensor] = {}
        self._class_table: Tensor | None = None
        if prompt_embeds is not None:
            for key, emb in prompt_embeds.items():
                self._store_embedding(key, emb)
        self._prompt = ""
        self._class_prompts: list[str] | None = None
        if self.is_text_conditioned:
            if (text_encoder is None) != (tokenizer is None):
                raise ValueError("`text_encoder` and `tokenizer` must be given together (or neither).")
            self.prompt = prompt
            self.class_prompts = class_prompts
        else:
            if text_encoder is not None or tokenizer is not None:
                raise ValueError(
                    f"kind={self.kind!r} takes no text encoder/tokenizer; the UNet is not text-conditioned."
                )
            if prompt != "" or class_prompts is not None:
                raise ValueError(
                    f"`prompt`/`class_prompts` only apply to text-conditioned UNets; this one is kind={self.kind!r}."
                )

    # ------------------------------------------------------------------------------ set-up helpers
    def _resolve_kind(self, kind: str | None) -> str:
        config = self.unet.config
        cls_name = type(self.unet).__name__
        has_class_embed = (
            _config_get(config, "num_class_embeds") is not None
            or _config_get(config, "class_embed_type") is not None
        )
        if kind is not None:
            if kind not in KINDS:
                raise ValueError(f"`kind` must be one of {KINDS} or None; got {_short(kind)}.")
            return kind
        if cls_name == "UNet2DModel":
            return "class_conditional" if has_class_embed else "unconditional"
        if cls_name == "UNet2DConditionModel":
            in_ch = int(_config_get(config, "in_channels"))
            out_ch = int(_config_get(config, "out_channels", in_ch))
            if (
                _config_get(config, "class_embed_type") == "timestep"
                and in_ch % 2 == 0
                and out_ch in (in_ch // 2, in_ch)
            ):
                return "if_superres"
            if in_ch == 4:
                raise ValueError(
                    "this UNet2DConditionModel has 4 input channels: it looks like a latent diffusion model"
                    " (Stable Diffusion), but the one-shot denoiser needs a pixel-space model. Pass `kind=`"
                    " explicitly if it really works on 4-channel images."
                )
            if has_class_embed:
                raise ValueError(
                    "a text-conditioned UNet with a class embedding is supported only as an IF super-resolution"
                    " model; pass kind='if_superres' if that is what it is."
                )
            return "text"
        raise TypeError(f"cannot detect the kind of a {cls_name}; pass `kind=` with one of {KINDS}.")

    @property
    def is_text_conditioned(self) -> bool:
        return self.kind in ("text", "if_superres")

    @property
    def dtype(self) -> torch.dtype:
        dtype = _module_device_dtype(self.unet)[1]
        return torch.get_default_dtype() if dtype is None else dtype

    @property
    def device(self) -> torch.device:
        device = _module_device_dtype(self.unet)[0]
        return self.alphas_cumprod.device if device is None else device

    # --------------------------------------------------------------------------------- the schedule
    @property
    def max_sigma(self) -> float:
        """Largest σ (in [0, 1] pixel space) the schedule reaches: half the final noise ratio."""
        return float(self._noise_ratio[-1]) / 2.0

    def sigma_for_timestep(self, t: int) -> float:
        """The [0, 1]-space σ that step ``t`` represents: ``sqrt(1 - ᾱ_t) / sqrt(ᾱ_t) / 2``."""
        t = self._check_timestep_int(t, "t")
        return float(self._noise_ratio[t]) / 2.0

    def timestep_for_sigma(self, sigma: float) -> int:
        """t* = the first t with ``sqrt(1 - ᾱ_t) / sqrt(ᾱ_t) >= 2σ``."""
        sigma = check_positive_float("sigma", sigma)
        reached = self._noise_ratio >= 2.0 * sigma
        if not reached.any():
            raise ValueError(
                f"`sigma`={sigma:g} is beyond this diffusion schedule: the largest noise it reaches is"
                f" σ={self.max_sigma:.4g} (in [0, 1] pixel space) at t={self.num_train_timesteps - 1}."
            )
        return int(np.argmax(reached))

    def _check_timestep_int(self, t: Any, name: str) -> int:
        if (
            isinstance(t, bool)
            or not isinstance(t, (int, np.integer))
            or not 0 <= t < self.num_train_timesteps
        ):
            raise ValueError(
                f"`{name}` must be an integer in [0, {self.num_train_timesteps - 1}]; got {_short(t)}."
            )
        return int(t)

    def _timesteps_tensor(self, timesteps: Any, batch: int, device: torch.device) -> Tensor:
        if isinstance(timesteps, Tensor):
            if torch.is_floating_point(timesteps) or timesteps.dtype == torch.bool:
                raise TypeError(f"`timesteps` must hold integers; got dtype {timesteps.dtype}.")
            if timesteps.dim() == 0:
                timesteps = timesteps.reshape(1).expand(batch)
            elif timesteps.shape != (batch,):
                raise ValueError(
                    f"`timesteps` must be an int, a 0-d tensor or shape ({batch},); got shape {tuple(timesteps.shape)}."
                )
            low, high = int(timesteps.min()), int(timesteps.max())
            if low < 0 or high >= self.num_train_timesteps:
                raise ValueError(
                    f"`timesteps` must lie in [0, {self.num_train_timesteps - 1}]; got values in [{low}, {high}]."
                )
            return timesteps.to(device=device, dtype=torch.long)
        t = self._check_timestep_int(timesteps, "timesteps")
        return torch.full((batch,), t, dtype=torch.long, device=device)

    def _coefficients(self, t: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """sqrt(ᾱ_t), sqrt(1 - ᾱ_t) shaped (B, 1, 1, 1)."""
        alpha = self.alphas_cumprod.to(device=t.device, dtype=torch.float64)[t]
        return (
            alpha.sqrt().to(dtype).view(-1, 1, 1, 1),
            (1.0 - alpha).sqrt().to(dtype).view(-1, 1, 1, 1),
        )

    # ------------------------------------------------------------------------------- pixel/model space
    @staticmethod
    def to_model_space(x: Tensor) -> Tensor:
        """[0, 1] pixels → [-1, 1] model space (noise std doubles)."""
        return 2.0 * x - 1.0

    @staticmethod
    def to_pixel_space(x: Tensor) -> Tensor:
        """[-1, 1] model space → [0, 1] pixels (no clamping)."""
        return (x + 1.0) / 2.0

    # ------------------------------------------------------------------------------------- prompts
    @property
    def prompt(self) -> str:
        return self._prompt

    @prompt.setter
    def prompt(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError(f"`prompt` must be a string; got {type(value).__name__}.")
        if not self.is_text_conditioned:
            raise ValueError(
                f"`prompt` only applies to text-conditioned UNets; this one is kind={self.kind!r}."
            )
        if value not in self._prompt_cache:
            self._require_encoder(f"prompt {value!r}")
            self.encode_prompts([value])
        self._prompt = value

    @property
    def class_prompts(self) -> list[str] | None:
        return None if self._class_prompts is None else list(self._class_prompts)

    @class_prompts.setter
    def class_prompts(self, value: Sequence[str] | None) -> None:
        if value is not None:
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise TypeError(
                    f"`class_prompts` must be a sequence of strings or None; got {_short(value)}."
                )
            value = list(value)
            if not value:
                raise ValueError("`class_prompts` must hold at least one prompt (or be None).")
            for i, p in enumerate(value):
                if not isinstance(p, str):
                    raise TypeError(f"`class_prompts[{i}]` must be a string; got {_short(p)}.")
            if not self.is_text_conditioned:
                raise ValueError(
                    f"`class_prompts` only apply to text-conditioned UNets; this one is kind={self.kind!r}."
                )
            missing = [p for p in value if p not in self._prompt_cache]
            if missing:
                self._require_encoder(f"class prompt {missing[0]!r}")
        self._class_prompts = value
        self._class_table = None

    def _require_encoder(self, what: str) -> None:
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError(
                f"no embedding is cached for {what} and this denoiser has no text encoder/tokenizer to compute it;"
                " pass `text_encoder` and `tokenizer`, or `prompt_embeds` holding that prompt."
            )

    def _store_embedding(self, prompt: str, emb: Tensor) -> None:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt_embeds keys must be strings; got {_short(prompt)}.")
        if not isinstance(emb, Tensor) or not torch.is_floating_point(emb):
            raise TypeError(
                f"prompt_embeds[{prompt!r}] must be a floating-point tensor; got {type(emb).__name__}."
            )
        if emb.dim() == 2:
            emb = emb.unsqueeze(0)
        if emb.dim() != 3 or emb.shape[0] != 1:
            raise ValueError(
                f"prompt_embeds[{prompt!r}] must have shape (1, L, D) or (L, D); got {tuple(emb.shape)}."
            )
        expected = self._embed_dim
        if expected is not None and emb.shape[-1] != expected:
            raise ValueError(
                f"the embedding of prompt {prompt!r} has width {emb.shape[-1]} but the UNet expects"
                f" {expected} (config encoder_hid_dim / cross_attention_dim): text encoder and UNet do not match."
            )
        self._prompt_cache[prompt] = emb.detach()

    def _tokenize(self, prompts: list[str]) -> tuple[dict[str, Tensor], bool]:
        """Tokenize as the diffusers pipelines do; returns (tokens, pass_attention_mask)."""
        tok = self.tokenizer
        enc_config = getattr(self.text_encoder, "config", None)
        if _config_get(enc_config, "model_type") in _T5_MODEL_TYPES:
            # IFPipeline: lower-cased, stripped, padded to 77 tokens, attention mask given to T5.
            prompts = [p.lower().strip() for p in prompts]
            max_length: int | None = _T5_MAX_LENGTH
            use_mask = True
        else:
            # StableDiffusionPipeline: padded to the tokenizer's length, mask only if the config asks.
            max_length = getattr(tok, "model_max_length", None)
            if max_length is None or max_length >= _UNBOUNDED_LENGTH:
                max_length = _config_get(enc_config, "max_position_embeddings")
            use_mask = bool(_config_get(enc_config, "use_attention_mask", False))
        if max_length is not None and getattr(tok, "pad_token", None) is not None:
            tokens = tok(
                prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
            )
        else:
            if len({len(tok(p)["input_ids"]) for p in prompts}) > 1:
                raise ValueError(
                    "the tokenizer has no pad token, so prompts of different lengths cannot be batched;"
                    " set `tokenizer.pad_token`."
                )
            tokens = tok(
                prompts, truncation=max_length is not None, max_length=max_length, return_tensors="pt"
            )
        return dict(tokens), use_mask

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Prompt embeddings ``(K, L, D)``; computed once per prompt with the text encoder, then cached.

        The encoding follows the diffusers pipelines (IF for T5 encoders, Stable Diffusion otherwise),
        so a model trained through those pipelines sees the embeddings it was trained on.
        """
        prompts = list(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._prompt_cache))
        if missing:
            self._require_encoder(f"prompt {missing[0]!r}")
            encoder = self.text_encoder
            assert encoder is not None
            enc_device = next(encoder.parameters()).device
            was_training = encoder.training
            encoder.eval()
            try:
                for start in range(0, len(missing), _ENCODE_CHUNK):
                    chunk = missing[start : start + _ENCODE_CHUNK]
                    tokens, use_mask = self._tokenize(chunk)
                    kwargs = {"attention_mask": tokens["attention_mask"].to(enc_device)} if use_mask else {}
                    hidden = encoder(tokens["input_ids"].to(enc_device), **kwargs)[0]
                    for p, emb in zip(chunk, hidden, strict=True):
                        self._store_embedding(p, emb.unsqueeze(0))
            finally:
                encoder.train(was_training)
        lengths = {self._prompt_cache[p].shape[1] for p in prompts}
        if len(lengths) > 1:
            raise ValueError(
                f"prompt embeddings have different lengths {sorted(lengths)}; cannot stack them."
            )
        dtype, device = self.dtype, self.device
        return torch.cat([self._cached(p, dtype, device) for p in prompts], dim=0)

    def _cached(self, prompt: str, dtype: torch.dtype, device: torch.device) -> Tensor:
        emb = self._prompt_cache[prompt]
        if emb.dtype != dtype or emb.device != device:
            emb = emb.to(device=device, dtype=dtype)
            self._prompt_cache[prompt] = emb
        return emb

    def release_text_encoder(self) -> None:
        """Cache the embeddings of ``prompt`` and ``class_prompts``, then drop the encoder to free memory.

        Afterwards only cached prompts can be used (IF's T5-XXL alone is ~4.7 B parameters).
        """
        if self.is_text_conditioned:
            self.encode_prompts([self._prompt] + (self._class_prompts or []))
        self.text_encoder = None
        self.tokenizer = None

    def _embeddings(self, labels: Tensor | None, batch: int) -> Tensor:
        dtype, device = self.dtype, self.device
        if labels is not None and self._class_prompts is not None:
            if (
                self._class_table is None
                or self._class_table.dtype != dtype
                or self._class_table.device != device
            ):
                self._class_table = self.encode_prompts(self._class_prompts)
            return self._class_table[labels.to(device)]
        return self._cached(self._prompt, dtype, device).repeat(batch, 1, 1)

    # ----------------------------------------------------------------------------------- UNet call
    def _check_labels(self, labels: Any, batch: int) -> Tensor | None:
        if labels is None:
            if self.kind == "class_conditional":
                raise ValueError(
                    "`labels` are required: this UNet is class-conditional (it has a class embedding)."
                )
            return None
        if not isinstance(labels, Tensor):
            labels = torch.as_tensor(labels)
        if torch.is_floating_point(labels) or labels.dtype == torch.bool:
            raise TypeError(f"`labels` must hold integer class indices; got dtype {labels.dtype}.")
        if labels.shape != (batch,):
            raise ValueError(
                f"`labels` must have shape ({batch},), one per image; got {tuple(labels.shape)}."
            )
        if self.kind == "class_conditional":
            n = self._num_class_embeds
        elif self.is_text_conditioned and self._class_prompts is not None:
            n = len(self._class_prompts)
        else:
            return labels  # unused by this kind
        if n is not None and (int(labels.min()) < 0 or int(labels.max()) >= n):
            raise ValueError(
                f"`labels` must lie in [0, {n - 1}]; got values in [{int(labels.min())}, {int(labels.max())}]."
            )
        return labels.long()

    def _unet_output(self, x_t: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        batch = x_t.shape[0]
        if self.kind == "unconditional":
            out = self.unet(x_t, t, return_dict=False)[0]
        elif self.kind == "class_conditional":
            assert labels is not None
            out = self.unet(x_t, t, class_labels=labels.to(x_t.device), return_dict=False)[0]
        elif self.kind == "text":
            embeds = self._embeddings(labels, batch)
            out = self.unet(x_t, t, encoder_hidden_states=embeds, return_dict=False)[0]
        else:  # if_superres: the noisy image is its own low-resolution condition.
            noise_level = (t.to(torch.float32) * self.noise_level_factor).clamp(
                max=float(self.num_train_timesteps)
            )
            out = self.unet(
                torch.cat([x_t, x_t], dim=1),
                t,
                encoder_hidden_states=self._embeddings(labels, batch),
                class_labels=noise_level,
                return_dict=False,
            )[0]
        expected = 2 * self.image_channels if self.learned_variance else self.image_channels
        if out.shape[1] != expected:
            raise RuntimeError(f"the UNet returned {out.shape[1]} channels; expected {expected}.")
        return out[:, : self.image_channels]

    def _predict(self, x_t: Tensor, timesteps: Any, labels: Any) -> tuple[Tensor, Tensor]:
        """(ε̂, unclipped x̂0) in model space at the UNet's resolution."""
        x_t = check_images(x_t, "x_t", unit_range=False)
        if x_t.shape[1] != self.image_channels:
            raise ValueError(
                f"`x_t` must have {self.image_channels} channel(s) (model space, the UNet's images); got shape"
                f" {tuple(x_t.shape)}."
            )
        dtype, device = self.dtype, self.device
        x_t = x_t.to(device=device, dtype=dtype)
        t = self._timesteps_tensor(timesteps, x_t.shape[0], device)
        labels = self._check_labels(labels, x_t.shape[0])
        raw = self._unet_output(x_t, t, labels)
        s0, s1 = self._coefficients(t, raw.dtype)
        if self.prediction_type == "epsilon":
            eps = raw
            x0 = (x_t - s1 * eps) / s0
        elif self.prediction_type == "v_prediction":
            eps = s0 * raw + s1 * x_t
            x0 = s0 * x_t - s1 * raw
        else:  # "sample"
            x0 = raw
            eps = (x_t - s0 * x0) / s1
        return eps, x0

    def predict_epsilon(
        self, x_t: Tensor, timesteps: int | Tensor, *, labels: Tensor | None = None
    ) -> Tensor:
        """ε̂(x_t, t) in model space (first C channels when the UNet also outputs a variance).

        ``x_t`` is at the UNet's resolution with its image channels; ``timesteps`` is an int or a
        per-sample integer tensor. Differentiable in the UNet's parameters (LoRA trains through it).
        """
        return self._predict(x_t, timesteps, labels)[0]

    def predict_x0(self, x_t: Tensor, timesteps: int | Tensor, *, labels: Tensor | None = None) -> Tensor:
        """x̂0 = (x_t − sqrt(1−ᾱ_t) ε̂) / sqrt(ᾱ_t) in model space, clipped to [-1, 1]."""
        return self._predict(x_t, timesteps, labels)[1].clamp(-1.0, 1.0)

    # ------------------------------------------------------------------------------------- forward
    def forward(self, x_noisy: Tensor, sigma: float, *, labels: Tensor | None = None) -> Tensor:
        """Denoise ``x_noisy`` = x + N(0, σ²) (pixels, [0, 1] scale) in one UNet call; returns [0, 1] images.

        Output has the input's shape, the UNet's dtype and device; differentiable w.r.t. the input.
        """
        x = check_images(x_noisy, "x_noisy", unit_range=False)
        t_star = self.timestep_for_sigma(sigma)
        channels = x.shape[1]
        if channels != self.image_channels:
            if channels == 1 and self.image_channels == 3:
                # The same noise in every channel is not the model's i.i.d. noise, but it is the best
                # use of an RGB denoiser for grayscale images; the channel mean is taken back below.
                x = x.expand(-1, 3, -1, -1)
            elif channels == 3 and self.image_channels == 1:
                raise ValueError(
                    "`x_noisy` has 3 channels but the denoiser's UNet works on 1-channel images. Convert the"
                    " images to grayscale before adding noise: averaging noisy channels here would change the"
                    " noise level the denoiser is told about."
                )
            else:
                raise ValueError(
                    f"`x_noisy` must have {self.image_channels} channel(s) for this denoiser; got shape"
                    f" {tuple(x_noisy.shape)}."
                )
        dtype, device = self.dtype, self.device
        x = x.to(device=device, dtype=dtype)
        in_size = (x.shape[-2], x.shape[-1])
        resized = self.resize and self.sample_size is not None and in_size != self.sample_size
        if resized:
            x = _resize(x, self.sample_size)
        s0 = math.sqrt(float(self.alphas_cumprod[t_star]))
        x_t = s0 * self.to_model_space(x)
        x0 = self.to_pixel_space(self.predict_x0(x_t, t_star, labels=labels))
        if resized:
            x0 = _resize(x0, in_size).clamp(0.0, 1.0)
        if channels == 1 and self.image_channels == 3:
            x0 = x0.mean(dim=1, keepdim=True)
        return x0

    def __repr__(self) -> str:
        parts = [
            f"kind={self.kind!r}",
            f"image_channels={self.image_channels}",
            f"sample_size={self.sample_size}",
            f"timesteps={self.num_train_timesteps}",
            f"prediction_type={self.prediction_type!r}",
            f"learned_variance={self.learned_variance}",
        ]
        if self.is_text_conditioned:
            parts.append(f"prompt={self._prompt!r}")
            if self._class_prompts is not None:
                parts.append(f"class_prompts=<{len(self._class_prompts)} prompts>")
            if self.kind == "if_superres":
                parts.append(f"noise_level_factor={self.noise_level_factor:g}")
        parts.append(f"resize={self.resize}")
        return f"DiffusionDenoiser({', '.join(parts)})"

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_path: str | os.PathLike,
        *,
        subfolder: str | None = "unet",
        revision: str | None = None,
        torch_dtype: torch.dtype | None = None,
        prompt: str = "",
        class_prompts: Sequence[str] | None = None,
        kind: DenoiserKind | None = None,
        variant: str | None = None,
        keep_text_encoder: bool = True,
        resize: bool = True,
    ) -> DiffusionDenoiser:
        """Load a denoiser from a diffusers pipeline layout (Hub id or local directory).

        Reads ``<repo>/unet`` (or the repo root when it holds the UNet there, as
        google/ddpm-cifar10-32 does), ``<repo>/scheduler`` (or ``scheduler_config.json`` at the root),
        and for text-conditioned UNets ``<repo>/text_encoder`` + ``<repo>/tokenizer``. Weights are
        read from safetensors only. ``keep_text_encoder=False`` caches the prompt embeddings and
        drops the text encoder (see :meth:`release_text_encoder`).
        """
        from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

        source = os.fspath(repo_id_or_path)
        unet_classes: dict[str, Any] = {
            "UNet2DModel": UNet2DModel,
            "UNet2DConditionModel": UNet2DConditionModel,
        }

        def load_config(sub: str | None) -> dict:
            return dict(UNet2DModel.load_config(source, subfolder=sub, revision=revision))

        unet_sub, unet_config = _first_that_loads(
            source, [subfolder, None] if subfolder else [None], load_config
        )
        class_name = unet_config.get("_class_name")
        if class_name not in unet_classes:
            raise TypeError(
                f"{source!r} holds a {class_name!r}; the denoiser needs a pixel-space UNet2DModel or UNet2DConditionModel."
            )
        unet = unet_classes[class_name].from_pretrained(
            source,
            subfolder=unet_sub,
            revision=revision,
            torch_dtype=torch_dtype,
            variant=variant,
            use_safetensors=True,
        )
        unet.eval()

        def load_scheduler(sub: str | None) -> Any:
            return DDPMScheduler.from_pretrained(source, subfolder=sub, revision=revision)

        _, scheduler = _first_that_loads(source, ["scheduler", None], load_scheduler)

        text_encoder = tokenizer = None
        if class_name == "UNet2DConditionModel":
            text_encoder, tokenizer = _load_text_encoder(source, revision, torch_dtype, variant)
        denoiser = cls(
            unet,
            scheduler,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            prompt=prompt,
            class_prompts=class_prompts,
            kind=kind,
            resize=resize,
        )
        if not keep_text_encoder:
            denoiser.release_text_encoder()
        return denoiser


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    down = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=down)


class _PixelBridge:
    """Moves [0, 1] images of the references' shape to the UNet's images and back, as
    :meth:`DiffusionDenoiser.forward` does (grayscale to RGB, resize to ``sample_size`` and back),
    for the training steps (personalize, adapt) that call the UNet themselves.

    Resizing runs in float32: antialiased bilinear resizing has no fp16/bf16 CPU kernel.
    """

    def __init__(self, denoiser: DiffusionDenoiser, channels: int, size: tuple[int, int], name: str) -> None:
        self.expand = channels == 1 and denoiser.image_channels == 3
        if channels != denoiser.image_channels and not self.expand:
            raise ValueError(
                f"`{name}` has {channels}-channel images but the denoiser's UNet works on"
                f" {denoiser.image_channels}-channel images; convert them first."
            )
        self.size = size
        self.unet_size = denoiser.sample_size
        self.resized = denoiser.resize and self.unet_size is not None and size != self.unet_size

    def to_unet(self, x: Tensor) -> Tensor:
        if self.expand:
            x = x.expand(-1, 3, -1, -1)
        if self.resized:
            assert self.unet_size is not None
            x = _resize(x.float(), self.unet_size).to(x.dtype)
        return x

    def back(self, x0: Tensor) -> Tensor:
        if self.resized:
            x0 = _resize(x0.float(), self.size).clamp(0.0, 1.0).to(x0.dtype)
        if self.expand:
            x0 = x0.mean(dim=1, keepdim=True)
        return x0


def _first_that_loads(source: str, subfolders: list[str | None], load: Callable[[str | None], Any]) -> tuple:
    """``(sub, load(sub))`` for the first candidate subfolder that exists (``None`` = the repo root).

    A local directory is inspected, so a broken component reports its own error; on the Hub the
    candidates are tried in turn (a missing file surfaces as an OSError).
    """
    if os.path.isdir(source):
        for sub in subfolders:
            if sub is None or os.path.isdir(os.path.join(source, sub)):
                return sub, load(sub)
        raise FileNotFoundError(f"{source!r} has none of the subfolders {subfolders}.")
    if os.path.isabs(source) or source.startswith(".") or source.count("/") > 1:
        raise FileNotFoundError(
            f"no such directory {source!r} (and it is not a Hub id of the form 'org/name')."
        )
    errors: list[str] = []
    for sub in subfolders:
        try:
            return sub, load(sub)
        except OSError as exc:
            errors.append(f"subfolder={sub!r}: {exc}")
    raise OSError(f"could not load from {source!r}:\n" + "\n".join(errors))


def _load_text_encoder(
    source: str, revision: str | None, torch_dtype: torch.dtype | None, variant: str | None
):
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel

    config = AutoConfig.from_pretrained(source, subfolder="text_encoder", revision=revision)
    arch = (getattr(config, "architectures", None) or [None])[0]
    model_cls = getattr(transformers, arch, None) if arch else None
    if not (isinstance(model_cls, type) and issubclass(model_cls, PreTrainedModel)):
        model_cls = transformers.T5EncoderModel if config.model_type in _T5_MODEL_TYPES else AutoModel
    kwargs: dict[str, Any] = {"revision": revision, "use_safetensors": True}
    if variant is not None:
        kwargs["variant"] = variant
    if torch_dtype is not None:
        # transformers renamed `torch_dtype` to `dtype` in 4.56.
        major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
        kwargs["dtype" if (major, minor) >= (4, 56) else "torch_dtype"] = torch_dtype
    from transformers.utils import logging as transformers_logging

    # Its per-tensor "Loading weights" bar is noise for an encoder loaded in a second.
    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        text_encoder = model_cls.from_pretrained(source, subfolder="text_encoder", **kwargs)
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()
    text_encoder.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer", revision=revision)
    return text_encoder, tokenizer


class DenoisedClassifier(nn.Module):
    """``classifier ∘ denoiser(·, σ)``: the base classifier of denoised smoothing.

    ``forward(x_noisy)`` returns the classifier's logits on the one-shot denoised images; it is
    differentiable end to end (attacks, classifier adaptation).
    """

    def __init__(
        self, denoiser: DiffusionDenoiser, classifier: Callable[[Tensor], Tensor], sigma: float
    ) -> None:
        super().__init__()
        if not isinstance(denoiser, DiffusionDenoiser):
            raise TypeError(f"`denoiser` must be a DiffusionDenoiser; got {type(denoiser).__name__}.")
        if not callable(classifier):
            raise TypeError(
                f"`classifier` must be callable (images → logits); got {type(classifier).__name__}."
            )
        self.denoiser = denoiser
        self.classifier = classifier
        self.sigma = check_positive_float("sigma", sigma)
        self.timestep = denoiser.timestep_for_sigma(self.sigma)

    def forward(self, x_noisy: Tensor) -> Tensor:
        return self.classifier(self.denoiser(x_noisy, self.sigma))

    def __repr__(self) -> str:
        name = type(self.classifier).__name__
        return f"DenoisedClassifier(sigma={self.sigma:g}, timestep={self.timestep}, denoiser={self.denoiser!r}, classifier={name})"
