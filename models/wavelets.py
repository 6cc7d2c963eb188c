"""A fixed Morlet wavelet filter bank: the data-independent front end of the ``cnn`` architecture.

Why fixed filters: under DP-SGD every trained parameter adds noise, and hand-designed
scattering features let a small private classifier reach accuracies that end-to-end private CNNs
do not (Tramer & Boneh, "Differentially Private Learning Needs Better Features", 2021). Their
ScatterNet takes the complex modulus, which CKKS cannot evaluate; here each wavelet's real and
imaginary parts are two convolution channels and the network squares them, so the same
information travels as ``|x * psi|^2``, a degree-2 polynomial.

The filters depend on nothing but their size, scale and orientation: they read no data.
"""

from __future__ import annotations

import numpy as np


def morlet(size: int, *, sigma: float, theta: float, xi: float, slant: float = 0.5) -> np.ndarray:
    """A complex 2-D Morlet wavelet, zero-mean and L1-normalized, on a ``size x size`` grid."""
    half = size // 2
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    along = np.cos(theta) * xx + np.sin(theta) * yy
    across = -np.sin(theta) * xx + np.cos(theta) * yy
    envelope = np.exp(-(along**2 + (across / slant) ** 2) / (2 * sigma**2))
    wave = np.exp(1j * xi * along)
    beta = (envelope * wave).sum() / envelope.sum()  # makes the wavelet zero-mean
    psi = envelope * (wave - beta)
    return psi / np.abs(psi).sum()


def gaussian(size: int, *, sigma: float) -> np.ndarray:
    half = size // 2
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    phi = np.exp(-(xx**2 + yy**2) / (2 * sigma**2))
    return phi / phi.sum()


def filter_bank(size: int, *, scales: int, orientations: int) -> np.ndarray:
    """``[2 * scales * orientations + 1, 1, size, size]`` float32 filters.

    For scale ``j`` and orientation ``l``: the real then the imaginary part of a Morlet wavelet
    with ``sigma = 0.8 * 2**j``, ``xi = 3*pi/4 / 2**j`` and ``theta = pi * l / orientations``
    (the usual scattering parameters); the last channel is a Gaussian low-pass.
    """
    if size % 2 == 0 or size < 3:
        raise ValueError(f"filter size must be odd and at least 3, got {size}")
    filters = []
    for j in range(scales):
        for k in range(orientations):
            psi = morlet(size, sigma=0.8 * 2**j, theta=np.pi * k / orientations, xi=3 * np.pi / 4 / 2**j)
            filters += [psi.real, psi.imag]
    filters.append(gaussian(size, sigma=0.8 * 2 ** max(scales - 1, 0)))
    return np.stack(filters)[:, None].astype(np.float32)
