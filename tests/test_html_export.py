"""The static HTML export: Deep Zoom geometry and pixels, the triage worklist, privacy, escaping,
and the pages themselves in a real headless Chromium opened from ``file://``.

One export of the small SVS mosaic (label, macro and stand-in PHI in its description, copied
under a patient-like file name) is shared by the tests of this module. The browser tests save
screenshots under ``$SLIDEPIPE_TEST_ARTIFACTS`` (default ``tests/artifacts/``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import io
import json
import math
import os
import re
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import wsi
from pipelines.html_export import (
    DziGeometry,
    SlideView,
    TopPatch,
    plan_dzi,
    write_dzi,
    write_html_export,
)
from pipelines.html_export.export import EXPORT_MARKER
from pipelines.html_export.heatmap_layer import score_png
from tests import builders
from wsi.writer import STAND_IN_IDENTIFIERS

PHI_FOLDER = "MRN-4711-Doe"
PHI_FILE = "Doe_Jane_1957-03-04.svs"
MISSING_FILE = "Doe_Jane_second_slide.svs"
HOSTILE_NAME = "<script>alert(\"x\")</script> & 'C'"
#: Four times the scan's µm/px: the export reads pyramid level 1 as it is.
VIEWER_MPP = 4 * builders.REAL_MPP
HEATMAP_DOWNSAMPLE = 32.0
#: Level-0 centre of the heatmap's blob and of the best patch.
BLOB_CENTRE = (1200, 3400)
BLOB_SIGMA = 500.0
PATCH_SIZE = 256
THRESHOLD = 0.65
#: Risk order of the views in :func:`export` (highest first).
RISK_ORDER = ("B-high", "D-missing", HOSTILE_NAME, "A-low", "E-bad-heatmap")
ARTIFACTS = Path(os.environ.get("SLIDEPIPE_TEST_ARTIFACTS",
                                builders.REPO_ROOT / "tests" / "artifacts")) / "html_export"


def blob_heatmap(size: tuple[int, int], downsample: float = HEATMAP_DOWNSAMPLE) -> np.ndarray:
    """A Gaussian blob of scores (1 at its centre) over a slide of level-0 ``size``; the three
    left-most raster columns have no data."""
    width, height = (math.ceil(side / downsample) for side in size)
    ys, xs = np.mgrid[0:height, 0:width]
    cx, cy = (c / downsample - 0.5 for c in BLOB_CENTRE)
    sigma = BLOB_SIGMA / downsample
    scores = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma ** 2))
    scores = (scores / scores.max()).astype(np.float32)
    scores[:, :3] = np.nan
    return scores


def shown_cells(heatmap: np.ndarray, threshold: float) -> int:
    """Raster cells the viewer shows at ``threshold`` (scores travel as round(score x 255))."""
    valid = np.isfinite(heatmap)
    grey = np.round(np.where(valid, heatmap, 0) * 255)
    return int((valid & (grey >= math.ceil(threshold * 255 - 1e-6))).sum())


@pytest.fixture(scope="module")
def phi_slide(tmp_path_factory: pytest.TempPathFactory, small_svs: Path) -> Path:
    """The small SVS (label, macro, stand-in PHI) under a patient-like folder and file name."""
    folder = tmp_path_factory.mktemp("archive") / PHI_FOLDER
    folder.mkdir()
    return Path(shutil.copyfile(small_svs, folder / PHI_FILE))


@pytest.fixture(scope="module")
def lesion_slide(tmp_path_factory: pytest.TempPathFactory, real_svs: Path) -> Path:
    """A 2048 x 2048 px real-tissue slide whose level 1 is exactly 4x smaller, so both levels
    read back pixel-exact at any place."""
    folder = tmp_path_factory.mktemp("lesion")
    builders.build_lesion_cohort(folder, n_slides=1)
    return folder / "case00.svs"


@pytest.fixture(scope="module")
def slide_size(phi_slide: Path) -> tuple[int, int]:
    with wsi.open_slide(phi_slide) as slide:
        return slide.dimensions


@pytest.fixture(scope="module")
def views(phi_slide: Path, slide_size: tuple[int, int]) -> list[SlideView]:
    heatmap = blob_heatmap(slide_size)
    patches = [TopPatch(BLOB_CENTRE[0] - PATCH_SIZE // 2, BLOB_CENTRE[1] - PATCH_SIZE // 2,
                        PATCH_SIZE, 1.0, 1),
               TopPatch(2000, 600, PATCH_SIZE, 0.41, 2)]

    def view(name: str, risk: float, grade: str, probability: float, qc: str,
             path: Path = phi_slide, raster: np.ndarray = heatmap) -> SlideView:
        probabilities = {g: (1 - probability) / 2 for g in ("G1", "G2", "G3")}
        probabilities[grade] = probability
        return SlideView(name, path, grade, risk, probabilities, qc, raster, HEATMAP_DOWNSAMPLE,
                         "attention, min-max normalised", patches)

    return [
        view("A-low", 0.2, "G1", 0.95, "ok"),
        view("B-high", 0.9, "G3", 0.6, "ok"),
        view(HOSTILE_NAME, 0.5, "G2", 0.7, "pen marks"),
        view("D-missing", 0.7, "G3", 0.8, "ok", path=phi_slide.parent / MISSING_FILE),
        view("E-bad-heatmap", 0.1, "G1", 0.5, "ok", raster=heatmap[:, : heatmap.shape[1] // 2]),
    ]


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory, views: list[SlideView]) -> Path:
    """The export of :func:`views`; returns its ``index.html``."""
    out = tmp_path_factory.mktemp("html") / "export"
    return write_html_export(out, views, threshold=THRESHOLD, viewer_mpp=VIEWER_MPP, workers=2)


def worklist_rows(index: Path) -> list[dict[str, str]]:
    """The worklist's rows in page order: class, rank, name, risk."""
    pattern = re.compile(r'<tr class="(\w+)" data-rank="(\d+)" data-name="([^"]*)" '
                         r'data-grade="[^"]*" data-probability="[^"]*" data-risk="([^"]*)"')
    return [{"class": c, "rank": r, "name": html.unescape(n), "risk": k}
            for c, r, n, k in pattern.findall(index.read_text(encoding="utf-8"))]


def slide_folder(index: Path, name: str) -> Path:
    """The export folder of the slide displayed as ``name``."""
    rank = next(row["rank"] for row in worklist_rows(index) if row["name"] == name)
    (folder,) = (index.parent / "slides").glob(f"{int(rank):03d}-*")
    return folder


def read_geometry(dzi: Path) -> DziGeometry:
    """The geometry a ``.dzi`` file describes (scale and source level are not in it)."""
    root = ET.parse(dzi).getroot()
    size = root.find("{http://schemas.microsoft.com/deepzoom/2008}Size")
    assert size is not None
    return DziGeometry(width=int(size.get("Width", 0)), height=int(size.get("Height", 0)),
                       level0_per_pixel=1.0, source_level=0, source_downsample=1.0,
                       tile_size=int(root.get("TileSize", 0)), overlap=int(root.get("Overlap", 0)))


def decode(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def magenta(rgb: np.ndarray) -> np.ndarray:
    """Pixels of the test label's colour, which neither tissue nor glass nor viridis show."""
    return (rgb[..., 0] > 200) & (rgb[..., 1] < 80) & (rgb[..., 2] > 200)


def jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# -- Deep Zoom geometry and pixels -------------------------------------------------------------

def test_dzi_geometry_levels_tiles_and_overlap() -> None:
    geometry = DziGeometry(width=1000, height=600, level0_per_pixel=2.0, source_level=0,
                           source_downsample=1.0)
    assert geometry.max_level == 10  # 2**10 = 1024 >= 1000
    assert [geometry.level_size(level) for level in (10, 9, 8, 1, 0)] == [
        (1000, 600), (500, 300), (250, 150), (2, 2), (1, 1)]
    assert geometry.tile_grid(10) == (4, 3)
    assert geometry.tile_grid(9) == (2, 2)
    assert geometry.tile_grid(8) == (1, 1)
    assert geometry.tile_count() == 12 + 4 + 9
    # 254 px tiles plus one pixel of each neighbour; edges clipped to the level
    assert geometry.tile_box(10, 0, 0) == (0, 0, 255, 255)
    assert geometry.tile_box(10, 1, 1) == (253, 253, 509, 509)
    assert geometry.tile_box(10, 3, 2) == (761, 507, 1000, 600)
    assert geometry.level0_extent == (2000.0, 1200.0)
    image = geometry.descriptor("slide_files/")["Image"]
    assert image == {"xmlns": "http://schemas.microsoft.com/deepzoom/2008",
                     "Url": "slide_files/", "Format": "jpg", "Overlap": "1", "TileSize": "254",
                     "Size": {"Width": "1000", "Height": "600"}}


def test_dzi_descriptor_matches_the_slide_at_viewer_mpp(small_svs: Path) -> None:
    with wsi.open_slide(small_svs) as slide:
        width0, height0 = slide.dimensions
        resampled = plan_dzi(slide, 1.0)
        assert (resampled.width, resampled.height) == (math.ceil(width0 * builders.REAL_MPP),
                                                       math.ceil(height0 * builders.REAL_MPP))
        assert resampled.source_level == 0  # no stored level near 2x: read level 0, resample
        assert resampled.level0_per_pixel == pytest.approx(1.0 / builders.REAL_MPP)
        extent_x, extent_y = resampled.level0_extent
        assert width0 <= extent_x < width0 + resampled.level0_per_pixel
        assert height0 <= extent_y < height0 + resampled.level0_per_pixel

        stored = plan_dzi(slide, VIEWER_MPP)  # level 1 (4x) is used as it is
        assert stored.source_level == 1
        assert (stored.width, stored.height) == slide.level_dimensions[1]
        assert stored.level0_per_pixel == slide.level_downsamples[1]

        finest = plan_dzi(slide, 0.1)  # never finer than level 0
        assert (finest.width, finest.height) == slide.dimensions
        assert finest.level0_per_pixel == 1.0


def test_dzi_files_match_the_geometry(export: Path) -> None:
    folder = slide_folder(export, "B-high")
    geometry = read_geometry(folder / "slide.dzi")
    files = folder / "slide_files"
    assert sorted(int(p.name) for p in files.iterdir()) == list(geometry.levels)
    for level in geometry.levels:
        columns, rows = geometry.tile_grid(level)
        expected = {f"{c}_{r}.jpg" for c in range(columns) for r in range(rows)}
        assert {p.name for p in (files / str(level)).iterdir()} == expected
        for column, row in ((0, 0), (columns - 1, rows - 1), (columns // 2, rows // 2)):
            x0, y0, x1, y1 = geometry.tile_box(level, column, row)
            with Image.open(files / str(level) / f"{column}_{row}.jpg") as tile:
                assert tile.format == "JPEG"
                assert tile.size == (x1 - x0, y1 - y0)


@pytest.mark.parametrize(("viewer_mpp", "level"), [(builders.REAL_MPP, 0),
                                                    (4 * builders.REAL_MPP, 1)])
def test_dzi_tile_pixels_equal_the_slide_region(tmp_path: Path, lesion_slide: Path,
                                                viewer_mpp: float, level: int) -> None:
    """Tiles of a pyramid served by a stored level hold exactly that level's pixels at their
    place: each tile is byte for byte the JPEG of the slide region (and not of the region one
    pixel off)."""
    with wsi.open_slide(lesion_slide) as slide:
        geometry = plan_dzi(slide, viewer_mpp)
        assert geometry.source_level == level
        write_dzi(slide, tmp_path, geometry, quality=95, workers=2)
        pixels = slide.read_region((0, 0), level, slide.level_dimensions[level])
    assert (geometry.width, geometry.height) == (pixels.shape[1], pixels.shape[0])
    columns, rows = geometry.tile_grid(geometry.max_level)
    for column, row in ((0, 0), (1, 1), (columns - 1, rows - 1)):
        x0, y0, x1, y1 = geometry.tile_box(geometry.max_level, column, row)
        tile = tmp_path / "slide_files" / str(geometry.max_level) / f"{column}_{row}.jpg"
        assert tile.read_bytes() == jpeg(pixels[y0:y1, x0:x1], quality=95)
        if column and row:
            assert tile.read_bytes() != jpeg(pixels[y0 - 1:y1 - 1, x0:x1], quality=95)
            assert tile.read_bytes() != jpeg(pixels[y0:y1, x0 - 1:x1 - 1], quality=95)


def test_dzi_coarser_levels_match_the_slide_thumbnail(tmp_path: Path, small_svs: Path) -> None:
    """A resampled pyramid (1 µm/px from 0.499) agrees, two levels down, with the slide's own
    thumbnail at that resolution (another resampling path): the level chain keeps its place
    on level 0, so the tile matches best where it is, not one pixel away."""
    with wsi.open_slide(small_svs) as slide:
        geometry = plan_dzi(slide, 1.0)
        captured = write_dzi(slide, tmp_path, geometry, quality=95, workers=2,
                             thumbnail_side=256)
        level = geometry.max_level - 2
        reference = slide.thumbnail(target_mpp=4 * geometry.level0_per_pixel * slide.level0_mpp)
    # the thumbnail rounds its size, the pyramid rounds up: the same to within a pixel
    assert np.abs(np.subtract(reference.shape[1::-1], geometry.level_size(level))).max() <= 1
    x0, y0, x1, y1 = geometry.tile_box(level, 1, 1)
    tile = decode(tmp_path / "slide_files" / str(level) / "1_1.jpg")
    errors = {(dx, dy): mean_abs_diff(tile, reference[y0 + dy:y1 + dy, x0 + dx:x1 + dx])
              for dx in (-1, 0, 1) for dy in (-1, 0, 1)}
    same_place = errors.pop((0, 0))
    assert same_place < 10
    assert same_place < 0.75 * min(errors.values())
    thumbnail_level = max(lv for lv in geometry.levels if max(geometry.level_size(lv)) <= 256)
    assert captured.shape[1::-1] == geometry.level_size(thumbnail_level)
    reduced = decode(tmp_path / "slide_files" / str(thumbnail_level) / "0_0.jpg")
    assert mean_abs_diff(captured, reduced) < 3  # the captured level is the level's image


# -- worklist, failures, privacy, escaping --------------------------------------------------------

def test_worklist_is_sorted_by_risk(export: Path, views: list[SlideView]) -> None:
    rows = worklist_rows(export)
    assert tuple(row["name"] for row in rows) == RISK_ORDER
    assert [int(row["rank"]) for row in rows] == [1, 2, 3, 4, 5]
    risks = [float(row["risk"]) for row in rows]
    assert risks == sorted((view.risk for view in views), reverse=True)
    csv_names = [line.split(",")[1] for line in
                 (export.parent / "worklist.csv").read_text().splitlines()[1:]]
    assert csv_names[:2] == ["B-high", "D-missing"]


def test_unreadable_slides_are_listed_with_their_error(export: Path) -> None:
    rows = {row["name"]: row for row in worklist_rows(export)}
    assert rows["D-missing"]["class"] == "failed"
    assert rows["E-bad-heatmap"]["class"] == "failed"
    assert {name for name, row in rows.items() if row["class"] == "ok"} == {
        "A-low", "B-high", HOSTILE_NAME}
    page = export.read_text(encoding="utf-8")
    assert "viewer not available: no such file; check the path" in page
    assert "viewer not available: the heatmap spans" in page
    slides = {p.name for p in (export.parent / "slides").iterdir()}
    assert slides == {"001-B-high", "003-script-alert-x-script-C", "004-A-low"}
    for folder in (export.parent / "slides").iterdir():
        assert (folder / "index.html").is_file()


def test_a_slide_failing_mid_pyramid_leaves_no_partial_output(
        tmp_path: Path, corrupt_tile_svs: Path, views: list[SlideView]) -> None:
    corrupt = dataclasses.replace(views[1], slide_id="F-corrupt", slide_path=corrupt_tile_svs)
    good = dataclasses.replace(views[0], heatmap=np.zeros((2, 2), np.float32),
                               heatmap_downsample=4096.0, top_patches=[])
    index = write_html_export(tmp_path / "export", [corrupt, good], viewer_mpp=1.0)
    rows = {row["name"]: row["class"] for row in worklist_rows(index)}
    assert rows == {"F-corrupt": "failed", "A-low": "ok"}
    assert "viewer not available: cannot read level 0" in index.read_text(encoding="utf-8")
    assert [p.name for p in (index.parent / "slides").iterdir()] == ["002-A-low"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary folder left


def test_export_holds_no_label_macro_or_phi(export: Path, phi_slide: Path) -> None:
    with wsi.open_slide(phi_slide) as slide:  # the slide does carry all of it
        assert {"label", "macro"} <= set(slide.associated_names)
        label = slide.associated_image("label")
        identifiers = slide.properties(show_phi=True)
    assert magenta(label).mean() > 0.3
    assert set(STAND_IN_IDENTIFIERS.values()) <= set(identifiers.values())

    secrets = [PHI_FILE, Path(PHI_FILE).stem, MISSING_FILE, "Doe_Jane", PHI_FOLDER,
               str(phi_slide.parent), *STAND_IN_IDENTIFIERS.values()]
    images = 0
    for path in export.parent.rglob("*"):
        if path.is_dir():
            continue
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, f"{secret!r} leaked into {path}"
        if path.suffix in (".jpg", ".png"):
            images += 1
            assert not magenta(decode(path)).any(), f"label pixels in {path}"
    assert images > 100
    for folder in (export.parent / "slides").iterdir():
        assert {p.name for p in folder.iterdir()} == {
            "index.html", "slide.dzi", "slide_files", "heatmap.png", "thumbnail.jpg"}


def test_names_are_escaped(export: Path) -> None:
    index = export.read_text(encoding="utf-8")
    assert HOSTILE_NAME not in index
    assert html.escape(HOSTILE_NAME) in index
    assert index.count("<script") == index.count("</script>") == 1
    page = (slide_folder(export, HOSTILE_NAME) / "index.html").read_text(encoding="utf-8")
    assert HOSTILE_NAME not in page
    assert page.count("<script") == page.count("</script>") == 3
    (payload,) = re.findall(r'<script type="application/json" id="slide-data">(.*?)</script>',
                            page, flags=re.DOTALL)
    data = json.loads(payload)
    assert data["name"] == HOSTILE_NAME
    assert data["slide"]["dzi"]["Image"]["Url"] == "slide_files/"


def test_heatmap_png_keeps_scores_and_no_data() -> None:
    raster = np.array([[0.0, 0.5, 1.0, np.nan], [0.25, 0.999, np.nan, 0.75]], np.float32)
    with Image.open(io.BytesIO(score_png(raster))) as image:
        assert image.mode == "LA"
        grey, alpha = np.asarray(image).transpose(2, 0, 1)
    assert alpha.tolist() == [[255, 255, 255, 0], [255, 255, 0, 255]]
    assert grey[alpha > 0].tolist() == [0, 128, 255, 64, 255, 191]


def test_slide_view_rejects_unusable_heatmaps(phi_slide: Path) -> None:
    good = np.zeros((4, 4), np.float32)

    def view(heatmap: Any) -> SlideView:
        return SlideView("x", phi_slide, "G1", 0.5, {"G1": 1.0}, "ok", heatmap, 32.0, "")

    view(good)
    with pytest.raises(ValueError, match="float32"):
        view(good.astype(np.float64))
    with pytest.raises(ValueError, match="normalise"):
        view(good + 1.5)
    with pytest.raises(ValueError, match="NaN for no data"):
        view(np.where(good == 0, np.inf, good).astype(np.float32))
    with pytest.raises(ValueError, match="unique"):
        write_html_export(phi_slide.parent / "never", [view(good), view(good)])


def test_replaces_an_earlier_export_but_never_another_folder(tmp_path: Path) -> None:
    out = tmp_path / "export"
    write_html_export(out, [])
    (out / "stale.txt").write_text("from an earlier export")
    index = write_html_export(out, [], title="second")
    assert not (out / "stale.txt").exists()
    assert "<title>second</title>" in index.read_text(encoding="utf-8")
    assert (out / EXPORT_MARKER).is_file()
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_html_export(foreign, [])
    assert (foreign / "keep.txt").read_text() == "mine"


def test_vendored_openseadragon_matches_its_checksums(export: Path) -> None:
    vendor = builders.REPO_ROOT / "pipelines" / "html_export" / "vendor" / "openseadragon"
    sums = (vendor / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == 18  # the script, its licence, 16 button images
    for line in sums:
        digest, name = line.split()
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name
        copied = export.parent / "assets" / "openseadragon" / name
        assert hashlib.sha256(copied.read_bytes()).hexdigest() == digest, name
    assert "6.1.1" in (vendor / "README.md").read_text()


# -- the pages in a headless Chromium --------------------------------------------------------

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="browser tests need Chromium and its WebDriver (Debian: apt-get install chromium "
           "chromium-driver)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1400,900",
                     "--disable-background-networking"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(10)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, script: str, *args: Any, timeout: float = 10.0) -> Any:
    """Poll ``script`` (a JS expression body returning a value) until it is truthy."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: d.execute_script(script, *args), message=f"timed out waiting for: {script}")


def settle(driver: Any, frames: int = 6) -> None:
    """Let the page draw a few animation frames."""
    driver.execute_async_script(
        "let n = arguments[0]; const done = arguments[1];"
        "const step = () => (--n > 0 ? requestAnimationFrame(step) : done());"
        "requestAnimationFrame(step);", frames)


def severe_console_entries(driver: Any) -> list[dict[str, Any]]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def viewer_pixels(driver: Any) -> np.ndarray:
    png = driver.find_element("id", "viewer").screenshot_as_png
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def changed_pixels(a: np.ndarray, b: np.ndarray) -> int:
    """Pixels of two screenshots that differ by more than 30 in some channel."""
    return int((np.abs(a - b).max(axis=2) > 30).sum())


@needs_chromium
def test_worklist_page_sorts_and_filters(browser: Any, export: Path) -> None:
    browser.get(export.as_uri())
    names = "return Array.from(document.querySelectorAll('#worklist tbody tr'))" \
            ".filter(r => !r.hidden).map(r => r.dataset.name)"
    assert tuple(browser.execute_script(names)) == RISK_ORDER

    def click_header(key: str) -> None:
        browser.find_element("css selector", f'th[data-sort-key="{key}"] button').click()

    click_header("name")
    by_name = [HOSTILE_NAME, "A-low", "B-high", "D-missing", "E-bad-heatmap"]  # "<" first
    assert browser.execute_script(names) == by_name
    click_header("name")
    assert browser.execute_script(names) == by_name[::-1]
    click_header("risk")
    assert tuple(browser.execute_script(names)) == RISK_ORDER
    click_header("probability")  # probability of the predicted grade, highest first
    assert browser.execute_script(names) == ["A-low", "D-missing", HOSTILE_NAME, "B-high",
                                             "E-bad-heatmap"]

    browser.find_element("id", "filter-text").send_keys("high")
    assert browser.execute_script(names) == ["B-high"]
    browser.find_element("id", "filter-text").clear()
    browser.find_element("css selector", '#filter-qc option[value="pen marks"]').click()
    assert browser.execute_script(names) == [HOSTILE_NAME]
    shown = browser.find_element("id", "shown-count").text
    assert shown == "1 of 5 shown"
    browser.save_screenshot(str(ARTIFACTS / "worklist.png"))
    assert severe_console_entries(browser) == []


@needs_chromium
def test_slide_page_heatmap_layer_and_top_patches(browser: Any, export: Path,
                                                  views: list[SlideView]) -> None:
    folder = slide_folder(export, "B-high")
    browser.get((folder / "index.html").as_uri())
    wait_for(browser, "return document.body.dataset.viewerReady === 'true'")
    wait_for(browser, "const w = window.slidepipe.viewer.world; return w.getItemCount() === 2 "
                      "&& w.getItemAt(0).getFullyLoaded() && w.getItemAt(1).getFullyLoaded()")
    settle(browser)
    assert browser.find_element("tag name", "h1").text == "B-high"
    item_opacity = "return window.slidepipe.viewer.world.getItemAt(1).getOpacity()"
    assert browser.execute_script(item_opacity) == pytest.approx(0.5)
    # the heatmap layer spans the slide's level-0 extent in viewport (= level-0) units
    bounds = browser.execute_script("const b = window.slidepipe.viewer.world.getItemAt(1)"
                                    ".getBounds(); return [b.x, b.y, b.width, b.height]")
    heatmap = views[1].heatmap
    assert bounds == pytest.approx([0, 0, heatmap.shape[1] * HEATMAP_DOWNSAMPLE,
                                    heatmap.shape[0] * HEATMAP_DOWNSAMPLE])
    with_heatmap = viewer_pixels(browser)
    browser.save_screenshot(str(ARTIFACTS / "slide-heatmap.png"))

    # on/off toggle
    browser.find_element("id", "heatmap-visible").click()
    assert browser.execute_script(item_opacity) == 0
    settle(browser)
    without_heatmap = viewer_pixels(browser)
    assert changed_pixels(with_heatmap, without_heatmap) > 500
    browser.find_element("id", "heatmap-visible").click()
    assert browser.execute_script(item_opacity) == pytest.approx(0.5)

    # opacity slider
    set_range = ("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                 "e.dispatchEvent(new Event('input', {bubbles: true}));")
    browser.execute_script(set_range, "heatmap-opacity", "0.9")
    assert browser.execute_script(item_opacity) == pytest.approx(0.9)
    settle(browser)
    before = viewer_pixels(browser)

    # threshold slider: the layer shows exactly the cells at or above it, and the view changes
    shown = "return window.slidepipe.state.layer.visiblePixels"
    assert browser.execute_script(shown) == shown_cells(heatmap, THRESHOLD)
    browser.execute_script(set_range, "heatmap-threshold", "0.3")
    wait_for(browser, "return window.slidepipe.state.layer.threshold === 0.3")
    assert browser.execute_script(shown) == shown_cells(heatmap, 0.3) > shown_cells(heatmap,
                                                                                    THRESHOLD)
    wait_for(browser, "return window.slidepipe.viewer.world.getItemAt(1).getFullyLoaded()")
    settle(browser, 12)
    after = viewer_pixels(browser)
    assert changed_pixels(after, before) > 200
    browser.save_screenshot(str(ARTIFACTS / "slide-threshold-0.3.png"))

    # a top patch click fits the viewport around its level-0 rectangle
    patch = views[1].ranked_patches()[0]
    browser.find_element("css selector", '#top-patch-list button[data-rank="1"]').click()
    wait_for(browser, "const v = window.slidepipe.viewer.viewport;"
                      "return v.getBounds(true).equals(v.getBounds(false))")
    x, y, width, height = browser.execute_script(
        "const b = window.slidepipe.viewer.viewport.getBounds(true);"
        "return [b.x, b.y, b.width, b.height]")
    assert x + width / 2 == pytest.approx(patch.x + patch.size / 2, abs=2)
    assert y + height / 2 == pytest.approx(patch.y + patch.size / 2, abs=2)
    assert min(width, height) == pytest.approx(3 * patch.size, rel=0.02)
    assert browser.find_element("css selector", ".patch-box").is_displayed()
    browser.save_screenshot(str(ARTIFACTS / "slide-top-patch.png"))
    assert severe_console_entries(browser) == []
