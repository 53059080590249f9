"""RCE in your own training loop: the loss (Eq. 4) and the export that serves it.

A network trained with reverse cross-entropy predicts with softmax(-Z), so its ONNX graph must
give the negated logits -Z; `notsure import --output neg_logits` then serves it on the J-score
(docs/your-model.md):

    from training.rce import export_neg_logits, rce_loss

    for x, y in loader:
        loss = rce_loss(net(x), y)  # instead of F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    export_neg_logits(net.eval(), "net.onnx", input_shape=(1, 28, 28))
    # notsure import net.onnx --name my-rce --data heldout/ --output neg_logits
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from training.losses import rce_loss

__all__ = ["NegatedLogits", "export_neg_logits", "rce_loss"]


class NegatedLogits(nn.Module):
    """A network whose output is -Z: the vector an RCE-trained network feeds to its softmax."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.net(x)  # (B, L) logits Z -> (B, L) -Z


def export_neg_logits(
    net: nn.Module, path: str | Path, input_shape: tuple[int, int, int], opset: int = 18
) -> Path:
    """Export `net` (in eval mode) to ONNX with negated logits and a dynamic batch axis: input
    "image" (B, C, H, W) as the network takes it, output "neg_logits" (B, L)."""
    path = Path(path)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(
        NegatedLogits(net).eval(),
        (torch.zeros((2, *input_shape)),),
        input_names=["image"],
        output_names=["neg_logits"],
        dynamic_shapes=({0: batch},),
        opset_version=opset,
        dynamo=True,
        verbose=False,
    )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    program.save(str(path), external_data=False)
    return path
