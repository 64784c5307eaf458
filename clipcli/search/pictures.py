"""Whether two files hold the same picture, compared pixel by pixel: what ``dedup --keep`` checks before
it lists a file for deletion.

Embeddings say two pictures are alike, not that one is a copy of the other: at the default threshold
a small model puts a red hexagon beside a red circle, and CLIP puts two shots of one scene together.
So a file is listed only when it is byte for byte the kept file, or when its picture is the kept
file's at another size or compression:

- each is shown upright and shrunk to at most :data:`SIDE` pixels a side; the larger is brought to the
  smaller's size (an average over each cell, as a box filter), both are blurred a little
  (:data:`BLUR` pixels, so that two resampling filters do not differ at edges), and no pixel may differ
  by more than :data:`TOLERANCE` of the scale in any channel. A mean would not do: two invoices, or a
  blank page and the same page signed, differ in a few pixels only;
- their shapes (width over height) agree within :data:`SHAPE_TOLERANCE`;
- a picture of several frames or pages (an animated GIF, a multi-page TIFF) is compared byte for byte
  only: its first frame says nothing of the others.

Calibrated on copies at half and a quarter of the size and at JPEG qualities 30 to 70 (largest
difference 0.08) against different pictures: two invoices of different lines, a blank page and the
same page signed, a crop of 8 pixels a side, two shapes (0.21 and more). A crop or an edit is so
never listed; erring this way keeps a copy, never deletes a picture.
"""

from __future__ import annotations

import filecmp
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

SIDE = 1024
BLUR = 2.0
TOLERANCE = 0.12
SHAPE_TOLERANCE = 0.02


@dataclass
class Pictures:
    """The files compared, each decoded once (shrunk to :data:`SIDE`), or why it cannot be compared."""

    seen: dict[str, Image.Image | str] = field(default_factory=dict)

    def look(self, path: str) -> Image.Image | str:
        if path not in self.seen:
            from PIL import Image

            from clipcli.images.decode import FORMATS, load_image

            try:
                with Image.open(path, formats=FORMATS) as im:
                    frames = getattr(im, "n_frames", 1)
                if frames > 1:
                    self.seen[path] = f"has {frames} frames or pages, and is not byte for byte the kept file"
                else:
                    image = load_image(Path(path), draft_size=SIDE)
                    image.thumbnail((SIDE, SIDE), Image.Resampling.BOX)
                    self.seen[path] = image
            except (OSError, ValueError) as e:
                self.seen[path] = f"cannot be read to compare its picture ({e})"
        return self.seen[path]

    def differs(self, kept: str, copy: str) -> str | None:
        """Why ``copy`` is not the picture ``kept`` is (None: it is, within the tolerances)."""
        try:
            if filecmp.cmp(kept, copy, shallow=False):
                return None
        except OSError:
            pass  # each is looked at below, which says what cannot be read
        a, b = self.look(kept), self.look(copy)
        if isinstance(a, str):
            return f"the file kept, {kept}, {a}"
        if isinstance(b, str):
            return f"it {b}"
        shape_a, shape_b = a.width / max(a.height, 1), b.width / max(b.height, 1)
        if abs(shape_a / shape_b - 1) > SHAPE_TOLERANCE:
            shapes = f"{shape_b:.3f} against {shape_a:.3f} wide per high"
            return f"its picture has another shape than the kept file's ({shapes})"
        worst = _largest_difference(a, b)
        if worst > TOLERANCE:
            return (
                f"its picture differs from the kept file's, {kept} (by up to {worst:.2f} of the scale at a pixel, "
                f"over {TOLERANCE}): alike by their embeddings, not a copy"
            )
        return None


def _largest_difference(a: Image.Image, b: Image.Image) -> float:
    import numpy as np
    from PIL import Image, ImageFilter

    size = min(a.size, b.size, key=lambda s: s[0] * s[1])

    def pixels(image: Image.Image) -> np.ndarray:
        shrunk = image.resize(size, Image.Resampling.BOX) if image.size != size else image
        return np.asarray(shrunk.filter(ImageFilter.GaussianBlur(BLUR)), np.float32) / 255.0

    return float(np.abs(pixels(a) - pixels(b)).max())
