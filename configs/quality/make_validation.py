"""Issue #22: rebuild the two validation folders from the installed photo packages.

- ``OUT/validation``: the 20 validation photos of ``validation_photos.txt`` (copied as they are;
  Plasma's ``<Name>/contents/images/<size>.jpg`` is named ``<Name>.jpg``).
- ``OUT/validation-crops``: 3 random square crops of each (40-70 % of the shorter side,
  ``random.Random(0)``, bicubic to 224 px), so the classifier sees photo-scale detail and n = 60.

Labels are the classifier's clean predictions (``impure evaluate`` uses them for unlabelled folders).

    python configs/quality/make_validation.py runs
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent


def photo_name(path: Path) -> str:
    if path.parent.name == "images" and path.parent.parent.name == "contents":  # Plasma's layout
        return path.parents[2].name + path.suffix
    return path.name


def main(out: Path) -> None:
    listed = subprocess.run(["sh", str(HERE / "photos.sh"), str(HERE / "validation_photos.txt")],
                            check=True, capture_output=True, text=True).stdout.split()
    photos, crops = out / "validation", out / "validation-crops"
    photos.mkdir(parents=True, exist_ok=True)
    crops.mkdir(parents=True, exist_ok=True)
    for source in map(Path, listed):
        shutil.copyfile(source, photos / photo_name(source))
    rng = random.Random(0)
    for path in sorted(photos.iterdir()):
        image = Image.open(path).convert("RGB")
        w, h = image.size
        for k in range(3):
            side = int(min(w, h) * rng.uniform(0.4, 0.7))
            x, y = rng.randint(0, w - side), rng.randint(0, h - side)
            image.crop((x, y, x + side, y + side)).resize((224, 224), Image.BICUBIC).save(crops / f"{path.stem}_crop{k}.png")
    print(f"{len(listed)} photos in {photos}, {3 * len(listed)} crops in {crops}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs"))
