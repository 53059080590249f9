"""Find a model-repository entry, load the PyTorch network that belongs to it (for white-box
attacks) and the test images of the data set it was trained on.

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
from training import data as data_mod
from training.nets import build_net

# The dry run's synthetic test split: calibrate.py uses seed + 2 for the test split of seed 0.
SYNTHETIC_TEST_SEED = 2


class WeightsMismatch(RuntimeError):
    """The weights file next to a manifest is missing or is not the one the manifest names."""


def model_version_dir(models_dir: Path, name: str, version: int | None = None) -> Path:
    """models/<name>/<version>; the highest version that has a manifest unless one is given."""
    if version is not None:
        return models_dir / name / str(version)
    folder = models_dir / name
    versions = sorted(
        int(p.name) for p in folder.glob("*") if p.name.isdigit() and (p / MANIFEST_FILE).exists()
    )
    if not versions:
        raise FileNotFoundError(
            f"no calibrated version of {name!r} in {models_dir}/ (expected "
            f"{folder}/<version>/{MANIFEST_FILE}); check --models-dir and the model name"
        )
    return folder / str(versions[-1])


def test_images(manifest: Manifest, data_dir: Path, n: int) -> data_mod.TensorData:
    """The first n images of the test split of the data set the model was trained on."""
    dataset = manifest.training.dataset if manifest.training else "mnist"
    if dataset == "synthetic":
        return data_mod.synthetic(n, seed=SYNTHETIC_TEST_SEED, shape=manifest.input_shape)
    test = data_mod.load(dataset, data_dir, train=False)
    if n > len(test):
        raise ValueError(f"--n {n} is larger than the {dataset} test set ({len(test)} images)")
    return test.subset(slice(0, n))


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
