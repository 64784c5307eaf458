"""Pictures dropped on the page, for search by image: read up to a size limit, decoded with the guards
every image gets (regular file, the pixel limit that refuses a decompression bomb from its header,
formats Pillow knows), embedded once, and kept in memory by id for the searches (and pages) that use it.
The file itself is written to a private temporary folder only while it is embedded.
"""

from __future__ import annotations

import secrets
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from clipcli.errors import ClipCliError, InputError
from clipcli.images.limits import DEFAULT_MAX_PIXELS

if TYPE_CHECKING:
    import numpy as np

    from clipcli.models import LoadedModel

DEFAULT_MAX_BYTES = 20 << 20
KEPT = 256  # uploads remembered (each one vector)


class TooLarge(ClipCliError):
    """An upload over the size limit (HTTP 413)."""


class Uploads:
    def __init__(
        self,
        lm: LoadedModel,
        model_lock: threading.Lock,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.lm = lm
        self.model_lock = model_lock
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self.lock = threading.Lock()
        self.folder = Path(tempfile.mkdtemp(prefix="clipcli-uploads-"))

    def too_large(self, size: int) -> TooLarge:
        return TooLarge(f"upload of {size:,} bytes or more: over the limit of {self.max_bytes:,} bytes")

    def add(self, data: bytes) -> str:
        """Embed an uploaded picture and return its id; :class:`InputError` for a file that is not an
        image the guards accept (the route has refused one over the size limit while reading it)."""
        from clipcli.search.rank import query_embedding

        if len(data) > self.max_bytes:
            raise self.too_large(len(data))
        if not data:
            raise InputError("upload: an empty file")
        upload_id = secrets.token_urlsafe(12)
        file = self.folder / f"{upload_id}.upload"
        try:
            file.write_bytes(data)
            with self.model_lock:
                vector = query_embedding(self.lm, image=str(file), max_pixels=self.max_pixels)
        except InputError as e:
            raise InputError(f"upload: {str(e).split(': ', 1)[-1]}") from None
        finally:
            file.unlink(missing_ok=True)
        with self.lock:
            self.vectors[upload_id] = vector
            while len(self.vectors) > KEPT:
                self.vectors.popitem(last=False)
        return upload_id

    def get(self, upload_id: str) -> np.ndarray | None:
        with self.lock:
            return self.vectors.get(upload_id)

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)
