"""The comparison servers' scorer answers as notsure does: on the score each model is served on
(a CE model on its confidence, not on J) at the manifest's T."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from benchmarks.others.common import Scorer
from training.data import synthetic

CE = "tiny-ce"


def test_a_ce_model_is_answered_on_its_confidence(model_repo: Path, client: TestClient) -> None:
    scorer = Scorer(str(model_repo / CE / "1"))
    assert scorer.manifest.score == "confidence"  # what a CE model is served on
    x = synthetic(64, seed=11).x.numpy()  # (64, 1, 28, 28) in [0, 1]
    got = scorer(x)

    # The softmax's largest probability against T, by hand from the graph's logits.
    logits = scorer.sess.run(None, {"input": x})[0].astype(np.float64)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    confidence = (p / p.sum(axis=1, keepdims=True)).max(axis=1)
    want = confidence >= scorer.manifest.threshold
    assert got["accepted"] == want.tolist()
    assert 0 < sum(want) < len(want)  # both decisions occur, so the comparison says something

    # ...and the service decides the same images the same way.
    r = client.post(f"/v1/models/{CE}/predict", json={"instances": x[:, 0].tolist()})
    assert r.status_code == 200, r.text
    served = [p["decision"] == "accepted" for p in r.json()["predictions"]]
    assert served == got["accepted"]
