"""What an ONNX classifier's graph and `notsure import`'s flags say about its input and output:
channels, size, fixed batch, which output, class names, normalisation; every contradiction
between them an `ImportFailed` that names the fix."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from service.imaging import ResizeMode
from service.preprocess import ModelIO
from service.scoring import ScoreName
from training.heldout import Heldout

OutputKind = Literal["logits", "neg_logits", "probabilities"]


class ImportFailed(ValueError):
    """The model or its data cannot be imported as given; the message names the fix."""


@dataclass(frozen=True)
class ImportConfig:
    model: Path  # the ONNX file
    name: str
    data: Path | None = None  # ImageFolder tree or .npz; None only with `threshold`
    mean: tuple[float, ...] | None = None  # per channel, for pixels in [0, 1]
    std: tuple[float, ...] | None = None
    size: tuple[int, int] | None = None  # (H, W); None: the graph's
    channels: int | None = None  # None: the graph's
    classes: Path | None = None  # one class name a line
    output: OutputKind = "logits"
    score: ScoreName | None = None  # None: j_score for negated logits, else confidence
    target_clean_refuse: float = 0.05
    # With a confidence: the refuse rate stays <= target_clean_refuse with this probability
    # (exact binomial bound, docs/calibration.md); None: T refuses exactly that share of the
    # held-out images. With target_risk: that guarantee's probability (None: 0.95).
    confidence: float | None = None
    target_risk: float | None = None  # SGR instead (needs labels)
    threshold: float | None = None  # T by hand: the model is marked uncalibrated
    resize: ResizeMode | None = None  # None: stretch, only when a request asks
    repository: Path = Path("models")
    seed: int = 0


@dataclass(frozen=True)
class GraphInfo:
    """What the graph itself says about its input and the output notsure will read."""

    channels: int
    size: tuple[int, int]
    batch_size: int | None
    output_name: str | None  # None: the first output
    classes: int | None  # None: symbolic in the graph


def inspect_graph(cfg: ImportConfig) -> GraphInfo:
    """The graph's input and classifier output, merged with the flags; ImportFailed on a graph
    that is no image classifier or that the flags contradict."""
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(str(cfg.model), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several types for a file it cannot load
        raise ImportFailed(f"{cfg.model} is not a loadable ONNX graph: {exc}") from exc
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise ImportFailed(
            f"the graph takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); an "
            "image classifier takes one image batch: export it with a single input"
        )
    dims = tuple(inputs[0].shape)
    if len(dims) not in (2, 4) or inputs[0].type != "tensor(float)":
        raise ImportFailed(
            f"the graph's input {inputs[0].name!r} is {inputs[0].type} {list(dims)}; an image "
            "classifier takes float32 [batch, channels, height, width] (or [batch, pixels])"
        )
    outs = [o for o in sess.get_outputs() if o.type == "tensor(float)" and len(o.shape) == 2]
    if not outs:
        have = ", ".join(f"{o.name} {o.type} {o.shape}" for o in sess.get_outputs())
        fix = (
            "; skl2onnx: convert with options={'zipmap': False}"
            if any(o.type.startswith("seq(") for o in sess.get_outputs())
            else ""
        )
        raise ImportFailed(
            f"the graph has no float32 [batch, classes] output ({have}): it is not an image "
            f"classifier notsure can score{fix}"
        )
    out = outs[0]
    first = sess.get_outputs()[0].name
    batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
    classes = out.shape[1] if isinstance(out.shape[1], int) else None
    if len(dims) == 2:  # flat rows: channels and size must come from the flags
        if cfg.size is None:
            raise ImportFailed(
                f"the graph takes flat rows {list(dims)}; give --size HxW (and --channels) of "
                "the images they were made from"
            )
        c = cfg.channels or 1
        return GraphInfo(c, cfg.size, batch, None if out.name == first else out.name, classes)
    c = _pick("channels", dims[1], cfg.channels, "--channels 1|3")
    h = _pick("height", dims[2], None if cfg.size is None else cfg.size[0], "--size HxW")
    w = _pick("width", dims[3], None if cfg.size is None else cfg.size[1], "--size HxW")
    if c not in (1, 3):
        raise ImportFailed(f"the graph takes {c} channels; notsure serves grey (1) or RGB (3)")
    return GraphInfo(c, (h, w), batch, None if out.name == first else out.name, classes)


def _pick(axis: str, graph: object, flag: int | None, option: str) -> int:
    """One input axis: the graph's fixed size or, where it is dynamic, the flag's."""
    if isinstance(graph, int) and graph > 0:
        if flag is not None and flag != graph:
            raise ImportFailed(
                f"the graph's input {axis} is fixed at {graph}, but {option} gives {flag}; "
                f"drop {option.split()[0]} or give {graph}"
            )
        return graph
    if flag is None:
        raise ImportFailed(
            f"the graph's input {axis} is dynamic ({graph!r}); give {option} to fix the size "
            "images are resized to"
        )
    return flag


def class_names(cfg: ImportConfig, held: Heldout | None, count: int) -> list[str]:
    """--classes, else the folder tree's names, else the indices; checked against the graph."""
    if cfg.classes is not None:
        names = [s.strip() for s in cfg.classes.read_text(encoding="utf-8").splitlines()]
        names = [s for s in names if s]
        where = f"--classes {cfg.classes} lists {len(names)} names"
    elif held is not None and held.folder_classes is not None:
        names, where = held.folder_classes, f"--data has {len(held.folder_classes)} class folders"
    else:
        return [str(i) for i in range(count)]
    if len(names) != count:
        raise ImportFailed(
            f"{where} but the model has {count} outputs; give one class name for each output, "
            "in the order of the model's outputs"
        )
    return names


def model_io(cfg: ImportConfig, g: GraphInfo) -> ModelIO:
    """How the service feeds the graph: input shape, normalisation, output and batch size."""
    c = g.channels
    if (cfg.mean is None) != (cfg.std is None):
        raise ImportFailed("give both --mean and --std, or neither")
    norm = None
    if cfg.mean is not None and cfg.std is not None:
        if len(cfg.mean) != c or len(cfg.std) != c:
            raise ImportFailed(
                f"--mean and --std need {c} comma-separated values (one a channel), got "
                f"{len(cfg.mean)} and {len(cfg.std)}"
            )
        if any(s <= 0 or not math.isfinite(s) for s in cfg.std):
            raise ImportFailed("--std values must be positive")
        norm = (np.asarray(cfg.mean, np.float32).reshape(1, c, 1, 1),
                np.asarray(cfg.std, np.float32).reshape(1, c, 1, 1))  # fmt: skip
    return ModelIO(
        shape=(c, *g.size),
        mean=None if norm is None else norm[0],
        std=None if norm is None else norm[1],
        probabilities=cfg.output == "probabilities",
        output_name=g.output_name,
        batch_size=g.batch_size,
    )
