"""The worked examples of docs/your-model.md end to end, in tiny versions: a model trained and
exported by a plain PyTorch script, a scikit-learn model exported with skl2onnx, and an
RGB fixed-batch ImageNet model (the real EfficientNet-Lite0 when its package is installed, else
a stand-in of the same shape), each imported with `notsure import` and asked through the native
API, KServe V2 over HTTP and over gRPC (tritonclient as the independent client). Expected
answers come from the ONNX file run directly by onnxruntime on inputs prepared by hand."""

from __future__ import annotations

import importlib.util
import io
import sys
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from service.config import Settings
from tests.conftest import LiveServer
from tests.training.graphs import linear_classifier, softmax
from training.importer import ImportConfig, import_model

tritonclient_http = pytest.importorskip("tritonclient.http")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")

pytestmark = [pytest.mark.integration, pytest.mark.slow]
EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def example(name: str) -> ModuleType:
    """A script of docs/examples, imported as a module."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def raw_probabilities(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    """The graph itself, on an input prepared by the caller, then a softmax unless it ends in
    probabilities already (more than one output: skl2onnx's label, probabilities)."""
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: x})
    return np.asarray(outs[1]) if len(outs) > 1 else softmax(np.asarray(outs[0], np.float64))


def ask_everywhere(server: LiveServer, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """Probabilities and labels (-1: NOT SURE) of (B, C, H, W) pixels in [0, 1] over the
    native API, V2 HTTP and V2 gRPC; the three must agree on every image."""
    r = httpx.post(f"{server.url}/v1/models/{name}/predict", json={"instances": x.tolist()})
    assert r.status_code == 200, r.text
    native = [p["label"] if p["decision"] == "accepted" else -1 for p in r.json()["predictions"]]
    answers, calibrated = {}, {}
    for mod, client in (
        (tritonclient_http, tritonclient_http.InferenceServerClient(f"127.0.0.1:{server.port}")),
        (tritonclient_grpc, tritonclient_grpc.InferenceServerClient(server.grpc_target)),
    ):
        inp = mod.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x.astype(np.float32))
        result = client.infer(name, [inp])
        answers[mod.__name__] = (result.as_numpy("label"), result.as_numpy("probabilities"))
        resp = result.get_response()  # HTTP: a dict; gRPC: a ModelInferResponse
        calibrated[mod.__name__] = (
            resp["parameters"]["calibrated"]
            if isinstance(resp, dict)
            else resp.parameters["calibrated"].bool_param
        )
        client.close()
    (lh, ph), (lg, pg) = answers.values()
    np.testing.assert_array_equal(lh, native)
    np.testing.assert_array_equal(lg, native)
    np.testing.assert_array_equal(ph, pg)
    assert len(set(calibrated.values())) == 1
    return {"label": lh, "probabilities": ph, "calibrated": np.array(calibrated.popitem()[1])}


def test_pytorch_script_and_sklearn_models(tmp_path: Path) -> None:
    fashion, digits = example("fashion_cnn"), example("digits_sklearn")
    fashion.main(None, tmp_path / "fashion", 20)  # the script's own loop, on random images
    digits.main(tmp_path / "digits")
    repo = tmp_path / "models"
    f = tmp_path / "fashion"
    import_model(ImportConfig(model=f / "fashion_cnn.onnx", name="fashion-cnn",
                              data=f / "heldout.npz", mean=(fashion.MEAN,), std=(fashion.STD,),
                              classes=f / "classes.txt", repository=repo))  # fmt: skip
    d = tmp_path / "digits"
    import_model(ImportConfig(model=d / "digits.onnx", name="digits", data=d / "heldout.npz",
                              size=(8, 8), channels=1, mean=(0.0,), std=(0.0625,),
                              output="probabilities", repository=repo))  # fmt: skip

    with LiveServer(Settings(model_repository=repo)) as server:
        fresh = np.load(f / "fresh.npz")["x"][:6]  # (6, 28, 28) uint8
        x = (fresh / 255.0).astype(np.float32)[:, None]
        got = ask_everywhere(server, "fashion-cnn", x)
        assert got["calibrated"]
        want = raw_probabilities(
            f / "fashion_cnn.onnx", ((x - fashion.MEAN) / fashion.STD).astype(np.float32)
        )
        np.testing.assert_allclose(got["probabilities"], want, atol=1e-5)

        xd = np.load(d / "heldout.npz")["x"][:5].astype(np.float32)[:, None]  # 0-16 / 16
        got = ask_everywhere(server, "digits", xd)
        want = raw_probabilities(d / "digits.onnx", (xd * 16).reshape(5, 64))
        np.testing.assert_allclose(got["probabilities"], want, atol=1e-5)


CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


def _imagenet_model(tmp: Path) -> tuple[Path, Path, bool]:
    """The real EfficientNet-Lite0 (export, class names, photos) when its packages are there,
    else a stand-in: a fixed-batch (1, 3, 224, 224) graph of ten classes."""
    try:
        eff = example("efficientnet_lite0")
        eff.load_net()
        import skimage  # noqa: F401
    except ImportError:
        linear_classifier(tmp / "m.onnx", (1, 3, 224, 224), 10, pool=True)
        (tmp / "classes.txt").write_text("\n".join(f"thing {i}" for i in range(10)) + "\n")
        return tmp / "m.onnx", tmp / "classes.txt", False
    eff.main(tmp)
    return tmp / "efficientnet_lite0.onnx", tmp / "imagenet_classes.txt", True


def _jpeg(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_imagenet_model_with_a_fixed_batch_of_one(tmp_path: Path) -> None:
    model, classes, real = _imagenet_model(tmp_path)
    repo = tmp_path / "models"
    m = import_model(ImportConfig(model=model, name="imagenet", mean=IMAGENET_MEAN,
                                  std=IMAGENET_STD, classes=classes, resize="center_crop",
                                  threshold=0.2, score="confidence",
                                  repository=repo)).manifest  # fmt: skip
    assert m.batch_size == 1 and m.input_shape == (3, 224, 224) and not m.calibrated
    noise = np.random.default_rng(0).integers(0, 256, (300, 400, 3), np.uint8)
    photo = np.asarray(Image.open(tmp_path / "photos" / "chelsea.jpg")) if real else noise
    with LiveServer(Settings(model_repository=repo)) as server:
        # JPEG uploads of any size: centre-cropped to 224x224 by the service, one at a time.
        files = [("files", (f"{i}.jpg", _jpeg(p), "image/jpeg")) for i, p in
                 enumerate((photo, noise))]  # fmt: skip
        r = httpx.post(f"{server.url}/v1/models/imagenet/predict/files", files=files, timeout=60)
        assert r.status_code == 200, r.text
        cat, _ = r.json()["predictions"]
        # V2 (HTTP and gRPC) take the 224x224 pixels; two in one request.
        x = np.random.default_rng(1).random((2, 3, 224, 224)).astype(np.float32)
        got = ask_everywhere(server, "imagenet", x)
        assert not got["calibrated"]  # T set by hand, in the V2 HTTP and gRPC responses
        meta = httpx.get(f"{server.url}/v2/models/imagenet").json()
        assert meta["parameters"]["calibrated"] is False
    mean, std = np.array(IMAGENET_MEAN)[:, None, None], np.array(IMAGENET_STD)[:, None, None]
    want = np.concatenate([raw_probabilities(model, ((xi[None] - mean) / std).astype(np.float32))
                           for xi in x])  # fmt: skip
    np.testing.assert_allclose(got["probabilities"], want, atol=1e-5)
    if real:
        assert cat["decision"] == "accepted" and cat["class_name"] in CAT_CLASSES, cat
