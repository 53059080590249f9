"""`notsure certify train`: IBP certified training (Gowal et al. 2018) with the eps ramp and
the kappa schedule of schedule.py, a checkpoint every epoch, `--resume`, and per-epoch clean and
IBP-verified accuracy on held-out training images; the epoch with the best held-out verified
accuracy is kept as the run's weights.

Loss (Gowal et al., Eq. 12): kappa * plain(z, y) + (1 - kappa) * CE(z_worst, y), where
z_worst_j = -(lower bound of s_y - s_j) over the ball (0 at j = y): the logits of the worst case
the bounds allow. plain is CE for CE nets; for RCE nets it is the RCE loss of training/losses.py
and the robust term bounds the served logits -Z, the ones the service decides on.

The run folder has the layout `notsure export` reads (train_config.json, result.json,
weights.safetensors), so a certified run is exported and calibrated like any other.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from training import data as data_mod
from training.certify.bounds import ibp
from training.certify.schedule import Schedule
from training.losses import Objective, objective_loss, served_logits
from training.nets import build_net, count_parameters
from training.progress import progress_bar
from training.provenance import machine

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
BEST_FILE = "best.safetensors"
LOG_FILE = "train_log.jsonl"
CONFIG_FILE = "train_config.json"  # the names `notsure export` reads
RESULT_FILE = "result.json"
WEIGHTS_FILE = "weights.safetensors"


@dataclass(frozen=True)
class CertifyTrainConfig:
    dataset: str = "mnist"
    data_dir: Path = Path("data")
    arch: str = "cnn"
    objective: Objective = "ce"
    steps: int = 60_000  # Gowal et al., MNIST: 60k steps of batch 100 (100 epochs)
    batch_size: int = 100
    lr: float = 1e-3  # Adam
    lr_drops: tuple[int, ...] = (15_000, 25_000)  # steps where lr /= 10
    schedule: Schedule = field(default_factory=Schedule)
    eval_eps: float = 0.3  # radius of the held-out verified accuracy
    val_size: int = 5000
    out_dir: Path = Path("runs/certify")
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # 0: leave torch's default
    resume: bool = True
    stop_after: int = 0  # stop (resumably) after this many steps of this call; 0: never
    dry_run: bool = False

    @classmethod
    def tiny(cls, **given: object) -> CertifyTrainConfig:
        """Seconds on the synthetic set: an MLP, a short ramp, a few epochs of 4 steps."""
        base = cls(
            dataset="synthetic", arch="mlp", steps=40, batch_size=128, lr=3e-3, lr_drops=(),
            schedule=Schedule(eps=0.1, warmup_steps=4, ramp_steps=16, shape="linear"),
            eval_eps=0.1, val_size=128, dry_run=True, threads=2,
        )  # fmt: skip
        return replace(base, **given)  # type: ignore[arg-type]


@dataclass(frozen=True)
class CertifyTrainResult:
    out_dir: Path
    steps: int
    finished: bool  # False when stopped early by stop_after (resume to go on)
    best: dict[str, float]  # the kept epoch's log record
    wall_time_s: float
    parameters: int
    history: list[dict[str, float]] = field(default_factory=list)


def _epoch_steps(n_train: int, batch_size: int) -> int:
    return max(n_train // batch_size, 1)


def certified_loss(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    objective: Objective,
    eps: float,
    kappa: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(loss, plain logits, lower margin bounds or None at eps 0) of one batch."""
    logits = net(x)  # (B, L)
    plain = objective_loss(objective, logits, y)
    if eps <= 0:
        return plain, logits, None
    margins = ibp(net, x, eps, objective).margin_of(y)  # (B, L): lower bounds of s_y - s_j
    robust = F.cross_entropy(-margins, y)  # CE of the worst-case logits z_worst = -margins
    return kappa * plain + (1 - kappa) * robust, logits, margins


@torch.no_grad()
def evaluate(
    net: nn.Module,
    ds: data_mod.TensorData,
    objective: Objective,
    eps: float,
    device: torch.device,
    batch: int = 500,
) -> tuple[float, float]:
    """(clean accuracy, IBP-verified accuracy at eps) of the served argmax, eval mode."""
    if len(ds) == 0:
        return float("nan"), float("nan")
    net.eval()
    clean = verified = 0
    for i in range(0, len(ds), batch):
        x, y = ds.x[i : i + batch].to(device), ds.y[i : i + batch].to(device)
        right = served_logits(objective, net(x)).argmax(1) == y
        clean += int(right.sum())
        verified += int((right & ibp(net, x, eps, objective).certified(y)).sum())
    return clean / len(ds), verified / len(ds)


def _better(record: dict[str, float], best: dict[str, float]) -> bool:
    """Higher held-out verified accuracy wins; ties (0 early on) go to clean accuracy."""
    key = (record["val_verified"], record["val_clean"])
    return not best or key > (best["val_verified"], best["val_clean"])


def train(cfg: CertifyTrainConfig) -> CertifyTrainResult:
    """Train one network with IBP; resumes from out_dir/checkpoint.pt when present."""
    from training.train import pick_device, resume_state

    if cfg.arch.startswith("resnet"):
        raise ValueError(
            f"--arch {cfg.arch}: certified training supports cnn and mlp; a ResNet's BatchNorm "
            "normalises each training batch with its own statistics, which IBP cannot bound"
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    splits = data_mod.run_splits(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.seed, cfg.dry_run)
    net = build_net(cfg.arch, splits.train.input_shape, len(splits.train.classes)).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    # Plus the optimiser keys `notsure calibrate` records in the manifest (Adam, no decay).
    written = {**asdict(cfg), "optimizer": "adam", "momentum": 0.0, "weight_decay": 0.0}
    (cfg.out_dir / CONFIG_FILE).write_text(json.dumps(written, default=str, indent=2))

    gen = torch.Generator().manual_seed(cfg.seed)
    step, elapsed = 0, 0.0
    best: dict[str, float] = {}
    ckpt_path = cfg.out_dir / CHECKPOINT_FILE
    ckpt = resume_state(ckpt_path, net, opt, gen, device) if cfg.resume else None
    if ckpt is not None:
        step, elapsed, best = int(ckpt["step"]), float(ckpt["elapsed"]), dict(ckpt["best"])

    n_train = len(splits.train)
    per_epoch = _epoch_steps(n_train, cfg.batch_size)
    log.info("IBP training %s/%s on %s (%d images, %d params) on %s: %d steps, %d per epoch, "
             "eps %.3g", cfg.arch, cfg.objective, cfg.dataset, n_train, count_parameters(net),
             device, cfg.steps, per_epoch, cfg.schedule.eps)  # fmt: skip
    history: list[dict[str, float]] = []
    t0 = time.perf_counter() - elapsed
    stop_at = min(cfg.steps, step + cfg.stop_after) if cfg.stop_after else cfg.steps

    def save_checkpoint() -> None:
        state = {"model": net.state_dict(), "optimizer": opt.state_dict(), "step": step,
                 "elapsed": time.perf_counter() - t0, "generator": gen.get_state(),
                 "best": best}  # fmt: skip
        torch.save(state, ckpt_path.with_suffix(".tmp"))
        ckpt_path.with_suffix(".tmp").replace(ckpt_path)  # never a half-written checkpoint

    # Each epoch is one seeded permutation, so a resumed run sees the same batches.
    with (cfg.out_dir / LOG_FILE).open("a", encoding="utf-8") as log_file, progress_bar(
        f"certify {cfg.arch}/{cfg.objective}", total=cfg.steps
    ) as bar:  # fmt: skip
        bar.advance(step)
        window_t, window_imgs = time.perf_counter(), 0
        while step < stop_at:
            epoch, offset = divmod(step, per_epoch)
            perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(
                cfg.seed * 100_003 + epoch))  # fmt: skip
            idx = perm[offset * cfg.batch_size : (offset + 1) * cfg.batch_size]
            x, y = splits.train.x[idx].to(device), splits.train.y[idx].to(device)
            eps, kappa = cfg.schedule.eps_at(step), cfg.schedule.kappa_at(step)
            lr = cfg.lr * 0.1 ** sum(step >= d for d in cfg.lr_drops)
            for group in opt.param_groups:
                group["lr"] = lr
            net.train()
            loss, logits, margins = certified_loss(net, x, y, cfg.objective, eps, kappa)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            window_imgs += x.shape[0]
            rate = window_imgs / max(time.perf_counter() - window_t, 1e-9)
            served = served_logits(cfg.objective, logits.detach())
            stats = {"loss": loss.item(), "eps": eps, "kappa": kappa, "img/s": rate,
                     "acc": float((served.argmax(1) == y).float().mean())}  # fmt: skip
            if margins is not None:  # share of the batch the bounds certify at this eps
                m = margins.detach().scatter(1, y[:, None], float("inf"))
                stats["cert"] = float((m.amin(1) > 0).float().mean())
            bar.update(step, **stats)
            if step % 50 == 0:
                window_t, window_imgs = time.perf_counter(), 0
            if step % per_epoch == 0 or step == cfg.steps:
                clean, verified = evaluate(net, splits.val, cfg.objective, cfg.eval_eps, device)
                record = {"step": step, "epoch": step / per_epoch, "loss": stats["loss"],
                          "eps": eps, "kappa": kappa, "lr": lr, "img_per_s": rate,
                          "elapsed_s": time.perf_counter() - t0, "val_clean": clean,
                          "val_verified": verified, "eval_eps": cfg.eval_eps}  # fmt: skip
                if _better(record, best):
                    best = record
                    _save_weights(net, cfg.out_dir / BEST_FILE)
                history.append(record)
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                log.info("epoch %.0f step %d eps %.3f kappa %.2f: held-out clean %.4f, verified "
                         "at %.2f %.4f (%.0f img/s)", record["epoch"], step, eps, kappa, clean,
                         cfg.eval_eps, verified, rate)  # fmt: skip
                save_checkpoint()
        save_checkpoint()

    finished = step >= cfg.steps
    wall = time.perf_counter() - t0
    if finished:
        if not (cfg.out_dir / BEST_FILE).exists():
            _save_weights(net, cfg.out_dir / BEST_FILE)
        # The kept epoch becomes the run's weights, the file `notsure export` reads.
        net.load_state_dict(load_file(str(cfg.out_dir / BEST_FILE)))
        _save_weights(net, cfg.out_dir / WEIGHTS_FILE)
        clean, verified = evaluate(net, splits.test, cfg.objective, cfg.eval_eps, device)
        summary = {"steps": step, "best": best, "test_accuracy": clean,
                   "test_verified_accuracy": verified, "eval_eps": cfg.eval_eps,
                   "wall_time_s": wall, "parameters": count_parameters(net),
                   "hardware": f"{machine()}; torch on {device.type}",
                   "config": asdict(cfg)}  # fmt: skip
        (cfg.out_dir / RESULT_FILE).write_text(json.dumps(summary, default=str, indent=2))
        log.info("done: test clean %.4f, IBP-verified at %.2f %.4f (epoch %.0f kept)", clean,
                 cfg.eval_eps, verified, best.get("epoch", float("nan")))  # fmt: skip
    return CertifyTrainResult(out_dir=cfg.out_dir, steps=step, finished=finished, best=best,
                              wall_time_s=wall, parameters=count_parameters(net),
                              history=history)  # fmt: skip


def _save_weights(net: nn.Module, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(tmp))
    tmp.replace(path)
