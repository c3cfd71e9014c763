import json
import string

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from tiny_models import CLIP_TEXT_BODY, VIT_BODY
from torch import nn

from nodata_defense.classifiers import (
    CLIP_MEAN,
    CLIP_STD,
    ImageClassifier,
    ImagePreprocess,
    ZeroShotClassifier,
    as_image_classifier,
    check_num_classes,
    extract_logits,
)


# ------------------------------------------------------------------------------------ fixtures
class TinyNet(nn.Module):
    """torchvision/timm style: normalized tensor in, logits tensor out."""

    def __init__(self, in_channels: int = 3, num_classes: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean(dim=(2, 3)))


def smooth_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(array).filter(ImageFilter.GaussianBlur(2))


def to_unit_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255


def tiny_vit(num_labels: int = 4):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        **VIT_BODY,
        num_labels=num_labels,
        id2label={i: f"class_{i}" for i in range(num_labels)},
        label2id={f"class_{i}": i for i in range(num_labels)},
    )
    return ViTForImageClassification(config).eval()


@pytest.fixture
def clip_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase) + ["."]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(vocab=str(tmp_path / "vocab.json"), merges=str(tmp_path / "merges.txt"))


@pytest.fixture
def tiny_clip(clip_tokenizer):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    vocab_size = len(clip_tokenizer)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            **CLIP_TEXT_BODY,
            max_position_embeddings=32,
            projection_dim=8,
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
        ),
        vision_config=dict(**VIT_BODY, projection_dim=8),
        projection_dim=8,
    )
    return CLIPModel(config).eval()


# -------------------------------------------------------------------------------- ImagePreprocess
def test_preprocess_resize_normalize_and_repr():
    pre = ImagePreprocess((8, 6), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    x = torch.rand(2, 3, 20, 15)
    out = pre(x)
    assert out.shape == (2, 3, 8, 6)
    # An input already at the target size is only normalized.
    y = torch.rand(1, 3, 8, 6)
    torch.testing.assert_close(pre(y), (y - 0.5) / 0.25)
    text = repr(pre)
    assert "size=(8, 6)" in text and "mode='resize'" in text and "std=(0.25, 0.25, 0.25)" in text


def test_preprocess_shortest_edge_then_center_crop_geometry():
    pre = ImagePreprocess(10, mode="resize_shortest_then_center_crop", crop_size=(10, 8))
    # Identity resize (short side already 10): the crop is the centered window, floor offsets.
    x = torch.arange(10 * 15, dtype=torch.float32).view(1, 1, 10, 15) / 150
    torch.testing.assert_close(pre(x), x[..., :, 3:11])
    assert pre(torch.rand(1, 3, 31, 20)).shape == (1, 3, 10, 8)
    assert ImagePreprocess(10, mode="resize_shortest")(torch.rand(1, 3, 20, 31)).shape == (1, 3, 10, 15)
    # A crop larger than the image pads with zeros, like transformers' center_crop.
    padded = ImagePreprocess(crop_size=6)(torch.ones(1, 1, 4, 4))
    assert padded.shape == (1, 1, 6, 6) and padded.sum() == 16 and padded[0, 0, 1:5, 1:5].min() == 1


def test_preprocess_is_differentiable():
    pre = ImagePreprocess(7, mode="resize_shortest_then_center_crop", mean=CLIP_MEAN, std=CLIP_STD)
    x = torch.rand(2, 3, 12, 16, requires_grad=True)
    pre(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_preprocess_grayscale_to_rgb():
    rgb_only = ImagePreprocess(mean=CLIP_MEAN, std=CLIP_STD)
    gray = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"must have 3 channels.*grayscale_to_rgb=True"):
        rgb_only(gray)
    pre = ImagePreprocess(mean=CLIP_MEAN, std=CLIP_STD, grayscale_to_rgb=True)
    out = pre(gray)
    expected = (gray.expand(-1, 3, -1, -1) - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        CLIP_STD
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "squash"}, r"`mode` must be one of"),
        ({"size": 4, "interpolation": "lanczos"}, r"`interpolation` must be one of"),
        ({"mean": (0.5,)}, r"`mean` and `std` must be given together"),
        ({"mean": (0.5,), "std": (0.0,)}, r"`std` must be a non-empty sequence of positive numbers"),
        ({"size": (4, 0)}, r"`size` must be an integer >= 1 or a pair"),
        ({"mode": "resize_shortest"}, r"`size` is required with mode='resize_shortest'"),
    ],
)
def test_preprocess_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImagePreprocess(**kwargs)


def test_from_processor_matches_vit_processor():
    from transformers import ViTImageProcessorPil

    image = smooth_image(40, 52)
    x = to_unit_tensor(image)
    # Same size: normalization only, identical up to float rounding.
    same = ViTImageProcessorPil(
        size={"height": 40, "width": 52}, image_mean=[0.1, 0.2, 0.3], image_std=[0.2, 0.3, 0.4]
    )
    reference = same(images=image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ImagePreprocess.from_processor(same)(x), reference, rtol=0, atol=1e-5)
    # Down-sizing: PIL works on 8-bit pixels, so outputs agree to about one gray level / std.
    processor = ViTImageProcessorPil(size={"height": 16, "width": 16})
    reference = processor(images=image, return_tensors="pt")["pixel_values"]
    pre = ImagePreprocess.from_processor(processor)
    assert pre.size == (16, 16) and pre.interpolation == "bilinear" and pre.mean == (0.5, 0.5, 0.5)
    out = pre(x)
    assert out.shape == reference.shape
    assert (out - reference).abs().max() < 2.5 / 255 / 0.5
    assert (out - reference).abs().mean() < 1 / 255 / 0.5


def test_from_processor_matches_clip_processor_resize_and_crop():
    from transformers import CLIPImageProcessorPil

    image = smooth_image(40, 52, seed=1)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 20}, crop_size={"height": 18, "width": 18})
    reference = processor(images=image, return_tensors="pt")["pixel_values"]
    pre = ImagePreprocess.from_processor(processor)
    assert (pre.mode, pre.size, pre.crop_size, pre.interpolation) == (
        "resize_shortest_then_center_crop",
        20,
        (18, 18),
        "bicubic",
    )
    out = pre(to_unit_tensor(image))
    assert out.shape == reference.shape == (1, 3, 18, 18)
    assert (out - reference).abs().max() < 2.5 / 255 / min(CLIP_STD)


def test_from_processor_convnext_crop_pct():
    from transformers import ConvNextImageProcessorPil

    image = smooth_image(40, 52, seed=2)
    processor = ConvNextImageProcessorPil(size={"shortest_edge": 14}, crop_pct=0.875)
    reference = processor(images=image, return_tensors="pt")["pixel_values"]
    pre = ImagePreprocess.from_processor(processor)
    assert (pre.mode, pre.size, pre.crop_size) == ("resize_shortest_then_center_crop", 16, (14, 14))
    out = pre(to_unit_tensor(image))
    assert out.shape == reference.shape == (1, 3, 14, 14)
    assert (out - reference).abs().max() < 2.5 / 255 / min(processor.image_std)


def test_from_processor_without_normalization_and_bad_processors():
    from transformers import ViTImageProcessorPil

    pre = ImagePreprocess.from_processor(ViTImageProcessorPil(do_normalize=False, do_resize=False))
    assert pre.size is None and pre.mean is None
    with pytest.raises(TypeError, match=r"`processor` must be a transformers image processor"):
        ImagePreprocess.from_processor(object())
    with pytest.raises(ValueError, match=r"does not reproduce"):
        ImagePreprocess.from_processor(ViTImageProcessorPil(size={"shortest_edge": 16, "longest_edge": 20}))


# -------------------------------------------------------------------------------- ImageClassifier
def test_plain_module_path():
    torch.manual_seed(0)
    net = TinyNet(num_classes=5).eval()
    pre = ImagePreprocess((8, 8), mean=(0.5,) * 3, std=(0.5,) * 3)
    classifier = as_image_classifier(net, preprocess=pre)
    assert isinstance(classifier, ImageClassifier) and classifier.model is net
    assert not classifier.training  # follows the wrapped model
    x = torch.rand(3, 3, 12, 12)
    logits = classifier(x)
    assert logits.shape == (3, 5)
    torch.testing.assert_close(logits, net(pre(x)))
    assert as_image_classifier(classifier) is classifier
    assert "num_classes=None" in repr(classifier) and "ImagePreprocess(size=(8, 8)" in repr(classifier)
    # A callable that is not a module works as preprocess too.
    doubled = as_image_classifier(net, preprocess=lambda t: t * 2)
    torch.testing.assert_close(doubled(x), net(x * 2))


def test_train_eval_mode_is_the_wrappers():
    net = TinyNet().train()
    classifier = ImageClassifier(net)
    assert classifier.training
    classifier.eval()
    assert not net.training and not net.bn.training
    classifier.train()
    assert net.bn.training


def test_non_module_model_is_refused():
    with pytest.raises(TypeError, match=r"`model` must be a torch.nn.Module.*function"):
        as_image_classifier(lambda x: x)
    with pytest.raises(TypeError, match=r"`model` must be a torch.nn.Module.*str"):
        ImageClassifier("resnet50")
    with pytest.raises(TypeError, match=r"`preprocess` must be an nn.Module, a callable or None"):
        ImageClassifier(TinyNet(), preprocess=3)


def test_class_count_mismatch_is_caught_once():
    net = TinyNet(num_classes=7).eval()
    classifier = as_image_classifier(net)
    with pytest.raises(ValueError, match=r"`model` returns 7 logits but 10 class names were given"):
        check_num_classes(classifier, 10, (3, 8, 8))
    calls = []
    net.register_forward_hook(lambda *args: calls.append(1))
    assert classifier.check_num_classes(7, (1, 3, 8, 8)) == 7
    assert classifier.num_classes == 7 and calls == []  # the count observed earlier is reused
    with pytest.raises(ValueError, match=r"`example_input_shape` must be \(C, H, W\)"):
        check_num_classes(as_image_classifier(TinyNet()), 5, (8, 8))


def test_class_count_check_restores_modes_and_leaves_batchnorm_alone():
    net = TinyNet(num_classes=5).train()
    before = net.bn.running_mean.clone()
    # In train mode this forward would update the BatchNorm running statistics.
    assert check_num_classes(net, 5, (3, 8, 8)) == 5
    assert net.training and net.bn.training
    torch.testing.assert_close(net.bn.running_mean, before)


def test_bad_logits_are_explained():
    with pytest.raises(ValueError, match=r"shape \(batch, num_classes\).*\(2, 5, 4\)"):
        extract_logits(torch.zeros(2, 5, 4), 2)
    with pytest.raises(TypeError, match=r"without `logits`.*last_hidden_state"):
        extract_logits({"last_hidden_state": torch.zeros(2, 3)}, 2)
    torch.testing.assert_close(extract_logits((torch.ones(2, 3), torch.zeros(2, 3)), 2), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"`x` must have 4 dimensions"):
        ImageClassifier(TinyNet())(torch.rand(3, 8, 8))


def test_transformers_vit_with_processor():
    from transformers import ViTImageProcessorPil

    model = tiny_vit(num_labels=4)
    processor = ViTImageProcessorPil(size={"height": 16, "width": 16})
    classifier = ImageClassifier.from_transformers(model, processor)
    assert classifier.num_classes == 4 and classifier.class_names == tuple(f"class_{i}" for i in range(4))
    x = torch.rand(2, 3, 24, 20, requires_grad=True)
    logits = classifier(x)
    assert logits.shape == (2, 4)
    expected = model(pixel_values=ImagePreprocess.from_processor(processor)(x)).logits
    torch.testing.assert_close(logits, expected)
    logits.sum().backward()
    assert x.grad.abs().sum() > 0
    # The generic entry point reads the processor and the config too.
    generic = as_image_classifier(model, preprocess=processor)
    assert generic.num_classes == 4 and isinstance(generic.preprocess, ImagePreprocess)
    torch.testing.assert_close(generic(x), logits)
    assert check_num_classes(generic, 4, (3, 16, 16)) == 4
    with pytest.raises(ValueError, match=r"config.num_labels=4 but `num_classes` is 3"):
        as_image_classifier(model, num_classes=3)


def test_grayscale_input_into_rgb_transformers_model():
    from transformers import ViTImageProcessorPil

    model = tiny_vit()
    processor = ViTImageProcessorPil(size={"height": 16, "width": 16})
    classifier = ImageClassifier.from_transformers(model, processor, grayscale_to_rgb=True)
    gray = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(classifier(gray), classifier(gray.expand(-1, 3, -1, -1)))


def test_dtype_and_device_follow_the_model():
    model = tiny_vit().double()
    classifier = as_image_classifier(
        model, preprocess=ImagePreprocess((16, 16), mean=(0.5,) * 3, std=(0.5,) * 3)
    )
    logits = classifier(torch.rand(2, 3, 20, 20))  # float32 input, float64 model
    assert logits.dtype == torch.float64 and logits.device == next(model.parameters()).device
    moved = classifier.to(torch.float32)
    assert moved(torch.rand(1, 3, 16, 16)).dtype == torch.float32


def test_clip_model_needs_class_names(tiny_clip):
    with pytest.raises(TypeError, match=r"needs the class names.*ZeroShotClassifier.from_clip"):
        as_image_classifier(tiny_clip)


# ------------------------------------------------------------------------------ ZeroShotClassifier
def test_zero_shot_logits_shape_and_gradient(tiny_clip, clip_tokenizer):
    names = ["cat", "dog", "bird"]
    classifier = ZeroShotClassifier.from_clip(
        tiny_clip, clip_tokenizer, names, templates=("a photo of a {}.", "a {}")
    )
    assert classifier.num_classes == 3 and classifier.class_names == tuple(names)
    assert as_image_classifier(classifier) is classifier
    assert not classifier.text_embeddings.requires_grad
    torch.testing.assert_close(classifier.text_embeddings.norm(dim=-1), torch.ones(3))
    text = repr(classifier)
    assert "num_classes=3" in text and "num_templates=2" in text
    x = torch.rand(2, 3, 20, 24, requires_grad=True)
    logits = classifier(x)
    assert logits.shape == (2, 3)
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert check_num_classes(classifier, 3, (3, 16, 16)) == 3
    with pytest.raises(ValueError, match=r"returns 3 logits but 4 class names"):
        check_num_classes(classifier, 4, (3, 16, 16))


def test_zero_shot_equals_clip_forward(tiny_clip, clip_tokenizer):
    from transformers import CLIPImageProcessorPil, CLIPProcessor

    names = ["cat", "dog", "bird", "fish"]
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
        ),
        tokenizer=clip_tokenizer,
    )
    classifier = ZeroShotClassifier.from_clip(tiny_clip, processor, names)
    x = torch.rand(3, 3, 16, 16)
    tokens = clip_tokenizer([f"a photo of a {n}." for n in names], padding=True, return_tensors="pt")
    with torch.no_grad():
        pixel_values = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(
            1, 3, 1, 1
        )
        direct = tiny_clip(pixel_values=pixel_values, **tokens).logits_per_image
        torch.testing.assert_close(classifier(x), direct, rtol=1e-4, atol=1e-4)
    # Without a processor the image size comes from the vision config with CLIP's statistics.
    default = ZeroShotClassifier.from_clip(tiny_clip, clip_tokenizer, names)
    assert (default.preprocess.size, default.preprocess.mean) == (16, CLIP_MEAN)
    with torch.no_grad():
        torch.testing.assert_close(default(x), direct, rtol=1e-4, atol=1e-4)


def test_zero_shot_rejects_bad_arguments(tiny_clip, clip_tokenizer):
    with pytest.raises(ValueError, match=r"`templates\[0\]` must be a string with one '\{\}' slot"):
        ZeroShotClassifier.from_clip(tiny_clip, clip_tokenizer, ["cat"], templates=("a photo",))
    with pytest.raises(ValueError, match=r"`class_names` must hold distinct names"):
        ZeroShotClassifier.from_clip(tiny_clip, clip_tokenizer, ["cat", "cat"])
    with pytest.raises(TypeError, match=r"`model` must be a CLIP-like nn.Module"):
        ZeroShotClassifier.from_clip(TinyNet(), clip_tokenizer, ["cat"])


def test_zero_shot_restores_model_mode(tiny_clip, clip_tokenizer):
    tiny_clip.train()
    classifier = ZeroShotClassifier.from_clip(tiny_clip, clip_tokenizer, ["cat", "dog"])
    assert tiny_clip.training and classifier.training
