"""Whether two files hold the same picture, compared pixel by pixel: what ``dedup --keep`` checks before
it lists a file for deletion.

Embeddings say two pictures are alike, not that one is a copy of the other: at the default threshold
a small model puts a red hexagon beside a red circle, and CLIP puts two shots of one scene together.
So a file is listed only when its picture, shown upright and shrunk to a grey :data:`SIDE` x
:data:`SIDE` thumbnail (an average over each cell, as a box filter), differs from the kept file's by at
most :data:`TOLERANCE` of the grey scale on average, and its shape (width over height) by at most
:data:`SHAPE_TOLERANCE`. A copy saved at another size or JPEG quality stays well within that (a
re-encoded photo differs by a level or two of 255), and so does a crop of a few pixels a side; another
picture, a larger crop or an edit does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

SIDE = 32
TOLERANCE = 0.03  # a mean difference of about 8 levels of 255
SHAPE_TOLERANCE = 0.02


@dataclass
class Pictures:
    """Grey thumbnails of the files compared, each decoded once."""

    seen: dict[str, tuple[np.ndarray, float] | str] = field(default_factory=dict)

    def look(self, path: str) -> tuple[np.ndarray, float] | str:
        """The file's thumbnail and shape, or why it cannot be read."""
        if path not in self.seen:
            import numpy as np
            from PIL import Image

            from clipcli.images.decode import load_image

            try:
                image = load_image(Path(path), draft_size=4 * SIDE)
            except (OSError, ValueError) as e:
                self.seen[path] = f"cannot be read to compare its picture ({e})"
            else:
                grey = image.convert("L").resize((SIDE, SIDE), Image.Resampling.BOX)
                self.seen[path] = (np.asarray(grey, np.float32) / 255.0, image.width / max(image.height, 1))
        return self.seen[path]

    def differs(self, kept: str, copy: str) -> str | None:
        """Why ``copy`` is not the picture ``kept`` is (None: it is, within the tolerances)."""
        a, b = self.look(kept), self.look(copy)
        if isinstance(a, str):
            return f"the file kept, {kept}, {a}"
        if isinstance(b, str):
            return f"it {b}"
        if abs(a[1] / b[1] - 1) > SHAPE_TOLERANCE:
            return f"its picture has another shape than the kept file's ({b[1]:.3f} against {a[1]:.3f} wide per high)"
        difference = float(abs(a[0] - b[0]).mean())
        if difference > TOLERANCE:
            return (
                f"its picture differs from the kept file's, {kept} (by {difference:.3f} of the grey scale on "
                f"average, over {TOLERANCE}): alike by their embeddings, not a copy"
            )
        return None
