"""vlm-export: Hugging Face vision-language models to ONNX / TensorRT, and a torch-free runtime."""

__version__ = "0.1.0"
