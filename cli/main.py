"""The `cifar10` command: train, export, quantize, register, predict, evaluate.

The top of the project: it drives training and the shared core. Each subcommand imports
its heavy dependencies itself, so `predict` runs without torch.
"""

from __future__ import annotations

import argparse
import sys

from core.contract import PRECISIONS, SPLITS
from core.errors import UserError


def _train(args: argparse.Namespace) -> int:
    from training.train import TrainConfig, train

    cfg = TrainConfig(
        arch=args.arch,
        data=args.data,
        out=args.out,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        cutout=args.cutout,
        seed=args.seed,
        device=args.device,
        amp=args.amp,
        resume=args.resume,
        download=args.download,
        val_size=args.val_size,
        stop_after=args.stop_after,
        command=["cifar10", *sys.argv[1:]],
    )
    train(cfg)
    return 0


def _export(args: argparse.Namespace) -> int:
    from training.export import export

    export(args.checkpoint, args.out, data=args.data, register_as=args.register)
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from training.quantize import quantize

    agreement = {} if args.min_agreement is None else {"min_agreement": args.min_agreement}
    quantize(
        args.model, args.out, args.data, images=args.images, seed=args.seed, register_as=args.register, **agreement
    )
    return 0


def _register(args: argparse.Namespace) -> int:
    from core.store import register_and_compare

    print(register_and_compare(args.onnx_file, args.name))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate

    evaluate(args.data, model=args.model, split=args.split, out=args.out, precision=args.precision)
    return 0


def _predict(args: argparse.Namespace) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cifar10", description="Train, export and serve CIFAR-10 classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a network; checkpoints every epoch")
    p.add_argument("--arch", required=True, choices=("lenet", "resnet18"))
    p.add_argument("--data", required=True, help="zip, class-folder tree or cifar-10-batches-py root")
    p.add_argument("--out", required=True, help="run folder for checkpoints, metrics and curves")
    p.add_argument(
        "--epochs", type=int, help="default: the architecture's recipe; with --resume, more than the run's extends it"
    )
    p.add_argument("--batch-size", type=int, help="global batch size; default: the recipe's")
    p.add_argument("--lr", type=float, help="peak learning rate; default: the recipe's")
    p.add_argument("--cutout", type=int, help="side of the square Cutout erases, 0 for none; default: the recipe's")
    p.add_argument("--val-size", type=int, help="training images held out for validation (default 5000)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last.pt, with the run's own settings"
    )
    p.add_argument("--stop-after", type=int, metavar="EPOCH", help="end after this epoch; finish later with --resume")
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
    p.add_argument("--register", metavar="NAME", help="also store the ONNX file in the BentoML model store")
    p.set_defaults(func=_export)

    p = sub.add_parser("quantize", help="int8 copy of an fp32 ONNX file, calibrated on training images")
    p.add_argument("model", metavar="MODEL.onnx", help="an fp32 file from `cifar10 export`")
    p.add_argument("--data", required=True, help="the training data (its train split calibrates and checks)")
    p.add_argument("--out", required=True, help="FILE.onnx to write")
    p.add_argument("--images", type=int, default=512, help="calibration images, drawn from the train split")
    p.add_argument("--seed", type=int, default=0, help="for drawing the calibration images")
    p.add_argument(
        "--min-agreement",
        type=float,
        help="top-1 agreement with fp32 on held-out training images below which nothing is written (default 0.99)",
    )
    p.add_argument("--register", metavar="NAME", help="also store it in the BentoML model store")
    p.set_defaults(func=_quantize)

    p = sub.add_parser("register", help="store an ONNX file in the BentoML model store")
    p.add_argument("onnx_file")
    p.add_argument("--name", required=True, help="model name, e.g. cifar10-resnet18")
    p.set_defaults(func=_register)

    p = sub.add_parser("predict", help="label image files: CSV or JSONL, one row per input, in order")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders, globs, or - for paths on stdin")
    p.add_argument("--recursive", action="store_true", help="descend into sub-folders (and ** in globs)")
    p.add_argument("--model", default="resnet18", help="resnet18, resnet18-int8, lenet, a store tag or FILE.onnx")
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="resnet18 in int8 or fp32; auto: int8 on a CPU host, fp32 with a GPU",
    )
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default="-", help="FILE.csv, FILE.jsonl or - for stdout (default)")
    p.add_argument("--format", choices=("csv", "jsonl"), help="default: from the --out suffix, else csv")
    p.add_argument(
        "--workers",
        type=int,
        help="decoding processes (local; default: one per core) or requests in flight (server; default 4)",
    )
    p.add_argument("--server", metavar="URL", help="use a running service, e.g. http://localhost:3000")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=_predict)

    p = sub.add_parser("evaluate", help="accuracy, per-class accuracy and confusion matrix on a labelled split")
    p.add_argument("--data", required=True, help="zip, class-folder tree or cifar-10-batches-py root")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument(
        "--model", default="resnet18", help="resnet18, resnet18-int8, lenet, a store tag, FILE.onnx or a .pt checkpoint"
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="resnet18 in int8 or fp32; auto: int8 on a CPU host, fp32 with a GPU",
    )
    p.add_argument("--out", help="folder for evaluation.json and confusion.png")
    p.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cifar10` console command."""
    args = build_parser().parse_args(argv)
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
