"""Purifier speed and memory beside timm ViT-B/16, measured in one run. Same as `impure bench`.

    python benchmarks/bench_purify.py --out benchmarks/results        # full table (about 20 min on 2 cores)
    python benchmarks/bench_purify.py --presets impure-vit-tiny --batches 1 8 --repeats 3
"""

import sys

from impure_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
