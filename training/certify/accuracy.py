"""`notsure certify eval`: certified accuracy and certified handled on a test set, per model
and eps, from the bound graph (onnxruntime, as a service would run it) or the torch bounds.

Per test image x with true label y, over every x' in the L-inf ball of radius eps around x (cut
to [0, 1]), from the margin bounds M[c, j] <= s_c(x') - s_j(x') of the served logits s:
  certified:  every x' is labelled y (M[y, j] > 0 for all j != y);
  handled:    every x' is labelled y or answered NOT SURE at the model's threshold T. A wrong
              class j can never be the accepted answer when it can never be the argmax (some
              M[k, j] > 0) or when its confidence stays below T everywhere:
              p_j(x') = 1 / sum_k exp(s_k - s_j) <= 1 / sum_k exp(M[k, j]) < T.
              This holds for the confidence score and for the J-score (J = confidence x kernel
              non-ME, the kernel factor is <= 1); for other scores only `certified` is reported.
Also, the per-request policy at x itself: an answer is accepted only when the score passes T
*and* the predicted label is certified on the ball around the input (clean refusals and the
accuracy of what is accepted).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from service.certify import certified_labels
from training.progress import progress_bar

log = logging.getLogger(__name__)

Margins = npt.NDArray[np.float32]  # (N, L, L): [n, c, j] lower bound of s_c - s_j
BoundFn = Callable[[npt.NDArray[np.float32], float], Margins]
THRESHOLD_SCORES = ("confidence", "j_score")  # scores bounded above by the confidence


@dataclass(frozen=True)
class CertifiedResult:
    model: str
    eps: float
    images: int
    backend: str
    clean_accuracy: float  # served argmax at x
    certified_accuracy: float  # every x' in the ball labelled y
    certified_handled: float | None  # every x' labelled y or NOT SURE at T (None: score unbounded)
    score: str
    threshold: float
    accept_rate: float  # clean x accepted at T (no certificate asked)
    policy_accept_rate: float  # clean x accepted at T and certified at its predicted label
    policy_accepted_accuracy: float  # accuracy of those answers (nan when none)
    wall_time_s: float


def never_accepted(margins: Margins, threshold: float) -> npt.NDArray[np.bool_]:
    """(N, L): True where class j is the accepted answer at no point of the ball."""
    beaten = (margins > 0).any(axis=1)  # some k with s_k > s_j everywhere: j is never argmax
    m = margins.astype(np.float64)
    top = m.max(axis=1, keepdims=True)  # (N, 1, L); log sum_k exp(M[k, j]), stably
    log_denominator = top[:, 0] + np.log(np.exp(m - top).sum(axis=1))
    confidence_upper = np.exp(-log_denominator)  # includes k = j, where M[j, j] = 0
    return np.asarray(beaten | (confidence_upper < threshold))


def handled(
    margins: Margins, labels: npt.NDArray[np.int64], threshold: float
) -> npt.NDArray[np.bool_]:
    """(N,): True where no wrong class can be accepted anywhere in the ball."""
    ok = never_accepted(margins, threshold)
    ok[np.arange(len(labels)), labels] = True  # the true class may be accepted
    return np.asarray(ok.all(axis=1))


def onnx_bounds(path: Path) -> BoundFn:
    """Margin bounds from the exported bound graph, with onnxruntime."""
    from training.certify.graph import run_graph, session

    sess = session(path)
    return lambda x, eps: run_graph(sess, x, eps).margins


def torch_bounds(model_dir: Path) -> BoundFn:
    """Margin bounds from the torch network of a model version."""
    import torch

    from training.certify.bounds import ibp
    from training.modelio import load_torch_model

    net, manifest = load_torch_model(model_dir)

    def run(x: npt.NDArray[np.float32], eps: float) -> Margins:
        with torch.no_grad():
            b = ibp(net, torch.from_numpy(x), eps, manifest.objective)
        return b.margins.numpy()

    return run


def evaluate(
    model_dir: Path,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    eps_values: tuple[float, ...],
    backend: str = "onnx",
    certify_path: Path | None = None,
    batch: int = 250,
) -> list[CertifiedResult]:
    """Certified figures of one model version on (x, y), one result per eps."""
    import onnxruntime as ort

    from service.manifest import MODEL_FILE
    from service.scoring import score_logits
    from training.modelio import load_manifest

    manifest = load_manifest(model_dir)
    if manifest.score == "k_density":
        raise ValueError(
            f"{model_dir}: the k_density score needs the kernel set; evaluate the certificate "
            "with a manifest whose score is confidence, j_score or energy"
        )
    if backend == "onnx":
        if certify_path is None or not certify_path.exists():
            raise FileNotFoundError(
                f"{certify_path}: no bound graph; run `notsure certify export {model_dir}` "
                "first, or pass --backend torch"
            )
        bounds = onnx_bounds(certify_path)
    elif backend == "torch":
        bounds = torch_bounds(model_dir)
    else:
        raise ValueError(f"unknown backend {backend!r}; use onnx or torch")
    plain = ort.InferenceSession(str(model_dir / MODEL_FILE), providers=["CPUExecutionProvider"])
    scores_at_x = [
        score_logits(
            plain.run(["logits"], {"input": x[i : i + batch]})[0], manifest.kernel, manifest.score
        )
        for i in range(0, len(x), batch)
    ]
    label = np.concatenate([s.label for s in scores_at_x])
    accepted = np.concatenate([s.score for s in scores_at_x]) >= manifest.threshold
    results = []
    for eps in eps_values:
        t0 = time.perf_counter()
        cert, hand, cert_pred = [], [], []
        with progress_bar(f"certify {manifest.name} eps {eps:g}", total=len(x)) as bar:
            for i in range(0, len(x), batch):
                m = bounds(x[i : i + batch], eps)
                labels_ok = certified_labels(m)
                rows = np.arange(len(m))
                cert.append(labels_ok[rows, y[i : i + batch]])
                cert_pred.append(labels_ok[rows, label[i : i + batch]])
                hand.append(handled(m, y[i : i + batch], manifest.threshold))
                bar.advance(len(m))
        policy = accepted & np.concatenate(cert_pred)
        bounded_score = manifest.score in THRESHOLD_SCORES
        results.append(
            CertifiedResult(
                model=f"{manifest.name}/{manifest.version}",
                eps=eps,
                images=len(x),
                backend=backend,
                clean_accuracy=float((label == y).mean()),
                certified_accuracy=float(np.concatenate(cert).mean()),
                certified_handled=float(np.concatenate(hand).mean()) if bounded_score else None,
                score=manifest.score,
                threshold=manifest.threshold,
                accept_rate=float(accepted.mean()),
                policy_accept_rate=float(policy.mean()),
                policy_accepted_accuracy=float((label[policy] == y[policy]).mean())
                if policy.any()
                else float("nan"),
                wall_time_s=time.perf_counter() - t0,
            )
        )
        log.info("%s", json.dumps(asdict(results[-1])))
    return results


@dataclass(frozen=True)
class EvalConfig:
    model_dir: Path = Path("models/mnist-cnn-ce-at/1")
    eps: tuple[float, ...] = (0.1, 0.2, 0.3)
    dataset: str | None = None  # None: the data set the manifest names
    data_dir: Path = Path("data")
    limit: int = 0  # first N test images; 0: all
    backend: str = "onnx"  # onnx: certify.onnx beside model.onnx; torch: the weights
    out: Path | None = None  # JSON results (with date and machine)
    dry_run: bool = False  # the synthetic test set instead of the real one

    @classmethod
    def tiny(cls, **given: object) -> EvalConfig:
        """The synthetic test set's first 64 images at one radius."""
        from dataclasses import replace

        return replace(cls(eps=(0.1,), limit=64, dry_run=True), **given)  # type: ignore[arg-type]


def run(cfg: EvalConfig) -> list[CertifiedResult]:
    """Load the test set, evaluate, write cfg.out when given."""
    import datetime as dt
    import os
    import platform

    from service.manifest import CERTIFY_FILE
    from training import data as data_mod
    from training.modelio import load_manifest

    manifest = load_manifest(cfg.model_dir)
    name = cfg.dataset or (manifest.training.dataset if manifest.training else "mnist")
    if cfg.dry_run:
        name = "synthetic"
        test = data_mod.synthetic(256, seed=2, shape=manifest.input_shape)
    else:
        test = data_mod.load(name, cfg.data_dir, train=False)
    n = cfg.limit or len(test)
    x = test.x[:n].numpy().astype(np.float32)
    y = test.y[:n].numpy().astype(np.int64)
    results = evaluate(cfg.model_dir, x, y, cfg.eps, cfg.backend, cfg.model_dir / CERTIFY_FILE)
    if cfg.out is not None:
        meta = {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU",
            "dataset": name,
        }
        cfg.out.parent.mkdir(parents=True, exist_ok=True)
        rows = [asdict(r) for r in results]
        cfg.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2, default=str))
    return results
