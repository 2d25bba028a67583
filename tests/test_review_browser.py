"""The review page in a real browser: headless Chromium loads OUTPUT/review/index.html from
file:// after a real `dreamfocus run` and `dreamfocus review`; its DOM, a screenshot and every
link are checked. `make browser` (scripts/get_chromium.sh) unpacks Chromium from Debian's
packages into .cache/chromium; DREAMFOCUS_CHROMIUM names another one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from PIL import Image

from pipeline.manifest import STAGES, ManifestWriter, image_id
from pipeline.review import build_review
from pipeline.storage import Storage

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.jpg"))
WINDOW = (1400, 1000)
PAGE_SIZE = 48  # as the page's script pages


def find_chromium() -> str | None:
    candidates = [os.environ.get("DREAMFOCUS_CHROMIUM"), str(ROOT / ".cache" / "chromium" / "chromium")]
    candidates += [shutil.which(n) for n in ("chromium-headless-shell", "chromium", "chromium-browser", "chrome")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium: `make browser` unpacks one from Debian's packages into .cache/chromium "
    "(or set DREAMFOCUS_CHROMIUM)",
)


def chromium(tmp_path: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on a page, after its scripts ran and its images loaded."""
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # root in CI containers; the page is a local file
        "--disable-gpu",
        "--disable-dev-shm-usage",  # containers' /dev/shm is small or not writable
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--virtual-time-budget=10000",  # let the script run and the lazy images load
        *args,
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


class Links(HTMLParser):
    """Every href and src of a document, and the cards of the grid by status."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.cards: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        self.links += [v for k, v in attrs if k in ("href", "src") and v]
        if tag == "article":
            self.cards.append(found.get("data-status") or "")


def parse(dom: str) -> Links:
    links = Links()
    links.feed(dom)
    return links


def checkerboard(size: tuple[int, int], square: int = 24) -> Image.Image:
    """Pure red and green squares: colours nothing else on the page has, with detail everywhere."""
    y, x = np.mgrid[: size[1], : size[0]]
    pixels = np.where((((x // square) + (y // square)) % 2 == 1)[..., None], (0, 220, 0), (230, 0, 0))
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory) -> Path:
    """A real run (trivial models, intermediates saved) and its review page; OUTPUT/review."""
    root = tmp_path_factory.mktemp("job")
    inputs, output = root / "in", root / "out"
    (inputs / "trip 2024").mkdir(parents=True)
    checkerboard((640, 480)).save(inputs / "0-checker.jpg", quality=95)  # sorts first: the first card
    for photo in EXAMPLES:
        shutil.copy(photo, inputs / "trip 2024" / photo.name)
    shutil.copy(EXAMPLES[0], inputs / "trip 2024" / "50% #1?.jpg")
    Image.new("RGB", (300, 200), (120, 140, 160)).save(inputs / "plain.jpg")  # left alone: nothing in it
    (inputs / "broken.jpg").write_bytes(EXAMPLES[0].read_bytes()[:3000])
    run = [sys.executable, "-m", "pipeline.cli"]
    models = ["--saliency-model", "trivial-saliency", "--depth-model", "trivial-depth"]
    job = subprocess.run(
        [*run, "run", str(inputs), str(output), *models, "--save-intermediates", "--cpu-workers", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert job.returncode == 1, job.stdout + job.stderr  # 1: broken.jpg failed
    review = subprocess.run([*run, "review", str(output)], capture_output=True, text=True, timeout=300)
    assert review.returncode == 0, review.stderr
    return output / "review"


def rows_of(review: Path) -> list[dict]:
    script = (review / "rows.js").read_text()
    return json.loads(script[len("window.REVIEW_ROWS = ") : -2])


def local_file(review: Path, link: str) -> Path:
    parts = urlsplit(link)
    assert not parts.scheme and not parts.netloc, f"not a relative link: {link}"
    return (review / unquote(parts.path)).resolve()


def test_page_shows_every_photo_with_its_counts(reviewed, tmp_path):
    rows = rows_of(reviewed)
    statuses = [r["status"] for r in rows]
    counts = {s: statuses.count(s) for s in ("ok", "skipped", "failed")}
    assert counts == {"ok": len(EXAMPLES) + 2, "skipped": 1, "failed": 1}

    dom = chromium(tmp_path, reviewed.joinpath("index.html").as_uri(), "--dump-dom").stdout
    page = parse(dom)
    assert page.cards == statuses  # the script rendered one card per photo, in order
    assert f"{len(rows)} photos</h1>" in dom
    assert f"{counts['ok']} ok</span>" in dom and "1 left alone</span>" in dom and "1 failed</span>" in dom
    assert f"all ({len(rows)})" in dom and "failed (1)" in dom and f"page 1 of 1 · {len(rows)} photos" in dom
    assert "photos/s · 1 run" in dom and dom.count('class="stage"') == len(STAGES)  # one bar a stage
    assert "background has little fine detail" in dom and "truncated or corrupt image data" in dom

    # Every link and image of the page, and every file rows.js names, is there.
    assert len(page.links) > 4 * len(rows)
    for link in page.links:
        assert local_file(reviewed, link).is_file(), link
    for row in rows:
        names = [row["before"], row["after"], row["output"]] + [n for i in row["intermediates"] for n in i[1:]]
        for name in filter(None, names):
            assert local_file(reviewed, name).is_file(), name
    assert any(r["intermediates"] for r in rows)


def test_screenshot_shows_the_thumbnails(reviewed, tmp_path):
    assert rows_of(reviewed)[0]["path"] == "0-checker.jpg"
    shot = tmp_path / "page.png"
    # Draw only once every stage ran: fewer lazy, async-decoded thumbnails still blank on a busy
    # machine (Chromium's virtual time does not wait on image decoding, so some may be).
    page = reviewed.joinpath("index.html").as_uri()
    chromium(tmp_path, page, "--run-all-compositor-stages-before-draw", f"--screenshot={shot}")
    with Image.open(shot) as im:
        assert im.size == WINDOW
        pixels = np.asarray(im.convert("RGB")).astype(int)
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    # The first card's checkerboard, before and after: its pure red and green are on screen.
    red = np.mean((r > 170) & (g < 70) & (b < 70))
    green = np.mean((g > 160) & (r < 70) & (b < 70))
    assert red > 0.01 and green > 0.01, (red, green)
    # And the second row's example photos at the bottom: many colours, not blank cards. Any two of
    # its three photos give over 480 colour bins; a card with no photo (broken.jpg's) gives 58.
    second_row = pixels[int(WINDOW[1] * 0.8) :]
    assert len(np.unique(second_row.reshape(-1, 3) // 16, axis=0)) > 300


def test_filter_by_status_from_the_address(reviewed, tmp_path):
    url = reviewed.joinpath("index.html").as_uri() + "#status=skipped"
    page = parse(chromium(tmp_path, url, "--dump-dom").stdout)
    assert page.cards == ["skipped"]


def test_pages_of_a_large_library(tmp_path):
    output = Storage(str(tmp_path / "out"))
    writer = ManifestWriter(Storage(f"{output.uri}/manifest"), "run-1")
    for i in range(2 * PAGE_SIZE + 10):
        relpath = f"photo-{i:05d}.jpg"
        status = "failed" if i % 3 else "skipped"
        writer.add(dict(relpath=relpath, image_id=image_id(relpath), status=status, error=f"error {i}", attempt=1))
    writer.flush()
    build_review(output.uri)
    index = Path(output.uri, "review", "index.html").as_uri()

    first = chromium(tmp_path, index, "--dump-dom").stdout
    assert len(parse(first).cards) == PAGE_SIZE and "page 1 of 3 · 106 photos" in first
    last = chromium(tmp_path, index + "#status=all&page=3", "--dump-dom").stdout
    assert len(parse(last).cards) == 10 and "photo-00105.jpg" in last and "photo-00095.jpg" not in last
    skipped = chromium(tmp_path, index + "#status=skipped", "--dump-dom").stdout
    assert parse(skipped).cards == ["skipped"] * 36 and "page 1 of 1 · 36 photos" in skipped
