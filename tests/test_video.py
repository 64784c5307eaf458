"""Videos as inputs: sampled frames as rows (with ``t``), moments in ``rank``, a timeline in ``classify``,
bad videos reported while the good ones are embedded. The videos are written by the tests themselves
(tests/video_helpers.py: a red circle from 4 s to 8 s and a blue star from 12 s to 16 s in a 20 s
clip, a green square the rest of the time), in H.264 (libx264) and VP9 (libvpx-vp9)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from conftest import make_image
from video_helpers import LABELS, write_audio_only, write_video

from clipcli.errors import EXIT_PARTIAL

TINY = ("-m", "tiny-shapes")
SHOWN = {"a red circle": (4.0, 8.0), "a blue star": (12.0, 16.0)}


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    rng = random.Random(7)
    times, t = [], 0.0
    while t < 20:  # frames 0.1 s to 0.9 s apart
        times.append(round(t, 3))
        t += rng.choice((0.1, 0.3, 0.9))
    return {
        "h264": write_video(root / "clip.mp4", "h264-b"),
        "vp9": write_video(root / "clip.webm", "vp9"),
        "vfr": write_video(root / "vfr.mkv", "h264", times=times),
        "rotated": write_video(root / "rotated.mp4", "h264", duration=2, size=(128, 96), rotation=-90),
    }


def rows(folder: Path, columns: list[str]) -> dict[str, list]:
    table = ds.dataset(folder, format="parquet").to_table(columns=columns)
    return {c: table.column(c).to_pylist() for c in columns}


def frame_times(paths: list[str], video: str) -> list[float]:
    return sorted(float(p.rpartition("#t=")[2]) for p in paths if p.startswith(video + "#t="))


def test_frames_are_rows_with_their_time_and_images_keep_t_empty(cli, videos, tmp_path):
    image = make_image(tmp_path / "photo.jpg")
    out = tmp_path / "emb"
    r = cli("embed", *TINY, str(videos["h264"]), str(videos["vp9"]), str(image), "-o", f"{out}/")
    assert r.exit_code == 0, r.stderr
    got = rows(out, ["path", "t", "width", "height", "folder"])
    by_path = dict(
        zip(got["path"], zip(got["t"], got["width"], got["height"], got["folder"], strict=True), strict=True)
    )
    for video in (videos["h264"], videos["vp9"]):
        assert frame_times(got["path"], str(video)) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]
        t, w, h, folder = by_path[f"{video}#t=12.000"]
        assert (t, w, h, folder) == (12.0, 128, 128, str(video.parent))
    assert by_path[str(image)][0] is None
    assert "embedded 21" in r.stderr


def test_every_and_scene_choose_the_frames(cli, videos, tmp_path):
    r = cli("embed", *TINY, str(videos["h264"]), "--every", "5", "-f", "jsonl")
    assert r.exit_code == 0, r.stderr
    assert [json.loads(line)["t"] for line in r.stdout.splitlines()] == [0.0, 5.0, 10.0, 15.0]
    r = cli("embed", *TINY, str(videos["vp9"]), "--frames", "scene", "-f", "jsonl")
    assert r.exit_code == 0, r.stderr
    # the first frame, then each change of picture: the circle, the square, the star, the square
    assert [json.loads(line)["t"] for line in r.stdout.splitlines()] == [0.0, 4.0, 8.0, 12.0, 16.0]
    scene = (str(videos["vp9"]), "--frames", "scene", "-f", "jsonl", "--scene-threshold")
    r = cli("embed", *TINY, *scene, "0.5")  # no change of these shapes is that large
    assert [json.loads(line)["t"] for line in r.stdout.splitlines()] == [0.0], r.stderr
    r = cli("embed", *TINY, *scene, "0")  # any change at all: each look (0.25 s apart) while a shape moves
    times = [json.loads(line)["t"] for line in r.stdout.splitlines()]
    assert {0.0, 4.0, 8.0, 12.0, 16.0} <= set(times) and len(times) > 5, times


def test_csv_and_npy_carry_t_and_image_outputs_are_unchanged(cli, videos, tmp_path):
    image = make_image(tmp_path / "photo.png")
    r = cli("embed", *TINY, str(videos["h264"]), str(image), "--every", "10", "-f", "csv")
    lines = r.stdout.splitlines()
    assert lines[0].startswith("path,t,e0,")
    assert lines[1].startswith(f"{videos['h264']}#t=0.000,0.0,") and lines[3].startswith(f"{image},,")
    only_images = cli("embed", *TINY, str(image), "-f", "csv").stdout.splitlines()
    assert only_images[0].startswith("path,e0,") and only_images[1].startswith(f"{image},0") is False
    assert only_images[1].split(",")[1:] == lines[3].split(",")[2:]  # the same numbers, no t cell
    npy = tmp_path / "e.npy"
    assert cli("embed", *TINY, str(videos["h264"]), str(image), "--every", "10", "-o", str(npy)).exit_code == 0
    sidecar = [json.loads(line) for line in npy.with_name("e.rows.jsonl").read_text().splitlines()[1:]]
    assert sidecar == [
        {"path": f"{videos['h264']}#t=0.000", "t": 0.0},
        {"path": f"{videos['h264']}#t=10.000", "t": 10.0},
        str(image),
    ]
    r = cli("rank", *TINY, "a red circle", str(npy), "--raw-frames", "-k", "3", "-f", "jsonl")
    assert r.exit_code == 0, r.stderr  # the sidecar reads back
    plain = tmp_path / "p.npy"
    assert cli("embed", *TINY, str(image), "-o", str(plain)).exit_code == 0
    assert json.loads(plain.with_name("p.rows.jsonl").read_text().splitlines()[1]) == str(image)


@pytest.mark.parametrize("kind", ["h264", "vp9", "vfr"])
def test_classify_gives_a_timeline_of_the_shown_shapes(cli, videos, kind):
    every = 1.0
    r = cli("classify", *TINY, str(videos[kind]), "--labels", ",".join(LABELS), "--every", str(every), "-f", "jsonl")
    assert r.exit_code == 0, r.stderr
    segments = [json.loads(line) for line in r.stdout.splitlines()]
    assert [s["label"] for s in segments] == [LABELS[2], LABELS[0], LABELS[2], LABELS[1], LABELS[2]]
    assert segments[0]["start"] == 0.0 and abs(segments[-1]["end"] - 20.0) <= every
    for s in segments:
        assert s["path"] == str(videos[kind]) and 0 < s["score"] <= 1
        if s["label"] in SHOWN:
            shown = SHOWN[s["label"]]
            assert abs(s["start"] - shown[0]) <= every and abs(s["end"] - shown[1]) <= every, s
    assert "20 of them video frames" in r.stderr


def test_classify_timeline_as_parquet_and_table(cli, videos, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "timeline.parquet"
    image = make_image(tmp_path / "photo.png")
    r = cli("classify", *TINY, str(videos["h264"]), str(image), "--labels", ",".join(LABELS), "-o", str(out))
    assert r.exit_code == 0, r.stderr
    table = pq.read_table(out)
    assert table.column_names == ["path", "start", "end", "label", "score"]
    got = table.to_pylist()
    circle = [row for row in got if row["label"] == LABELS[0] and row["start"] is not None]
    assert [(row["path"], row["start"], row["end"]) for row in circle] == [(str(videos["h264"]), 4.0, 8.0)]
    assert got[-1]["path"] == str(image) and got[-1]["start"] is None and got[-1]["end"] is None
    top2 = ("--labels", ",".join(LABELS), "--top-k", "2", "-f", "jsonl")
    r = cli("classify", *TINY, str(videos["h264"]), str(image), *top2)
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["path"] for row in rows].count(str(image)) == 2  # the image's top two; each segment one row
    assert [row["label"] for row in rows if row["path"] == str(videos["h264"])] == [
        row["label"] for row in got if row["path"] == str(videos["h264"])
    ]
    r = cli("classify", *TINY, str(videos["h264"]), "--labels", ",".join(LABELS), "-f", "table")
    assert "4.000" in r.stdout and "8.000" in r.stdout and "a red circle" in r.stdout


def test_rank_finds_the_red_circle_as_one_moment(cli, videos, tmp_path):
    out = tmp_path / "emb"
    r = cli("embed", *TINY, str(videos["h264"]), str(videos["vp9"]), "--every", "1", "-o", f"{out}/")
    assert r.exit_code == 0, r.stderr
    r = cli("rank", *TINY, "a red circle", str(out), "-k", "3", "-f", "jsonl")
    assert r.exit_code == 0, r.stderr
    hits = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(hits) == 3
    top = hits[0]["path"]
    video, _, span = top.rpartition("#t=")
    start, end = (float(x) for x in span.split(","))
    assert 4.0 <= start < end <= 8.0, top
    # the other video's circle is a moment of its own, not more frames of the first
    assert hits[1]["path"].rpartition("#t=")[0] not in (video, "")
    raw = cli("rank", *TINY, "a red circle", str(out), "-k", "3", "--raw-frames", "-f", "jsonl")
    frames = [json.loads(line)["path"] for line in raw.stdout.splitlines()]
    assert all("," not in f.rpartition("#t=")[2] for f in frames) and len(frames) == 3


def test_a_frame_row_is_a_query_image(cli, videos, tmp_path, monkeypatch):
    """A frame named as the results name it (``clip.mp4#t=5.000``) is an image term of the query language
    and an --image, taken from the saved rows; before, the term was read as a text and --image failed."""
    monkeypatch.chdir(videos["h264"].parent)  # rows named relatively, as from `embed clip.mp4`
    out = tmp_path / "emb"
    assert cli("embed", *TINY, "clip.mp4", "clip.webm", "--every", "1", "-o", f"{out}/").exit_code == 0
    frame = "clip.mp4#t=5.000"
    for query in (("+ " + frame,), ("+ ./" + frame,), ("--image", frame)):
        r = cli("rank", *TINY, *query, str(out), "-k", "10", "-f", "jsonl", "--raw-frames")
        assert r.exit_code == 0, r.stderr
        best = [h["path"] for h in map(json.loads, r.stdout.splitlines()) if abs(h["score"] - 1) < 1e-5]
        assert frame in best, r.stdout  # its own row scores 1 (the circle's other frames too)
    r = cli("rank", *TINY, "--image", "clip.mp4#t=5.500", str(out))
    assert r.exit_code == 2 and "nor a row of the embeddings given" in r.stderr, r.stderr


def test_dedup_groups_a_videos_frames_but_keep_lists_none_of_them(cli, videos, tmp_path):
    """The green square's frames are near-duplicates of each other, and of a photo of that frame; a frame
    is no file to delete, nor a copy that makes a photo deletable: --keep lists photos whose kept copy
    is a photo too."""
    import av

    with av.open(str(videos["h264"])) as container:
        frame = next(f for f in container.decode(video=0) if f.time is not None and f.time >= 5)
    photo = tmp_path / "photos" / "circle.png"
    photo.parent.mkdir()
    frame.to_image().save(photo)
    only = tmp_path / "only" / "square.png"  # a photo whose near-copies are all frames
    only.parent.mkdir()
    with av.open(str(videos["h264"])) as container:
        next(container.decode(video=0)).to_image().save(only)
    out = tmp_path / "emb"
    assert cli("embed", *TINY, str(videos["h264"]), str(photo), str(only), "-o", f"{out}/").exit_code == 0
    groups = cli("dedup", *TINY, str(out), "-f", "jsonl")
    assert groups.exit_code == 0, groups.stderr
    grouped = [json.loads(line)["path"] for line in groups.stdout.splitlines()]
    frames = [p for p in grouped if p.startswith(f"{videos['h264']}#t=")]
    assert len(frames) >= 3 and {str(photo), str(only)} <= set(grouped)  # photos grouped with frames
    for keep in ("largest", "first"):
        kept = cli("dedup", *TINY, str(out), "--keep", keep, "-0")
        assert kept.exit_code == 0, kept.stderr
        assert kept.stdout == "" and "skipped" not in kept.stderr, (kept.stdout, kept.stderr)
    shutil.copy(photo, photo.with_name("circle-copy.png"))  # a real copy: one of the two is listed
    assert cli("embed", *TINY, str(videos["h264"]), str(photo.parent), str(only), "-o", f"{out}/").exit_code == 0
    for keep in ("largest", "first"):
        kept = cli("dedup", *TINY, str(out), "--keep", keep, "-0")
        assert kept.exit_code == 0, kept.stderr
        listed = kept.stdout.split("\0")[:-1]
        assert len(listed) == 1 and Path(listed[0]).parent == photo.parent, kept.stdout


def test_a_rerun_is_incremental_and_a_changed_video_replaces_its_frames(cli, videos, tmp_path):
    clip = write_video(tmp_path / "clip.mp4", "h264", duration=6)
    out = tmp_path / "emb"
    assert cli("embed", *TINY, str(clip), str(videos["vp9"]), "-o", f"{out}/").exit_code == 0
    r = cli("embed", *TINY, str(clip), str(videos["vp9"]), "-o", f"{out}/")
    assert "embedded 0, unchanged 13" in r.stderr, r.stderr
    write_video(clip, "h264", duration=3)  # shorter: the frame at 4 s is gone
    r = cli("embed", *TINY, str(clip), str(videos["vp9"]), "-o", f"{out}/")
    assert r.exit_code == 0, r.stderr
    assert "embedded 2, unchanged 10, removed 1" in r.stderr, r.stderr
    assert frame_times(rows(out, ["path"])["path"], str(clip)) == [0.0, 2.0]


def test_a_video_replaced_after_its_frames_were_listed_gives_no_frame_of_the_new_one(tmp_path):
    """Frames are listed at discovery and decoded later: a video replaced in between (another cut, same
    name) is another video, whose frames are not at the listed times. None is taken from it (stored with
    the new file's size and mtime, they would be called unchanged by every rerun); each is reported."""
    from clipcli.images import video
    from clipcli.images.sources import discover

    clip = write_video(tmp_path / "clip.mp4", "h264", duration=6)
    other = write_video(tmp_path / "other.mp4", "h264", duration=3, size=(96, 64))
    refs, _ = discover([str(clip)], containers=video.ContainerOptions(every=1.0))
    assert len(refs) == 6
    os.replace(other, clip)
    for ref in refs:
        with pytest.raises(video.VideoError, match="changed since its frames were listed"):
            video.CONTAINER.decode(ref, None, None)
    refs, _ = discover([str(clip)], containers=video.ContainerOptions(every=1.0))  # listed again: taken
    assert [video.CONTAINER.decode(r, None, None).size for r in refs] == [(96, 64)] * 3


def test_a_sampled_time_gives_the_first_frame_at_it_or_after_with_a_variable_frame_rate(tmp_path):
    """The frame a row holds is the first at its time or after it, as a player shows it, never an
    earlier one: with frames at 9, 9.5 and 10 s, the row at 10 s is the picture of 10 s."""
    from PIL import Image

    from clipcli.images import video
    from clipcli.images.sources import discover

    times = [0.0, 3.0, 6.0, 9.0, 9.5, 10.0, 10.5]
    colours = {t: (int(20 * i), 255 - int(30 * i), 40 + int(25 * i)) for i, t in enumerate(times)}
    clip = write_video(
        tmp_path / "vfr.mp4", "h264", times=times, picture=lambda t, size: Image.new("RGB", size, colours[t])
    )
    refs, _ = discover([str(clip)], containers=video.ContainerOptions(every=1.0))
    got = {}
    for ref in refs:
        decoded = video.CONTAINER.decode(ref, None, None)
        got[decoded.meta["t"]] = np.asarray(decoded.image).reshape(-1, 3).mean(axis=0)
    assert sorted(got) == [0.0, 3.0, 6.0, 9.0, 10.0]
    for t, mean in got.items():
        assert np.abs(mean - colours[t]).max() < 6, (t, mean, colours[t])


def test_a_video_cut_shorter_replaces_its_frames_without_prune(cli, tmp_path):
    """Most of a video's rows going because its new version is shorter is no sign of an unmounted share:
    the run replaces them (--prune guards rows of files missing from here). Before, it was refused."""
    clip = write_video(tmp_path / "cut.mp4", "h264", duration=20)
    out = tmp_path / "emb"
    assert cli("embed", *TINY, str(clip), "--every", "1", "-o", f"{out}/").exit_code == 0
    write_video(clip, "h264", duration=6)
    r = cli("embed", *TINY, str(clip), "--every", "1", "-o", f"{out}/")
    assert r.exit_code == 0, r.stderr
    assert "embedded 6, unchanged 0, removed 14" in r.stderr, r.stderr
    assert frame_times(rows(out, ["path"])["path"], str(clip)) == [float(t) for t in range(6)]
    photos = [make_image(tmp_path / "photos" / f"p{i}.png", seed=i) for i in range(8)]
    assert cli("embed", *TINY, str(clip), str(photos[0].parent), "-o", f"{out}/").exit_code == 0
    for photo in photos:
        photo.unlink()  # files gone from here are still guarded
    r = cli("embed", *TINY, str(clip), "-o", f"{out}/")
    assert r.exit_code == 2 and "this run would remove 8 of its" in r.stderr and "--prune" in r.stderr, r.stderr


def test_rotation_is_applied(videos):
    from clipcli.images.sources import discover
    from clipcli.images.video import CONTAINER

    def left_red_right_blue(t: float, size: tuple[int, int]):
        from PIL import Image

        w, h = size
        image = Image.new("RGB", size, (30, 70, 225))
        image.paste((220, 30, 30), (0, 0, w // 2, h))
        return image

    folder = videos["rotated"].parent
    clip = write_video(
        folder / "turned.mp4", "h264", duration=1, size=(128, 96), rotation=-90, picture=left_red_right_blue
    )
    refs, skipped = discover([str(clip)])
    assert not skipped
    got = CONTAINER.decode(refs[0], None, None)
    assert got.size == (96, 128) and got.image.size == (96, 128)
    top, bottom = got.image.getpixel((48, 10)), got.image.getpixel((48, 118))
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]  # turned clockwise: the left side on top
    slanted = write_video(folder / "slanted.mp4", "h264", duration=1, size=(128, 96), rotation=45)
    refs, _ = discover([str(slanted)])
    got = CONTAINER.decode(refs[0], None, None)  # not turned (as FFmpeg's players do), so not swapped either
    assert got.size == (128, 96) and got.image.size == (128, 96)


def test_bad_videos_are_reported_and_the_good_ones_embedded(cli, videos, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "empty.mp4").write_bytes(b"")
    (bad / "noise.mkv").write_bytes(bytes(random.Random(1).randrange(256) for _ in range(4000)))
    write_audio_only(bad / "audio.mp4")
    data = write_video(tmp_path / "x.mkv", "h264-b").read_bytes()
    (bad / "truncated.mkv").write_bytes(data[: len(data) // 2])
    lying = bytearray(data)
    at = lying.find(b"\x44\x89\x88")  # Matroska's Duration element: an 8-byte float, in milliseconds
    lying[at + 3 : at + 11] = struct.pack(">d", 600_000.0)
    (bad / "lying.mkv").write_bytes(bytes(lying))
    avi = write_video(tmp_path / "x.avi", "mjpeg", duration=1).read_bytes()
    (bad / "unknown.avi").write_bytes(avi.replace(b"MJPG", b"QQQQ"))  # a codec FFmpeg does not know
    write_video(bad / "huge.avi", "mjpeg", duration=1, fps=1, size=(1600, 1200))
    out = tmp_path / "emb"
    r = cli("embed", *TINY, str(bad), str(videos["vp9"]), "--max-megapixels", "1", "-o", f"{out}/")
    assert r.exit_code == EXIT_PARTIAL, r.stderr
    assert "Traceback" not in r.stderr
    reasons = {
        line.split(": ", 1)[0].rpartition("/")[2]: line for line in r.stderr.splitlines() if line.startswith("skipped")
    }
    assert "empty file" in reasons["empty.mp4"]
    assert "no video stream" in reasons["audio.mp4"]
    assert "not a readable video" in reasons["noise.mkv"]
    assert "unknown video codec" in reasons["unknown.avi"]
    assert "frames too large" in reasons["huge.avi#t=0.000"]
    assert "stop at 1" in reasons["truncated.mkv"] and "stated 20.000 s" in reasons["truncated.mkv"]
    assert "stated 600.000 s" in reasons["lying.mkv"]
    paths = rows(out, ["path"])["path"]
    assert len(frame_times(paths, str(videos["vp9"]))) == 10
    truncated = frame_times(paths, str(bad / "truncated.mkv"))
    assert truncated[0] == 0.0 and 8.0 <= truncated[-1] < 14.0  # the frames before the damage
    assert frame_times(paths, str(bad / "lying.mkv"))[-1] == 18.0  # sampled to the real end


def test_a_cut_whose_first_keyframe_is_discarded_is_decoded_not_gone_round_for_ever(tmp_path):
    """An MP4 whose frames start before 0 (as ``ffmpeg -ss ... -c copy`` cuts write it: an edit list, the
    first packets marked discarded, the keyframe among them) gives no frame when that keyframe is
    drained; decoding once went back to it for ever, at full CPU, deaf to SIGTERM. Every row comes."""
    clip = write_video(tmp_path / "cut.mp4", "h264-b", times=[round(-0.5 + i / 10, 3) for i in range(40)])
    args = [sys.executable, "-m", "clipcli", "embed", *TINY, str(clip), "--every", "0.5"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert frame_times([ln.split(",")[0] for ln in done.stdout.splitlines()], str(clip)) == [i / 2 for i in range(8)]


def test_scenes_before_a_damaged_frame_are_kept(cli, tmp_path):
    """--frames scene decodes the video at discovery: a frame that cannot be decoded stops that scan
    where it is, and the scenes found before it are embedded, the reason naming the time (as a truncated
    video's frames before the damage are)."""
    import av

    clip = write_video(tmp_path / "clip.avi", "mjpeg", duration=20, fps=5)
    data = bytearray(clip.read_bytes())
    with av.open(str(clip)) as container:
        packet = next(p for p in container.demux(video=0) if p.pts is not None and float(p.pts * p.time_base) >= 10)
        data[packet.pos + 16 : packet.pos + packet.size] = b"\xff" * (packet.size - 16)
    clip.write_bytes(bytes(data))
    out = tmp_path / "emb"
    r = cli("embed", *TINY, str(clip), "--frames", "scene", "-o", f"{out}/")
    assert r.exit_code == EXIT_PARTIAL, r.stderr
    assert "Traceback" not in r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("skipped")]
    assert f"{clip}: damaged: decoding stopped at 9.800 s" in line and "the scenes before it are kept" in line
    assert frame_times(rows(out, ["path"])["path"], str(clip)) == [0.0, 4.0, 8.0]


def growing_mjpeg(path: Path, side: int) -> Path:
    """An MJPEG AVI whose header says 64x64, its first two frames that size, then frames of side x side
    (each MJPEG frame declares its own size)."""
    import fractions
    import io

    import av
    from PIL import Image

    def jpeg(w: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (w, w), (200, 30, 30)).save(buf, "JPEG", quality=50)
        return buf.getvalue()

    small, big = jpeg(64), jpeg(side)
    with av.open(str(path), "w", format="avi") as out:
        stream = out.add_stream("mjpeg", rate=1)
        stream.time_base = fractions.Fraction(1, 1)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuvj420p"
        for i in range(6):
            packet = av.Packet(big if i >= 2 else small)
            packet.stream, packet.pts, packet.dts = stream, i, i
            out.mux(packet)
    return path


def test_frames_that_grow_past_the_limit_mid_stream_are_refused_and_the_earlier_kept(cli, tmp_path):
    """Found by attack: the limit was checked against the stream's header only, and frames declaring
    four times the limit later in the stream were decoded (a 16 MB file took 1.5 GB)."""
    video = growing_mjpeg(tmp_path / "grows.avi", 2000)  # 4 Mpx frames from t=2
    out = tmp_path / "grows.csv"
    r = cli("embed", *TINY, str(video), "--every", "1", "--max-megapixels", "1", "-o", str(out))
    assert r.exit_code == EXIT_PARTIAL, r.stderr
    assert "Traceback" not in r.stderr
    rows = [line.split(",")[0] for line in out.read_text().splitlines()[1:]]
    assert [row.rpartition("#")[2] for row in rows] == ["t=0.000", "t=1.000"]
    assert (
        "grows.avi#t=2.000: the decoder refused a frame (Invalid argument): larger than the limit of 1 Mpx" in r.stderr
    )


def test_a_decode_that_makes_no_progress_is_abandoned(videos, monkeypatch):
    from clipcli.images import video, video_decode
    from clipcli.images.sources import discover

    refs, _ = discover([str(videos["h264"])])
    video.forget(videos["h264"])
    monkeypatch.setattr(video_decode, "STALL_SECONDS", -1.0)  # any packet that gives no frame at once stalls
    with pytest.raises(ValueError, match="made no progress"):
        video.CONTAINER.decode(refs[3], None, None)


def test_without_pyav_a_video_is_skipped_naming_the_extra(cli, videos, tmp_path, monkeypatch):
    from clipcli.images import video

    def missing() -> None:
        raise ImportError("No module named 'av'")

    monkeypatch.setattr(video, "load_av", missing)
    image = make_image(tmp_path / "photo.jpg")
    r = cli("embed", *TINY, str(videos["h264"]), str(image), "-f", "jsonl")
    assert r.exit_code == EXIT_PARTIAL
    assert len(r.stdout.splitlines()) == 1
    assert f"skipped {videos['h264']}: " in r.stderr and "clipcli[video]" in r.stderr


def test_frames_decoded_forward_or_by_seeking_are_the_same(videos):
    """Frames decoded in passes, onward from one to the next, are those a fresh seek to each gives; and
    the decoding threads, sharing the passes, give the same frames too."""
    from concurrent.futures import ThreadPoolExecutor

    from clipcli.images import video
    from clipcli.images.sources import discover

    clip = videos["h264"]
    refs, _ = discover([str(clip)], containers=video.ContainerOptions(every=0.6))
    video.forget(clip)
    onward = [np.asarray(video.CONTAINER.decode(r, None, None).image) for r in refs]
    fresh = []
    for r in refs:
        video.forget(clip)
        fresh.append(np.asarray(video.CONTAINER.decode(r, None, None).image))
    assert all(np.array_equal(a, b) for a, b in zip(onward, fresh, strict=True))
    refs, _ = discover([str(clip)], containers=video.ContainerOptions(every=0.6))
    video.forget(clip)
    with ThreadPoolExecutor(4) as pool:
        shared = list(pool.map(lambda r: np.asarray(video.CONTAINER.decode(r, None, None).image), refs))
    assert all(np.array_equal(a, b) for a, b in zip(onward, shared, strict=True))


def test_keyframes_skip_deblocking_and_every_other_frame_is_decoded_exactly(videos):
    """A sampled frame that is itself a keyframe is decoded without H.264's deblocking filter (nothing is
    decoded from it): close to the full decode, not equal to it. Every other frame equals decoding the
    whole video frame by frame, so no frame is ever decoded from an unfiltered picture."""
    import av

    from clipcli.images import video
    from clipcli.images.sources import discover

    clip = videos["h264"]  # x264 veryfast (deblocking on), B-frames, a keyframe every 5 s at least
    with av.open(str(clip)) as container:
        decoded = [(float(f.time), f.key_frame, np.asarray(f.to_image())) for f in container.decode(video=0)]
    origin = min(t for t, _, _ in decoded)
    plain = {round(t - origin, 3): (bool(key), picture.astype(int)) for t, key, picture in decoded}
    refs, _ = discover([str(clip)], containers=video.ContainerOptions(every=1.0))
    video.forget(clip)
    keyframes = []
    for ref in refs:
        decoded_as = video.CONTAINER.decode(ref, None, None)
        key, expected = plain[round(decoded_as.meta["t"], 3)]
        got = np.asarray(decoded_as.image).astype(int)
        if key:
            keyframes.append(np.abs(got - expected).mean())
        else:
            assert np.array_equal(got, expected), decoded_as.meta["t"]
    assert len(keyframes) >= 4 and len(keyframes) < len(refs)
    assert max(keyframes) < 1.0 and max(keyframes) > 0.0


@pytest.mark.parametrize("size", [(198, 110), (1282, 722), (640, 480)])
def test_a_frame_converts_as_pyav_converts_it_whatever_its_row_padding(size):
    """frame_image reads the converted rows at the plane's stride (its width in bytes, padded for SIMD,
    differs from width x 3 for most widths): the picture PyAV's own to_image gives, at full size and
    drafted, pixel for pixel."""
    import av

    from clipcli.images.video_decode import frame_image

    rng = np.random.default_rng(sum(size))
    picture = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    frame = av.VideoFrame.from_ndarray(picture, format="rgb24").reformat(format="yuv420p")
    for draft, scale in [(None, 1), (size[1] // 2, 2), (size[1] // 4, 4)]:
        got = frame_image(frame, draft)
        small = {} if scale == 1 else {"width": size[0] // scale, "height": size[1] // scale, "interpolation": "AREA"}
        expected = frame.to_image(**small)
        assert got.size == expected.size == (size[0] // scale, size[1] // scale)
        assert np.array_equal(np.asarray(got), np.asarray(expected)), (size, scale)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGKILL, -9), (signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["kill", "int", "term"]
)
def test_killed_mid_video_then_rerun_embeds_every_frame_once(tmp_path, signum, code):
    """A video's frames are written as one unit: a run killed (or stopped by Ctrl-C or SIGTERM, which
    write the rows done) inside the second video kept the first one's and none of the second's, and the
    rerun embeds the second whole, each frame once."""
    first = write_video(tmp_path / "a.mp4", "h264", duration=1)
    second = write_video(tmp_path / "b.mp4", "h264", duration=10)
    out = tmp_path / "emb"
    args = [sys.executable, "-m", "clipcli", "embed", *TINY, str(first), str(second), "--every", "0.2", "-b", "4"]
    args += ["-o", f"{out}/", "--part-size", "4"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("part-*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it was killed"
        os.killpg(proc.pid, signum)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    assert proc.returncode == code, err.decode()
    kept = rows(out, ["path"])["path"]
    assert frame_times(kept, str(first)) == [0.0, 0.2, 0.4, 0.6, 0.8] and not frame_times(kept, str(second))
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "embedded 50, unchanged 5" in done.stderr
    paths = rows(out, ["path"])["path"]
    assert len(paths) == len(set(paths)) == 55
    assert frame_times(paths, str(second)) == [round(i * 0.2, 3) for i in range(50)]


@pytest.mark.parametrize(("batch", "kept"), [(10, 10), (4, 0)], ids=["between-videos", "inside-a-video"])
def test_a_run_stopped_between_videos_keeps_the_finished_one(cli, tmp_path, monkeypatch, batch, kept):
    """Ctrl-C after the batch that ended the first video (10 frames) keeps that video, which is whole;
    after a batch that ended inside it, none of it."""
    from clipcli.engines.base import Run

    first = write_video(tmp_path / "a.mp4", "h264", duration=2)
    second = write_video(tmp_path / "b.mp4", "h264", duration=2)
    counted = Run.batch

    def count_then_stop(self, embedded, done):  # as Ctrl-C while the next batch decodes
        counted(self, embedded, done)
        raise KeyboardInterrupt

    monkeypatch.setattr(Run, "batch", count_then_stop)
    out = tmp_path / "emb"
    r = cli("embed", *TINY, str(first), str(second), "--every", "0.2", "-b", str(batch), "-o", f"{out}/")
    assert r.exit_code == 130, r.stderr
    paths = rows(out, ["path"])["path"] if list(out.glob("part-*.parquet")) else []
    assert len(frame_times(paths, str(first))) == kept and not frame_times(paths, str(second))


def test_moments_merge_adjacent_frames_within_the_margin():
    from clipcli.search.moments import moments

    hits = [
        ("a.mp4#t=4.000", 0.80),
        ("a.mp4#t=6.000", 0.79),
        ("a.mp4#t=8.000", 0.50),  # adjacent, but far below the best
        ("a.mp4#t=14.000", 0.70),  # not adjacent
        ("photo.jpg", 0.75),
        ("b.webm#t=2.000", 0.78),
        ("b.webm#t=4.000", 0.77),
    ]
    got = moments(hits)
    assert [(m.path, m.start, m.end, m.score, m.t) for m in got] == [
        ("a.mp4", 4.0, 6.0, 0.80, 4.0),
        ("b.webm", 2.0, 4.0, 0.78, 2.0),
        ("photo.jpg", None, None, 0.75, None),
        ("a.mp4", 14.0, 14.0, 0.70, 14.0),
        ("a.mp4", 8.0, 8.0, 0.50, 8.0),
    ]
    assert got[0].name == "a.mp4#t=4.000,6.000" and got[2].name == "photo.jpg"
    assert [m.name for m in moments([("x.jpg", 0.9), ("y.png", 0.8)])] == ["x.jpg", "y.png"]


def test_moment_hits_keep_image_results_as_they_were():
    from clipcli.search.moments import candidates, moment_hits
    from clipcli.search.rank import Hit

    images = [Hit(0.9, "b.jpg"), Hit(0.9, "a.jpg"), Hit(0.5, "c.jpg")]
    assert moment_hits(images, 2) == images[:2]  # order and ties untouched
    frames = [Hit(0.8, "v.mp4#t=2.000"), Hit(0.79, "v.mp4#t=4.000"), Hit(0.7, "c.jpg")]
    assert moment_hits(frames, 2) == [Hit(0.8, "v.mp4#t=2.000,4.000"), Hit(0.7, "c.jpg")]
    assert candidates(10) > 10 and candidates(10, raw_frames=True) == 10


def test_timeline_segments_tile_the_video():
    from clipcli.zeroshot.timeline import Timeline

    timeline = Timeline()
    got = []
    for path, label in [("v.mp4#t=0.000", "x"), ("v.mp4#t=2.000", "y"), ("v.mp4#t=4.000", "y"), ("i.jpg", "z")]:
        got += list(timeline.add(path, [label, "w"], [0.5, 0.25]))  # top two: a frame counts with its first
    got += list(timeline.close())
    assert [(s.path, s.start, s.end, s.label, s.frames) for s in got] == [
        ("v.mp4", 0.0, 2.0, "x", 1),
        ("v.mp4", 2.0, 6.0, "y", 2),
        ("i.jpg", None, None, "z", 1),
        ("i.jpg", None, None, "w", 1),  # an image keeps its top k, as in a run without videos
    ]
