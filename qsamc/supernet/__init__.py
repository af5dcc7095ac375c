"""The model every stage works on: the search space and `Subnet`, segment-anything's encoder made
elastic and quantizable, its LSQ+ quantizers, quantization-aware LoRA and training kernels."""
