"""Decoding JPEGs on the model's device (``--decode gpu``), so a GPU run is not capped by the host's decode rate.

The pipeline, each stage ahead of the next:

1. **readers** (CPU threads): read each file into memory and parse its JPEG header (size, EXIF orientation,
   coding) without decoding a pixel (:mod:`clipcli.images.jpeg`). :func:`~clipcli.images.jpeg.device_decodable`
   picks the decoder per file: sequential 8-bit JPEGs, grey or YCbCr, complete up to their end marker, go to
   the device; everything else (PNG, WebP, progressive, CMYK or 12-bit JPEGs, truncated files, images over
   ``--max-megapixels``) is decoded by the CPU path of :mod:`clipcli.images.batches` there and then, so its
   pixels and its skip reasons are the CPU path's own.
2. **device stage** (one thread, its own CUDA stream): :class:`DeviceDecoder` decodes the batch's JPEGs in
   one call (``torchvision.io.decode_jpeg(list, device=...)``: nvJPEG on CUDA, libjpeg-turbo on the CPU,
   which is how the CPU tests run this whole module), turns them upright, resizes and crops them with the
   geometry of :func:`clipcli.images.decode.resize_and_crop`, copies the CPU-decoded crops in through pinned
   memory and normalises the batch. A file the device decoder rejects is decoded by the CPU path instead.
3. **the model** (the caller's thread) waits for the batch's event, not for the whole device.

Batches come out in input order with the same indices, sizes and skips as :func:`clipcli.images.batches.iter_batches`.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from clipcli.errors import InputError, ModelError
from clipcli.images.batches import PREFETCH_BATCHES, ImageDataset, decoded_batches
from clipcli.images.decode import DEFAULT_MAX_PIXELS, ImageSpec, image_spec, require_regular_file
from clipcli.images.jpeg import HEADER_BYTES, Read, device_decodable, jpeg_header, read_jpeg
from clipcli.images.sources import ImageRef

if TYPE_CHECKING:
    import numpy as np
    import torch

DecodeChoice = Literal["cpu", "gpu", "auto"]
DECODE_CHOICES = ("cpu", "gpu", "auto")

# Full-resolution pixels decoded in one batched call (1 Gpx: 3 GB of uint8, ~80 12 MP photos), and resized
# in one call (as float32: 128 Mpx is 1.5 GB): large calls for the decoder, without a whole batch of
# 12 MP photos held at full size, in float, at once.
DECODE_PIXEL_BUDGET = 1_000_000_000
RESIZE_PIXEL_BUDGET = 128_000_000


class _ReadDataset:
    """Reads for the device stage, with the CPU path (:class:`clipcli.images.batches.ImageDataset`) for the rest."""

    def __init__(self, refs: Sequence[ImageRef], spec: ImageSpec, exact: bool, max_pixels: int | None) -> None:
        self.refs = refs
        self.max_pixels = max_pixels
        self.cpu = ImageDataset(refs, spec, exact, max_pixels)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> tuple[int, Read]:
        if self.refs[i].member is not None:  # a container's member (a shard's sample): the file is not the image
            return i, self.on_cpu(i)
        try:
            require_regular_file(self.refs[i].file)
            data = read_jpeg(self.refs[i].file)
        except Exception:
            return i, self.on_cpu(i)  # the CPU path names the reason as it always does
        header = None if data is None else jpeg_header(data[:HEADER_BYTES])
        if data is None or header is None or not device_decodable(header, data, self.max_pixels):
            return i, self.on_cpu(i)
        size = (header.height, header.width) if header.orientation in (5, 6, 7, 8) else (header.width, header.height)
        return i, Read(i, data, header.orientation, size)

    def on_cpu(self, i: int) -> Read:
        _, got = self.cpu[i]
        if isinstance(got, str):
            return Read(i, error=got)
        pixels, size = got[0], got[1]  # the device path keeps no stats: rows are checked after embedding
        return Read(i, size=size, pixels=pixels)

    def decode_order(self, indices: range) -> Sequence[int]:
        return indices


@dataclass
class DeviceBatch:
    """A batch of model input already on the model's device (see :class:`clipcli.images.batches.Batch`)."""

    indices: list[int]
    pixels: torch.Tensor | None  # N x 3 x S x S float32, normalised, one per index
    sizes: list[tuple[int, int]]
    skipped: list[tuple[int, str]]
    ready: Any = None  # a CUDA event recorded when ``pixels`` is complete on the decoding stream

    def wait(self) -> None:
        """Make the caller's stream wait for this batch (on the GPU, not in Python)."""
        if self.ready is None or self.pixels is None:
            return
        import torch

        stream = torch.cuda.current_stream(self.pixels.device)
        stream.wait_event(self.ready)
        self.pixels.record_stream(stream)  # the caching allocator must not reuse it before the model is done


def _orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """``PIL.ImageOps.exif_transpose`` of a C x H x W tensor."""
    import torch

    ops = {
        2: lambda x: x.flip(-1),
        3: lambda x: x.flip(-1, -2),
        4: lambda x: x.flip(-2),
        5: lambda x: x.transpose(-1, -2),
        6: lambda x: torch.rot90(x, -1, (-2, -1)),
        7: lambda x: x.transpose(-1, -2).flip(-1, -2),
        8: lambda x: torch.rot90(x, 1, (-2, -1)),
    }
    op = ops.get(orientation)
    return image if op is None else op(image)


def crop_geometry(width: int, height: int, spec: ImageSpec) -> tuple[int, int, int, int]:
    """(resized width, resized height, left, top) of :func:`clipcli.images.decode.resize_and_crop`'s geometry."""
    n_px = spec.size
    if spec.resize == "squash":
        return n_px, n_px, 0, 0
    if width <= height:
        new_w, new_h = n_px, int(n_px * height / width)
    else:
        new_w, new_h = int(n_px * width / height), n_px
    return new_w, new_h, round((new_w - n_px) / 2.0), round((new_h - n_px) / 2.0)


def resize_crops(images: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """N x 3 x H x W uint8 of one size -> N x 3 x S x S uint8: resize (antialiased, as PIL filters) then
    centre crop, the geometry of :func:`clipcli.images.decode.resize_and_crop`."""
    import torch

    new_w, new_h, left, top = crop_geometry(images.shape[-1], images.shape[-2], spec)
    resized = torch.nn.functional.interpolate(
        images.float(), size=(new_h, new_w), mode=spec.interpolation, antialias=True, align_corners=False
    )
    n_px = spec.size
    crop = resized[:, :, top : top + n_px, left : left + n_px]
    return crop.round_().clamp_(0, 255).to(torch.uint8)


def _budget_chunks(items: Sequence[Read], pixels: Callable[[Read], int], budget: int) -> Iterator[list[Read]]:
    chunk: list[Read] = []
    total = 0
    for item in items:
        if chunk and total + pixels(item) > budget:
            yield chunk
            chunk, total = [], 0
        chunk.append(item)
        total += pixels(item)
    if chunk:
        yield chunk


def _pixels(read: Read) -> int:
    return read.size[0] * read.size[1]


class DeviceDecoder:
    """The device-only part, behind one small interface: JPEG bytes in, normalised model input out.

    ``decode`` is the one call that differs by device (nvJPEG on CUDA); the resizing and normalising
    are torch operations that run the same on any device, so the CPU tests exercise them all.
    """

    def __init__(self, device: torch.device, spec: ImageSpec) -> None:
        import torch

        self.device = device
        self.spec = spec
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        with self.on_stream():  # made on the stream that uses them
            std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
            self.scale = 1.0 / (255.0 * std)
            self.shift = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1) / std

    def decode(self, buffers: Sequence[bytearray]) -> list[torch.Tensor | None]:
        """uint8 3 x H x W on the device per buffer, None where the decoder refuses one (it goes to the
        CPU). One batched call; when it fails, one call per file finds the file at fault."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        if not buffers:
            return []
        tensors = [torch.frombuffer(b, dtype=torch.uint8) for b in buffers]
        if self.cuda:
            # nvJPEG writes on a stream of its own into memory the allocator hands out on this one: work
            # still queued here on memory freed earlier must be done before the decoder starts.
            torch.cuda.current_stream(self.device).synchronize()
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            pass
        out: list[torch.Tensor | None] = []
        for t in tensors:
            try:
                out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:
                out.append(None)
        return out

    def on_stream(self) -> AbstractContextManager[Any]:
        import torch

        return torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()

    def upload(self, crops: np.ndarray) -> torch.Tensor:
        """N x S x S x 3 uint8 from the host -> N x 3 x S x S on the device, through pinned memory."""
        import torch

        host = torch.from_numpy(crops)
        if self.cuda:
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True).permute(0, 3, 1, 2)

    def crops(self, reads: Sequence[Read]) -> tuple[dict[int, torch.Tensor], list[Read]]:
        """Device crops (3 x S x S uint8) by input index, and the reads the decoder refused."""
        import torch

        out: dict[int, torch.Tensor] = {}
        refused: list[Read] = []
        for chunk in _budget_chunks(reads, _pixels, DECODE_PIXEL_BUDGET):
            decoded = self.decode([r.data for r in chunk if r.data is not None])
            upright: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
            for r, image in zip(chunk, decoded, strict=True):
                if image is None:
                    refused.append(r)
                    continue
                image = _orient(image, r.orientation)
                upright.setdefault(tuple(image.shape), []).append((r.index, image))
            del decoded
            for group in upright.values():  # photos of one camera share a size: resized together
                per_call = max(1, RESIZE_PIXEL_BUDGET // (group[0][1].shape[-1] * group[0][1].shape[-2]))
                for start in range(0, len(group), per_call):
                    part = group[start : start + per_call]
                    crops = resize_crops(torch.stack([image for _, image in part]), self.spec)
                    out.update((i, crop) for (i, _), crop in zip(part, crops, strict=True))
        return out, refused

    def normalize(self, crops: torch.Tensor) -> torch.Tensor:
        """uint8 N x 3 x S x S -> the model's float input, as :func:`clipcli.images.decode.normalize_pixels`."""
        return crops.float().mul_(self.scale).sub_(self.shift)

    def batch(self, reads: list[Read], on_cpu: Callable[[int], Read]) -> DeviceBatch:
        """One batch of model input from the readers' work, in input order."""
        import numpy as np
        import torch

        with torch.inference_mode(), self.on_stream():
            device_crops, refused = self.crops([r for r in reads if r.data is not None])
            fallback = {r.index: on_cpu(r.index) for r in refused}
            final = [fallback.get(r.index, r) for r in reads]
            good = [r for r in final if r.error is None]
            skipped = [(r.index, r.error) for r in final if r.error is not None]
            if not good:
                return DeviceBatch([], None, [], skipped)
            host = [r for r in good if r.pixels is not None]
            if host:
                uploaded = self.upload(np.stack([r.pixels for r in host if r.pixels is not None]))
                device_crops.update((r.index, crop) for r, crop in zip(host, uploaded, strict=True))
            pixels = self.normalize(torch.stack([device_crops[r.index] for r in good]))
            ready = None
            if self.stream is not None:
                ready = torch.cuda.Event()
                ready.record(self.stream)
        return DeviceBatch([r.index for r in good], pixels, [r.size for r in good], skipped, ready)


T = TypeVar("T")


def in_background(items: Iterator[T], depth: int, name: str) -> Iterator[T]:
    """Run ``items`` in a thread of its own, ``depth`` results ahead of the caller, in order.

    Its errors reach the caller; an early close (or Ctrl-C in the caller) stops it after the item in
    hand, and closes ``items`` in the thread that ran it.
    """
    results: queue.Queue[tuple[str, Any]] = queue.Queue(depth)
    stop = threading.Event()

    def put(kind: str, value: Any) -> bool:
        while not stop.is_set():
            try:
                results.put((kind, value), timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in items:
                if not put("item", item):
                    return
            put("done", None)
        except BaseException as e:
            put("error", e)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=run, name=name, daemon=True)
    worker.start()
    try:
        while True:
            kind, value = results.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        worker.join()


def iter_device_batches(
    refs: Sequence[ImageRef],
    geometry: int | ImageSpec,
    device: torch.device | str,
    batch_size: int = 32,
    exact: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    decoder: DeviceDecoder | None = None,
) -> Iterator[DeviceBatch]:
    """:func:`clipcli.images.batches.iter_batches`, decoded on ``device``: the same indices, sizes and skips."""
    import torch

    spec = image_spec(geometry)
    decoder = decoder or DeviceDecoder(torch.device(device), spec)
    dataset = _ReadDataset(refs, spec, exact, max_pixels)
    return in_background(_prepared(decoder, dataset, batch_size), PREFETCH_BATCHES, "clipcli-device-decode")


def _prepared(decoder: DeviceDecoder, dataset: _ReadDataset, batch_size: int) -> Iterator[DeviceBatch]:
    reads = decoded_batches(dataset, batch_size, True, collate=lambda items: [read for _, read in items])
    try:
        for batch in reads:
            yield decoder.batch(batch, dataset.on_cpu)
    finally:
        reads.close()  # the readers' pool: batches not started are dropped


def _tiny_jpeg() -> bytearray:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 100, 50)).save(buf, "JPEG")
    return bytearray(buf.getvalue())


def device_decoder_works(device: torch.device) -> str | None:
    """None when the device decodes JPEGs here, else why not (torchvision built without nvJPEG...)."""
    try:
        decoded = DeviceDecoder(device, ImageSpec(16)).decode([_tiny_jpeg()])
    except Exception as e:  # an import error, a CUDA error: the reason is in the message
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None if decoded and decoded[0] is not None else "the decoder refused a plain JPEG"


def use_device_decoding(choice: str, device: torch.device) -> bool:
    """Whether ``--decode choice`` decodes on the model's ``device``. ``gpu`` without a CUDA model, or
    with a torchvision that cannot decode there, is an error; ``auto`` quietly decodes on the CPU then."""
    if choice not in DECODE_CHOICES:
        raise InputError(f"unknown --decode {choice!r}: use one of {', '.join(DECODE_CHOICES)}")
    if choice == "cpu" or (choice == "auto" and device.type != "cuda"):
        return False
    if device.type != "cuda":
        raise InputError(f"--decode gpu needs the model on a CUDA GPU (it runs on {device.type}): use --decode cpu")
    problem = _probe(device)
    if problem is not None and choice == "gpu":
        raise ModelError(f"--decode gpu: torchvision cannot decode JPEGs on {device} ({problem}); use --decode cpu")
    return problem is None


_PROBED: dict[str, str | None] = {}


def _probe(device: torch.device) -> str | None:
    key = str(device)
    if key not in _PROBED:
        _PROBED[key] = device_decoder_works(device)
    return _PROBED[key]
