"""The `cifar10` command: train, export, quantize, calibrate, register, predict, evaluate.

The top of the project: it drives training and the shared core. Each subcommand imports
its heavy dependencies itself, so `predict` runs without torch. Every option is checked
here, when the command line is read: a bad value is one line and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from collections.abc import Callable
from dataclasses import fields

from core.contract import PRECISIONS, SPLITS
from core.errors import UserError
from models import ARCHS


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (no usage block) that says where the help is."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def whole(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` (to `high`)."""

    def parse(text: str) -> int:
        allowed = f"a whole number from {low}" + (f" to {high}" if high is not None else " up")
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {allowed}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{text} is out of range: use {allowed}")
        return value

    return parse


def number(low: float, high: float | None = None, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a number from `low` (above it when `low_open`) to `high`."""

    def parse(text: str) -> float:
        allowed = f"a number {'above' if low_open else 'from'} {low:g}" + (f" to {high:g}" if high is not None else "")
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {allowed}") from None
        if not (value > low if low_open else value >= low) or (high is not None and value > high) or value != value:
            raise argparse.ArgumentTypeError(f"{text} is out of range: use {allowed}")
        return value

    return parse


def call(target: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand that imports `module:function` when it runs (so `predict` needs no torch) and calls it with the
    options its parameters name; a text it returns is printed."""

    def run(args: argparse.Namespace) -> int:
        module, name = target.split(":")
        function = getattr(importlib.import_module(module), name)
        options = vars(args)
        result = function(**{key: options[key] for key in inspect.signature(function).parameters if key in options})
        if isinstance(result, str):
            print(result)
        return result if isinstance(result, int) else 0

    return run


def _train(args: argparse.Namespace) -> int:
    from training.train import TrainConfig, train

    options = {spec.name: getattr(args, spec.name) for spec in fields(TrainConfig) if hasattr(args, spec.name)}
    train(TrainConfig(**{**options, "command": ["cifar10", *sys.argv[1:]]}))  # args.command is the subcommand
    return 0


def _predict(args: argparse.Namespace) -> int:
    if args.ray:
        return _predict_on_ray(args)
    for flag in ("address", "actors", "cpus_per_actor", "gpus_per_actor"):
        if getattr(args, flag) is not None:
            option = "--" + flag.replace("_", "-")
            raise UserError(f"{option} is for a Ray run; add --ray, or drop {option}")
    if args.format == "parquet" or args.out.endswith(".parquet"):
        raise UserError("Parquet output is written by a Ray run; add --ray, or write --out FILE.csv or FILE.jsonl")
    from cli.predict import predict

    return predict(
        args.inputs,
        model=args.model,
        top_k=args.top_k,
        batch_size=args.batch_size,
        out=args.out,
        fmt=args.format,
        workers=args.workers,
        server=args.server,
        recursive=args.recursive,
        force=args.force,
        quiet=args.quiet,
        precision=args.precision,
    )


def _predict_on_ray(args: argparse.Namespace) -> int:
    for flag, value in (("--server", args.server), ("--workers", args.workers)):
        if value is not None:
            raise UserError(f"{flag} is for a run on this machine; drop it, or drop --ray")
    try:
        from cli.ray_predict import predict_on_ray
    except ImportError:
        raise UserError("--ray needs Ray: pip install -e '.[ray]'") from None
    return predict_on_ray(
        args.inputs,
        address=args.address,
        model=args.model,
        precision=args.precision,
        top_k=args.top_k,
        batch_size=args.batch_size,
        out=args.out,
        fmt=args.format,
        recursive=args.recursive,
        force=args.force,
        quiet=args.quiet,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor or 1.0,
        gpus_per_actor=args.gpus_per_actor,
        image_column=args.image_column,
        id_column=args.id_column,
    )


MODEL_HELP = "a served name (resnet18, lenet, or NAME of a cifar10-NAME in the store), a store tag NAME:VERSION"
PRECISION_HELP = "a served name's copy: auto (int8 on a CPU host where its self-check passes, else fp32), fp32 or int8"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cifar10", description="Train, export and serve CIFAR-10 classifiers.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("train", help="train a network; checkpoints every epoch")
    p.add_argument("--arch", required=True, choices=ARCHS)
    p.add_argument("--data", required=True, help="zip, class-folder tree or cifar-10-batches-py root")
    p.add_argument("--out", required=True, help="run folder for checkpoints, metrics and curves")
    p.add_argument(
        "--epochs",
        type=whole(1),
        help="default: the architecture's recipe; with --resume, more than the run's extends it",
    )
    p.add_argument("--batch-size", type=whole(1), help="global batch size; default: the recipe's")
    p.add_argument("--lr", type=number(0, 10, low_open=True), help="peak learning rate; default: the recipe's")
    p.add_argument(
        "--cutout", type=whole(0, 32), help="side of the square Cutout erases, 0 for none; default: the recipe's"
    )
    p.add_argument("--val-size", type=whole(1), help="training images held out for validation (default 5000)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=whole(0), help="default 0")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last.pt, with the run's own settings"
    )
    p.add_argument(
        "--stop-after", type=whole(1), metavar="EPOCH", help="end after this epoch; finish later with --resume"
    )
    p.add_argument("--download", action="store_true", help="fetch the official CIFAR-10 release into --data")
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: on for CUDA and for CPUs with native bf16)",
    )
    p.set_defaults(func=_train)

    p = sub.add_parser("export", help="export a checkpoint to ONNX and check parity")
    p.add_argument("checkpoint", help="RUN_DIR/best.pt")
    p.add_argument("--out", required=True, help="FILE.onnx to write")
    p.add_argument("--data", help="images for the parity check (default: a synthetic batch)")
    p.add_argument(
        "--tolerance",
        type=number(0, 1, low_open=True),
        default=1e-4,
        help="largest logit difference from PyTorch, relative to the largest logit (default 1e-4)",
    )
    p.add_argument(
        "--register",
        dest="register_as",
        metavar="NAME",
        nargs="?",
        const="",
        help="also store it in the BentoML model store (NAME: default cifar10-ARCH)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.set_defaults(func=call("training.export:export"))

    p = sub.add_parser("quantize", help="int8 copy of an fp32 ONNX file, calibrated on training images")
    p.add_argument("source", metavar="MODEL.onnx", help="an fp32 file from `cifar10 export`")
    p.add_argument("--data", required=True, help="the training data (its train split calibrates and checks)")
    p.add_argument("--out", required=True, help="FILE.onnx to write")
    p.add_argument("--images", type=whole(1), default=512, help="calibration images, drawn from the train split")
    p.add_argument("--seed", type=whole(0), default=0, help="for drawing the calibration images")
    p.add_argument(
        "--min-agreement",
        type=number(0, 1),
        default=0.99,
        help="top-1 agreement with fp32 on held-out training images below which nothing is written (default 0.99)",
    )
    p.add_argument(
        "--register",
        dest="register_as",
        metavar="NAME",
        nargs="?",
        const="",
        help="also store it in the BentoML model store (NAME: default cifar10-ARCH-int8)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.set_defaults(func=call("training.quantize:quantize"))

    p = sub.add_parser(
        "calibrate",
        help="fit the softmax temperature and out-of-distribution score on the validation images; stamp them in a copy",
    )
    p.add_argument("model", metavar="MODEL.onnx", help="an ONNX file from `cifar10 export` or `cifar10 quantize`")
    p.add_argument(
        "--data",
        required=True,
        help="the training data (its held-out validation images fit; its test images are only measured)",
    )
    p.add_argument("--out", required=True, help="FILE.onnx to write (MODEL.onnx itself with --force)")
    p.add_argument(
        "--source",
        metavar="FP32.onnx",
        help="for an int8 file: the calibrated fp32 file it came from, whose temperature it takes",
    )
    p.add_argument("--val-size", type=whole(1), default=5000, help="the run's --val-size (default 5000)")
    p.add_argument("--seed", type=whole(0), default=0, help="the run's --seed (default 0)")
    p.add_argument("--diagram", metavar="FILE.png", help="also draw the reliability diagram, before and after")
    p.add_argument(
        "--ood-images",
        dest="outside",
        metavar="FOLDER",
        help="images of none of the classes, to measure the out-of-distribution score against (never fitted on)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.set_defaults(func=call("training.calibrate:calibrate"))

    p = sub.add_parser("register", help="store an ONNX file in the BentoML model store")
    p.add_argument("onnx_file", metavar="FILE.onnx", help="a file from `cifar10 export` or `cifar10 quantize`")
    p.add_argument(
        "--name",
        help="cifar10-ARCH[-ANYTHING][-int8], served as what follows cifar10-; default: "
        "cifar10-ARCH (-int8 for an int8 file), from the file's metadata",
    )
    p.set_defaults(func=call("core.store:register_and_compare"))

    p = sub.add_parser("predict", help="label image files: CSV or JSONL, one row per input, in order")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders, globs, or - for paths on stdin")
    p.add_argument("-r", "--recursive", action="store_true", help="descend into sub-folders (and ** in globs)")
    p.add_argument("-m", "--model", default="resnet18", help=f"{MODEL_HELP}, or FILE.onnx (default resnet18)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help=f"{PRECISION_HELP}; local runs only")
    p.add_argument(
        "-k", "--top-k", type=whole(1, 10), default=3, help="labels per image, most probable first (default 3)"
    )
    p.add_argument(
        "-b",
        "--batch-size",
        type=whole(1),
        default=64,
        help="images per model call (default 64; a server takes 64 at most)",
    )
    p.add_argument(
        "-o", "--out", default="-", help="FILE.csv, FILE.jsonl, - for stdout (default), or with --ray DIR.parquet"
    )
    p.add_argument("--format", choices=("csv", "jsonl", "parquet"), help="default: from the --out suffix, else csv")
    p.add_argument(
        "-w",
        "--workers",
        type=whole(1, 256),
        help="decoding processes (local; default: one per core) or requests in flight (server; default 4)",
    )
    p.add_argument("-s", "--server", metavar="URL", help="use a running service, e.g. http://localhost:3000")
    p.add_argument("-f", "--force", action="store_true", help="overwrite an existing --out file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line")
    ray = p.add_argument_group("on a Ray cluster (pip install -e '.[ray]')")
    ray.add_argument(
        "--ray",
        action="store_true",
        help="run on Ray Data; inputs may also be *.parquet and URIs (s3://bucket/images/)",
    )
    ray.add_argument(
        "--address",
        help="the cluster: auto (the one this node is in) or ray://HOST:10001 (default: RAY_ADDRESS, else a local Ray)",
    )
    ray.add_argument("--actors", type=whole(1, 100_000), help="model actors (default: one per GPU, else per CPU)")
    ray.add_argument("--cpus-per-actor", type=number(0, low_open=True), help="also its threads (default 1)")
    ray.add_argument("--gpus-per-actor", type=number(0), help="default: 1 where the cluster has GPUs, else 0")
    ray.add_argument("--image-column", default="image", help="Parquet input: the image bytes (default image)")
    ray.add_argument("--id-column", default="path", help="Parquet input: what names each row (default path)")
    p.set_defaults(func=_predict)

    p = sub.add_parser("evaluate", help="accuracy, per-class accuracy and confusion matrix on a labelled split")
    p.add_argument("--data", required=True, help="zip, class-folder tree or cifar-10-batches-py root")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument(
        "-m", "--model", default="resnet18", help=f"{MODEL_HELP}, FILE.onnx or a .pt checkpoint (default resnet18)"
    )
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help=PRECISION_HELP)
    p.add_argument("-o", "--out", help="folder for evaluation.json and confusion.png")
    p.add_argument("-f", "--force", action="store_true", help="overwrite evaluation.json and confusion.png in --out")
    p.set_defaults(func=call("training.evaluate:evaluate"))
    parser.commands = sub.choices  # each subcommand's parser, to word the errors main() finds
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cifar10` console command."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the subcommand's parser: "cifar10 predict: error: ...; see cifar10 predict --help"
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except UserError as exc:
        print(f"cifar10 {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cifar10 {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `cifar10 predict ... | head`
        sys.stderr.close()
        return 141


if __name__ == "__main__":
    sys.exit(main())
