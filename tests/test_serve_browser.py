"""`clipcli serve`'s page, driven in a real headless Chromium (Debian's ``chromium``, through Playwright),
as a person uses it: type a query, click "more like this", filter by date, drop a picture, open the
duplicates view, on a desktop and a phone screen. A screenshot of the results page is saved: to
docs/img/serve.png when ``CLIPCLI_SCREENSHOTS`` is set (the picture in docs/serve.md), else to the
test's temporary folder.
"""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import OLD_FILES, SAMPLES, Server, embed, photo_tree, running_server

pytestmark = pytest.mark.slow  # a server, an embedding run and a browser to start: about 15 s before the first test

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("page")
    env = {"CLIPCLI_CACHE": str(root / "cache")}
    photo_tree(root)
    embed(root, ["photos"], "emb/", env)
    with running_server(["emb", "-m", "tiny-shapes"], root, env) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.skip("no Chromium: install Debian's chromium package (.ci/run does) to run the browser tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, site: Server) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    tab.on("requestfailed", lambda r: errors.append(f"{r.url}: {r.failure}"))
    tab.goto(site.base + "/")
    yield tab
    context.close()
    assert not errors, errors


def results(page: Any) -> list[str]:
    return page.locator("#results .result img").evaluate_all("imgs => imgs.map(i => i.alt)")


def wait_for_results(page: Any, first: str | None = None) -> list[str]:
    """Wait until the grid shows results (the first one ``first``), every thumbnail in view decoded (the
    others load lazily, as the page scrolls)."""
    page.wait_for_function(
        """first => {
            const imgs = [...document.querySelectorAll('#results .result img')];
            return imgs.length && (!first || imgs[0].alt === first)
                && !document.body.hasAttribute('aria-busy')
                && imgs.filter(i => i.getBoundingClientRect().top < innerHeight)
                       .every(i => i.complete && i.naturalWidth > 0);
        }""",
        arg=first,
        timeout=30_000,
    )
    return results(page)


def search(page: Any, text: str) -> None:
    page.fill("#q", text)
    page.keyboard.press("Enter")


def test_a_query_shows_the_expected_thumbnail_first(page: Any, tmp_path: Path) -> None:
    page.keyboard.type("a red circle")  # the search box has the focus when the page opens
    page.keyboard.press("Enter")
    shown = wait_for_results(page)
    assert shown[0].endswith("red-circle.jpg"), shown
    assert "Results 1\u201324 for a red circle" in page.inner_text("#status")
    scores = [float(s) for s in page.locator("#results .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    assert page.locator("#next").is_enabled()
    page.click("#next")
    second = wait_for_results(page)
    assert "Page 2" in page.inner_text("#page-label") and not set(second) & set(shown)
    page.click("#prev")
    assert wait_for_results(page) == shown
    folder = DOCS_IMG if os.environ.get("CLIPCLI_SCREENSHOTS") else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / "serve.png"))
    assert (folder / "serve.png").stat().st_size > 10_000
    if folder == DOCS_IMG:  # kept in the repository: 256 colours are plenty for a picture of the page
        from PIL import Image

        with Image.open(folder / "serve.png") as shot:
            shot.convert("RGB").quantize(256).save(folder / "serve.png", optimize=True)


def test_more_like_this(page: Any) -> None:
    search(page, "a yellow heart")
    first = wait_for_results(page)[0]
    page.locator("#results .result .more").first.click()
    shown = wait_for_results(page)
    assert first not in shown and shown[0].endswith("yellow-heart.jpg"), shown
    assert f"more like {first}" in page.inner_text("#status")


def test_a_date_filter(page: Any) -> None:
    search(page, "a shape")
    assert len(wait_for_results(page)) == 24
    page.click("#filters summary")
    page.fill("#before", "2019-12-31")
    page.click("#apply-filters")
    page.wait_for_function("() => document.querySelectorAll('#results .result').length === 2")
    assert sorted(wait_for_results(page)) == sorted(f"photos/{name}" for name in OLD_FILES)
    page.fill("#before", "")
    page.fill("#after", "2020-01-01")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelectorAll('#results .result').length === 24")
    assert not set(wait_for_results(page)) & {f"photos/{name}" for name in OLD_FILES}


def test_the_auto_cutoff_answers_nothing_when_nothing_stands_out(page: Any) -> None:
    page.click("#filters summary")
    page.select_option("#cutoff", "auto")
    search(page, "a red circle")
    shown = wait_for_results(page, "photos/busy/red-circle.jpg")
    assert all(p.endswith("red-circle.jpg") for p in shown)
    search(page, "a large pale oval")
    page.wait_for_function("() => document.querySelector('#status').textContent.startsWith('Nothing matches')")


def drop_file(page: Any, target: str, file: Path, kind: str = "image/jpeg") -> None:
    data = base64.b64encode(file.read_bytes()).decode()
    transfer = page.evaluate_handle(
        """([data, name, kind]) => {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: kind }));
            return transfer;
        }""",
        [data, file.name, kind],
    )
    page.dispatch_event(target, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(target, "drop", {"dataTransfer": transfer})


def test_drop_an_image_on_the_page(page: Any) -> None:
    drop_file(page, "#drop-zone", SAMPLES / "held-out" / "cyan-heart.jpg")
    shown = wait_for_results(page, "photos/held-out/cyan-heart.jpg")
    assert "like cyan-heart.jpg" in page.inner_text("#status")
    assert float(page.locator("#results .score").first.inner_text()) > 0.999
    assert len(shown) == 24


def test_the_file_picker_and_a_refused_picture(page: Any, tmp_path: Path) -> None:
    page.set_input_files("#file", str(SAMPLES / "seen" / "purple-arrow.jpg"))
    wait_for_results(page, "photos/seen/purple-arrow.jpg")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a JPEG")
    page.set_input_files("#file", str(broken))
    page.wait_for_function("() => document.querySelector('#status').classList.contains('error')")
    assert "broken.jpg" in page.inner_text("#status") and "not an image" in page.inner_text("#status")


def test_the_duplicates_view(page: Any) -> None:
    page.click("#tab-dupes")
    page.wait_for_selector("#groups .group")
    page.fill("#threshold", "0.95")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelector('#dupes-status').textContent.includes('\u2265 0.95')")
    groups = page.locator("#groups .group").evaluate_all(
        "gs => gs.map(g => [...g.querySelectorAll('img')].map(i => i.alt).sort())"
    )
    assert ["photos/busy/red-circle.jpg", "photos/held-out/red-circle.jpg"] in groups
    assert page.is_hidden("#search-view")
    page.locator("#groups .more").first.click()
    wait_for_results(page)
    assert page.is_visible("#search-view")


def test_keyboard_only(page: Any) -> None:
    page.evaluate("() => document.activeElement.blur()")
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "q"
    page.keyboard.type("a blue star")
    page.keyboard.press("Enter")
    wait_for_results(page)
    for _ in range(40):  # Tab reaches the first result's "more like this"
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.className") == "more":
            break
    first = results(page)[0]
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelector('#status').textContent.includes('more like')")
    assert first in page.inner_text("#status")


def test_readable_on_a_phone(browser: Any, site: Server) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    phone = context.new_page()
    phone.goto(site.base + "/?q=a%20green%20cross")
    wait_for_results(phone)
    columns = phone.evaluate(
        "getComputedStyle(document.querySelector('#results')).gridTemplateColumns.split(' ').length"
    )
    assert columns == 2
    assert phone.evaluate("document.documentElement.scrollWidth") <= 390
    assert phone.evaluate("parseFloat(getComputedStyle(document.querySelector('#q')).fontSize)") >= 16
    context.close()
