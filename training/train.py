"""Train one of the networks in models/ on CIFAR-10; runs alone or under torchrun (DDP).

Every epoch writes last.pt, best.pt (by validation accuracy), metrics.jsonl and
curves.png into the run folder, atomically, so `--resume` can pick up any cut.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from core.contract import CLASS_NAMES, MEAN, STD
from core.errors import UserError
from core.files import write_atomic
from core.host import instruction_sets
from core.preprocess import normalization_table
from models import get_model
from training.data import DataError, Split, load_split

# What every architecture's recipe starts from: Nesterov SGD, linear warm-up over 15% of the steps then linear decay
# to zero, label smoothing 0.1, random crops of the image padded with 4 zero pixels, random horizontal flips.
BASE_RECIPE: dict[str, float | bool | None] = {
    "momentum": 0.9,
    "label_smoothing": 0.1,
    "pad": 4,  # random-crop padding, in pixels
    "reflect": False,  # pad by reflecting the image (else with zeros)
    "alternate_flips": False,  # flip each image in every other epoch (else at random)
    "warmup": 0.15,  # share of the steps over which the learning rate rises to its peak
    "lr_start": None,  # the first step's learning rate as a share of the peak (None: one warm-up step's share)
    "lr_end": 0.0,  # the last step's, likewise
    "bias_lr_scale": 1.0,  # BatchNorm shifts learn this many times faster (their weight decay as much slower)
    "lookahead": False,  # every 5 steps, pull the weights back towards a running average of themselves
    "whitening": True,  # WhiteNet: its first convolution whitens the training images' patches, frozen (else learned)
    "whiten_bias_epochs": 0,  # WhiteNet: epochs in which the whitening convolution's bias still learns
    "cutout": 0,
}
RECIPES: dict[str, dict[str, float | bool | None]] = {
    "lenet": {"epochs": 60, "batch_size": 128, "lr": 0.05, "weight_decay": 5e-4},
    "alexnet": {"epochs": 60, "batch_size": 128, "lr": 0.02, "weight_decay": 5e-4},  # no BatchNorm
    "vgg11": {"epochs": 60, "batch_size": 128, "lr": 0.05, "weight_decay": 5e-4},
    "vgg16": {"epochs": 60, "batch_size": 128, "lr": 0.05, "weight_decay": 5e-4},
    "googlenet": {"epochs": 60, "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4},
    "resnet18": {"epochs": 60, "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4},
    # airbench94's recipe (arXiv 2404.00498) in this trainer's terms (the mean loss of a batch of 1,024): a
    # short triangular schedule, label smoothing 0.2, 2-pixel reflected translations, alternating flips, fast
    # BatchNorm shifts and lookahead.
    "whitenet": {
        "epochs": 12,
        "batch_size": 1024,
        "lr": 1.5,
        "weight_decay": 1.33e-3,
        "momentum": 0.85,
        "label_smoothing": 0.2,
        "pad": 2,
        "reflect": True,
        "alternate_flips": True,
        "warmup": 0.23,
        "lr_start": 0.2,
        "lr_end": 0.07,
        "bias_lr_scale": 64.0,
        "lookahead": True,
        "whiten_bias_epochs": 3,
    },
}
LOOKAHEAD_EVERY = 5  # steps


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; stored in every checkpoint. None: not given (the recipe's value, or on
    --resume the run's own)."""

    arch: str
    data: str
    out: str
    epochs: int | None = None  # None: the recipe's value (likewise batch_size, lr, weight_decay, cutout)
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    cutout: int | None = None  # side of the square erased at random (Cutout), 0 for none
    momentum: float | None = None
    label_smoothing: float | None = None
    pad: int | None = None  # the recipe's other parts (BASE_RECIPE says what each is)
    reflect: bool | None = None
    alternate_flips: bool | None = None
    warmup: float | None = None
    lr_start: float | None = None
    lr_end: float | None = None
    bias_lr_scale: float | None = None
    lookahead: bool | None = None
    whitening: bool | None = None
    whiten_bias_epochs: int | None = None
    val_size: int | None = None  # None: 5000
    seed: int | None = None  # None: 0
    device: str = "auto"
    amp: bool | None = None  # bf16 autocast; None: on for CUDA and for CPUs with native bf16
    resume: bool = False
    stop_after: int | None = None  # end this process after that epoch; the schedule still spans `epochs`
    download: bool = False
    command: list[str] = field(default_factory=list)

    def filled(self) -> TrainConfig:
        """The recipe's value and the defaults for every field not given (amp stays: the device decides)."""
        defaults = {"val_size": 5000, "seed": 0, **BASE_RECIPE, **RECIPES[self.arch]}
        return replace(self, **{key: value for key, value in defaults.items() if getattr(self, key) is None})

    def resumed(self, saved: TrainConfig) -> TrainConfig:
        """The saved run's settings, continued as configured: a flag that would change them is refused, except
        --epochs above the run's, which extends it."""
        if saved.arch != self.arch:
            raise TrainError(f"--resume: {self.out} holds a {saved.arch} run, not {self.arch}")
        for key in ("batch_size", "lr", "cutout", "val_size", "seed"):
            given, kept = getattr(self, key), getattr(saved, key)
            if given is not None and given != kept:
                flag = "--" + key.replace("_", "-")
                raise TrainError(
                    f"--resume keeps the run's settings: {flag} {given} differs from its {kept}; "
                    f"drop {flag}, or start a new run with another --out"
                )
        if self.epochs is not None and self.epochs < saved.epochs:
            raise TrainError(
                f"--resume: --epochs {self.epochs} is below the run's {saved.epochs}; "
                "a run can be extended, not shortened"
            )
        return replace(
            saved.filled(),  # a run saved before a recipe part existed ran without it: the base recipe's value
            data=self.data,
            out=self.out,
            device=self.device,
            amp=self.amp,
            resume=True,
            stop_after=self.stop_after,
            download=self.download,
            epochs=self.epochs or saved.epochs,
        )


class TrainError(UserError):
    """A problem with the run's set-up, reported as one line."""


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise TrainError("--device cuda was asked for, but PyTorch sees no usable GPU; use --device cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"


FP32_FALLBACK = (
    "fp32: this CPU has no native bf16 (avx512_bf16 or amx_bf16), so bf16 autocast would be emulated, ~20x slower "
    "(WhiteNet on a 2-core AVX2 EPYC: 11 against 220 images/s); fp32 trains to the same accuracy, in more time "
    "than bf16 takes on a CPU that has it"
)


def bf16_is_fast(device: torch.device) -> bool:
    """CUDA always; a CPU only with native bf16 (AVX512-BF16 or AMX), where autocast emulation is ~10x slower."""
    return device.type == "cuda" or bool({"avx512_bf16", "amx_bf16"} & set(instruction_sets()))


def split_validation(train: Split, val_size: int, seed: int) -> tuple[Split, Split]:
    """Hold out a seeded random part of the training images (at most 10% of them)."""
    n_val = min(val_size, len(train) // 10)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).numpy()
    val, rest = order[:n_val], np.sort(order[n_val:])
    return Split(train.images[rest], train.labels[rest]), Split(train.images[val], train.labels[val])


class Augmenter:
    """Random crop (of the image padded by `pad` pixels, with zeros or reflected), horizontal flip and Cutout on
    uint8 NHWC batches, with normalization."""

    def __init__(self, device: torch.device, cutout: int = 0, pad: int = 4, reflect: bool = False) -> None:
        self.cutout, self.pad, self.reflect = cutout, pad, reflect
        self.table = torch.from_numpy(normalization_table(MEAN, STD)).to(device)
        self.channels = torch.arange(3, device=device)
        self.grid = torch.arange(32, device=device)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> float32 NCHW (channels_last strides), from the service's lookup table."""
        return self.table[self.channels, pixels.long()].permute(0, 3, 1, 2)

    def __call__(self, pixels: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """`offsets` (B, 4): crop row and column offsets (0 to 2 x pad), then the Cutout square's centre row and
        column."""
        rows = offsets[:, 0:1] + self.grid
        cols = offsets[:, 1:2] + self.grid
        cols = torch.where(flips[:, None], cols.flip(1), cols)
        batch = torch.arange(len(pixels), device=pixels.device)[:, None, None]
        if self.reflect:  # padded coordinates back into the image, mirrored at its edges
            rows, cols = (31 - (31 - (t - self.pad).abs()).abs() for t in (rows, cols))
            x = self.normalize(pixels[batch, rows[:, :, None], cols[:, None, :]])
        else:
            padded = nn.functional.pad(pixels, (0, 0, self.pad, self.pad, self.pad, self.pad))
            x = self.normalize(padded[batch, rows[:, :, None], cols[:, None, :]])
        if self.cutout:
            half = self.cutout // 2
            inside_rows = (self.grid[None, :] - offsets[:, 2:3]).abs() < half
            inside_cols = (self.grid[None, :] - offsets[:, 3:4]).abs() < half
            x = x.masked_fill((inside_rows[:, :, None] & inside_cols[:, None, :])[:, None], 0.0)
        return x


def warmup_then_decay(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup: float = 0.15,
    start: float | None = None,
    end: float = 0.0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up over the first `warmup` share of the steps from `start` times the peak (None: one warm-up
    step's share), then linear decay to `end` times the peak at the last step."""
    warm = max(1, int(warmup * total_steps))
    schedule = torch.optim.lr_scheduler
    return schedule.SequentialLR(
        optimizer,
        [
            schedule.LinearLR(optimizer, 1 / warm if start is None else start, 1.0, total_iters=max(1, warm - 1)),
            schedule.LinearLR(optimizer, 1.0, end, total_iters=max(1, total_steps - warm)),
        ],
        milestones=[warm],
    )


def epoch_plan(
    n: int, epoch: int, seed: int, pad: int = 4, alternate_flips: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order, crop offsets and Cutout centres, and flips of one epoch. With `alternate_flips`, each image is
    flipped in every other epoch, from a seeded random start, rather than at random in each.

    A function of (seed, epoch) alone, so a resumed run repeats them exactly.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g)
    crops = torch.randint(0, 2 * pad + 1, (n, 2), generator=g)
    flips = torch.rand(n, generator=g) < 0.5
    centres = torch.randint(0, 32, (n, 2), generator=g)
    if alternate_flips:
        first = torch.rand(n, generator=torch.Generator().manual_seed(seed * 100_003)) < 0.5
        flips = first ^ bool(epoch % 2 == 0)
    return order, torch.cat([crops, centres], 1), flips


class Lookahead:
    """Every LOOKAHEAD_EVERY steps, move a running average of the weights towards them and set them to it: the
    average's weight on its past grows from 0 to 0.95**5 with the cube of the run's progress, and the last step
    leaves the average as the model."""

    def __init__(self, model: nn.Module, total_steps: int, state: dict | None = None) -> None:
        self.model, self.total_steps = model, total_steps
        self.average = state or {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def step(self, step: int) -> None:
        """After optimizer step `step` (1-based)."""
        if step % LOOKAHEAD_EVERY and step < self.total_steps:
            return
        keep = 1.0 if step >= self.total_steps else 0.95**5 * (step / self.total_steps) ** 3
        weights = self.model.state_dict()
        for name, average in self.average.items():
            average.lerp_(weights[name], 1 - keep)
            weights[name].copy_(average)


@torch.no_grad()
def split_metrics(model: nn.Module, data: Split, aug: Augmenter, device: torch.device, amp: bool) -> dict:
    """Loss, accuracy and per-class accuracy on a split, without augmentation."""
    model.eval()
    images = torch.from_numpy(data.images).to(device)
    labels = torch.from_numpy(data.labels).to(device)
    loss_sum, preds = 0.0, []
    for start in range(0, len(data), 1000):
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            logits = model(aug.normalize(images[start : start + 1000])).float()
        loss_sum += nn.functional.cross_entropy(logits, labels[start : start + 1000], reduction="sum").item()
        preds.append(logits.argmax(1))
    correct = (torch.cat(preds) == labels).cpu().numpy()
    per_class = {
        name: float(correct[data.labels == i].mean()) if (data.labels == i).any() else float("nan")
        for i, name in enumerate(CLASS_NAMES)
    }
    return {"loss": loss_sum / len(data), "accuracy": float(correct.mean()), "per_class": per_class}


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m["epoch"] for m in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [m["train_loss"] for m in history], label="train")
    ax_loss.plot(epochs, [m["val_loss"] for m in history], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_acc.plot(epochs, [m["train_acc"] for m in history], label="train")
    ax_acc.plot(epochs, [m["val_acc"] for m in history], label="validation")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def train(given: TrainConfig) -> dict:
    """Run the training described by `given` (continued from its run folder with --resume); returns the final
    summary (rank 0) or {}."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = pick_device(given.device, int(os.environ.get("LOCAL_RANK", "0")))
    last_path = Path(given.out) / "last.pt"
    if given.resume:
        if not last_path.exists():
            raise TrainError(f"--resume: no {last_path} to resume from; start without --resume")
        state = torch.load(last_path, map_location=device, weights_only=True)
        cfg = given.resumed(TrainConfig(**state["config"]))
    else:
        if last_path.exists():
            raise TrainError(f"{given.out} already holds a run; continue it with --resume, or choose another --out")
        state, cfg = None, given.filled()
    explain_fp32 = cfg.amp is None and not bf16_is_fast(device)  # chosen for the user: say why
    cfg = replace(cfg, amp=bf16_is_fast(device) if cfg.amp is None else cfg.amp)
    torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.batch_size % world:
        raise TrainError(f"--batch-size {cfg.batch_size} must be divisible by the {world} processes")
    try:
        return _train(cfg, state, device, rank, world, explain_fp32)
    finally:
        if world > 1:
            dist.destroy_process_group()


def parameter_groups(model: nn.Module, lr: float, weight_decay: float, bias_lr_scale: float) -> list[dict]:
    """The parameters to train; with `bias_lr_scale` other than 1, the BatchNorm shifts form a group whose learning
    rate is that many times higher and its weight decay as many times lower (the same decay per step)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    if bias_lr_scale == 1:
        return [{"params": trained}]
    norms = (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    shifts = {id(m.bias) for m in norms if m.bias is not None}
    return [
        {"params": [p for p in trained if id(p) not in shifts]},
        {
            "params": [p for p in trained if id(p) in shifts],
            "lr": lr * bias_lr_scale,
            "weight_decay": weight_decay / bias_lr_scale,
        },
    ]


def _train(
    cfg: TrainConfig, state: dict | None, device: torch.device, rank: int, world: int, explain_fp32: bool = False
) -> dict:
    """Train from scratch, or from `state` (last.pt) when resuming."""
    out = Path(cfg.out)
    is_main = rank == 0
    last_path, best_path = out / "last.pt", out / "best.pt"
    if state is not None and state["epoch"] >= cfg.epochs:
        if is_main:
            print(
                f"{out} is finished ({state['epoch']} of {cfg.epochs} epochs): nothing to do; "
                "pass --epochs N to train it longer",
                flush=True,
            )
        return {}
    train_data, val_data = split_validation(load_split(cfg.data, "train", cfg.download), cfg.val_size, cfg.seed)
    test_data = _test_split(cfg.data, announce=is_main)
    if is_main:  # once the data has loaded: a run refused for its data leaves no folder behind
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = get_model(cfg.arch).to(device, memory_format=torch.channels_last)
    aug = Augmenter(device, cfg.cutout, cfg.pad, cfg.reflect)
    images = torch.from_numpy(train_data.images).to(device)
    labels = torch.from_numpy(train_data.labels).to(device)
    if hasattr(model, "fit_to") and state is None:  # WhiteNet's whitening filters, from the training images
        if cfg.whitening:
            model.fit_to(aug.normalize(images[:5000]))
        else:  # learned from its random start, like any other layer
            model.whiten.weight.requires_grad_(True)
    optimizer = torch.optim.SGD(
        parameter_groups(model, cfg.lr, cfg.weight_decay, cfg.bias_lr_scale),
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=True,
        weight_decay=cfg.weight_decay,
    )
    local_batch = cfg.batch_size // world
    steps = max(1, len(train_data) // cfg.batch_size)
    history: list[dict] = []
    best_acc, start_epoch = -1.0, 1
    if state is None:
        scheduler = warmup_then_decay(optimizer, cfg.epochs * steps, cfg.warmup, cfg.lr_start, cfg.lr_end)
    else:
        model.load_state_dict(state["model"])
        torch.set_rng_state(state["rng"]["torch"])
        history, best_acc, start_epoch = state["history"], state["best_val_acc"], state["epoch"] + 1
        scheduler = _resumed_schedule(optimizer, state, cfg, steps, announce=is_main)
    lookahead = Lookahead(model, cfg.epochs * steps, state and state.get("lookahead")) if cfg.lookahead else None
    if is_main:
        capped = f" (--val-size {cfg.val_size} capped at a tenth of them)" if len(val_data) < cfg.val_size else ""
        print(
            f"{cfg.arch}: {len(train_data):,} training, {len(val_data):,} validation{capped}, "
            f"{len(test_data) if test_data else 'no'} test images; {device_name(device)} x {world}, "
            f"{'bf16 autocast' if cfg.amp else 'fp32'}; epochs {start_epoch}-{cfg.epochs}, {steps} steps each, "
            f"batch {cfg.batch_size}",
            flush=True,
        )
        if explain_fp32:
            print(FP32_FALLBACK, flush=True)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    last_epoch = min(cfg.epochs, cfg.stop_after or cfg.epochs)
    for epoch in range(start_epoch, last_epoch + 1):
        model.train()
        plan = epoch_plan(len(train_data), epoch, cfg.seed, cfg.pad, cfg.alternate_flips)
        order, offsets, flips = (t.to(device) for t in plan)
        totals = torch.zeros(2, device=device)  # loss sum, correct
        count = 0
        started = time.perf_counter()
        bar = tqdm(range(steps), desc=f"epoch {epoch}/{cfg.epochs}", disable=not is_main or None, leave=False)
        for step in bar:
            batch = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            idx = batch[rank * local_batch : (rank + 1) * local_batch]  # this process's share
            x, y = aug(images[idx], offsets[idx], flips[idx]), labels[idx]
            with torch.autocast(device.type, torch.bfloat16, enabled=cfg.amp):
                logits = net(x)
                loss = criterion(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if epoch > cfg.whiten_bias_epochs > 0:  # WhiteNet's whitening bias has learned what it will
                model.whiten.bias.grad = None  # SGD leaves a parameter without a gradient as it is
            optimizer.step()
            scheduler.step()
            if lookahead:
                lookahead.step((epoch - 1) * steps + step + 1)
            totals += torch.stack([loss.detach() * len(y), (logits.argmax(1) == y).sum()])
            count += len(y)
            if not bar.disable and step % 20 == 0:  # .item() waits for the device: only when someone watches
                bar.set_postfix(
                    loss=f"{totals[0].item() / count:.3f}",
                    acc=f"{totals[1].item() / count:.3f}",
                    img_s=f"{count * world / (time.perf_counter() - started):.0f}",
                )
        totals = torch.cat([totals, torch.tensor([float(count)], device=device)])
        if world > 1:
            dist.all_reduce(totals)
        seconds = time.perf_counter() - started
        val = split_metrics(model, val_data, aug, device, cfg.amp)
        metrics = {
            "epoch": epoch,
            "train_loss": totals[0].item() / totals[2].item(),
            "train_acc": totals[1].item() / totals[2].item(),
            "val_loss": val["loss"],
            "val_acc": val["accuracy"],
            "lr": scheduler.get_last_lr()[0],
            "seconds": round(seconds, 2),
            "images_per_s": round(totals[2].item() / seconds, 1),
        }
        history.append(metrics)
        if not is_main:
            continue
        print(
            f"epoch {epoch}/{cfg.epochs}  train loss {metrics['train_loss']:.4f} acc {metrics['train_acc']:.4f}  "
            f"val loss {metrics['val_loss']:.4f} acc {metrics['val_acc']:.4f}  "
            f"{seconds:.1f}s ({metrics['images_per_s']:.0f} img/s)",
            flush=True,
        )
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "rng": {"torch": torch.get_rng_state()},
            **({"lookahead": lookahead.average} if lookahead else {}),
            "config": asdict(cfg),
            "history": history,
            "best_val_acc": max(best_acc, metrics["val_acc"]),
        }
        if metrics["val_acc"] > best_acc:
            best_acc = metrics["val_acc"]
            best = {
                "model": model.state_dict(),
                "epoch": epoch,
                "config": asdict(cfg),
                "history": history,
                "val_acc": best_acc,
            }
            write_atomic(best_path, functools.partial(torch.save, best))
        write_atomic(last_path, functools.partial(torch.save, state))
        write_atomic(out / "metrics.jsonl", lambda tmp: tmp.write_text("".join(json.dumps(m) + "\n" for m in history)))
        plot_curves(history, out / "curves.png")
    if last_epoch < cfg.epochs:
        if is_main:
            print(f"stopped after epoch {last_epoch} of {cfg.epochs}; continue with --resume", flush=True)
        return {}
    return _finish(cfg, device, out, history, len(val_data), test_data) if is_main else {}


def _resumed_schedule(
    optimizer: torch.optim.Optimizer, state: dict, cfg: TrainConfig, steps: int, announce: bool
) -> torch.optim.lr_scheduler.LRScheduler:
    """Load the optimizer's state and return the run's schedule where it stopped; extended to `cfg.epochs`, the
    schedule of a run that long at this step."""
    planned, epochs = state["config"]["epochs"], cfg.epochs
    shape = (cfg.warmup, cfg.lr_start, cfg.lr_end)
    if epochs == planned:
        scheduler = warmup_then_decay(optimizer, planned * steps, *shape)  # sets the rates: load the saved ones after
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        return scheduler
    optimizer.load_state_dict(state["optimizer"])
    was = optimizer.param_groups[0]["lr"]
    for group in optimizer.param_groups:  # the schedulers scale the current rate: start again from the peak
        group["lr"] = group["initial_lr"]
    scheduler = warmup_then_decay(optimizer, epochs * steps, *shape)
    with warnings.catch_warnings():  # stepping ahead of optimizer.step() is the point here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(state["epoch"] * steps):
            scheduler.step()
    if announce:
        print(
            f"extending the run from {planned} to {epochs} epochs: the learning rate follows the {epochs}-epoch "
            f"schedule from epoch {state['epoch'] + 1}, {scheduler.get_last_lr()[0]:.4g} (was {was:.4g})",
            flush=True,
        )
    return scheduler


def _test_split(data: str, announce: bool) -> Split | None:
    try:
        return load_split(data, "test")
    except DataError as exc:  # no test split: say so and keep the run
        if announce:
            print(f"no test evaluation: {exc}", file=sys.stderr)
        return None


def _finish(
    cfg: TrainConfig, device: torch.device, out: Path, history: list[dict], val_images: int, test: Split | None
) -> dict:
    """Evaluate best.pt once on the test split and write summary.json."""
    best = torch.load(out / "best.pt", map_location=device, weights_only=True)
    model = get_model(cfg.arch).to(device, memory_format=torch.channels_last)
    model.load_state_dict(best["model"])
    summary = {
        "arch": cfg.arch,
        "best_epoch": best["epoch"],
        "val_acc": best["val_acc"],
        "epochs": cfg.epochs,
        "train_seconds": round(sum(m["seconds"] for m in history), 1),
        "device": device_name(device),
        "config": asdict(cfg),
        "val_images": val_images,
    }
    if test is not None:
        result = split_metrics(model, test, Augmenter(device), device, cfg.amp)
        summary.update(test_acc=result["accuracy"], test_per_class=result["per_class"])
        print(f"test accuracy of best.pt (epoch {best['epoch']}): {result['accuracy']:.4f}", flush=True)
    write_atomic(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2, default=float) + "\n"))
    return summary
