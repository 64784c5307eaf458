"""Checkpoints are read as tensors only: nothing a file contains is run, and bad files fail in one line."""

from __future__ import annotations

import builtins
import contextlib
import csv
import os
import pickle
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import make_image

from clipcli.errors import ModelError
from clipcli.models import load_model
from clipcli.models.families.openai import import_clip, read_state_dict

REFUSED = "contains code or objects clipcli will not load (only tensors are read from checkpoints); "


class TouchOnLoad(torch.nn.Module):
    """A TorchScript module whose __setstate__, run by torch.jit.load, creates the file named in its state."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(2))
        self.marker = marker
        self.probe = torch.zeros(1, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.weight, self.marker, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        self.weight = state[0]
        self.marker = state[1]
        self.training = state[2]
        # from_file with shared=True creates the file; keeping the result stops the compiler dropping the call.
        self.probe = torch.from_file(self.marker, True, 1, dtype=torch.uint8)


class RunOnUnpickle:
    """What a malicious pickle holds: unpickling it calls exec, which creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


class BuffersAndAttributes(torch.nn.Module):
    """Parameters, buffers, a plain tensor attribute and typed containers: only the first two are state."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(3)
        self.plain = torch.ones(3)
        self.sizes: list[int] = [1, 2]
        self.table: dict[str, torch.Tensor] = {"a": torch.zeros(1)}
        self.register_buffer("steps", torch.arange(4))
        self.proj = torch.nn.Parameter(torch.randn(3, 3)[:, 1:])  # a strided view of a larger storage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) + self.plain + self.sizes[0] + self.table["a"]


def _quiet_jit(make, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        return make(*args, **kwargs)


def _save_script(module: torch.nn.Module, path: Path) -> Path:
    _quiet_jit(torch.jit.save, _quiet_jit(torch.jit.script, module), str(path))
    return path


def _one_line_error(ran) -> str:
    assert ran.exit_code == 2, ran.stderr
    line = ran.stderr.strip()
    assert "\n" not in line and line.startswith("Error: ") and "Traceback" not in ran.stderr
    return line


def _write_zip(path: Path, records: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in records.items():
            z.writestr(name, data)
    return path


def test_torchscript_setstate_is_not_run(tmp_path, cli):
    marker = tmp_path / "ran-setstate"
    archive = _save_script(TouchOnLoad(str(marker)), tmp_path / "evil.pt")
    # The archive is live: torch.jit.load runs its __setstate__, which creates the marker.
    _quiet_jit(torch.jit.load, str(archive))
    assert marker.exists()
    marker.unlink()

    with pytest.raises(ModelError) as info:
        read_state_dict(archive)
    assert str(info.value).startswith(f"{archive}: {REFUSED}")
    assert "TouchOnLoad.__setstate__, code that loading would run" in str(info.value)
    assert not marker.exists()

    image = make_image(tmp_path / "img.jpg")
    line = _one_line_error(cli("classify", str(image), "--model", str(archive), "--labels", "a,b"))
    assert line == f"Error: {info.value}"
    assert not marker.exists()


@pytest.mark.slow
def test_the_command_prints_one_line_and_runs_nothing(tmp_path):
    """The same through a real process: no torch warning or traceback reaches stderr."""
    marker = tmp_path / "ran-setstate"
    archive = _save_script(TouchOnLoad(str(marker)), tmp_path / "evil.pt")
    image = make_image(tmp_path / "img.jpg")
    command = [sys.executable, "-m", "clipcli", "classify", str(image), "--model", str(archive), "--labels", "a,b"]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"Error: {archive}: {REFUSED}") and done.stderr.count("\n") == 1
    assert not marker.exists()


@pytest.mark.parametrize("layout", ["torchscript", "torch.save zip", "legacy pickle"])
def test_a_pickled_call_is_refused_without_running(tmp_path, cli, layout):
    marker = tmp_path / "ran-exec"
    payload = pickle.dumps({"text_projection": RunOnUnpickle(marker)}, protocol=2)
    pickle.loads(payload)  # the payload is live: plain unpickling creates the marker
    assert marker.exists()
    marker.unlink()

    evil = tmp_path / "evil.pt"
    if layout == "torchscript":  # a code/ folder makes it look like OpenAI's archives
        records = {
            "evil/data.pkl": payload,
            "evil/code/__torch__/m.py": b"",
            "evil/constants.pkl": b"",
            "evil/version": b"4\n",
        }
        _write_zip(evil, records)
    elif layout == "torch.save zip":
        torch.save({"text_projection": RunOnUnpickle(marker)}, evil, pickle_protocol=2)
    else:
        evil.write_bytes(payload)

    with pytest.raises(ModelError) as info:
        read_state_dict(evil)
    message = str(info.value)
    assert message.startswith(f"{evil}: {REFUSED}it refers to builtins.exec; ")
    assert "weights_only" not in message and "\n" not in message
    assert not marker.exists()

    image = make_image(tmp_path / "img.jpg")
    line = _one_line_error(cli("classify", str(image), "--model", str(evil), "--labels", "a,b"))
    assert REFUSED in line and not marker.exists()


def test_a_pickled_object_is_named_in_a_whole_sentence(tmp_path):
    evil = tmp_path / "object.pt"
    torch.save({"text_projection": object()}, evil)
    with pytest.raises(ModelError) as info:
        read_state_dict(evil)
    assert str(info.value) == (
        f"{evil}: {REFUSED}it refers to builtins.object; "
        "re-save a model you trust as its weights alone: torch.save(model.state_dict(), path)"
    )


def test_other_unreadable_files_keep_their_reason_whole(tmp_path, vit_ckpt):
    cut = tmp_path / "cut.pt"
    cut.write_bytes(vit_ckpt.read_bytes()[:4096])
    with pytest.raises(ModelError) as info:
        read_state_dict(cut)
    # torch's own advice ("If you are seeing this error...") is left out; the reason is not cut mid-word.
    assert str(info.value) == (
        f"{cut}: not a readable checkpoint "
        "(PytorchStreamReader failed reading zip archive: failed finding central directory)"
    )
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match=r"empty\.pt: not a readable checkpoint \(the file is empty or ends early\)$"):
        read_state_dict(empty)


def _traced_clip(ckpt: Path, path: Path, resolution: int) -> Path:
    clip = import_clip()
    model, _ = _quiet_jit(clip.load, str(ckpt), device="cpu", jit=False)  # it tries torch.jit.load first
    inputs = (torch.randn(1, 3, resolution, resolution), clip.tokenize(["a dog"]))
    traced = _quiet_jit(torch.jit.trace, model.eval(), inputs, check_trace=False)
    _quiet_jit(torch.jit.save, traced, str(path))
    return path


@pytest.mark.slow
def test_archives_read_as_jit_load_reads_them_without_calling_it(tmp_path, rn_ckpt, monkeypatch):
    from clipcli.models.torchscript import read_torchscript_state_dict

    traced = _traced_clip(rn_ckpt, tmp_path / "traced-rn.pt", 32)
    scripted = _save_script(BuffersAndAttributes().half(), tmp_path / "scripted.pt")
    expected = {p: _quiet_jit(torch.jit.load, str(p)).state_dict() for p in (traced, scripted)}

    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load called")

    monkeypatch.setattr(torch.jit, "load", refuse)
    for path, reference in expected.items():
        ours = read_torchscript_state_dict(path)
        assert list(ours) == list(reference)  # same names, same order; "plain" is not a buffer
        for key, tensor in reference.items():
            assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor), key
    assert "plain" not in expected[scripted] and "steps" in expected[scripted]

    loaded = load_model(str(traced), "cpu", "fp32")
    plain = load_model(str(rn_ckpt), "cpu", "fp32")
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.model.encode_image(image), plain.model.encode_image(image), atol=1e-6)


def _global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def _text(value: str) -> bytes:
    return b"X" + len(value).to_bytes(4, "little") + value.encode()


def _tensor(size: int = 2, stride: int = 1) -> bytes:
    """Pickle opcodes for a 1-d float tensor over the 8-byte record data/0, as TorchScript writes one."""
    storage = b"((" + _text("storage") + _global("torch", "FloatStorage") + _text("0") + _text("cpu") + b"K\x02tQ"
    size_stride = b"(J" + size.to_bytes(4, "little", signed=True) + b"t(J" + stride.to_bytes(4, "little", signed=True)
    no_hooks = _global("collections", "OrderedDict") + b")R"
    return (
        _global("torch._utils", "_rebuild_tensor_v2") + storage + b"K\x00" + size_stride + b"t\x89" + no_hooks + b"tR"
    )


def _module(attributes: bytes) -> bytes:
    """A pickled instance of TorchScript class __torch__.M (memo 0) with these attribute opcodes."""
    return b"\x80\x02" + _global("__torch__", "M") + b")\x81q\x00}(" + attributes + b"ub."


def _crafted_archive(path: Path, pickled: bytes) -> Path:
    code = b'class M(Module):\n  __parameters__ = ["w", ]\n  __buffers__ = []\n  w : Tensor\n'
    records = {"m/data.pkl": pickled, "m/code/__torch__.py": code, "m/constants.pkl": b"", "m/data/0": bytes(8)}
    return _write_zip(path, records)


@pytest.mark.parametrize(
    ("pickled", "reason"),
    [
        (_module(_text("w") + _tensor(size=3)), "a tensor that runs past its storage"),
        (_module(_text("w") + _tensor(stride=-1)), "a tensor with a negative size, stride or offset"),
        (_module(_text("w") + _tensor() + b"}b"), "extra state given to a tensor"),  # BUILD on the tensor
        (_module(_text("w") + _tensor() + _text("child") + b"h\x00"), "a module that contains itself"),
        (_module(_text("w") + b"K\x05"), "w is not a tensor"),
    ],
)
def test_crafted_archives_fail_in_one_line(tmp_path, pickled, reason):
    from clipcli.models.torchscript import read_torchscript_state_dict

    # The well-formed archive reads, so each variant fails for the reason it names.
    good = _crafted_archive(tmp_path / "good.pt", _module(_text("w") + _tensor()))
    assert read_torchscript_state_dict(good)["w"].tolist() == [0.0, 0.0]
    bad = _crafted_archive(tmp_path / "crafted.pt", pickled)
    with pytest.raises(ModelError) as info:
        read_torchscript_state_dict(bad)
    assert str(info.value) == f"{bad}: not a readable checkpoint ({reason})"


def test_a_truncated_tensor_record_is_an_error(tmp_path):
    from clipcli.models.torchscript import read_torchscript_state_dict

    scripted = _save_script(BuffersAndAttributes(), tmp_path / "scripted.pt")
    with zipfile.ZipFile(scripted) as z:
        records = {name: z.read(name) for name in z.namelist()}
    first = next(n for n in records if n.endswith("/data/0"))
    records[first] = records[first][:2]
    cut = _write_zip(tmp_path / "cut.pt", records)
    with pytest.raises(ModelError, match=r"cut\.pt: not a readable checkpoint \(tensor storage 0 is shorter"):
        read_torchscript_state_dict(cut)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"ln_final.weight": torch.zeros(0)}, "text transformer width 0 cannot be split into"),
        ({"text_projection": torch.zeros(64, 64, 2)}, "text_projection has 3 dimension(s), CLIP's has 2"),
        ({"ln_final.weight": torch.zeros(129)}, "text transformer width 129 cannot be split into"),
        ({"visual.conv1.weight": torch.zeros(0, 3, 16, 16)}, "vision_width would be 0"),
        ({"text_projection": torch.zeros(32, 64)}, "text_projection has shape [32, 64], expected [64, 64]"),
        ({"extra.weight": torch.zeros(1)}, "unexpected extra.weight"),
    ],
)
def test_malformed_state_dicts_are_one_line_usage_errors(tmp_path, cli, vit_ckpt, change, reason):
    sd = {**torch.load(vit_ckpt, weights_only=True), **change}
    bad = tmp_path / "bad.pt"
    torch.save(sd, bad)
    image = make_image(tmp_path / "img.jpg")
    line = _one_line_error(cli("classify", str(image), "--model", str(bad), "--labels", "a,b"))
    assert line.startswith(f"Error: {bad}: not a CLIP checkpoint this version understands ({reason}")
    assert line.endswith(")")


def test_a_value_that_is_no_tensor_is_a_usage_error(tmp_path, cli, vit_ckpt):
    bad = tmp_path / "bad.pt"
    torch.save({**torch.load(vit_ckpt, weights_only=True), "ln_final.weight": 5}, bad)
    image = make_image(tmp_path / "img.jpg")
    line = _one_line_error(cli("classify", str(image), "--model", str(bad), "--labels", "a,b"))
    assert line == f"Error: {bad}: not a CLIP checkpoint ('ln_final.weight' holds 'int', not a tensor)"


def _pairs(folder: Path, n: int = 4) -> Path:
    rows = [{"image": make_image(folder / f"{i}.png", (40, 40), seed=i).name, "text": f"shape {i}"} for i in range(n)]
    path = folder / "pairs.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("layout", ["torch.save zip", "legacy pickle"])
def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, cli, layout):
    marker = tmp_path / "ran-exec"
    out = tmp_path / "out.pt"
    ckpt = tmp_path / "out.pt.ckpt"
    state = {"signature": {}, "step": RunOnUnpickle(marker)}
    if layout == "torch.save zip":
        torch.save(state, ckpt)
    else:
        ckpt.write_bytes(pickle.dumps(state, protocol=2))
    with contextlib.suppress(RuntimeError):  # the legacy layout fails after the pickle has run
        torch.load(ckpt, weights_only=False)  # the checkpoint is live: the old resume created the marker
    assert marker.exists()
    marker.unlink()

    args = ["train", str(_pairs(tmp_path)), "-o", str(out), "--arch", "test-rn", "--steps", "2", "-b", "2"]
    line = _one_line_error(cli(*args, "--resume"))
    assert line == f"Error: {ckpt}: {REFUSED}it refers to builtins.exec; delete it to start the run over"
    assert not marker.exists() and not out.exists()


@pytest.mark.slow
def test_resume_checkpoints_load_as_tensors_only(tmp_path):
    from clipcli.training.loop import TrainConfig, train

    out = tmp_path / "out.pt"
    pairs = _pairs(tmp_path)

    class Stop(Exception):
        pass

    def stop_at_2(info):  # called before step 2's checkpoint is saved: the last one is step 1's
        if info.step == 2:
            raise Stop

    config = TrainConfig(pairs=pairs, output=out, arch="test-rn", steps=3, batch_size=2, checkpoint_every=1)
    with pytest.raises(Stop):
        train(config, on_step=stop_at_2)
    state = torch.load(tmp_path / "out.pt.ckpt", weights_only=True)
    assert state["step"] == 1 and state["rng"].dtype == torch.uint8
    assert all(isinstance(v, str) for v in state["signature"].values())
    config.resume = True
    steps: list[int] = []
    train(config, on_step=lambda info: steps.append(info.step))
    assert steps == [2, 3] and out.exists()


def test_resume_from_a_torchscript_archive_is_refused_in_clipclis_words(tmp_path: Path) -> None:
    import torch

    from clipcli.errors import ModelError
    from clipcli.models.checkpoint import load_tensors

    archive = tmp_path / "out.pt.ckpt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(archive))
    with pytest.raises(ModelError) as refused:
        load_tensors(archive, remedy="delete it to start the run over")
    message = str(refused.value)
    assert message == (
        f"{archive}: contains code or objects clipcli will not load (only tensors are read from checkpoints); "
        "it refers to TorchScript code; delete it to start the run over"
    )
    assert "weights_only" not in message


def test_a_hostile_file_name_reaches_the_terminal_as_escapes_never_as_control_characters(cli, tmp_path):
    """A name holding a terminal's escape sequences (retitle the window, clear the screen) or a newline
    went to stderr raw in skip messages and errors: the terminal acted on it."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "red.jpg").write_bytes(
        (Path(__file__).resolve().parent.parent / "samples/seen/red-square.jpg").read_bytes()
    )
    (folder / "x\x1b]0;owned\x07\nline.jpg").write_bytes(b"not an image")
    ran = cli("classify", str(folder), "-l", "a,b", "-m", "tiny-shapes", "-o", str(tmp_path / "o.csv"))
    assert ran.exit_code == 1 and "x\\x1b]0;owned\\x07\\nline.jpg" in ran.stderr, ran.stderr
    missing = cli("embed", str(tmp_path / "gone\x1b[2J.jpg"), "-m", "tiny-shapes")
    assert missing.exit_code == 2 and "gone\\x1b[2J.jpg" in missing.stderr, missing.stderr
    usage = cli("embed", "--frobnicate\x1b[2J")
    assert usage.exit_code == 2 and "\\x1b[2J" in usage.stderr
    for text in (ran.stderr, missing.stderr, usage.stderr):
        assert not any((ord(c) < 32 and c != "\n") or 0x7F <= ord(c) <= 0x9F for c in text), repr(text)
    assert len(missing.stderr.strip().splitlines()) == 1


def test_messages_and_progress_bars_show_a_hostile_name_as_text():
    """A name in `say` kept its newline (a forged `Error:` line followed), and a progress bar's description
    was read as rich markup (`m[/bold]x.pt` ended eval with an internal error) and printed escapes raw."""
    from rich.text import Text

    from clipcli.commands import console

    with console.err.capture() as captured:
        console.say("wrote p\nError: forged\x1b[2J")
        console.skipped("b.jpg", "not listed: the file kept, a\x1b]0;x\x07.jpg, changed")
    lines = captured.get().splitlines()
    assert lines == [
        "wrote p\\nError: forged\\x1b[2J",
        "skipped b.jpg: not listed: the file kept, a\\x1b]0;x\\x07.jpg, changed",
    ]
    bar = console.Progress("embedding (m[/bold]x\x1b[2J.pt)", 3)
    shown = Text.from_markup(bar._bar.tasks[0].description)  # as its column renders it: no markup error
    assert shown.plain == "embedding (m[/bold]x\\x1b[2J.pt)"


def test_the_models_table_shows_a_hostile_cache_path_as_text(monkeypatch, capsys):
    """`clipcli models` on a terminal printed the cache folder's name raw (an escape sequence retitled the
    terminal) and read `[bold]` in it as markup."""
    from clipcli.commands.models import _print_table

    monkeypatch.setenv("CLIPCLI_CACHE", "/tmp/cache\x1b]0;PWNED\x07[bold]x")
    monkeypatch.setenv("COLUMNS", "200")
    _print_table([("m[bold]1", "local", "cached", 2**20, "/tmp/cache\x1b[2J/m1.pt")])
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "cache\\x1b]0;PWNED\\x07[bold]x" in out and "m[bold]1" in out and "\\x1b[2J/m1.pt" in out


def test_a_postscript_file_named_as_a_photo_is_skipped_and_never_run(tmp_path):
    """Pillow reads EPS by running Ghostscript on it; clipcli opens the image formats it takes, and no other."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    called = tmp_path / "gs-called"
    gs = bin_dir / "gs"
    gs.write_text(f'#!/bin/sh\necho "$@" >> {called}\nexit 1\n')
    gs.chmod(0o755)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "photo.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n")
    make_image(photos / "real.png", (32, 32))
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "clipcli", "embed", str(photos), "-m", "tiny-shapes", "-f", "jsonl"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stderr  # one input skipped
    assert "photo.jpg: not an image (or an unsupported format)" in done.stderr
    assert done.stdout.count('"embedding"') == 1
    assert not called.exists()
