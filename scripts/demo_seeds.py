"""The demo on ``train.seed`` 42, 1 and 2, with the mean and the targets (docs/demo.md).

    python scripts/demo_seeds.py --out runs/demo_seeds                  # three demos, one after the other
    python scripts/demo_seeds.py --out runs/demo_seeds --summarise      # only read OUT/seed_<s>/results.json
    python scripts/demo_seeds.py --out runs/x --backbone my.safetensors # another pretrain-backbone file

Each seed's demo goes to ``OUT/seed_<s>`` (what ``ivpt demo --seed S --out OUT/seed_<s>`` writes); the table of
every seed, the mean and the targets go to the terminal and ``OUT/seeds.txt``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ivpt.demo.seeds import SEEDS, format_seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder of the seeds' demo folders")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated train.seed values")
    parser.add_argument("--backbone", default=None, help="an ivpt pretrain-backbone file instead of the shipped one")
    parser.add_argument("--summarise", action="store_true", help="only read the seeds' results.json")
    args = parser.parse_args()

    out = Path(args.out)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    if not args.summarise:
        from ivpt.demo import run_demo

        for seed in seeds:
            run_demo(out / f"seed_{seed}", seed=seed, backbone_file=args.backbone)
    per_seed = {seed: json.loads((out / f"seed_{seed}" / "results.json").read_text()) for seed in seeds}
    text = format_seeds(per_seed)
    (out / "seeds.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
