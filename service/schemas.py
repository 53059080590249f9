"""Request and response models of the HTTP API (they are also the OpenAPI schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# --- native API ------------------------------------------------------------------------------


class B64Image(BaseModel):
    """An encoded image, TensorFlow-Serving style."""

    b64: str = Field(description="base64 of a PNG or JPEG file")


Instance = str | B64Image | list[Any]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instances: list[Instance] = Field(
        min_length=1,
        description="Each instance is a base64 PNG/JPEG (a string, a data URL or {'b64': ...}) or "
        "a pixel array HxW or CxHxW: floats in [0, 1] or integers 0-255.",
    )
    threshold: float | None = Field(
        default=None,
        description="T for this request, on the model's score (in [0, 1] except for energy); "
        "only honoured when the server allows it.",
    )
    resize: bool = Field(default=False, description="Resize images to the model's input size.")
    probabilities: bool = Field(
        default=False, description="Include each image's class probabilities in the answer."
    )
    id: str | None = Field(default=None, max_length=128, description="Echoed in the response.")


class Prediction(BaseModel):
    decision: Literal["accepted", "not_sure"]
    label: int | None = Field(description="null on NOT SURE unless the server reveals it")
    class_name: str | None
    j_score: float = Field(description="confidence x kernel non-ME (Eq. 5)")
    confidence: float
    non_me: float = Field(description="non-maximal entropy (Eq. 1)")
    score_name: str = Field(
        description="the score T applies to: j_score, confidence, energy or k_density"
    )
    score: float = Field(description="its value; accepted iff score >= threshold")
    probabilities: list[float] | None = Field(
        default=None, description="the softmax over the classes, when the request asked for it"
    )
    certified: bool | None = Field(
        default=None,
        description="whether every image within certify_eps (L-inf) of this one gets the same "
        "label, proven by interval bound propagation; absent when the model has no bound graph",
    )
    certify_eps: float | None = Field(
        default=None, description="the L-inf radius of the certificate; absent without one"
    )


class PredictResponse(BaseModel):
    id: str | None = None
    model: str
    version: int
    threshold: float = Field(description="the T that was applied")
    certificate_required: bool | None = Field(
        default=None,
        description="true: an answer is accepted only when it is also certified; absent when "
        "the model has no bound graph",
    )
    predictions: list[Prediction]


class ModelSummary(BaseModel):
    name: str
    version: int
    ready: bool
    objective: str | None = None
    score: str | None = Field(default=None, description="the score the threshold applies to")
    threshold: float | None = None
    calibrated: bool | None = Field(
        default=None, description="false when T was set by hand, not chosen on held-out data"
    )
    provider: str | None = None
    error: str | None = None


class ModelList(BaseModel):
    models: list[ModelSummary]
    # The `default_model` setting when a version of it is ready, else null.
    default_model: str | None = None


class ErrorBody(BaseModel):
    error: str
    field: str | None = None
    fix: str | None = None


# --- KServe V2 / Open Inference Protocol --------------------------------------------------------


class V2Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class V2RequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class V2InferRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[V2Tensor]
    outputs: list[V2RequestedOutput] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[V2Tensor]


class V2TensorMeta(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2TensorMeta]
    outputs: list[V2TensorMeta]
    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="calibrated (false when T was set by hand) and the score T applies to",
    )


class V2Duration(BaseModel):
    count: int = Field(description="how many times the step happened")
    ns: int = Field(description="their total duration in nanoseconds")


class V2InferStats(BaseModel):
    success: V2Duration
    fail: V2Duration
    queue: V2Duration
    compute_input: V2Duration
    compute_infer: V2Duration
    compute_output: V2Duration
    cache_hit: V2Duration
    cache_miss: V2Duration


class V2BatchStats(BaseModel):
    batch_size: int
    compute_input: V2Duration
    compute_infer: V2Duration
    compute_output: V2Duration


class V2ModelStats(BaseModel):
    name: str
    version: str
    last_inference: int = Field(description="ms since the epoch; 0 before the first request")
    inference_count: int = Field(description="images answered")
    execution_count: int = Field(description="batches run")
    inference_stats: V2InferStats
    batch_stats: list[V2BatchStats]
    memory_usage: list[dict[str, Any]]
    response_stats: dict[str, Any]


class V2Statistics(BaseModel):
    """Triton's statistics extension: cumulative counts per model version since it loaded."""

    model_stats: list[V2ModelStats]


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


# --- model repository extension (Triton's) ---------------------------------------------------


class RepositoryIndexRequest(BaseModel):
    # Strict: {"ready": 0} or {"ready": "yes"} is refused, not read as a boolean.
    model_config = ConfigDict(extra="forbid", strict=True)

    ready: bool = Field(default=False, description="true: only the versions ready to infer")


class RepositoryIndexEntry(BaseModel):
    name: str
    version: str
    state: Literal["READY", "UNAVAILABLE", "LOADING", "UNLOADING"]
    reason: str = Field(description="why it is in this state (empty when it serves)")


class RepositoryModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    parameters: dict[str, Any] = Field(
        default_factory=dict,
        description="unload: unload_dependents (no effect: models here have no dependents); "
        "load: none (a model loads from its version folders' files)",
    )


API_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "a malformed KServe V2 request (the body names the field and the fix), or a "
        "body that is not parseable JSON (e.g. nested too deeply)",
        401: "missing or unknown API key",
        404: "unknown model or version",
        413: "body or instance count over a limit",
        422: "malformed input to the native API; the body names the field and the fix",
        503: "model not ready, queue full (Retry-After) or shutting down",
        504: "waited in the queue past the request timeout",
    }.items()
}


# --- schemas of bodies the routes parse themselves ------------------------------------------------

_REF = "#/components/schemas/{model}"


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema for `openapi_extra`, its nested models referenced as components."""
    schema = model.model_json_schema(ref_template=_REF)
    schema.pop("$defs", None)
    return schema


def component_schemas(*models: type[BaseModel]) -> dict[str, Any]:
    """The nested models those schemas reference, for the OpenAPI document's components."""
    out: dict[str, Any] = {}
    for model in models:
        out.update(model.model_json_schema(ref_template=_REF).get("$defs", {}))
    return out
