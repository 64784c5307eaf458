"""Finding and decoding images: every input kind, every PIL mode users meet, every bad file."""

from __future__ import annotations

import io
import itertools
import os
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_image
from PIL import Image

from clipcli.images.batches import PREFETCH_BATCHES, decoded_batches, iter_batches
from clipcli.images.decode import ImageTooLarge, decode, load_image, resize_and_crop
from clipcli.images.sources import ImageRef, discover, natural_key


def test_natural_sort():
    names = ["img10.jpg", "img9.jpg", "Img1.jpg", "img100.jpg"]
    assert sorted(names, key=natural_key) == ["Img1.jpg", "img9.jpg", "img10.jpg", "img100.jpg"]


def test_discover_folders_recursively_with_case_insensitive_extensions(tmp_path):
    for name in ["b/x2.PNG", "b/x10.jpg", "a.JPEG", "notes.txt", "c/d/e.webp"]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    refs, missing = discover([str(tmp_path)])
    rel = [os.path.relpath(r.path, tmp_path) for r in refs]
    assert rel == ["a.JPEG", "b/x2.PNG", "b/x10.jpg", "c/d/e.webp"]
    assert missing == []


def test_discover_reports_missing_files_and_empty_globs(tmp_path):
    refs, missing = discover([str(tmp_path / "nope.jpg"), str(tmp_path / "*.gif")])
    assert refs == []
    assert [m.reason for m in missing] == ["no such file or directory", "no file matches this pattern"]


def test_a_file_named_twice_is_listed_once_as_first_written(tmp_path, monkeypatch):
    make_image(tmp_path / "folder" / "x.jpg")
    make_image(tmp_path / "folder" / "y.jpg", seed=1)
    monkeypatch.chdir(tmp_path / "folder")
    refs, _ = discover(["x.jpg", "x.jpg", ".", "./x.jpg", str(tmp_path / "folder" / "x.jpg"), "*.jpg"])
    assert [r.path for r in refs] == ["x.jpg", "y.jpg"]  # in normal form, whatever the spelling
    monkeypatch.chdir(tmp_path)
    stdin = io.StringIO("folder/y.jpg\nfolder/../folder/x.jpg\n")
    refs, _ = discover(["folder/x.jpg", "-", "folder/", "folder"], stdin)
    assert [r.path for r in refs] == ["folder/x.jpg", "folder/y.jpg"]


def test_paths_on_stdin_lose_only_their_line_ending(tmp_path):
    names = [" lead.jpg", "trail.jpg ", "tab\tname.jpg", "vt\x0bname.jpg", "fs\x1cname.jpg", "ls\u2028name.jpg"]
    names += ["nel\x85name.jpg", "inner\rcr.jpg"]
    files = [tmp_path / name for name in names]
    for file in files:
        file.write_bytes(b"")
    text = "\n".join(map(str, files[:4])) + "\r\n\n\r\n" + "\r\n".join(map(str, files[4:])) + "\n"
    refs, missing = discover(["-"], io.StringIO(text))
    assert [r.file for r in refs] == files
    assert all(r.file.exists() for r in refs) and missing == []


@pytest.fixture(scope="module")
def photo_108mp(tmp_path_factory) -> Path:
    """A 12000 x 9000 JPEG of one grey: a phone's 108 MP photo in pixels, 1 MB on disk."""
    path = tmp_path_factory.mktemp("large") / "108mp.jpg"
    Image.new("L", (12000, 9000), 128).save(path, quality=50)
    return path


def test_a_108_megapixel_photo_decodes_under_the_default_limit(photo_108mp):
    assert Image.MAX_IMAGE_PIXELS is None  # Pillow's own check (89.5 Mpx) is off; decode checks sizes
    image, size = decode(photo_108mp, draft_size=224)
    assert size == (12000, 9000) and image.mode == "RGB"
    (batch,) = iter_batches([ImageRef("photo", photo_108mp)], 32)
    assert batch.indices == [0] and batch.sizes == [(12000, 9000)] and batch.skipped == []


def test_images_above_max_pixels_are_skipped_with_the_limit_named(photo_108mp):
    (batch,) = iter_batches([ImageRef("photo", photo_108mp)], 32, max_pixels=50_000_000)
    assert batch.indices == []
    assert batch.skipped == [(0, "image too large (108 Mpx > limit 50 Mpx; raise --max-megapixels)")]


def test_a_bomb_is_refused_before_any_pixel_is_decoded(tmp_path, monkeypatch):
    from PIL import ImageFile

    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")  # 48 kB of PNG, 1.2 GB as RGB

    def decoded(*args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decoded)
    with pytest.raises(ImageTooLarge, match=r"^image too large \(400 Mpx > limit 250 Mpx; raise --max-megapixels\)$"):
        decode(tmp_path / "bomb.png")
    with pytest.raises(ImageTooLarge, match=r"400 Mpx > limit 399\.9 Mpx"):
        decode(tmp_path / "bomb.png", max_pixels=399_900_000)


@pytest.mark.parametrize(
    "pattern",
    ["**/*.jpg", "t/**/*.jpg", "t/**", "t/**/", "t/**/s*/*.png", "t/*/**/*.jpg", "t/**/b/**/*.jpg", "t/**/[ab]*"],
)
def test_recursive_globs_match_what_glob_matches(tmp_path, monkeypatch, pattern):
    """discover walks ** itself (to enter each directory once); on a tree without loops, glob agrees."""
    import glob

    for name in ["t/a.jpg", "t/b/c.jpg", "t/b/d/e.jpg", "t/sub/f.png", "t/.hidden/g.jpg", "t/b/.h.jpg", "u.jpg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "t" / "link").symlink_to(tmp_path / "t" / "sub", target_is_directory=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "t" / "out").symlink_to(tmp_path / "outside", target_is_directory=True)
    (tmp_path / "outside" / "o.jpg").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    expected = sorted(m for m in glob.glob(pattern, recursive=True) if not os.path.isdir(m))
    # Folders that glob enters twice are walked once: t/sub (not its link), outside (if walked itself).
    twice = ("t/link/", "t/out/") if pattern.startswith("**") else ("t/link/",)
    expected = [m for m in expected if not m.startswith(twice)]
    for prefix in ("", str(tmp_path) + "/"):
        refs, _ = discover([prefix + pattern])
        assert sorted(r.path for r in refs) == [prefix + m for m in expected]


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    image.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)


def _modes(tmp_path: Path) -> dict[str, Path]:
    out = {}
    base = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8), "RGB")
    base.convert("L").save(out.setdefault("grey", tmp_path / "grey.png"))
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    palette.save(out.setdefault("palette-transparent", tmp_path / "pal.png"), transparency=0)
    rgba = base.convert("RGBA")
    rgba.putalpha(0)
    rgba.save(out.setdefault("rgba", tmp_path / "rgba.png"))
    base.convert("CMYK").save(out.setdefault("cmyk", tmp_path / "cmyk.jpg"))
    Image.fromarray((np.arange(1200).reshape(30, 40) * 50).astype(np.uint16)).save(
        out.setdefault("16-bit", tmp_path / "deep.png")
    )
    base.save(out.setdefault("webp", tmp_path / "pic.webp"))
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "blue")]
    frames[0].save(out.setdefault("gif", tmp_path / "anim.gif"), save_all=True, append_images=frames[1:])
    frames[1].save(out.setdefault("tiff", tmp_path / "pages.tiff"), save_all=True, append_images=frames[:1])
    return out


def test_every_mode_decodes_to_rgb(tmp_path):
    files = _modes(tmp_path)
    for kind, path in files.items():
        image = load_image(path)
        assert image.mode == "RGB", kind
    # fully transparent pixels show as white, not as whatever colour they hold
    assert load_image(files["rgba"]).getpixel((5, 5)) == (255, 255, 255)
    # 16-bit values are scaled, not clipped: the brightest pixel is white, a mid value is grey
    deep = np.asarray(load_image(files["16-bit"]))[..., 0]
    assert deep.max() > 200 and 0 < np.median(deep) < 255
    # the first frame of animations and multipage files
    assert load_image(files["gif"]).getpixel((0, 0))[0] > 200
    assert load_image(files["tiff"]).getpixel((0, 0))[2] > 200


def _bad_inputs(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    good = make_image(folder / "good.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image\n")
    data = good.read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    # a PNG whose header claims 20000 x 20000 pixels: a decompression bomb
    Image.new("1", (20000, 20000)).save(folder / "bomb.png")
    (folder / "broken.png").symlink_to(folder / "does-not-exist.png")
    (folder / "adir.jpg").mkdir()
    return {
        "empty": folder / "empty.jpg",
        "text": folder / "text.jpg",
        "truncated": folder / "truncated.jpg",
        "bomb": folder / "bomb.png",
        "broken": folder / "broken.png",
        "dir": folder / "adir.jpg",
        "good": good,
    }


def test_bad_inputs_are_skipped_by_name_and_the_run_goes_on(cli, tmp_path, vit_ckpt, monkeypatch):
    files = _bad_inputs(tmp_path / "mixed")
    unreadable = make_image(tmp_path / "mixed" / "secret.jpg", seed=4)
    real_open = Image.open

    def deny(fp, *a, **k):  # tests run as root, where chmod 000 does not stop reading
        if Path(fp) == unreadable:
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *a, **k)

    monkeypatch.setattr(Image, "open", deny)
    paths = [*files.values(), unreadable]
    ran = cli(
        "classify", "-", "--labels", "a,b", "-m", str(vit_ckpt), "-f", "csv", input="\n".join(map(str, paths)) + "\n"
    )
    assert ran.exit_code == 1
    frame = pd.read_csv(io.StringIO(ran.stdout))
    assert set(frame["path"]) == {str(files["good"])}
    reasons = {
        "empty": "not an image",
        "text": "not an image",
        "truncated": "truncated",
        "bomb": "image too large (400 Mpx > limit 250 Mpx",
        "broken": "broken link",
        "dir": "is a directory",
    }
    lines = ran.stderr.splitlines()
    for kind, reason in reasons.items():
        assert any(line.startswith(f"skipped {files[kind]}: ") and reason in line for line in lines), kind
    assert any(line.startswith(f"skipped {unreadable}: permission denied") for line in lines)
    assert lines[-1] == "classified 1 image, skipped 7"
    assert "Traceback" not in ran.stderr


def test_mixed_folder_walk_skips_bad_files(cli, tmp_path, vit_ckpt):
    files = _bad_inputs(tmp_path / "mixed")
    ran = cli("classify", str(tmp_path / "mixed"), "--labels", "a,b", "-m", str(vit_ckpt), "-f", "csv")
    assert ran.exit_code == 1
    assert set(pd.read_csv(io.StringIO(ran.stdout))["path"]) == {str(files["good"])}
    assert ran.stderr.splitlines()[-1] == "classified 1 image, skipped 5"


def test_missing_argument_is_skipped_not_fatal(cli, images, vit_ckpt):
    ran = cli("classify", str(images[0]), "/no/such.jpg", "--labels", "a,b", "-m", str(vit_ckpt), "-f", "csv")
    assert ran.exit_code == 1
    assert "skipped /no/such.jpg: no such file or directory" in ran.stderr
    assert len(pd.read_csv(io.StringIO(ran.stdout))) == 2


@pytest.mark.parametrize("workers", [1, 2])
def test_workers_give_the_same_answers(cli, images, vit_ckpt, workers):
    """Decoding processes (--workers N) against the default, threads in this process (0): the same rows."""
    args = ["classify", str(images[0].parent), "--labels", "a,b,c", "-m", str(vit_ckpt), "-f", "csv", "-b", "2"]
    base = pd.read_csv(io.StringIO(cli(*args).stdout))
    assert sorted(set(base["path"])) == sorted(map(str, images)) and len(base) == 3 * len(images)
    other = pd.read_csv(io.StringIO(cli(*args, "--workers", str(workers)).stdout))
    pd.testing.assert_frame_equal(base, other)


@pytest.mark.parametrize("overlap", [False, True])
def test_batches_come_in_input_order_though_large_files_decode_first(tmp_path, overlap):
    sizes = [(40, 30), (400, 300), (64, 48), (300, 400), (50, 50), (200, 100), (30, 40)]
    files = [make_image(tmp_path / f"{i}.png", size, seed=i) for i, size in enumerate(sizes)]
    (tmp_path / "bad.png").write_bytes(b"not a png")
    refs = [ImageRef(str(f), f) for f in files[:3]] + [ImageRef("bad", tmp_path / "bad.png")]
    refs += [ImageRef(str(f), f) for f in files[3:]]
    batches = list(iter_batches(refs, 32, batch_size=3, overlap=overlap))
    assert [b.indices for b in batches] == [[0, 1, 2], [4, 5], [6, 7]]
    assert batches[1].skipped == [(3, "not an image (or an unsupported format)")]
    for batch in batches:
        assert batch.images is not None and batch.images.dtype == np.uint8
        for row, i in enumerate(batch.indices):
            expected = resize_and_crop(load_image(refs[i].file), 32)
            np.testing.assert_array_equal(batch.images[row], expected)
            assert batch.sizes[row] == Image.open(refs[i].file).size


class _Recorded:
    """A dataset that records which items were decoded, and can fail on one."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at, self.decoded = n, fail_at, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i == self.fail_at:
            raise RuntimeError(f"item {i} broke")
        self.decoded.append(i)
        return i, (np.full((2, 2, 3), i, np.uint8), (2, 2))

    def decode_order(self, indices):
        return indices


def _settle(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_on_the_cpu_decoding_waits_for_the_caller():
    data = _Recorded(20)
    batches = decoded_batches(data, 4, overlap=False)
    assert next(batches).indices == [0, 1, 2, 3]
    time.sleep(0.2)
    assert sorted(data.decoded) == [0, 1, 2, 3]
    assert next(batches).indices == [4, 5, 6, 7]
    assert sorted(data.decoded) == list(range(8))


def test_with_overlap_the_next_batches_decode_while_the_caller_works():
    data = _Recorded(20)
    batches = decoded_batches(data, 4, overlap=True)
    next(batches)
    _settle(lambda: len(data.decoded) == 4 * (1 + PREFETCH_BATCHES))
    time.sleep(0.1)
    assert sorted(data.decoded) == list(range(4 * (1 + PREFETCH_BATCHES)))


@pytest.mark.parametrize("overlap", [False, True])
def test_a_decoding_error_is_raised_after_the_batches_before_it(overlap):
    batches = decoded_batches(_Recorded(12, fail_at=9), 4, overlap=overlap)
    assert [b.indices for b in itertools.islice(batches, 2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(RuntimeError, match="item 9 broke"):
        next(batches)


def test_closing_the_batches_stops_the_decoding_threads():
    data = _Recorded(1000)
    batches = decoded_batches(data, 4, overlap=True)
    next(batches)
    batches.close()
    decoders = [t for t in threading.enumerate() if t.name.startswith("clipcli-decode")]
    for t in decoders:
        t.join(timeout=5)
    assert not any(t.is_alive() for t in decoders)
    assert len(data.decoded) <= 4 * (1 + PREFETCH_BATCHES)


def test_normalize_pixels_is_totensor_then_normalize():
    from clipcli.images.decode import CLIP_MEAN, CLIP_STD, normalize_pixels

    images = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    expected = (images.transpose(0, 3, 1, 2) / 255.0 - np.reshape(CLIP_MEAN, (1, 3, 1, 1))) / np.reshape(
        CLIP_STD, (1, 3, 1, 1)
    )
    pixels = normalize_pixels(images)
    assert pixels.shape == (3, 3, 5, 7) and pixels.is_contiguous()
    np.testing.assert_allclose(pixels.numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("size", [(224, 224), (640, 480), (480, 640), (333, 1000), (1000, 225), (31, 17), (225, 224)])
def test_preprocess_equals_openai_preprocess(size):
    """One resample of the crop box gives the pixels of clip's Resize + CenterCrop + ToTensor + Normalize.

    Up to rounding: a few values in ten thousand land one 8-bit level apart where a filter weight rounds
    the other way."""
    from clipcli.images.decode import CLIP_STD, preprocess
    from clipcli.models.families.openai import import_clip

    rng = np.random.default_rng(sum(size))
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    for n_px in (224, 64):
        ours = preprocess(image, n_px)
        theirs = import_clip().clip._transform(n_px)(image)
        assert ours.shape == theirs.shape == (3, n_px, n_px)
        differ = (ours - theirs).abs()
        one_level = 1 / 255 / min(CLIP_STD) + 1e-6
        assert differ.max() <= one_level
        assert (differ > 1e-5).float().mean() < 2e-3


@pytest.mark.parametrize("command", ["classify", "embed", "rank", "eval"])
@pytest.mark.slow
def test_max_megapixels_reaches_every_command(cli, tmp_path, command):
    folder = tmp_path / "by-class" / "red"
    make_image(folder / "small.png", (40, 40))
    make_image(folder / "large.png", (400, 300), seed=1)
    make_image(tmp_path / "by-class" / "blue" / "small.png", (40, 40), seed=2)  # eval needs two classes
    args = {
        "classify": ["classify", str(folder), "-l", "a,b"],
        "embed": ["embed", str(folder)],
        "rank": ["rank", "a red circle", str(folder)],
        "eval": ["eval", str(tmp_path / "by-class")],
    }[command]
    ran = cli(*args, "-m", "tiny-shapes", "--max-megapixels", "0.1")
    assert ran.exit_code == 1
    assert f"skipped {folder / 'large.png'}: image too large (0.12 Mpx > limit 0.1 Mpx; raise --max-megapixels)" in (
        ran.stderr
    )
    assert "small.png" not in ran.stderr


def test_the_default_limit_is_the_same_in_the_cli_and_the_core():
    from clipcli.commands.options import DEFAULT_MAX_MEGAPIXELS, max_pixels
    from clipcli.images.decode import DEFAULT_MAX_PIXELS

    assert max_pixels(DEFAULT_MAX_MEGAPIXELS) == DEFAULT_MAX_PIXELS
