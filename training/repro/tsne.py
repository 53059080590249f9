"""Fig. 2: t-SNE of the final hidden vectors of 1,000 MNIST training images, CE vs RCE.

The networks are the bundled ResNet-32 models (models/<name>/<version>, weights checked against
the manifest's sha256), or any training run folder. Besides the picture, two numbers make the
comparison checkable: the silhouette score of the classes (in the 2-D embedding and in the
feature space itself) and the leave-one-out 5-nearest-neighbour accuracy in feature space.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from service.manifest import MANIFEST_FILE
from training import data as data_mod
from training.evaluation import num, pct, table
from training.repro.common import Output, update_section, write_json

log = logging.getLogger(__name__)

NAME = "tsne"


@dataclass(frozen=True)
class TsneConfig:
    models: tuple[Path, Path] = (
        Path("models/mnist-resnet32-ce/1"),
        Path("models/mnist-resnet32-rce/1"),
    )
    dataset: str = "mnist"
    data_dir: Path = Path("data")
    samples: int = 1000
    perplexity: float = 30.0
    seed: int = 0
    threads: int = 1
    dry_run: bool = False

    @classmethod
    def tiny(cls, models: tuple[Path, Path], **overrides: object) -> TsneConfig:
        base = cls(models=models, dataset="synthetic", samples=120, perplexity=10.0, dry_run=True)
        return replace(base, **overrides)


def tiny_models(runs_dir: Path) -> tuple[Path, Path]:
    """Two MLPs (CE, RCE) trained for a few steps on the synthetic set: for --dry-run."""
    from training.train import TrainConfig, train

    paths = []
    for objective in ("ce", "rce"):
        out = runs_dir / f"tiny-mlp-{objective}"
        train(
            TrainConfig(
                dataset="synthetic",
                arch="mlp",
                objective=objective,
                steps=30,
                batch_size=32,
                optimizer="adam",
                lr=1e-3,
                weight_decay=0.0,
                eval_every=30,
                checkpoint_every=1000,
                out_dir=out,
                dry_run=True,
            )
        )
        paths.append(out)
    return paths[0], paths[1]


@dataclass(frozen=True)
class LoadedNet:
    net: nn.Module
    objective: str
    architecture: str
    description: str  # where the weights came from, for the report


def load_net(path: Path) -> LoadedNet:
    """A model version folder (manifest + checked weights) or a `notsure train` run folder."""
    if (path / MANIFEST_FILE).exists():
        from training.modelio import load_torch_model

        net, manifest = load_torch_model(path)
        acc = manifest.metrics.get("clean_test_accuracy")
        return LoadedNet(
            net,
            manifest.objective,
            manifest.architecture,
            f"{path} (test accuracy {pct(acc)}, weights sha256 checked)",
        )
    from training.export import load_run

    net, cfg, result = load_run(path)
    return LoadedNet(
        net,
        str(cfg["objective"]),
        str(cfg["arch"]),
        f"{path} (run folder, test accuracy {pct(result['test_accuracy'])})",
    )


@torch.no_grad()
def hidden_vectors(net: nn.Module, x: torch.Tensor) -> np.ndarray:
    """The final hidden vector `net.features(x)`: (N, C, H, W) -> (N, D)."""
    net.eval()
    parts = [net.features(x[i : i + 250]) for i in range(0, len(x), 250)]
    return torch.cat(parts).numpy().astype(np.float64)


def knn_accuracy(features: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Leave-one-out k-nearest-neighbour accuracy (Euclidean) of the class labels."""
    from sklearn.neighbors import KNeighborsClassifier

    clf = KNeighborsClassifier(n_neighbors=k + 1).fit(features, labels)
    idx = clf.kneighbors(features, return_distance=False)[:, 1:]  # drop the point itself
    votes = labels[idx]  # (N, k)
    pred = np.array([np.bincount(v, minlength=labels.max() + 1).argmax() for v in votes])
    return float((pred == labels).mean())


def _sample(cfg: TsneConfig) -> data_mod.TensorData:
    """`samples` training images chosen with a seeded permutation (not the first ones)."""
    if cfg.dry_run or cfg.dataset == "synthetic":
        full = data_mod.synthetic(512, seed=cfg.seed)
    else:
        full = data_mod.load(cfg.dataset, cfg.data_dir, train=True)
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(cfg.seed))
    return full.subset(perm[: cfg.samples])


def run(cfg: TsneConfig, out: Output) -> dict[str, object]:
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ds = _sample(cfg)
    labels = ds.y.numpy()
    results: dict[str, dict[str, object]] = {}
    for path in cfg.models:
        loaded = load_net(path)
        t0 = time.perf_counter()
        feats = hidden_vectors(loaded.net, ds.x)  # (N, D)
        emb = TSNE(
            n_components=2,
            perplexity=cfg.perplexity,
            init="pca",
            learning_rate="auto",
            random_state=cfg.seed,
        ).fit_transform(feats)
        results[loaded.objective] = {
            "model": loaded.description,
            "architecture": loaded.architecture,
            "feature_dim": int(feats.shape[1]),
            "silhouette_embedding": float(silhouette_score(emb, labels)),
            "silhouette_features": float(silhouette_score(feats, labels)),
            "knn5_accuracy_features": knn_accuracy(feats, labels),
            "seconds": time.perf_counter() - t0,
            "embedding": emb.T.round(2),  # (2, N): x row, y row
        }
        log.info("t-SNE of %s done in %.1f s", path, results[loaded.objective]["seconds"])
    summary: dict[str, object] = {
        "experiment": NAME,
        "dataset": "synthetic" if cfg.dry_run else cfg.dataset,
        "settings": asdict(cfg),
        "labels": labels,
        "models": results,
    }
    write_json(out.json_path(NAME), summary)
    _plot(results, labels, out.png_path(NAME))
    update_section(
        out.report,
        NAME,
        "Fig. 2: t-SNE of the final hidden vectors, CE vs RCE",
        _markdown(summary, out),
    )
    return summary


def _plot(results: dict[str, dict[str, object]], labels: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.8))
    for ax, (obj, r) in zip(np.atleast_1d(axes), results.items(), strict=True):
        emb = np.asarray(r["embedding"]).T  # (N, 2)
        sc = ax.scatter(emb[:, 0], emb[:, 1], c=labels, cmap="tab10", s=5, vmin=-0.5, vmax=9.5)
        ax.set_title(
            f"{obj.upper()} ({r['architecture']}), silhouette "
            f"{float(r['silhouette_embedding']):.2f}"
        )
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(sc, ax=axes, ticks=range(10), label="class")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _markdown(summary: dict[str, object], out: Output) -> str:
    results: dict[str, dict[str, object]] = summary["models"]
    settings: dict[str, object] = summary["settings"]
    rows = [
        [
            obj.upper(),
            str(r["model"]),
            str(r["feature_dim"]),
            num(r["silhouette_embedding"]),
            num(r["silhouette_features"]),
            pct(r["knn5_accuracy_features"], 1),
        ]
        for obj, r in results.items()
    ]
    return "\n".join(
        [
            f"{settings['samples']} {summary['dataset']} training images (seeded random "
            f"choice, seed {settings['seed']}); `net.features(x)`, the vector fed to the last "
            "linear layer; "
            f"scikit-learn TSNE, perplexity {settings['perplexity']}, PCA init, seed "
            f"{settings['seed']}. Silhouette scores use the true classes (1 = tight, separated "
            "clusters; 0 = overlapping); kNN is leave-one-out 5-nearest-neighbour accuracy.",
            "",
            table(
                [
                    "net",
                    "weights",
                    "dim",
                    "silhouette (t-SNE)",
                    "silhouette (features)",
                    "5-NN accuracy",
                ],
                rows,
            ),
            "",
            f"![t-SNE]({out.link(out.png_path(NAME))})",
            "",
            f"Data (embeddings and labels): [{NAME}.json]({out.link(out.json_path(NAME))}).",
        ]
    )
