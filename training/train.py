"""`notsure train`: CE or RCE training with the paper's schedule, checkpoints and a JSON log;
optionally adversarial (PGD-AT, TRADES or fast FGSM, see training/adversarial.py).

Adversarial runs check robustness on held-out images once an epoch (PGD on the served loss)
and can keep the weights of the best check rather than the last (`keep="best"`): robust
accuracy peaks and then falls while training accuracy still rises (robust overfitting, Rice,
Wong & Kolter 2020)."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from training import data as data_mod
from training.adversarial import AdversarialConfig, Adversary, evaluate
from training.keep import keep_best_or_last
from training.losses import Objective, objective_loss, served_logits
from training.nets import build_net, count_parameters
from training.progress import progress_bar
from training.provenance import machine

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "train_log.jsonl"
CONFIG_FILE = "train_config.json"
RESULT_FILE = "result.json"
BEST_FILE = "best.safetensors"  # weights of the best held-out robustness check so far


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "mnist"
    data_dir: Path = Path("data")
    arch: str = "resnet32"
    objective: Objective = "rce"
    steps: int = 20_000
    batch_size: int = 128
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    # step: lr /= 10 at each fraction in lr_drops of the steps (the paper); cyclic: linear from
    # 0 up to lr at lr_peak of the steps, then down to 0 (Wong et al.'s fast FGSM); cosine.
    lr_schedule: Literal["step", "cyclic", "cosine"] = "step"
    lr_drops: tuple[float, ...] = (0.5, 0.75)
    lr_peak: float = 0.4
    val_size: int = 5000
    eval_every: int = 1000
    checkpoint_every: int = 500
    out_dir: Path = Path("runs/train")
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # 0: leave torch's default
    resume: bool = True
    dry_run: bool = False
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    # Adversarial runs: the weights written at the end are the last ones, or those of the
    # held-out check with the best robust accuracy.
    keep: Literal["last", "best"] = "last"

    @classmethod
    def tiny(cls, **given: object) -> TrainConfig:
        """A few steps on synthetic data: what `--dry-run` and the tests run end to end."""
        cfg = replace(cls(), **given)  # type: ignore[arg-type]
        adv = cfg.adversarial
        if adv.enabled:
            adv = replace(adv, guard_every=10, guard_images=64)
        return replace(cfg, dataset="synthetic", steps=20, batch_size=32, eval_every=10,
                       dry_run=True, adversarial=adv)  # fmt: skip


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    steps: int
    test_accuracy: float
    val_accuracy: float
    wall_time_s: float
    parameters: int
    history: list[dict[str, float]] = field(default_factory=list)
    # Adversarial training only: the guard's PGD checks, and whether it stopped training early.
    guard_checks: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False


def pick_device(requested: str) -> torch.device:
    """'auto' picks CUDA when torch sees a GPU, else the CPU; 'cuda'/'cpu' force one."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(requested)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """The learning rate of optimiser step `step` (0-based) under cfg.lr_schedule."""
    if cfg.lr_schedule == "cyclic":
        peak = max(cfg.lr_peak * cfg.steps, 1.0)
        if step < peak:
            return cfg.lr * (step + 1) / peak
        return cfg.lr * max(cfg.steps - step, 0) / max(cfg.steps - peak, 1.0)
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / cfg.steps))
    drops = sum(step >= math.floor(f * cfg.steps) for f in cfg.lr_drops)
    return cfg.lr * (0.1**drops)


@torch.no_grad()
def batch_accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, objective: Objective) -> float:
    """Served-argmax accuracy of one batch in eval mode (BN statistics and dropout untouched)."""
    was_training = net.training
    net.eval()
    acc = float((served_logits(objective, net(x)).argmax(1) == y).float().mean())
    net.train(was_training)
    return acc


def resume_state(
    path: Path,
    net: nn.Module,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    device: torch.device,
) -> dict[str, Any] | None:
    """Load a run's checkpoint into the net, the optimiser and the data-order generator, and
    return it for the rest (step, elapsed time, a recipe's own state); None when there is none."""
    if not path.exists():
        return None
    # weights_only=True: nothing but tensors and plain containers is unpickled.
    ckpt: dict[str, Any] = torch.load(path, map_location=device, weights_only=True)
    net.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    gen.set_state(ckpt["generator"])
    log.info("resumed from %s at step %d", path, int(ckpt["step"]))
    return ckpt


def _make_optimizer(cfg: TrainConfig, net: nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def train(cfg: TrainConfig) -> TrainResult:
    """Train one network; resumes from out_dir/checkpoint.pt when present and cfg.resume."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    splits = data_mod.run_splits(cfg.dataset, cfg.data_dir, cfg.val_size, cfg.seed, cfg.dry_run)
    net = build_net(cfg.arch, splits.train.input_shape, len(splits.train.classes)).to(device)
    opt = _make_optimizer(cfg, net)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    (cfg.out_dir / CONFIG_FILE).write_text(json.dumps(asdict(cfg), default=str, indent=2))

    gen = torch.Generator().manual_seed(cfg.seed)
    adv = cfg.adversarial
    adversary = Adversary(adv, cfg.objective, cfg.seed) if adv.enabled else None
    step, elapsed = 0, 0.0
    ckpt_path = cfg.out_dir / CHECKPOINT_FILE
    ckpt = resume_state(ckpt_path, net, opt, gen, device) if cfg.resume else None
    if ckpt is not None:
        step, elapsed = int(ckpt["step"]), float(ckpt["elapsed"])
        if adversary is not None and "adversary" in ckpt:
            adversary.load_state_dict(ckpt["adversary"])

    n_train = len(splits.train)
    log.info(
        "training %s/%s on %s (%d images, %d params) on %s for %d steps",
        cfg.arch,
        cfg.objective,
        cfg.dataset,
        n_train,
        count_parameters(net),
        device,
        cfg.steps,
    )
    history: list[dict[str, float]] = []
    log_file = (cfg.out_dir / LOG_FILE).open("a", encoding="utf-8")
    perm = torch.randperm(n_train, generator=gen)
    cursor = (step * cfg.batch_size) % n_train
    augment = cfg.dataset == "cifar10"
    t0 = time.perf_counter() - elapsed
    window_t, window_imgs = time.perf_counter(), 0
    # The guard checks robustness once an epoch unless told otherwise.
    guard_every = adv.guard_every or max(n_train // cfg.batch_size, 1)
    clean_acc = float("nan")

    def save_weights(path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous().cpu() for k, v in net.state_dict().items()}, str(tmp))
        tmp.replace(path)

    def save_checkpoint() -> None:
        state = {
            "model": net.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "elapsed": time.perf_counter() - t0,
            "generator": gen.get_state(),
        }
        if adversary is not None:
            state["adversary"] = adversary.state_dict()
        torch.save(state, ckpt_path.with_suffix(".tmp"))
        ckpt_path.with_suffix(".tmp").replace(ckpt_path)

    with progress_bar(f"train {cfg.arch}/{cfg.objective}", total=cfg.steps) as bar:
        bar.advance(step)
        net.train()
        while step < cfg.steps and not (adversary is not None and adversary.stopped):
            if cursor + cfg.batch_size > n_train:
                perm, cursor = torch.randperm(n_train, generator=gen), 0
            idx = perm[cursor : cursor + cfg.batch_size]
            cursor += cfg.batch_size
            x, y = splits.train.x[idx], splits.train.y[idx]
            if augment:
                x = data_mod.augment(x, gen)
            lr = lr_at(cfg, step)
            for group in opt.param_groups:
                group["lr"] = lr
            xb, yb = x.to(device), y.to(device)
            if adversary is not None:
                if step % 10 == 0:  # clean batch accuracy for the bar, without touching BN stats
                    clean_acc = batch_accuracy(net, xb, yb, cfg.objective)
                loss, logits = adversary.loss(net, xb, yb, step)  # logits of adversarial images
            else:
                logits = net(xb)
                loss = objective_loss(cfg.objective, logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_value = loss.item()
            step += 1
            window_imgs += x.shape[0]
            now = time.perf_counter()
            rate = window_imgs / max(now - window_t, 1e-9)
            stats = {"loss": loss_value, "lr": lr, "rate": rate}
            if adversary is not None:
                served = served_logits(cfg.objective, logits.detach())
                stats["clean_acc"] = clean_acc
                stats["adv_acc"] = float((served.argmax(1) == yb).float().mean())
            bar.update(step, **stats)
            if step % 50 == 0:
                window_t, window_imgs = now, 0
            evaluate_now = step % cfg.eval_every == 0 or step == cfg.steps
            record: dict[str, float] = {}
            if evaluate_now or step % 100 == 0:
                record = {"step": step, "loss": loss_value, "lr": lr, "img_per_s": rate,
                          "elapsed_s": now - t0}  # fmt: skip
            if adversary is not None and (step % guard_every == 0 or step == cfg.steps):
                record = record or {"step": step, "loss": loss_value, "lr": lr}
                val_x, val_y = splits.val.x.to(device), splits.val.y.to(device)
                best_before = adversary.best
                record["epoch"] = step * cfg.batch_size / n_train
                record["guard_pgd_accuracy"] = adversary.check(net, opt, val_x, val_y, step)
                record["guard_clean_accuracy"] = batch_accuracy(
                    net, val_x[: adv.guard_images], val_y[: adv.guard_images], cfg.objective
                )
                record["adv_batch_accuracy"] = stats["adv_acc"]
                if adversary.best > best_before:
                    save_weights(cfg.out_dir / BEST_FILE)
                    record["best"] = 1.0
                log.info("epoch %.2f: held-out PGD-%d accuracy %.4f, clean %.4f (best %.4f)",
                         record["epoch"], adv.guard_steps, record["guard_pgd_accuracy"],
                         record["guard_clean_accuracy"], adversary.best)  # fmt: skip
                net.train()
            if evaluate_now:
                record["val_accuracy"] = evaluate(net, splits.val, cfg.objective, device)
                record["test_accuracy"] = evaluate(net, splits.test, cfg.objective, device)
                net.train()
                log.info("step %d loss %.4f lr %.4g val %.4f test %.4f (%.0f img/s)", step,
                         loss_value, lr, record["val_accuracy"], record["test_accuracy"],
                         rate)  # fmt: skip
            if record:
                history.append(record)
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            if step % cfg.checkpoint_every == 0:
                save_checkpoint()
    save_checkpoint()
    log_file.close()
    wall = time.perf_counter() - t0
    kept: dict[str, Any] | None = None
    if cfg.keep == "best" and (cfg.out_dir / BEST_FILE).exists():
        best = load_file(str(cfg.out_dir / BEST_FILE), device=str(device))
        kept = keep_best_or_last(net, best, step, n_train / cfg.batch_size,
                                 cfg.out_dir / LOG_FILE, splits.val, cfg.objective, adv,
                                 device)  # fmt: skip
    save_weights(cfg.out_dir / "weights.safetensors")
    result = TrainResult(
        out_dir=cfg.out_dir,
        steps=step,
        test_accuracy=evaluate(net, splits.test, cfg.objective, device),
        val_accuracy=evaluate(net, splits.val, cfg.objective, device),
        wall_time_s=wall,
        parameters=count_parameters(net),
        history=history,
        guard_checks=adversary.checks if adversary is not None else [],
        stopped_early=adversary is not None and adversary.stopped,
    )
    summary = {k: v for k, v in asdict(result).items() if k != "history"}
    summary["train_samples"] = len(splits.train)
    summary["hardware"] = f"{machine()}; torch on {device.type}"
    if kept is not None:
        summary["kept"] = kept
    summary["config"] = asdict(cfg)
    (cfg.out_dir / RESULT_FILE).write_text(json.dumps(summary, default=str, indent=2))
    log.info("done: test accuracy %.4f after %d steps in %.0f s", result.test_accuracy, step, wall)
    return result
