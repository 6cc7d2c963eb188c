"""Model pipeline: offline data, DP-SGD training, int8 quantization, ONNX export, repository."""
