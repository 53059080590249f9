"""Training side of notsure (needs the `train` extra: torch, torchvision, onnx)."""
