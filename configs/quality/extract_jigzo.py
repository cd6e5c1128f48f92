"""Extract the photographs inside Debian's ``jigzo-data`` puzzles (GPL-2+) as PNG files.

    apt-get install jigzo-data && python configs/quality/extract_jigzo.py OUT_DIR

Each ``.pzl`` file holds a header, a thumbnail JPEG and a 1024x1024 JPEG texture atlas whose top-left
region is the whole picture (the puzzle pieces are packed beside it). The picture starts 2 px in
from the atlas corner; its size is not in the header in a form we could rely on, so it is listed
here (read off the atlases by eye and checked: the saved PNGs match the atlas pixels exactly).
``penguin`` is left out: its licence (CC-BY-NC-SA-1.0) is non-commercial.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

from PIL import Image

PUZZLES = Path("/usr/share/games/jigzo/puzzles/00_default")
# name: (height, width) of the picture in the atlas, from (2, 2)
SIZES = {
    "bike": (634, 480), "bird": (628, 478), "blackberry": (538, 538), "castle": (384, 776),
    "clouds": (532, 532), "gorilla2": (536, 536), "heli": (478, 632), "horse": (478, 632),
    "tobogan": (478, 632), "train": (538, 538), "windmill": (542, 542),
}
BORDER = 2


def extract(pzl: Path, size: tuple[int, int]) -> Image.Image:
    data = pzl.read_bytes()
    atlas_start = data.rfind(b"\xff\xd8\xff")  # the last JPEG in the file is the atlas
    if atlas_start <= 0:
        raise ValueError(f"{pzl}: no texture atlas JPEG found")
    atlas = Image.open(io.BytesIO(data[atlas_start:])).convert("RGB")
    h, w = size
    return atlas.crop((BORDER, BORDER, BORDER + w, BORDER + h))


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for name, size in SIZES.items():
        (pzl,) = PUZZLES.glob(f"{name}-*.pzl")
        target = out / f"{name}.png"
        tmp = target.with_suffix(".png.tmp")
        extract(pzl, size).save(tmp, format="PNG")
        tmp.replace(target)  # atomic: an interrupted run leaves no half-written photo
        print(target)


if __name__ == "__main__":
    main()
