"""DP-SGD training with Opacus: Poisson sampling, per-sample clipping, the PRV accountant.

The private and the non-private runs share one code path. A finite target epsilon goes through
``make_private_with_epsilon`` (Opacus searches the noise multiplier that spends exactly the
budget over the planned epochs); ``epsilon = inf`` goes through ``make_private`` with zero noise,
so the baseline keeps the same sampling and clipping and differs only by the noise.

Noise and Poisson sampling come from :mod:`models.randomness`: the operating system's CSPRNG for
every private model (nothing recorded, nothing replayable), a seeded generator only for the
non-private baseline and for development runs whose manifest then says the noise is replayable.
Opacus draws neither: the batches come from :class:`PoissonBatches`, and the optimizer's noise
step is replaced by :func:`_draw_noise_from` (Opacus' own ``secure_mode`` needs ``torchcsprng``,
which has no build for the pinned torch).

Per-sample gradient norms come from Opacus' ghost clipping, which computes them without
materializing a gradient per example: the clipped, noised update is the same as with per-sample
hooks, and a 784-128 dense layer's step no longer builds a [batch, 128, 784] tensor.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from models.data import Dataset
from models.errors import InvalidArgumentError
from models.extras import require_train_extra
from models.manifest import DPRecord
from models.randomness import (
    GAUSSIAN_METHOD,
    RandomSource,
    SecureRandomness,
    SeededRandomness,
    gaussian_noise,
    poisson_mask,
)

torch = require_train_extra("torch")
opacus = require_train_extra("opacus")
tqdm = require_train_extra("tqdm").tqdm

EVAL_CHUNK = 4096
logger = logging.getLogger(__name__)


class TrainingConfig(BaseModel):
    """Hyperparameters of one DP-SGD run; defaults per dataset and architecture live in recipes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epsilon: float = Field(gt=0, description="target epsilon; inf trains the non-private baseline")
    delta: float | None = Field(
        default=None, gt=0, lt=1, description="default: the largest power of ten at most 1/(10 n)"
    )
    epochs: int = Field(gt=0)
    batch_size: int = Field(gt=0, description="expected batch size under Poisson sampling")
    learning_rate: float = Field(gt=0)
    momentum: float = Field(ge=0, lt=1)
    max_grad_norm: float = Field(gt=0)
    seed: int = Field(
        default=0,
        description="the initial weights' seed; with randomness='replayable' (or epsilon inf) also the noise's",
    )
    randomness: Literal["secure", "replayable"] = Field(
        default="secure",
        description="'replayable' draws a private model's noise from the seed: for development only, and the "
        "manifest then says so (the gateway lists it with epsilon: none)",
    )
    threads: int = Field(default=1, ge=1, description="torch threads; 1 unless the machine is otherwise idle")


@dataclass(frozen=True)
class TrainedModel:
    module: object  # the trained nn.Sequential, unwrapped from Opacus
    dp: DPRecord
    wall_time_seconds: float


def default_delta(n: int) -> float:
    """The largest power of ten at most ``1/(10 n)``: well below ``1/n``, as DP guidance asks.

    MNIST's 59,000 private examples give 1e-6 (the bundled models pass 1e-5, the literature's
    value, explicitly); breast_cancer's 398 give 1e-4.
    """
    return 10.0 ** math.floor(math.log10(1.0 / (10 * n)))


def validate_delta(delta: float, n: int) -> float:
    if not 0 < delta < 1 / n:
        raise InvalidArgumentError(
            f"delta={delta:g} must be in (0, 1/n) = (0, {1 / n:.3g}) for n={n} private examples; "
            "a larger delta allows releasing a whole example"
        )
    return delta


def split_frozen_prefix(module):
    """Split off the leading modules that have no trainable parameter.

    Their output is a fixed function of each example, so it is computed once per example
    rather than at every step; sampling, clipping, noise and accounting are unchanged.
    """
    cut = next((i for i, child in enumerate(module) if any(p.requires_grad for p in child.parameters())), None)
    if cut is None:
        raise InvalidArgumentError("the model has no trainable parameter")
    return module[:cut], module[cut:]


def _apply(frozen, x: np.ndarray):
    with torch.no_grad():
        return torch.cat([frozen(torch.from_numpy(x[i : i + EVAL_CHUNK])) for i in range(0, len(x), EVAL_CHUNK)])


def _accuracy(module, x: np.ndarray, y: np.ndarray) -> float:
    module.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(y), EVAL_CHUNK):
            logits = module(torch.from_numpy(x[start : start + EVAL_CHUNK]))
            correct += int((logits.argmax(1).numpy() == y[start : start + EVAL_CHUNK]).sum())
    module.train()
    return correct / len(y)


def fp32_accuracy(module, dataset: Dataset) -> float:
    """Test accuracy of the fp32 PyTorch model."""
    return _accuracy(module, dataset.normalize(dataset.test.x), dataset.test.y)


def randomness_for(config: TrainingConfig) -> RandomSource:
    """The CSPRNG for a private model; the seed only where replaying is harmless or asked for."""
    if math.isfinite(config.epsilon) and config.randomness == "secure":
        return SecureRandomness()
    if math.isfinite(config.epsilon):
        logger.warning(
            "randomness='replayable': the noise replays from seed %d, so this model is NOT private "
            "(its manifest says so and the gateway lists it with epsilon: none)",
            config.seed,
        )
    return SeededRandomness(config.seed)


class PoissonBatches(torch.utils.data.Sampler):
    """``steps`` batches of indices, each example in each batch with probability ``1 / steps``.

    The sampled Gaussian mechanism that the accountant analyses, drawn from ``source`` rather
    than torch's generator. The rate is ``1 / steps`` with ``steps = ceil(n / batch_size)``, the
    rate Opacus' own Poisson loader would use for the same batch size, so the accounting of a
    model trained before this sampler existed is unchanged.
    """

    def __init__(self, *, source: RandomSource, population: int, steps: int) -> None:
        self.source = source
        self.population = population
        self.steps = steps

    @property
    def sample_rate(self) -> float:
        return 1.0 / self.steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield torch.from_numpy(np.flatnonzero(poisson_mask(self.source, self.population, self.sample_rate)))


def _draw_noise_from(optimizer, source: RandomSource) -> None:
    """Make ``optimizer`` (an Opacus DPOptimizer) add noise drawn from ``source``.

    The replacement does what ``DPOptimizer.add_noise`` does (noise of standard deviation
    ``noise_multiplier * max_grad_norm`` on each parameter's clipped, summed gradient) with
    samples from :func:`models.randomness.gaussian_noise`, added in float64 and rounded once to
    the gradient's dtype. A test checks that Opacus' own generator is never called.
    """
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    def add_noise() -> None:
        multiplier = getattr(optimizer, "_adjusted_noise_multiplier", optimizer.noise_multiplier)
        std = multiplier * optimizer.max_grad_norm
        for p in optimizer.params:
            _check_processed_flag(p.summed_grad)
            grad = p.summed_grad
            if std > 0:
                noise = torch.from_numpy(gaussian_noise(source, grad.numel(), std)).view_as(grad)
                grad = (grad.double() + noise).to(grad.dtype)
            p.grad = grad.view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = add_noise


def train(*, module, dataset: Dataset, config: TrainingConfig, progress: bool = True) -> TrainedModel:
    """Train ``module`` on ``dataset.private`` with DP-SGD and account for it.

    Raises:
        InvalidArgumentError: delta not below 1/n.
    """
    n = len(dataset.private)
    delta = validate_delta(config.delta if config.delta is not None else default_delta(n), n)
    private = math.isfinite(config.epsilon)
    source = randomness_for(config)

    frozen, trainable = split_frozen_prefix(module)
    x = _apply(frozen, dataset.normalize(dataset.private.x))
    y = torch.from_numpy(dataset.private.y)
    batches = PoissonBatches(source=source, population=n, steps=math.ceil(n / config.batch_size))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=None, sampler=batches)
    optimizer = torch.optim.SGD(trainable.parameters(), lr=config.learning_rate, momentum=config.momentum)
    with warnings.catch_warnings():
        # Opacus' warning about its own secure_mode: neither its noise nor its sampling is used.
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG turned off.*")
        warnings.filterwarnings("ignore", message=".*Optimal order is the largest alpha.*")
        engine = opacus.PrivacyEngine(accountant="prv", secure_mode=False)
        common = {
            "module": trainable,
            "optimizer": optimizer,
            "data_loader": loader,
            "criterion": torch.nn.CrossEntropyLoss(),
            "max_grad_norm": config.max_grad_norm,
            "grad_sample_mode": "ghost",
            # The loader already samples Poisson batches (PoissonBatches); Opacus takes its sample
            # rate as 1 / len(loader) = batch_size / n, rounded as its own Poisson loader would.
            "poisson_sampling": False,
        }
        if private:
            model, optimizer, criterion, loader = engine.make_private_with_epsilon(
                **common, target_epsilon=config.epsilon, target_delta=delta, epochs=config.epochs
            )
        else:
            model, optimizer, criterion, loader = engine.make_private(**common, noise_multiplier=0.0)
    _draw_noise_from(optimizer, source)

    logger.info("DP-SGD noise and sampling from %s", source.generator)
    started = time.perf_counter()
    steps, epsilon = 0, math.inf
    for epoch in range(config.epochs):
        seen = correct = 0
        running_loss = 0.0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
        for batch_x, batch_y in bar:
            optimizer.zero_grad(set_to_none=True)
            logits = model(batch_x)
            loss = criterion(logits, batch_y)
            with warnings.catch_warnings():  # Opacus' hooks on the first layer, whose input needs no grad
                warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
                loss.backward()
            optimizer.step()
            steps += 1
            if len(batch_y):
                seen += len(batch_y)
                correct += int((logits.argmax(1) == batch_y).sum())
                running_loss += loss.item() * len(batch_y)
                bar.set_postfix(
                    loss=f"{running_loss / seen:.3f}", acc=f"{correct / seen:.3f}", eps=f"{epsilon:.2f}", refresh=False
                )
        if private:
            epsilon = _spent(engine.accountant, delta)
        if progress:
            tqdm.write(
                f"epoch {epoch + 1}/{config.epochs}: loss {running_loss / max(seen, 1):.3f}, "
                f"train acc {correct / max(seen, 1):.4f}, epsilon {epsilon:.3f} (delta {delta:g})"
            )
    wall = time.perf_counter() - started

    record = DPRecord(
        epsilon=epsilon,
        target_epsilon=config.epsilon,
        delta=delta,
        noise_multiplier=float(optimizer.noise_multiplier),
        max_grad_norm=config.max_grad_norm,
        sample_rate=batches.sample_rate,
        expected_batch_size=config.batch_size,
        epochs=config.epochs,
        steps=steps,
        secure_rng=source.secure,
        rng=source.generator,
        noise_method=GAUSSIAN_METHOD,
        replay_seed=None if source.secure else config.seed,
        init_seed=config.seed,
        dataset=dataset.name,
        private_size=n,
    )
    return TrainedModel(module=module, dp=record, wall_time_seconds=wall)


def recompute_epsilon(record: DPRecord) -> float:
    """Epsilon from a fresh PRV accountant fed only the recorded numbers (the audit path)."""
    if record.noise_multiplier == 0:
        return math.inf
    accountant = opacus.accountants.PRVAccountant()
    accountant.history = [(record.noise_multiplier, record.sample_rate, record.steps)]
    return _spent(accountant, record.delta)


def _spent(accountant, delta: float) -> float:
    """The PRV accountant's epsilon; it warns when the RDP bound it uses to size its grid is
    loose, which does not affect the PRV epsilon it returns."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Optimal order is the largest alpha.*")
        return accountant.get_epsilon(delta)
