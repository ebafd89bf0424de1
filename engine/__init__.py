"""smoothserve's engine: the OPT model in FP16 and SmoothQuant W8A8, quantization, and serving logic."""

__version__ = "0.1.0"
