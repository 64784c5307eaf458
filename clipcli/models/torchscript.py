"""Reading a TorchScript archive's weights without running it (OpenAI's nine models are traced modules saved
this way; see :mod:`clipcli.models.checkpoint` for the rule).

``torch.jit.load`` compiles the archive's code and runs it (a module's ``__setstate__`` runs while loading),
so it is never called. :func:`read_torchscript_state_dict` unpickles the module tree itself, with a pickle
reader that knows only tensors and turns each TorchScript class into an inert record, and reads the
parameter and buffer names from the class declarations as text.
"""

from __future__ import annotations

import ast
import pickle
import re
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar

from clipcli.errors import ModelError
from clipcli.models.checkpoint import plain_reason, refusal

if TYPE_CHECKING:
    import torch

# The storage classes a TorchScript pickle names for each tensor's element type.
_STORAGE_DTYPES = {
    "HalfStorage": "float16",
    "FloatStorage": "float32",
    "DoubleStorage": "float64",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}
_TORCHSCRIPT_MODULE = re.compile(r"__torch__(\.[A-Za-z_]\w*)*")
_MAX_DEPTH = 100  # module nesting; CLIP's is 6


class UnsafeContent(Exception):
    """The pickle names a function or class outside the tensor allow-list; nothing of it was called."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


class Unreadable(Exception):
    """The archive is not laid out as a TorchScript module tree of tensors."""


def read_torchscript_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The state dict ``torch.jit.load(path).state_dict()`` would give, without running the archive.

    Raises ModelError: the refusal message if the pickle names anything but tensors and TorchScript
    classes (or a class restores itself with its own ``__setstate__``), else "not a readable checkpoint".
    """
    try:
        with zipfile.ZipFile(path) as z:
            archive = _Archive(z)
            root = archive.unpickle("data.pkl")
            return archive.state_dict(root)
    except UnsafeContent as e:
        raise refusal(path, e.what) from None
    except RecursionError:
        raise ModelError(f"{path}: not a readable checkpoint (objects nested too deeply)") from None
    except Exception as e:  # corrupt zips, truncated records and bad tensor layouts raise all sorts
        raise ModelError(f"{path}: not a readable checkpoint ({plain_reason(e)})") from e


class _Sealed:
    """The reader's own objects: a pickle's BUILD would otherwise overwrite their fields."""

    kind: ClassVar[str]

    def __setstate__(self, state: object) -> None:
        raise Unreadable(f"extra state given to a {self.kind}")


@dataclass(frozen=True)
class _StorageType(_Sealed):
    """What the pickle's ``torch.FloatStorage`` (etc.) stands for: only an element type."""

    kind = "storage type"
    dtype_name: str


@dataclass(frozen=True)
class _Storage(_Sealed):
    kind = "tensor storage"
    data: torch.UntypedStorage
    dtype: torch.dtype


@dataclass(frozen=True)
class _TensorRef(_Sealed):
    """A tensor as the pickle describes it; made into a tensor only once its place is known.

    Returning a real tensor would let a BUILD reach ``torch.Tensor.__setstate__`` (``set_`` with
    arguments from the file); this placeholder refuses it.
    """

    kind = "tensor"
    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class _ScriptObject:
    """An inert stand-in for an instance of a TorchScript class: its state is recorded, nothing runs."""

    qualified_name: ClassVar[str] = "__torch__"

    def __setstate__(self, state: object) -> None:
        self.__dict__["recorded_state"] = state


@dataclass
class _ClassInfo:
    """What the archive's code says about one TorchScript class, read as text (never compiled)."""

    is_module: bool = False
    parameters: list[str] = field(default_factory=list)
    buffers: list[str] = field(default_factory=list)
    restores_itself: bool = False  # defines __setstate__: torch.jit.load would run it


class _Archive:
    """One TorchScript zip: its records under ``<name>/``, the stub classes and storages read so far."""

    def __init__(self, z: zipfile.ZipFile) -> None:
        self.zip = z
        self.names = set(z.namelist())
        pickles = [n for n in self.names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise Unreadable("no single data.pkl record in the archive")
        self.prefix = pickles[0].rsplit("/", 1)[0]
        byteorder = self._record("byteorder")
        if byteorder is not None and byteorder.strip() not in (b"little", b""):
            raise Unreadable("a big-endian archive")
        self.stubs: dict[str, type[_ScriptObject]] = {}
        self.storages: dict[str, _Storage] = {}
        self.sources: dict[str, dict[str, _ClassInfo]] = {}

    def _record(self, name: str) -> bytes | None:
        full = f"{self.prefix}/{name}"
        return self.zip.read(full) if full in self.names else None

    def unpickle(self, name: str) -> object:
        full = f"{self.prefix}/{name}"
        if full not in self.names:
            raise Unreadable(f"no {name} record")
        with self.zip.open(full) as f:
            return _RestrictedUnpickler(f, self).load()

    def stub_class(self, module: str, name: str) -> type[_ScriptObject]:
        qualified = f"{module}.{name}"
        if qualified not in self.stubs:
            self.stubs[qualified] = type(name, (_ScriptObject,), {"qualified_name": qualified})
        return self.stubs[qualified]

    def storage(self, pid: object) -> _Storage:
        """A tensor's bytes, from the ``data/<key>`` record its persistent id names."""
        import torch

        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise Unreadable("a persistent object that is not a tensor storage")
        _, kind, key, _location, numel = pid  # everything is read onto the CPU
        if not isinstance(kind, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise Unreadable("a malformed tensor storage reference")
        dtype = getattr(torch, kind.dtype_name)
        if key not in self.storages:
            self.storages[key] = _Storage(self._read_bytes(f"data/{key}"), dtype)
        stored = self.storages[key]
        if numel < 0 or numel * dtype.itemsize > stored.data.nbytes():
            raise Unreadable(f"tensor storage {key} is shorter than its tensors")
        return _Storage(stored.data, dtype)

    def _read_bytes(self, name: str) -> torch.UntypedStorage:
        import torch

        full = f"{self.prefix}/{name}"
        if full not in self.names:
            raise Unreadable(f"no {name} record")
        size = self.zip.getinfo(full).file_size
        if size == 0:
            return torch.UntypedStorage(0)
        buffer = bytearray(size)
        with self.zip.open(full) as f:
            _read_into(f, buffer)
        # Shares the bytearray (no copy); such a storage cannot be resized by a bad tensor layout.
        return torch.frombuffer(buffer, dtype=torch.uint8).untyped_storage()

    def class_info(self, stub: _ScriptObject) -> _ClassInfo:
        module, _, name = type(stub).qualified_name.rpartition(".")
        if module not in self.sources:
            source = self._record(f"code/{module.replace('.', '/')}.py")
            self.sources[module] = _parse_classes(source.decode("utf-8", "replace")) if source else {}
        info = self.sources[module].get(name)
        if info is None:
            raise Unreadable(f"no code for TorchScript class {type(stub).qualified_name}")
        return info

    def state_dict(self, root: object) -> dict[str, torch.Tensor]:
        if not isinstance(root, _ScriptObject) or not self.class_info(root).is_module:
            raise Unreadable("the archive does not hold a module")
        out: dict[str, torch.Tensor] = {}
        self._collect(root, "", out, ())
        return out

    def _collect(
        self, module: _ScriptObject, prefix: str, out: dict[str, torch.Tensor], ancestors: tuple[int, ...]
    ) -> None:
        """Parameters, then buffers, then submodules, as ``nn.Module.state_dict`` orders them."""
        if id(module) in ancestors:
            raise Unreadable("a module that contains itself")
        if len(ancestors) > _MAX_DEPTH:
            raise Unreadable("modules nested too deeply")
        info = self.class_info(module)
        if info.restores_itself:
            raise UnsafeContent(f"{type(module).qualified_name}.__setstate__, code that loading would run")
        state = module.__dict__.get("recorded_state")
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise Unreadable(f"{type(module).qualified_name} has no attributes")
        for names in (info.parameters, info.buffers):
            for name, value in state.items():
                if name in names and value is not None:
                    if not isinstance(value, _TensorRef):
                        raise Unreadable(f"{prefix}{name} is not a tensor")
                    out[prefix + name] = _materialize(value)
        for name, value in state.items():
            if isinstance(value, _ScriptObject) and self.class_info(value).is_module:
                self._collect(value, f"{prefix}{name}.", out, (*ancestors, id(module)))


def _read_into(f: IO[bytes], buffer: bytearray) -> None:
    view = memoryview(buffer)
    done = 0
    while done < len(buffer):
        got = f.readinto(view[done:])  # type: ignore[attr-defined]
        if not got:
            raise Unreadable("a tensor record ends early")
        done += got


def _materialize(ref: _TensorRef) -> torch.Tensor:
    import torch

    if ref.offset < 0 or any(n < 0 for n in ref.size) or any(s < 0 for s in ref.stride):
        raise Unreadable("a tensor with a negative size, stride or offset")
    if len(ref.size) != len(ref.stride):
        raise Unreadable("a tensor whose size and stride disagree")
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True)) if all(ref.size) else -1
    if (last + 1) * ref.storage.dtype.itemsize > ref.storage.data.nbytes():
        raise Unreadable("a tensor that runs past its storage")
    return torch.empty(0, dtype=ref.storage.dtype).set_(ref.storage.data, ref.offset, ref.size, ref.stride)


def _rebuild_tensor_v2(
    storage: object,
    offset: object,
    size: object,
    stride: object,
    requires_grad: object = False,
    backward_hooks: object = None,
    metadata: object = None,
) -> _TensorRef:
    """Stands in for ``torch._utils._rebuild_tensor_v2``: checks the layout, defers building."""
    if not isinstance(storage, _Storage) or not isinstance(offset, int):
        raise Unreadable("a malformed tensor")
    if not _is_int_tuple(size) or not _is_int_tuple(stride) or not isinstance(requires_grad, bool):
        raise Unreadable("a malformed tensor")
    # Hooks and conj/neg metadata would attach Python objects from the file to the tensor.
    if backward_hooks or metadata:
        raise UnsafeContent("tensor hooks or metadata")
    return _TensorRef(storage, offset, tuple(size), tuple(stride))  # type: ignore[arg-type]


def _rebuild_tensor(storage: object, offset: object, size: object, stride: object) -> _TensorRef:
    return _rebuild_tensor_v2(storage, offset, size, stride)


def _is_int_tuple(value: object) -> bool:
    return isinstance(value, tuple | list) and all(isinstance(n, int) and not isinstance(n, bool) for n in value)


def _same_value(value: object, *_type: object) -> object:
    """torch.jit._pickle's list builders and type tags: they return the value they are given."""
    return value


# (module, name) -> what the pickle gets instead; each entry is inert or checks its arguments.
_ALLOWED: dict[tuple[str, str], Callable[..., object] | type] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("collections", "OrderedDict"): OrderedDict,
    **{("torch.jit._pickle", n): _same_value for n in ("restore_type_tag", "build_intlist", "build_doublelist")},
    **{("torch.jit._pickle", n): _same_value for n in ("build_boollist", "build_tensorlist")},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the names a TorchScript module tree of tensors uses; anything else is refused."""

    def __init__(self, file: IO[bytes], archive: _Archive) -> None:
        super().__init__(file)
        self.archive = archive

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[module, name]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if _TORCHSCRIPT_MODULE.fullmatch(module) and name.isidentifier():
            return self.archive.stub_class(module, name)
        # Protocol 2 pickles name the builtins module as Python 2 did.
        raise UnsafeContent(f"{'builtins' if module == '__builtin__' else module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        return self.archive.storage(pid)


_CLASS_LINE = re.compile(r"class (\w+)(?:\((.*)\))?:")
_DECLARATION = re.compile(r"\s+(__parameters__|__buffers__) = (\[.*\])\s*")


def _parse_classes(source: str) -> dict[str, _ClassInfo]:
    """Each class's parameter and buffer names, and whether it defines ``__setstate__``.

    The code torch.jit.save writes declares them on fixed lines (``__parameters__ = ["weight", ]``);
    the lists are read with ``ast.literal_eval``, which evaluates literals only.
    """
    classes: dict[str, _ClassInfo] = {}
    current: _ClassInfo | None = None
    for line in source.splitlines():
        header = _CLASS_LINE.fullmatch(line.rstrip())
        if header:
            # torch.jit.load takes a class for a module only when its base is literally "Module".
            current = classes[header.group(1)] = _ClassInfo(is_module=(header.group(2) or "").strip() == "Module")
            continue
        if current is None:
            continue
        declared = _DECLARATION.fullmatch(line)
        if declared:
            names = ast.literal_eval(declared.group(2))
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise Unreadable("a malformed parameter list")
            if declared.group(1) == "__parameters__":
                current.parameters = names
            else:
                current.buffers = names
        elif line.lstrip().startswith("def __setstate__("):
            current.restores_itself = True
    return classes
