"""Ask a running notsure service about fresh images (an .npz with x and optional y) and compare
its refuse rate with the calibration target: inside the 95% interval of Binomial(n, target)/n
is what a correctly calibrated T gives on images from the held-out distribution.

    python docs/examples/refuse_rate.py --model fashion-cnn --data runs/fashion/fresh.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import httpx
import numpy as np
from scipy import stats


def main(url: str, model: str, data: Path, target: float, batch: int) -> bool:
    with np.load(data) as f:
        x, y = f["x"], f.get("y")
    decisions: list[tuple[str, int | None]] = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for i in range(0, len(x), batch):
            body = {"instances": x[i : i + batch].tolist()}
            r = client.post(f"/v1/models/{model}/predict", json=body)
            r.raise_for_status()
            decisions += [(p["decision"], p["label"]) for p in r.json()["predictions"]]
    n = len(decisions)
    refused = sum(d == "not_sure" for d, _ in decisions)
    lo, hi = stats.binom.ppf([0.025, 0.975], n, target) / n
    rate = refused / n
    inside = lo <= rate <= hi
    print(f"{model}: refused {refused} of {n} fresh images = {rate:.2%}; 95% interval of "  # noqa: T201
          f"Binomial({n}, {target:g}) / {n}: [{lo:.2%}, {hi:.2%}]: "
          f"{'inside' if inside else 'OUTSIDE'}")  # fmt: skip
    if y is not None:
        acc = [(lab == t) for (d, lab), t in zip(decisions, y.tolist(), strict=True)
               if d == "accepted"]  # fmt: skip
        right = sum(acc)
        print(f"accuracy of the {len(acc)} accepted: {right / max(len(acc), 1):.2%}")  # noqa: T201
    return inside


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--target", type=float, default=0.05, help="--target-clean-refuse of import")
    p.add_argument("--batch", type=int, default=256)
    a = p.parse_args()
    raise SystemExit(0 if main(a.url, a.model, a.data, a.target, a.batch) else 1)
