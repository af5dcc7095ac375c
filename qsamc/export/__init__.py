"""Stage 4, lower -> emit -> verify: the static subnet, integer layers, ONNX emission, the FP16 float
path, verification in ONNX Runtime, the report and the TensorRT engine."""
