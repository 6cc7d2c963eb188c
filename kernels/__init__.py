"""numba int8 kernels for the plaintext fast path: the same logits as onnxruntime, faster.

(Bit for bit for models with uint8 activations. For A16W8 models, whose uint16 layers
onnxruntime runs in float32, the exact integer result instead: see ``arithmetic``.)

``compiler`` turns an int8 QDQ ONNX graph into a :class:`~kernels.plan.Plan`, ``program``
packs it into flat arrays, ``executor`` runs it through the kernels of ``ops`` (whose integer
products are the register tiles of ``simd``, AVX2 or AVX512-VNNI as ``isa`` picks for the CPU),
and ``loader`` picks these kernels or falls back to onnxruntime. ``arithmetic`` documents
onnxruntime's rounding; ``reference`` runs a plan in numpy, as the independent check of the
kernels; ``testing`` builds small QDQ graphs; ``jitcache`` keys numba's disk cache on the whole
package.

>>> backend = load_backend(artifact.onnx_path, threads=1)  # doctest: +SKIP
>>> backend.predict_logits(x)  # float32 [batch, *input_shape] -> float32 [batch, classes]  # doctest: +SKIP
"""

from kernels import jitcache

jitcache.install()  # before any @njit(cache=True) below is decorated

from kernels.errors import UnsupportedModelError  # noqa: E402
from kernels.executor import NumbaModel  # noqa: E402
from kernels.loader import LogitsModel, OnnxRuntimeModel, load_backend  # noqa: E402

__all__ = ["LogitsModel", "NumbaModel", "OnnxRuntimeModel", "UnsupportedModelError", "load_backend"]
