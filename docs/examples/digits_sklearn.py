"""A scikit-learn classifier on the 8x8 digits, exported with skl2onnx: a model that ends in
probabilities, takes flat rows of 64 pixels, and was trained on pixel values 0-16.

Writes into --out: digits.onnx and heldout.npz (the 797 digits it did not train on, pixels
scaled to [0, 1]). `--std 0.0625` tells the service to turn [0, 1] pixels back into 0-16:

    python docs/examples/digits_sklearn.py --out runs/digits
    notsure import runs/digits/digits.onnx --name digits-logreg --data runs/digits/heldout.npz \
        --size 8x8 --channels 1 --mean 0 --std 0.0625 --output probabilities
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

TRAIN = 1000  # digits trained on; the other 797 are held out


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    digits = load_digits()  # (1797, 8, 8) pixels 0-16, labels 0-9
    x, y = digits.images.astype(np.float32), digits.target
    clf = LogisticRegression(max_iter=2000).fit(x[:TRAIN].reshape(TRAIN, 64), y[:TRAIN])
    # zipmap False: a plain (B, 10) probability tensor instead of a list of dicts.
    onx = to_onnx(clf, x[:1].reshape(1, 64), options={"zipmap": False}, target_opset=18)
    (out / "digits.onnx").write_bytes(onx.SerializeToString())
    np.savez(out / "heldout.npz", x=x[TRAIN:] / 16.0, y=y[TRAIN:])
    acc = clf.score(x[TRAIN:].reshape(-1, 64), y[TRAIN:])
    print(f"held-out accuracy {acc:.4f}")  # noqa: T201


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/digits"))
    main(p.parse_args().out)
