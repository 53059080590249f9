"""Load the PyTorch network that belongs to a model-repository entry (for white-box attacks).

The ONNX graph is what the service runs; gradients need the network itself, rebuilt from the
manifest's architecture and the safetensors state dict next to it. The weights file is checked
against `manifest.weights_sha256` first, so an attack is never crafted on other weights than the
ones that were exported. Nothing is unpickled: safetensors holds raw tensors only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from service.manifest import MANIFEST_FILE, WEIGHTS_FILE, Manifest, sha256_file
from training.nets import build_net


class WeightsMismatch(RuntimeError):
    """The weights file next to a manifest is missing or is not the one the manifest names."""


def load_manifest(model_dir: Path) -> Manifest:
    """The manifest of models/<name>/<version>."""
    path = model_dir / MANIFEST_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: pass a model version folder (models/<name>/<version>) that "
            "`notsure calibrate` has written a manifest into"
        )
    return Manifest.load(path)


def load_torch_model(
    model_dir: Path, device: torch.device | str = "cpu"
) -> tuple[nn.Module, Manifest]:
    """The un-wrapped network (forward returns Z) in eval mode on `device`, and its manifest."""
    manifest = load_manifest(model_dir)
    weights = model_dir / WEIGHTS_FILE
    if manifest.weights_sha256 is None:
        raise WeightsMismatch(
            f"{model_dir / MANIFEST_FILE} has no weights_sha256; re-run `notsure calibrate` "
            "so the manifest records the checksum of weights.safetensors"
        )
    if not weights.exists():
        raise WeightsMismatch(f"{weights} is missing; re-export the model with `notsure export`")
    actual = sha256_file(weights)
    if actual != manifest.weights_sha256:
        raise WeightsMismatch(
            f"{weights} has sha256 {actual}, but the manifest expects "
            f"{manifest.weights_sha256}; the weights do not belong to this model version"
        )
    net = build_net(manifest.architecture, manifest.input_shape, manifest.num_classes)
    net.load_state_dict(load_file(str(weights)))
    return net.to(device).eval(), manifest
