"""Real photographs of none of CIFAR-10's classes, for measuring the out-of-distribution score: Tiny ImageNet's
validation images, downscaled to 32x32 (the public repository DhanashriPalodkar/imageet32x32), without the classes
that are, or look like, one of CIFAR-10's (cats, dogs, birds, frogs, cars, trucks, buses, boats, deer-like animals,
aircraft-like objects).

    python -m bench.outside_photos REPO_GIT_DIR OUT_FOLDER [--images 2000]

REPO_GIT_DIR is a git directory of that repository (no work tree needed); the images are written under OUT_FOLDER,
which belongs outside the checkout. Data, not code, comes from the repository.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import numpy as np

# WordNet IDs of Tiny ImageNet classes left out because CIFAR-10 has them, or something a person would call one.
OVERLAPPING = {
    "n02123045": "tabby cat",
    "n02123394": "Persian cat",
    "n02124075": "Egyptian cat",
    "n02125311": "cougar",
    "n02129165": "lion",
    "n02085620": "Chihuahua",
    "n02094433": "Yorkshire terrier",
    "n02099601": "golden retriever",
    "n02099712": "Labrador retriever",
    "n02106662": "German shepherd",
    "n02113799": "standard poodle",
    "n01641577": "bullfrog",
    "n01644900": "tailed frog",
    "n02002724": "black stork",
    "n02056570": "king penguin",
    "n02058221": "albatross",
    "n01855672": "goose",
    "n04146614": "school bus",
    "n03796401": "moving van",
    "n03977966": "police van",
    "n04465501": "tractor",
    "n03670208": "limousine",
    "n04285008": "sports car",
    "n02814533": "beach wagon",
    "n03100240": "convertible",
    "n04487081": "trolleybus",
    "n03444034": "go-kart",
    "n03393912": "freight car",
    "n02917067": "bullet train",
    "n03447447": "gondola",
    "n03662601": "lifeboat",
    "n02423022": "gazelle",
    "n02415577": "bighorn",
    "n04008634": "projectile, missile",
}


def git(repo: Path, *args: str) -> bytes:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, check=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", type=Path, help="git directory of DhanashriPalodkar/imageet32x32")
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    annotations = git(args.repo, "show", "HEAD:val/val_annotations.txt").decode()
    rows = [line.split("\t")[:2] for line in annotations.splitlines()]
    kept = sorted(name for name, wnid in rows if wnid not in OVERLAPPING)
    chosen = sorted(np.random.default_rng(args.seed).choice(kept, args.images, replace=False))
    args.out.mkdir(parents=True, exist_ok=True)
    for name in chosen:
        (args.out / name).write_bytes(git(args.repo, "show", f"HEAD:val/images/{name}"))
    print(f"wrote {len(chosen)} of {len(kept)} images ({len(rows) - len(kept)} of overlapping classes left out)")


if __name__ == "__main__":
    main()
