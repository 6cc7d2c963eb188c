"""HE-friendly PyTorch architectures and their conversion to the neutral layer list.

Only operators that CKKS evaluates appear: convolutions with a stride instead of pooling,
dense layers and the square activation. Each architecture is a plain ``nn.Sequential`` so that
:func:`to_layers` can walk it one module at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from models.errors import InvalidArgumentError, NotFoundError
from models.extras import require_train_extra
from models.layers import AvgPool, Conv, Dense, Flatten, Layer, Square
from models.wavelets import filter_bank

torch = require_train_extra("torch")
nn = torch.nn


class Centre(nn.Module):
    """Subtracts a fixed per-feature mean, fitted on the public split; folds into the next dense layer."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(features))

    def forward(self, x):
        return x - self.mean


class SquareActivation(nn.Module):
    """``x * x``; no parameters, so Opacus needs no per-sample gradient rule for it."""

    def forward(self, x):
        return x * x


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def build_linear(input_shape: list[int], num_classes: int) -> nn.Sequential:
    """Flatten -> dense: logistic regression, one level of CKKS depth.

    For small tabular sets: with a few hundred examples a hidden square layer gives uint8
    activations a dynamic range that a handful of public examples cannot calibrate well.
    """
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), num_classes))


def build_mlp(input_shape: list[int], num_classes: int, *, hidden: int) -> nn.Sequential:
    """Flatten -> dense -> square -> dense: three levels of CKKS depth."""
    features = int(np.prod(input_shape))
    return nn.Sequential(nn.Flatten(), nn.Linear(features, hidden), SquareActivation(), nn.Linear(hidden, num_classes))


def build_cnn(
    input_shape: list[int],
    num_classes: int,
    *,
    kernel: int,
    stride: int,
    padding: int,
    scales: int,
    orientations: int,
    pool: int,
    hidden: int,
) -> nn.Sequential:
    """Fixed wavelet conv -> square -> average pool -> (centre) -> private dense head.

    The head is one dense layer (four levels in all) or, with ``hidden > 0``, dense -> square ->
    dense (six levels). Only the head is trained (privately); the convolution holds the fixed
    :func:`models.wavelets.filter_bank`, rescaled per channel on the public split by
    :func:`fit_public`, which also sets the centring. The centring folds into the dense bias
    at export, so the exported graph is conv, square, average pool, flatten, dense.
    """
    if len(input_shape) != 3 or input_shape[0] != 1:
        raise InvalidArgumentError(f"the cnn architecture needs one-channel images [1, H, W], got shape {input_shape}")
    bank = torch.from_numpy(filter_bank(kernel, scales=scales, orientations=orientations))
    conv = nn.Conv2d(1, bank.shape[0], kernel, stride, padding=padding)
    with torch.no_grad():
        conv.weight.copy_(bank)
        conv.bias.zero_()
    conv.requires_grad_(False)
    _, height, width = input_shape
    out_h = _conv_out(height, kernel, stride, padding) // pool
    out_w = _conv_out(width, kernel, stride, padding) // pool
    if out_h < 1 or out_w < 1:
        raise InvalidArgumentError(f"pool {pool} after stride {stride} leaves nothing of a {height}x{width} image")
    features = bank.shape[0] * out_h * out_w
    head = (
        [nn.Linear(features, hidden), SquareActivation(), nn.Linear(hidden, num_classes)]
        if hidden
        else [nn.Linear(features, num_classes)]
    )
    pooling = [nn.AvgPool2d(pool)] if pool > 1 else []
    return nn.Sequential(conv, SquareActivation(), *pooling, nn.Flatten(), Centre(features), *head)


ARCHITECTURES: dict[str, Callable[..., nn.Sequential]] = {"linear": build_linear, "mlp": build_mlp, "cnn": build_cnn}


def build(name: str, input_shape: list[int], num_classes: int, **options: int) -> nn.Sequential:
    """Build architecture ``name``; unknown names fail loudly."""
    try:
        builder = ARCHITECTURES[name]
    except KeyError:
        raise NotFoundError(f"unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)}") from None
    return builder(input_shape, num_classes, **options)


def _array(tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().astype(np.float32)


def to_layers(module: nn.Sequential) -> list[Layer]:
    """Convert a trained ``nn.Sequential`` to the neutral layer list; refuses unknown modules."""
    layers: list[Layer] = []
    pending_shift = None
    for child in module:
        if pending_shift is not None and not isinstance(child, nn.Linear):
            raise InvalidArgumentError("a Centre module must be followed by a Linear layer")
        match child:
            case Centre():
                pending_shift = _array(child.mean)
                continue
            case nn.Conv2d():
                if child.stride[0] != child.stride[1] or child.padding[0] != child.padding[1]:
                    raise InvalidArgumentError("only square strides and paddings are supported")
                layers.append(Conv(_array(child.weight), _array(child.bias), child.stride[0], child.padding[0]))
            case nn.Linear():
                weight, bias = _array(child.weight), _array(child.bias)
                if pending_shift is not None:  # W (x - m) + b = W x + (b - W m)
                    bias = (bias.astype(np.float64) - weight.astype(np.float64) @ pending_shift).astype(np.float32)
                    pending_shift = None
                layers.append(Dense(weight, bias))
            case SquareActivation():
                layers.append(Square())
            case nn.AvgPool2d():
                layers.append(AvgPool(int(child.kernel_size), int(child.stride)))
            case nn.Flatten():
                layers.append(Flatten())
            case _:
                raise InvalidArgumentError(f"module {type(child).__name__} cannot be evaluated under CKKS")
    return layers


def activation_ranges(module: nn.Sequential, x: np.ndarray) -> list[tuple[float, float]]:
    """Min/max of the input and of every exported layer's output on calibration inputs ``x``.

    The result lines up with :func:`to_layers`: one range for the input, then one per layer
    (a folded :class:`Centre` has no range of its own).
    """
    module.eval()
    with torch.no_grad():
        t = torch.from_numpy(x)
        ranges = [(float(t.min()), float(t.max()))]
        for child in module:
            t = child(t)
            if not isinstance(child, Centre):
                ranges.append((float(t.min()), float(t.max())))
    return ranges


def fit_public(module: nn.Sequential, x: np.ndarray) -> None:
    """Set the data-dependent frozen parts from public inputs ``x``; reads no private example.

    Each fixed filter channel is rescaled so that its squared response has unit mean energy
    (squares of very different magnitudes would not share one uint8 scale well), and every
    :class:`Centre` takes the mean of the features that reach it.
    """
    with torch.no_grad():
        t = torch.from_numpy(x)
        for index, child in enumerate(module):
            next_child = module[index + 1] if index + 1 < len(module) else None
            if (
                isinstance(child, nn.Conv2d)
                and not child.weight.requires_grad
                and isinstance(next_child, SquareActivation)
            ):
                energy = (child(t) ** 2).mean(dim=(0, 2, 3))
                scale = torch.where(energy > 0, energy.rsqrt(), torch.ones_like(energy))
                child.weight.mul_(scale.view(-1, 1, 1, 1))
            elif isinstance(child, Centre):
                child.mean.copy_(t.mean(dim=0))
            t = child(t)
