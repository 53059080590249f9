"""`notsure import` on tiny ONNX classifiers built node by node: what it writes, how the service
then serves the model (normalisation, output kind, fixed batch, resizing, calibrated or not),
and how wrong inputs fail: with the fix named and no half-written version left behind."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from scipy import stats
from typer.testing import CliRunner

from notsure.cli import app as cli
from service.config import Settings
from service.imaging import resized
from service.main import create_app
from service.manifest import MANIFEST_FILE, Manifest
from tests.training.graphs import linear_classifier, not_a_classifier, softmax
from training.importer import ImportConfig, ImportFailed, import_model

MODELS = Path(__file__).resolve().parents[2] / "models"


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root: Path, names: list[str], per_class: int, shape: tuple[int, int]) -> Path:
    """An ImageFolder tree of random grey PNGs."""
    g = np.random.default_rng(1)
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.png").write_bytes(_png(g.integers(0, 256, shape, np.uint8)))
    return root


def test_cli_imports_an_image_folder_and_the_service_normalises(tmp_path: Path) -> None:
    w = linear_classifier(tmp_path / "m.onnx", ("batch", 1, 8, 8), 3)
    data = _folder(tmp_path / "heldout", ["cat", "dog", "owl"], 40, (8, 8))
    repo = tmp_path / "models"
    r = CliRunner().invoke(
        cli,
        ["import", str(tmp_path / "m.onnx"), "--name", "grey", "--data", str(data),
         "--mean", "0.5", "--std", "0.25", "--target-clean-refuse", "0.1",
         "--repository", str(repo)],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    m = Manifest.load(repo / "grey" / "1" / MANIFEST_FILE)
    assert m.classes == ["cat", "dog", "owl"] and m.input_shape == (1, 8, 8)
    assert m.normalize is not None and m.normalize.mean == [0.5] and m.normalize.std == [0.25]
    assert m.calibrated and m.batch_size is None and m.output == "logits"
    assert m.score == "confidence" and m.guarantee is None
    # T refuses 10% of the images it was chosen on (kernel sigma fitted on none of them: the
    # confidence is served, so all 120 images choose T).
    assert m.metrics["heldout_samples"] == 120
    assert m.metrics["heldout_refuse_rate"] == pytest.approx(0.1)
    assert not [p for p in repo.iterdir() if p.name.startswith(".")]

    img = np.random.default_rng(7).integers(0, 256, (8, 8), np.uint8)
    want = softmax(((img / 255.0 - 0.5) / 0.25).reshape(1, 64) @ w)[0]
    with TestClient(create_app(Settings(model_repository=repo))) as c:
        body = {"instances": [base64.b64encode(_png(img)).decode()]}
        p = c.post("/v1/models/grey/predict", json=body).json()["predictions"][0]
        assert p["confidence"] == pytest.approx(want.max(), rel=1e-5)
        accepted = want.max() >= m.threshold
        assert p["decision"] == ("accepted" if accepted else "not_sure")
        assert p["class_name"] == (["cat", "dog", "owl"][int(want.argmax())] if accepted else None)
        listed = c.get("/v1/models").json()["models"]
        assert listed == [{**listed[0], "name": "grey", "calibrated": True, "ready": True}]


def test_probability_output_with_the_refuse_rate_guarantee(tmp_path: Path) -> None:
    w = linear_classifier(tmp_path / "p.onnx", ("batch", 1, 6, 6), 4, softmax=True)
    x = np.random.default_rng(2).random((300, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)  # no labels
    cfg = ImportConfig(model=tmp_path / "p.onnx", name="probs", data=tmp_path / "x.npz",
                       output="probabilities", confidence=0.95,
                       repository=tmp_path / "r")  # fmt: skip
    m = import_model(cfg).manifest
    assert m.guarantee is not None and m.guarantee.rule == "clean_refuse"
    assert m.guarantee.n == 300 and "energy" not in m.score_thresholds
    # The exact binomial bound: T refuses k - 1 images, the largest k with
    # P(Binomial(300, 0.05) <= k - 1) <= 5%.
    k = max(k for k in range(1, 301) if stats.binom.cdf(k - 1, 300, 0.05) <= 0.05)
    assert m.metrics["heldout_refuse_rate"] == pytest.approx((k - 1) / 300)
    probe = x[:5]
    want = softmax(probe.reshape(5, 36) @ w)
    with TestClient(create_app(Settings(model_repository=tmp_path / "r"))) as c:
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [5, 1, 6, 6],
                            "data": probe.ravel().tolist()}]}  # fmt: skip
        out = {o["name"]: o for o in c.post("/v2/models/probs/infer", json=body).json()["outputs"]}
    got = np.asarray(out["probabilities"]["data"]).reshape(5, 4)
    np.testing.assert_allclose(got, want, atol=1e-6)
    with pytest.raises(ImportFailed, match="--target-risk needs labelled"):
        import_model(ImportConfig(**{**cfg.__dict__, "confidence": None, "target_risk": 0.1}))


def test_fixed_batch_rgb_model_with_a_hand_set_threshold(tmp_path: Path) -> None:
    w = linear_classifier(tmp_path / "f.onnx", (1, 3, 16, 16), 5)
    repo = tmp_path / "models"
    cfg = ImportConfig(model=tmp_path / "f.onnx", name="rgb", threshold=0.3,
                       mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4), resize="center_crop",
                       repository=repo)  # fmt: skip
    m = import_model(cfg).manifest
    assert m.batch_size == 1 and not m.calibrated and m.threshold_rule.startswith("set by hand")
    assert m.input_shape == (3, 16, 16) and m.resize == "center_crop" and m.resize_by_default
    x = np.random.default_rng(3).random((3, 3, 16, 16)).astype(np.float32)
    mean, std = np.array([0.4, 0.5, 0.6])[:, None, None], np.array([0.2, 0.3, 0.4])[:, None, None]
    want = softmax(((x - mean) / std).reshape(3, -1) @ w)
    photo = np.random.default_rng(4).integers(0, 256, (40, 70, 3), np.uint8)  # 70 wide, 40 high
    crop = np.asarray(resized(Image.fromarray(photo), (16, 16), "center_crop"), np.float64) / 255
    want_photo = softmax(((crop.transpose(2, 0, 1) - mean) / std).reshape(1, -1) @ w)[0]
    with TestClient(create_app(Settings(model_repository=repo))) as c:
        assert c.app.state.notsure.repository.get("rgb").batcher.max_batch == 1  # type: ignore[attr-defined]
        # Three images in one request through a graph that takes one at a time.
        r = c.post("/v1/models/rgb/predict", json={"instances": x.tolist()}).json()
        got = [p["confidence"] for p in r["predictions"]]
        np.testing.assert_allclose(got, want.max(axis=1), rtol=1e-5)
        # An upload of another size is centre-cropped without the request asking.
        files = {"files": ("p.png", _png(photo), "image/png")}
        p = c.post("/v1/models/rgb/predict/files", files=files).json()["predictions"][0]
        assert p["confidence"] == pytest.approx(want_photo.max(), rel=1e-5)
        listed = c.get("/v1/models").json()["models"][0]
        assert listed["calibrated"] is False
        assert c.get("/v2/models/rgb").json()["parameters"]["calibrated"] is False


def test_center_crop_keeps_the_middle() -> None:
    """A 32x64 image, red in its outer 12 columns and green between: the 16x16 centre crop
    (shorter side to 16 / 0.875 = 18, so 37 wide) holds original columns ~17-46, all green."""
    img = np.zeros((32, 64, 3), np.uint8)
    img[:, :12, 0] = img[:, 52:, 0] = 255
    img[:, 12:52, 1] = 255
    out = np.asarray(resized(Image.fromarray(img), (16, 16), "center_crop"))
    assert out.shape == (16, 16, 3)
    assert (out[..., 1] == 255).all() and (out[..., 0] == 0).all()
    stretched = np.asarray(resized(Image.fromarray(img), (16, 16), "stretch"))
    assert stretched[:, 0, 0].min() == 255  # the red edge survives a stretch


def test_dynamic_spatial_size_comes_from_the_size_flag(tmp_path: Path) -> None:
    linear_classifier(tmp_path / "d.onnx", ("b", 3, "h", "w"), 3, pool=True)
    base = ImportConfig(model=tmp_path / "d.onnx", name="dyn", threshold=0.5,
                        repository=tmp_path / "r")  # fmt: skip
    with pytest.raises(ImportFailed, match=r"dynamic .*give --size HxW"):
        import_model(base)
    m = import_model(ImportConfig(**{**base.__dict__, "size": (12, 10)})).manifest
    assert m.input_shape == (3, 12, 10) and m.version == 1
    assert import_model(ImportConfig(**{**base.__dict__, "size": (12, 10)})).manifest.version == 2


def _bad_classes(tmp: Path) -> ImportConfig:
    linear_classifier(tmp / "m.onnx", ("b", 1, 8, 8), 3)
    (tmp / "classes.txt").write_text("shoe\nbag\n")
    np.savez(tmp / "x.npz", x=np.zeros((20, 8, 8), np.uint8))
    return ImportConfig(model=tmp / "m.onnx", name="bad", data=tmp / "x.npz",
                        classes=tmp / "classes.txt")  # fmt: skip


def _nan(tmp: Path) -> ImportConfig:
    linear_classifier(tmp / "m.onnx", ("b", 1, 8, 8), 3, nan=True)
    np.savez(tmp / "x.npz", x=np.random.default_rng(0).random((20, 8, 8)))
    return ImportConfig(model=tmp / "m.onnx", name="bad", data=tmp / "x.npz")


def _not_classifier(tmp: Path) -> ImportConfig:
    not_a_classifier(tmp / "m.onnx")
    return ImportConfig(model=tmp / "m.onnx", name="bad", threshold=0.5)


def _dynamic(tmp: Path) -> ImportConfig:
    linear_classifier(tmp / "m.onnx", ("b", 1, "h", "w"), 3, pool=True)
    return ImportConfig(model=tmp / "m.onnx", name="bad", threshold=0.5)


def _mean_wrong_length(tmp: Path) -> ImportConfig:
    linear_classifier(tmp / "m.onnx", ("b", 3, 4, 4), 3)
    return ImportConfig(model=tmp / "m.onnx", name="bad", threshold=0.5, mean=(0.5,), std=(0.2,))


def _bad_name(tmp: Path) -> ImportConfig:
    linear_classifier(tmp / "m.onnx", ("b", 1, 4, 4), 3)
    return ImportConfig(model=tmp / "m.onnx", name="My Model", threshold=0.5)


WRONG = {
    # what is wrong: (how to make it, what the message must say)
    "not_an_image_classifier": (_not_classifier, "an image classifier takes float32"),
    "dynamic_size_without_size": (_dynamic, "give --size HxW"),
    "class_count_mismatch": (_bad_classes, "lists 2 names but the model has 3 outputs"),
    "nan_outputs": (_nan, "NaN or infinite outputs .* check --mean/--std"),
    "mean_per_channel": (_mean_wrong_length, "need 3 comma-separated values"),
    "bad_name": (_bad_name, "use 1-64 lower-case letters"),
}


@pytest.mark.parametrize("case", sorted(WRONG))
def test_wrong_inputs_fail_with_the_fix_and_leave_nothing(tmp_path: Path, case: str) -> None:
    make, message = WRONG[case]
    repo = tmp_path / "models"
    repo.mkdir()
    (repo / "other").mkdir()  # an existing model's folder stays as it is
    cfg = ImportConfig(**{**make(tmp_path).__dict__, "repository": repo})
    with pytest.raises(ImportFailed, match=message):
        import_model(cfg)
    assert sorted(p.name for p in repo.rglob("*")) == ["other"]


def test_cli_reports_a_wrong_input_as_a_usage_error(tmp_path: Path) -> None:
    cfg = _bad_classes(tmp_path)
    r = CliRunner().invoke(
        cli,
        ["import", str(cfg.model), "--name", "bad", "--data", str(cfg.data), "--classes",
         str(cfg.classes), "--repository", str(tmp_path / "models")],
    )  # fmt: skip
    text = " ".join(r.output.replace("│", " ").split())  # rich wraps it in a box
    assert r.exit_code == 2 and "give one class name for each output" in text
    assert not (tmp_path / "models" / "bad").exists()


@pytest.mark.parametrize("path", sorted(MODELS.glob("*/*/" + MANIFEST_FILE)), ids=str)
def test_bundled_manifests_load_with_the_defaults(path: Path) -> None:
    """Every bundled manifest, as written before the import fields existed (those keys
    dropped), loads with the defaults the models notsure trains need, and as it stands says
    the same."""
    raw = json.loads(path.read_text())
    newer = ("normalize", "resize", "resize_by_default", "output_name", "batch_size", "calibrated")
    old = Manifest.model_validate({k: v for k, v in raw.items() if k not in newer})
    for m in (old, Manifest.load(path)):
        assert (m.normalize, m.resize, m.resize_by_default, m.output_name, m.batch_size) == (
            None, "stretch", False, None, None
        )  # fmt: skip
        assert m.calibrated


def test_refuse_rate_on_fresh_images_is_inside_the_binomial_interval(tmp_path: Path) -> None:
    """Calibrated to refuse 5% of 5,000 held-out images, the served model refuses a share of
    2,000 fresh images from the same distribution inside Binomial(2000, 0.05)'s 95% interval."""
    linear_classifier(tmp_path / "m.onnx", ("b", 1, 8, 8), 10, seed=5)
    g = np.random.default_rng(11)
    np.savez(tmp_path / "cal.npz", x=g.integers(0, 256, (5000, 8, 8), np.uint8))
    fresh = g.integers(0, 256, (2000, 8, 8), np.uint8)
    repo = tmp_path / "models"
    import_model(ImportConfig(model=tmp_path / "m.onnx", name="iid", data=tmp_path / "cal.npz",
                              repository=repo))  # fmt: skip
    with TestClient(create_app(Settings(model_repository=repo, max_instances=2000))) as c:
        r = c.post("/v1/models/iid/predict", json={"instances": fresh.tolist()}).json()
    refused = sum(p["decision"] == "not_sure" for p in r["predictions"])
    lo, hi = stats.binom.ppf([0.025, 0.975], 2000, 0.05)
    assert lo <= refused <= hi, (refused, lo, hi)
