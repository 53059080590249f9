"""The Open Inference Protocol's model steps, whichever transport carried them (HTTP or gRPC).

A transport decodes its request into named tensors and parameters, calls `run`, and encodes the
named outputs that come back; model metadata is built here once for both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from service.call import Call
from service.errors import InvalidInput, PayloadTooLarge
from service.imaging import check_batch
from service.inference import infer
from service.runner import LoadedModel
from service.state import AppState
from service.thresholds import threshold_in_force
from service.version import service_version

INPUT = "input"
OUTPUTS = ("label", "j_score", "confidence", "non_me", "probabilities", "score", "energy")
# Only for models whose graph has a features output and whose manifest has a kernel set.
KD_OUTPUT = "k_density"
# Only for models with a bound graph (certify.onnx): whether each answer is certified.
CERTIFIED_OUTPUT = "certified"
PLATFORM = "onnxruntime_onnx"


# Protocol extensions served: binary tensors on infer, the repository index/load/unload
# (service.model_control; load and unload answer only with model_control=explicit), and
# Triton's model configuration and statistics (service.v2extensions).
EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration", "statistics"]


def server_metadata() -> dict[str, Any]:
    return {"name": "notsure", "version": service_version(), "extensions": EXTENSIONS}


def outputs_of(model: LoadedModel) -> tuple[str, ...]:
    """The output tensors this model version can answer with, in metadata order."""
    extra = (KD_OUTPUT,) if model.kernel_set is not None else ()
    if model.certifier is not None:
        extra = (*extra, CERTIFIED_OUTPUT)
    return (*OUTPUTS, *extra)


def tensors(model: LoadedModel) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The model's input and output tensors as metadata lists them (name, datatype, shape with
    the batch axis as -1); the model configuration is built from the same list."""
    c, h, w = model.manifest.input_shape
    n = model.manifest.num_classes
    inputs = [{"name": INPUT, "datatype": "FP32", "shape": [-1, c, h, w]}]
    outputs = (
        [{"name": "label", "datatype": "INT64", "shape": [-1]}]
        + [{"name": o, "datatype": "FP32", "shape": [-1]} for o in OUTPUTS[1:4]]
        + [{"name": "probabilities", "datatype": "FP32", "shape": [-1, n]}]
        + [
            {"name": o, "datatype": "BOOL" if o == CERTIFIED_OUTPUT else "FP32", "shape": [-1]}
            for o in outputs_of(model)[5:]
        ]
    )
    return inputs, outputs


def metadata(model: LoadedModel, state: AppState) -> dict[str, Any]:
    """Model metadata: one FP32 image input, the decision outputs (label -1 is NOT SURE)."""
    versions = sorted(state.repository.versions.get(model.name, {}))
    inputs, outputs = tensors(model)
    return {
        "name": model.name,
        "versions": [str(v) for v in versions],
        "platform": PLATFORM,
        # Not in the protocol's schema (HTTP only; gRPC's message has no such field, and its
        # infer responses carry `calibrated` instead): whether T was chosen on held-out data.
        "parameters": {
            "calibrated": model.manifest.calibrated,
            "score": model.score,
            **_certificate_parameters(model),
        },
        "inputs": inputs,
        "outputs": outputs,
    }


def _certificate_parameters(model: LoadedModel) -> dict[str, Any]:
    m = model.manifest
    if model.certifier is None:
        return {}
    return {"certify_eps": m.certify_eps, "certificate_required": m.certify_required}


@dataclass(frozen=True)
class Answer:
    """The requested outputs in order, the T that was applied and the score it applies to."""

    outputs: list[tuple[str, npt.NDArray[Any]]]
    threshold: float
    score: str
    calibrated: bool = True  # False: T was set by hand
    certify_eps: float | None = None  # the radius answers are certified at, when they are


def check_outputs(model: LoadedModel, wanted: Sequence[str]) -> list[str]:
    """The requested output names (all when none are named); unknown names are refused."""
    available = outputs_of(model)
    if not wanted:
        return list(available)
    for name in wanted:
        if name not in available:
            raise InvalidInput(
                f"unknown output {name!r}",
                field="outputs",
                fix=f"choose from {', '.join(available)}",
            )
    return list(wanted)


async def run(
    state: AppState,
    call: Call,
    model: LoadedModel,
    inputs: Sequence[tuple[str, npt.NDArray[Any]]],
    parameters: Mapping[str, Any],
    wanted: Sequence[str],
    timeout_s: float | None = None,
) -> Answer:
    """Validate the decoded input, batch and score it, decide, and return the named outputs."""
    if len(inputs) != 1:
        raise InvalidInput(
            f"expected exactly one input, got {len(inputs)}",
            field="inputs",
            fix=f'send one tensor named "{INPUT}" of shape [B, C, H, W]',
        )
    name, tensor = inputs[0]
    if name != INPUT:
        raise InvalidInput(
            f"unknown input {name!r}",
            field="inputs[0].name",
            fix=f'name the tensor "{INPUT}" (see the model metadata)',
        )
    names = check_outputs(model, wanted)
    x = check_batch(tensor, model.manifest.input_shape, "inputs[0]")
    if x.shape[0] > state.settings.max_instances:
        raise PayloadTooLarge(
            f"{x.shape[0]} images, the limit is {state.settings.max_instances}",
            field="inputs[0].shape",
        )
    requested = parameters.get("threshold")
    threshold = threshold_in_force(
        state.settings, model.score, model.threshold, requested, "parameters.threshold"
    )
    outcome = await infer(state, call, model, x, threshold, timeout_s)
    s = outcome.scores
    values: dict[str, npt.NDArray[Any]] = {
        "label": outcome.labels,
        "j_score": s.j_score.astype(np.float32),
        "confidence": s.confidence.astype(np.float32),
        "non_me": s.non_me.astype(np.float32),
        "probabilities": s.probabilities.astype(np.float32),
        "score": s.score.astype(np.float32),
        "energy": s.energy.astype(np.float32),
    }
    if s.k_density is not None:
        values[KD_OUTPUT] = s.k_density.astype(np.float32)
    if s.certified is not None:
        values[CERTIFIED_OUTPUT] = s.certified.astype(np.bool_)
    calibrated = model.manifest.calibrated
    outputs = [(n, values[n]) for n in names]
    return Answer(outputs, threshold, s.score_name, calibrated, s.certify_eps)
