"""The PyTorch int8 reference: what the exported QDQ model must compute.

It fake-quantizes exactly where the ONNX graph has QuantizeLinear nodes, with the same scales,
zero points and round-half-to-even, and computes each layer in float32 on dequantized values.
onnxruntime's integer kernels may round a requantization tie the other way, so the two agree
within one quantization step of each intermediate tensor; the final logits are not
requantized, so the two agree to float rounding there.
"""

from __future__ import annotations

import numpy as np

from models.extras import require_train_extra
from models.layers import AvgPool, Conv, Dense, Flatten, Square
from models.quantization import QuantizedNetwork, QuantParams

torch = require_train_extra("torch")
F = torch.nn.functional


def _fake_quantize(x, params: QuantParams):
    scale = torch.tensor(params.scale, dtype=torch.float32)
    q = torch.clamp(torch.round(x / scale) + params.zero_point, 0, params.qmax)
    return (q - params.zero_point) * scale


def reference_logits(network: QuantizedNetwork, x: np.ndarray) -> np.ndarray:
    """Run the quantized network on normalized inputs ``x`` (batch first)."""
    with torch.no_grad():
        t = _fake_quantize(torch.from_numpy(np.ascontiguousarray(x, np.float32)), network.input)
        params = network.input
        for ql in network.layers:
            layer = ql.layer
            if isinstance(layer, Flatten):
                t = t.flatten(1)
                continue
            if isinstance(layer, (Conv, Dense)):
                shape = (-1,) + (1,) * (ql.weight_q.ndim - 1)
                weight = torch.from_numpy(ql.weight_q.astype(np.float32) * ql.weight_scale.reshape(shape))
                bias_scale = np.float32(params.scale) * ql.weight_scale
                bias = torch.from_numpy((ql.bias_q.astype(np.float32) * bias_scale).astype(np.float32))
                if isinstance(layer, Conv):
                    t = F.conv2d(t, weight, bias, stride=layer.stride, padding=layer.padding)
                else:
                    t = F.linear(t, weight, bias)
            elif isinstance(layer, Square):
                t = t * t
            elif isinstance(layer, AvgPool):
                t = F.avg_pool2d(t, layer.kernel, layer.stride)
            if ql.output is not None:  # the last layer keeps its float logits
                params = ql.output
                t = _fake_quantize(t, params)
        return t.numpy()
