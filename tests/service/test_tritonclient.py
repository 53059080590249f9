"""The real tritonclient (HTTP, default binary settings) against a live server on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

tritonclient_http = pytest.importorskip("tritonclient.http")

from service.manifest import MANIFEST_FILE, MODEL_FILE, Manifest  # noqa: E402
from service.runtime import OnnxModel  # noqa: E402
from service.scoring import score_logits  # noqa: E402
from tests.conftest import LiveServer  # noqa: E402
from training.data import synthetic  # noqa: E402


def test_tritonclient_round_trip(live_server: LiveServer, model_repo: Path) -> None:
    client = tritonclient_http.InferenceServerClient(f"127.0.0.1:{live_server.port}")
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("tiny-rce") and client.is_model_ready("tiny-rce", "1")
        meta = client.get_model_metadata("tiny-rce")
        assert meta["inputs"][0]["shape"] == [-1, 1, 28, 28]
        x = synthetic(8, seed=9).x.numpy()
        inp = tritonclient_http.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)  # binary_data=True by default
        result = client.infer("tiny-rce", [inp], request_id="abc")  # all outputs, binary
        vdir = model_repo / "tiny-rce" / "1"
        manifest = Manifest.load(vdir / MANIFEST_FILE)
        want = score_logits(
            OnnxModel(vdir / MODEL_FILE, device="cpu").run(x),
            manifest.kernel.to_kernel(),
        )
        assert result.get_response()["id"] == "abc"
        np.testing.assert_array_equal(
            result.as_numpy("label"), np.where(want.j_score >= manifest.threshold, want.label, -1)
        )
        np.testing.assert_allclose(result.as_numpy("j_score"), want.j_score, rtol=1e-5)
        np.testing.assert_allclose(result.as_numpy("probabilities"), want.probabilities, atol=1e-6)
        # Asking for some outputs, one in JSON, one binary.
        outs = [
            tritonclient_http.InferRequestedOutput("confidence", binary_data=False),
            tritonclient_http.InferRequestedOutput("non_me", binary_data=True),
        ]
        r2 = client.infer("tiny-rce", [inp], outputs=outs, model_version="1")
        np.testing.assert_allclose(r2.as_numpy("confidence"), want.confidence, rtol=1e-5)
        np.testing.assert_allclose(r2.as_numpy("non_me"), want.non_me, rtol=1e-5)
        assert r2.as_numpy("label") is None
        # Errors reach the client as InferenceServerException with our message.
        with pytest.raises(tritonclient_http.InferenceServerException, match="no model named"):
            client.infer("nope", [inp])
    finally:
        client.close()
