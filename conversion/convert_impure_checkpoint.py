"""Convert the authors' released IMPure checkpoint (github.com/NoWindButRain/IMPure) into a Hub folder.

Same as ``impure convert`` (wired in ``impure_hf/cli.py``; the conversion lives in ``impure_hf/convert.py``).

    python conversion/convert_impure_checkpoint.py IMPure.pth --out impure-vit-b-release
    python conversion/convert_impure_checkpoint.py tiny.pth --out tiny --config-from-args \\
        --num-heads 4 --decoder-num-heads 3 --fusion-layers 0 3 5
    python conversion/convert_impure_checkpoint.py IMPure.pth --out impure-vit-b-release \\
        --push-to-hub ORG/impure-vit-b-release

Flags: ``--preset NAME`` (sizes from a preset, default impure-vit-b-release) or
``--config-from-args`` (sizes from the checkpoint's args and shapes; heads from the release
factory name or ``--num-heads`` / ``--decoder-num-heads``), ``--fusion-layers`` (the fused encoder
blocks, the release's out_indices: not recorded in the file, needed unless the checkpoint has five
fusion projections, then 0 2 4 6 8), ``--trust-checkpoint`` (unpickle with
weights_only=False: trusted files only), ``--repo-id``, ``--push-to-hub REPO``, ``--private``.
"""

import sys

from impure_hf.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
