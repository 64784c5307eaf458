"""What the input stages pass along: :class:`ImageRef` (one image to decode), :class:`Skipped` (one input
left out, with its reason), and, for containers of images (a video's frames, a WebDataset shard's
members), the contract a container implements (:class:`Container`) and what its decoding gives
(:class:`Decoded`). The containers themselves are found through :mod:`clipcli.images.containers`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from PIL import Image

FileStat = tuple[int, float]  # (bytes, mtime) of a file as it was read


@dataclass(frozen=True, slots=True)  # one per input: slots keep a million of them small
class ImageRef:
    """One input image. ``path`` names its row: the path as the user wrote it (or folder + relative
    path), or, for an image inside a container, ``CONTAINER#MEMBER`` (``clip.mp4#t=12.000``,
    ``shard.tar#000042``). ``file`` is the file to open (the container itself for a member), and
    ``member`` the part after the ``#`` (None for a plain image file)."""

    path: str
    file: Path
    member: str | None = None


@dataclass(frozen=True, slots=True)
class Skipped:
    """An input passed over, with the reason. ``read``: the file was there and was read, and held no
    image that could be decoded (a damaged or empty video or shard), as a damaged photo is."""

    path: str
    reason: str
    read: bool = False


@dataclass
class Decoded:
    """One decoded image: the picture upright in RGB, its full-resolution (width, height), the stat of
    the file it came from (the container's for a member) and the row's metadata columns it fills
    (``t`` for a video frame, ``caption`` for a WebDataset sample, ``taken`` and the camera for a photo)."""

    image: Image.Image
    size: tuple[int, int]
    stat: FileStat
    meta: dict[str, Any] = field(default_factory=dict)


DEFAULT_SCENE_THRESHOLD = 0.08  # --frames scene: a mean grey difference of 20 levels of 255


@dataclass(frozen=True)
class ContainerOptions:
    """How containers are opened into images: a video's frames every ``every`` seconds, or at each
    change of scene (``frames="scene"``: a mean grey difference above ``scene_threshold``)."""

    every: float = 2.0
    frames: str = "every"
    scene_threshold: float = DEFAULT_SCENE_THRESHOLD


class Container(Protocol):
    """A kind of file that holds many images (one module in :mod:`clipcli.images` per kind, named in
    :data:`clipcli.images.containers.CONTAINERS`)."""

    def expand(self, ref: ImageRef, options: ContainerOptions) -> tuple[list[ImageRef], list[Skipped]]:
        """The images in the container ``ref`` names, as member refs, in order; or why there are none."""
        ...

    def decode(self, ref: ImageRef, draft_size: int | None, max_pixels: int | None) -> Decoded:
        """One member, decoded with the guards every image gets; raises OSError or ValueError with the
        reason when it cannot be."""
        ...
