"""A lean async FastAPI endpoint serving the same ONNX model with the same scoring: the baseline
a hand-written service starts from (no batching, no queue, onnxruntime inline on the event loop).

Run by benchmarks.serving, from the repository root:

    MODEL_DIR=models/<name>/1 PORT=8004 python -m benchmarks.others.fastapi_app
"""

import os
from typing import Any

import uvicorn
from fastapi import FastAPI, Request

from benchmarks.others.common import Scorer

scorer = Scorer(os.environ["MODEL_DIR"])
app = FastAPI()


@app.post("/predict")
async def predict(request: Request) -> dict[str, list[Any]]:
    # Blocks the loop for one inference (~1 ms): requests run strictly one at a time.
    return scorer((await request.json())["instances"])


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(os.environ["PORT"]),
        workers=1,
        loop="uvloop",
        http="httptools",
        log_level="warning",
    )
