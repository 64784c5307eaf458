"""Pictures of members: a video's frame or moment and a WebDataset sample get thumbnails in `rank --html`
and on the search page, like any image, and links that open the member (a video at its moment)."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from video_helpers import write_video
from wds_helpers import sample_items, write_shard

from clipcli.images.thumbs import thumbnail_jpeg

MODEL = ("-m", "tiny-shapes", "--precision", "fp32")


def red_share(jpeg: bytes) -> float:
    pixels = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(int)
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)
    return float(red.mean())


def test_a_frame_and_a_moment_have_the_thumbnail_of_their_time(tmp_path):
    video = write_video(tmp_path / "clip.mp4", "h264", duration=20.0, fps=5, size=(96, 96))
    # The red circle is shown from 4 s to 8 s (tests/video_helpers.py SCENES).
    assert red_share(thumbnail_jpeg(video, 64, member="t=6.000")) > 0.1
    assert red_share(thumbnail_jpeg(video, 64, member="t=5.000,7.000")) > 0.1  # a moment: its first frame
    assert red_share(thumbnail_jpeg(video, 64, member="t=1.000")) < 0.01
    with pytest.raises((OSError, ValueError)):
        thumbnail_jpeg(video, 64, member="t=oops")


def test_rank_html_shows_shard_samples_and_links_to_video_moments(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    items = sample_items()[:4]
    write_shard(Path("s.tar"), items)
    write_video(Path("clip.mp4"), "h264", duration=20.0, fps=5, size=(96, 96))
    assert cli("embed", "s.tar", "clip.mp4", *MODEL, "-o", "emb/").exit_code == 0
    ran = cli("rank", "a red circle", "emb/", *MODEL, "-k", "30", "--html", "page.html")
    assert ran.exit_code == 0, ran.stderr
    page = Path("page.html").read_text()
    assert "no preview" not in page  # every member got its picture
    assert page.count("data:image/jpeg;base64,") >= len(items) + 1
    links = re.findall(r'href="([^"]+)"', page)
    assert any(link.startswith("clip.mp4#t=") for link in links), links
    assert any(link.startswith("s.tar#") for link in links), links
    first = re.search(r'src="data:image/jpeg;base64,([^"]+)"', page)
    assert first is not None and red_share(base64.b64decode(first.group(1))) > 0.05  # the red circle first


def test_the_search_page_answers_with_a_videos_moments_as_rank_does(tmp_path):
    """A video's frames of one scene are one result on the page too: named by their span, with the best
    frame as the row behind it (its thumbnail, and what "more like this" searches from)."""
    import httpx
    from serve_helpers import embed, running_server

    env = {"CLIPCLI_CACHE": str(tmp_path / "cache")}
    write_video(tmp_path / "clip.mp4", "h264", duration=20.0, fps=5, size=(96, 96))
    write_shard(tmp_path / "s.tar", sample_items()[:4])
    embed(tmp_path, ["clip.mp4", "s.tar", "--every", "1"], "emb/", env)
    with (
        running_server(["emb", "-m", "tiny-shapes"], tmp_path, env) as server,
        httpx.Client(base_url=server.base, timeout=30) as client,
    ):
        answer = client.get("/api/search", params={"q": "a red circle", "page_size": 10})
        assert answer.status_code == 200, answer.text
        results = answer.json()["results"]
        top = results[0]
        video, _, span = top["path"].rpartition("#t=")
        start, end = (float(x) for x in span.split(","))
        assert video == "clip.mp4" and 4.0 <= start < end <= 8.0, top  # the circle, as one moment
        assert top["row"].startswith("clip.mp4#t=") and start <= float(top["row"][11:]) <= end
        assert all(r["row"] == r["path"] for r in results if r["path"].startswith("s.tar#"))
        spans = [r["path"] for r in results if r["path"].startswith("clip.mp4#")]
        assert len(spans) == len(set(spans)) and sum(1 for s in spans if s == top["path"]) == 1
        thumb = client.get(top["thumb"])
        assert thumb.status_code == 200 and red_share(thumb.content) > 0.05
        similar = client.get("/api/similar", params={"path": top["row"], "page_size": 5})
        assert similar.status_code == 200, similar.text
        assert all(r["row"] != top["row"] for r in similar.json()["results"])
        # the moment asked about is left out whole: not its other frames, split around the one asked of
        others = [r["path"].rpartition("#t=")[2] for r in similar.json()["results"] if r["path"].startswith("clip.")]
        assert not any(start <= float(o.split(",")[0]) <= end for o in others), (top, others)
        groups = client.get("/api/dedup", params={"threshold": 0.95}).json()["groups"]
        frames = [m for g in groups for m in g["members"] if m["path"].startswith("clip.mp4#t=")]
        assert frames and all(m["bytes"] is None for m in frames)  # a frame is no file of its own
