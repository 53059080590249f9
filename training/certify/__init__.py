"""Certified answers: interval bound propagation (IBP), certified training, the bound graph
exported to ONNX, and certified accuracy on a test set."""
