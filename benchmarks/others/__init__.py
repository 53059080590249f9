"""The servers notsure is compared with, each serving the same ONNX model with the same scoring
(`common.Scorer`); `benchmarks.serving` starts them."""
