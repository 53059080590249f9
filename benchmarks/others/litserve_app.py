"""LitServe serving the same ONNX model with the same scoring, for the side-by-side benchmark.

Run by benchmarks.serving, from the repository root:

    MODEL_DIR=models/<name>/1 PORT=8001 python -m benchmarks.others.litserve_app
"""

import os
from typing import Any

import litserve as ls

from benchmarks.others.common import Scorer


class NotSureAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.scorer = Scorer(os.environ["MODEL_DIR"])

    # LitServe reads this hint to build its endpoint: a plain dict means a JSON body.
    def decode_request(self, request: dict) -> Any:  # type: ignore[type-arg]
        return request["instances"]

    def predict(self, instances: Any) -> dict[str, list[Any]]:
        return self.scorer(instances)

    def encode_response(self, output: dict[str, list[Any]]) -> dict[str, list[Any]]:
        return output


if __name__ == "__main__":
    server = ls.LitServer(NotSureAPI(), accelerator="cpu")
    server.run(port=int(os.environ["PORT"]), generate_client_file=False)
