"""``y = M x + b`` on one CKKS ciphertext: baby-step / giant-step over M's diagonals.

A matrix acting on a vector of ``S`` slots is the sum of its generalized diagonals, each
multiplied by the vector rotated by the diagonal's index: ``M x = sum_d diag_d * rot(x, d)`` with
``diag_d[i] = M[i, (i + d) mod S]``. Writing ``d = g B + b`` moves the rotation by ``g B`` out of
the inner sum: ``sum_g rot(sum_b rot(diag_d, -g B) * rot(x, b), g B)``, so the evaluator rotates
the input once per distinct baby step ``b`` and each partial sum once per distinct giant step
``g B``, instead of once per diagonal. Only non-zero diagonals exist in the plan, and the split
``B`` is chosen to minimize rotations for the diagonals that do exist (a convolution's matrix has
few). The rotated diagonals are encoded once, when the model loads, at the level and scale where
they are used: each is encoded at the scale of the prime that the product then drops, so the
result comes back at exactly the input's scale.

Wide, short matrices (a 128x784 dense layer) use the replicated ("hybrid") layout: the input is
packed with period ``P`` (a power of two at least its length, repeated across all slots), so a
rotation of the ciphertext is a cyclic rotation of the vector. With ``m'`` the power of two at
least the row count, only ``m'`` diagonals exist, ``diag_d[s] = M[s mod m', (s + d) mod P]``,
and ``log2(P / m')`` rotate-and-add steps fold the partial sums: the result is ``y`` repeated with
period ``m'``, which is the packing the next layer wants. 911 products become 128.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tenseal.sealapi as seal

from models.errors import InvalidArgumentError


@dataclass(frozen=True)
class DiagonalPlan:
    """The public, key-independent part of one linear layer: which rotations it needs."""

    slots: int
    baby: int  # B
    diagonals: dict[int, np.ndarray] = field(repr=False)  # d -> diag_d (length slots), non-zero only
    bias: np.ndarray | None = field(repr=False)  # length slots, or None
    fold_steps: list[int] = field(default_factory=list)  # rotate-and-add steps after the products
    output_period: int = 0  # the result repeats with this period (0: not replicated)

    @property
    def baby_steps(self) -> list[int]:
        return sorted({d % self.baby for d in self.diagonals})

    @property
    def giant_steps(self) -> list[int]:
        return sorted({d - d % self.baby for d in self.diagonals})

    @property
    def rotation_steps(self) -> set[int]:
        """Every rotation step the evaluation uses: the Galois keys the client must make."""
        return {s for s in self.baby_steps + self.giant_steps + self.fold_steps if s}

    @property
    def rotations(self) -> int:
        """Rotations per evaluation (one per distinct non-zero baby and giant step, one per fold)."""
        return len([s for s in self.baby_steps if s]) + len([s for s in self.giant_steps if s]) + len(self.fold_steps)

    @property
    def products(self) -> int:
        return len(self.diagonals)


def _best_baby(indices: np.ndarray, slots: int) -> int:
    """The split ``B`` that minimizes baby plus giant rotations for these diagonal indices."""
    best, best_cost = 1, None
    for baby in range(1, slots + 1):
        cost = len(np.unique(indices % baby)) + len(np.unique(indices // baby))
        if best_cost is None or cost < best_cost:
            best, best_cost = baby, cost
    return best


def next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def plan_replicated(matrix: np.ndarray, bias: np.ndarray | None, *, slots: int, period: int) -> DiagonalPlan:
    """Plan ``y = matrix @ x + bias`` for ``x`` packed with period ``period`` (see the module doc).

    Falls back to :func:`plan_matrix` when the matrix has more rows than ``period`` (it widens
    the vector, so the input cannot be repeated), which needs ``period == slots``.
    """
    rows, cols = matrix.shape
    out_period = next_power_of_two(rows)
    if cols > period or period & (period - 1) or slots % period:
        raise InvalidArgumentError(f"a {rows}x{cols} matrix does not fit input period {period} in {slots} slots")
    if out_period > period:
        if period != slots:
            raise InvalidArgumentError(f"a {rows}x{cols} layer widens a replicated {period}-slot input")
        return plan_matrix(matrix, bias, slots=slots)
    padded = np.zeros((out_period, period))
    padded[:rows, :cols] = matrix
    s = np.arange(slots)
    diagonals = {}
    for d in range(out_period):
        diag = padded[s % out_period, (s + d) % period]
        if diag.any():
            diagonals[d] = diag
    full_bias = None
    if bias is not None:
        periodic = np.zeros(out_period)
        periodic[:rows] = bias
        full_bias = periodic[s % out_period]
    fold_steps = [out_period << k for k in range((period // out_period).bit_length() - 1)]
    baby = _best_baby(np.array(sorted(diagonals)), slots) if diagonals else 1
    return DiagonalPlan(
        slots=slots, baby=baby, diagonals=diagonals, bias=full_bias, fold_steps=fold_steps, output_period=out_period
    )


def plan_matrix(matrix: np.ndarray, bias: np.ndarray | None, *, slots: int) -> DiagonalPlan:
    """Plan ``y[:m] = matrix @ x[:n] + bias`` for ``x`` packed in slots ``[0, n)``.

    Slots ``[n, S)`` of the input must hold zeros (or values that the matrix's zero columns
    ignore); slots ``[m, S)`` of the output hold unspecified values.
    """
    rows, cols = matrix.shape
    if rows > slots or cols > slots:
        raise InvalidArgumentError(f"a {rows}x{cols} matrix does not fit {slots} slots")
    i, j = np.nonzero(matrix)
    index = (j - i) % slots
    diagonals: dict[int, np.ndarray] = {}
    for d in np.unique(index):
        diag = np.zeros(slots)
        mask = index == d
        diag[i[mask]] = matrix[i[mask], j[mask]]
        diagonals[int(d)] = diag
    full_bias = None
    if bias is not None:
        full_bias = np.zeros(slots)
        full_bias[:rows] = bias
    baby = _best_baby(np.array(sorted(diagonals)), slots) if diagonals else 1
    return DiagonalPlan(slots=slots, baby=baby, diagonals=diagonals, bias=full_bias)


def dropped_primes(context: seal.SEALContext, parms_id, count: int) -> tuple[float, list[int]]:
    """The product of the ``count`` primes that ``count`` rescales from ``parms_id`` drop (the last
    prime of each level on the way), and the level they lead to."""
    product = 1.0
    for _ in range(count):
        data = context.get_context_data(parms_id)
        product *= float(data.parms().coeff_modulus()[-1].value())
        parms_id = data.next_context_data().parms_id()
    return product, parms_id


class EncodedLinear:
    """A :class:`DiagonalPlan` with its plaintexts encoded for one level: server-side, read-only.

    The plan is in virtual positions; with ``lanes`` inputs interleaved per ciphertext (see
    :mod:`gateway.he.packing`) each plaintext value is repeated across the lanes and a virtual
    rotation by ``d`` is a physical rotation by ``d * lanes``.
    """

    def __init__(
        self,
        plan: DiagonalPlan,
        *,
        context: seal.SEALContext,
        parms_id,
        lanes: int,
        input_scale: float,
        output_scale: float | None = None,
        levels: int = 1,
    ) -> None:
        """``output_scale`` defaults to ``input_scale``; the last layer lowers it to fit the first prime.
        ``levels``: primes the layer drops (rescales after its products; two for circuit_private).

        A rotation adds key-switching noise of a roughly fixed size (about 2**17 here), which
        only a large scale makes negligible. So a layer that lowers its scale rotates everything
        first and rescales once at the end; the others rescale each partial sum first, because a
        rotation one level lower is cheaper.
        """
        self.plan = plan
        self.rotate_before_rescale = output_scale is not None and output_scale < input_scale
        self.lanes = lanes
        self.levels = levels
        encoder = seal.CKKSEncoder(context)
        dropped, next_parms_id = dropped_primes(context, parms_id, levels)
        self.input_scale = input_scale
        self.output_scale = output_scale or input_scale
        # (input_scale * plaintext_scale) / dropped == output_scale after the rescales
        plaintext_scale = dropped * self.output_scale / input_scale
        self._plaintexts: dict[tuple[int, int], seal.Plaintext] = {}
        for d, diag in plan.diagonals.items():
            giant, baby = d - d % plan.baby, d % plan.baby
            plaintext = seal.Plaintext()
            encoder.encode(np.repeat(np.roll(diag, giant), lanes).tolist(), parms_id, plaintext_scale, plaintext)
            self._plaintexts[(giant, baby)] = plaintext
        self._bias = None
        if plan.bias is not None:
            self._bias = seal.Plaintext()
            encoder.encode(np.repeat(plan.bias, lanes).tolist(), next_parms_id, self.output_scale, self._bias)

    @property
    def rotation_steps(self) -> set[int]:
        """The physical rotation steps: the Galois keys this layer needs."""
        return {step * self.lanes for step in self.plan.rotation_steps}

    def evaluate(self, evaluator: seal.Evaluator, x: seal.Ciphertext, galois_keys: seal.GaloisKeys) -> seal.Ciphertext:
        """``M x + b``, one level below ``x``."""
        rotated = {0: x}
        for step in self.plan.baby_steps:
            if step:
                rotated[step] = seal.Ciphertext()
                evaluator.rotate_vector(x, step * self.lanes, galois_keys, rotated[step])
        total = None
        for giant in self.plan.giant_steps:
            partial = None
            for baby in self.plan.baby_steps:
                plaintext = self._plaintexts.get((giant, baby))
                if plaintext is None:
                    continue
                product = seal.Ciphertext()
                evaluator.multiply_plain(rotated[baby], plaintext, product)
                if partial is None:
                    partial = product
                else:
                    evaluator.add_inplace(partial, product)
            if not self.rotate_before_rescale:
                for _ in range(self.levels):
                    evaluator.rescale_to_next_inplace(partial)
            if giant:
                evaluator.rotate_vector_inplace(partial, giant * self.lanes, galois_keys)
            if total is None:
                total = partial
            else:
                evaluator.add_inplace(total, partial)
        for step in self.plan.fold_steps:
            shifted = seal.Ciphertext()
            evaluator.rotate_vector(total, step * self.lanes, galois_keys, shifted)
            evaluator.add_inplace(total, shifted)
        if self.rotate_before_rescale:
            for _ in range(self.levels):
                evaluator.rescale_to_next_inplace(total)
        total.scale = self.output_scale
        if self._bias is not None:
            evaluator.add_plain_inplace(total, self._bias)
        return total
