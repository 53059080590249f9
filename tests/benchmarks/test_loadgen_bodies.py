"""The serving benchmark's request bodies: every kind carries the same images, and notsure
answers each kind it is sent with the same labels and scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from benchmarks.loadgen import NOTSURE_APIS, bodies
from service.manifest import MANIFEST_FILE, Manifest
from service.runtime import OnnxModel
from service.scoring import score_logits

MODEL = "tiny-rce"


def _v2_binary_outputs(r: bytes, header_len: int) -> dict[str, np.ndarray]:
    head = json.loads(r[:header_len])
    out, at = {}, header_len
    types = {"INT64": np.int64, "FP32": np.float32, "FP64": np.float64, "BOOL": np.bool_}
    for o in head["outputs"]:
        size = o["parameters"]["binary_data_size"]
        out[o["name"]] = np.frombuffer(r[at : at + size], dtype=types[o["datatype"]])
        at += size
    return out


@pytest.mark.parametrize("n", [1, 3])
def test_every_body_kind_gets_the_same_answer(
    client: TestClient, model_repo: Path, tmp_path: Path, n: int
) -> None:
    manifest = Manifest.load(model_repo / MODEL / "1" / MANIFEST_FILE)
    reqs = bodies(manifest, n, tmp_path)
    # The independent expectation: the ONNX graph and the service's scoring on the pixels the
    # integer JSON body holds, divided by 255.
    pixels = np.array(json.loads(reqs["native"][0].read_bytes())["instances"], dtype=np.float32)
    model = OnnxModel(model_repo / MODEL / "1" / "model.onnx")
    want = score_logits(model.run(pixels[:, None] / 255), manifest.kernel.to_kernel())
    for kind, route in NOTSURE_APIS.items():
        path, ctype, extra = reqs[kind]
        headers = {"Content-Type": ctype}
        if kind == "v2-binary":
            header_len = int(extra.split('"')[-2])
            headers["Inference-Header-Content-Length"] = str(header_len)
        r = client.post(route.format(MODEL), content=path.read_bytes(), headers=headers)
        assert r.status_code == 200, (kind, r.text[:300])
        if kind == "v2-binary":
            got = _v2_binary_outputs(r.content, int(r.headers["Inference-Header-Content-Length"]))
            labels, j = got["label"], got["j_score"]
        elif kind == "v2-json":
            outs = {o["name"]: o["data"] for o in r.json()["outputs"]}
            labels, j = np.array(outs["label"]), np.array(outs["j_score"])
        else:
            preds = r.json()["predictions"]
            labels = np.array([p["label"] if p["label"] is not None else -1 for p in preds])
            j = np.array([p["j_score"] for p in preds])
        assert len(labels) == n, kind
        # Float bodies round pixels to 4 decimals: the same labels, J within float noise.
        np.testing.assert_allclose(j, want.j_score, rtol=0, atol=2e-3, err_msg=kind)
        shown = want.label == labels
        assert shown.all() or (labels[~shown] == -1).all(), kind  # NOT SURE may hide a label


def test_peer_bodies_carry_the_same_pixels(model_repo: Path, tmp_path: Path) -> None:
    manifest = Manifest.load(model_repo / MODEL / "1" / MANIFEST_FILE)
    reqs = bodies(manifest, 2, tmp_path)
    pixels = np.array(json.loads(reqs["native"][0].read_bytes())["instances"], dtype=np.uint8)
    v2 = json.loads(reqs["v2-json-u8"][0].read_bytes())["inputs"][0]
    assert v2["datatype"] == "UINT8" and v2["shape"] == list(pixels.shape)
    assert v2["data"] == pixels.ravel().tolist()
    path, _, extra = reqs["v2-binary-u8"]
    header_len = int(extra.split('"')[-2])
    raw = path.read_bytes()
    head = json.loads(raw[:header_len])["inputs"][0]
    assert head["parameters"]["binary_data_size"] == pixels.nbytes
    np.testing.assert_array_equal(np.frombuffer(raw[header_len:], np.uint8), pixels.ravel())
    floats = np.array(json.loads(reqs["native-float"][0].read_bytes())["instances"])
    np.testing.assert_allclose(floats, pixels / 255, atol=5e-5)
