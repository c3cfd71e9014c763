"""nodata-defense: certifiable l2 robustness for pretrained image classifiers without their data.

    from nodata_defense import Robustifier

    robust = Robustifier(model, class_names, sigma=0.25).fit()
    robust.predict(x); robust.certify(x, sigma=0.25); robust.push_to_hub("org/name")

Images are float tensors (N, C, H, W) in [0, 1] everywhere; sigma is measured there.
"""

__version__ = "0.1.0"

from ._hub import HubUnreachableError
from .classifiers import ImageClassifier, ImagePreprocess, ZeroShotClassifier, as_image_classifier
from .config import (
    AdaptConfig,
    CertifiedAccuracy,
    PersonalizeConfig,
    RobustifierConfig,
    RobustModelConfig,
    SynthesisConfig,
)
from .denoiser import DiffusionDenoiser
from .robust_model import RobustModel
from .robustifier import Robustifier
from .smoothing import ABSTAIN, Certificate, Prediction

__all__ = [
    "ABSTAIN",
    "AdaptConfig",
    "Certificate",
    "CertifiedAccuracy",
    "DiffusionDenoiser",
    "HubUnreachableError",
    "ImageClassifier",
    "ImagePreprocess",
    "PersonalizeConfig",
    "Prediction",
    "RobustModel",
    "RobustModelConfig",
    "Robustifier",
    "RobustifierConfig",
    "SynthesisConfig",
    "ZeroShotClassifier",
    "__version__",
    "as_image_classifier",
]
