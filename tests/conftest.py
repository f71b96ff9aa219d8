"""Session-wide test slides, built once per test run from the real tissue in ../shared/data.

Every fixture returns a path inside its own temporary folder. The real slide is required: a
missing ``../shared/data/CMU-1-Small-Region.svs`` fails the run instead of skipping tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import builders


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (the folder holding pyproject.toml)."""
    return builders.REPO_ROOT


@pytest.fixture(scope="session")
def real_svs() -> Path:
    """The real Aperio scan every other test slide is made from."""
    if not builders.REAL_SVS.is_file():
        pytest.fail(f"real test slide missing: {builders.REAL_SVS}; the tests need "
                    "../shared/data/CMU-1-Small-Region.svs next to the repository")
    return builders.REAL_SVS


@pytest.fixture(scope="session")
def large_svs(tmp_path_factory: pytest.TempPathFactory, real_svs: Path) -> Path:
    """40960 x 40960 Aperio SVS, levels 1/4/16/64, eight real tissue blocks, label, macro."""
    return builders.build_large_svs(tmp_path_factory.mktemp("large-svs"))


@pytest.fixture(scope="session")
def generic_tiff(tmp_path_factory: pytest.TempPathFactory, real_svs: Path) -> Path:
    """The 2 x 2 real-tissue mosaic as a generic tiled TIFF pyramid, 0.499 µm/px."""
    return builders.build_generic_tiff(tmp_path_factory.mktemp("generic-tiff"))


@pytest.fixture(scope="session")
def ome_tiff(tmp_path_factory: pytest.TempPathFactory, real_svs: Path) -> Path:
    """The mosaic as an OME-TIFF with SubIFD levels, 0.499 µm/px."""
    return builders.build_ome_tiff(tmp_path_factory.mktemp("ome-tiff"))


@pytest.fixture(scope="session")
def small_svs(tmp_path_factory: pytest.TempPathFactory, real_svs: Path) -> Path:
    """The mosaic as an Aperio SVS with label and macro."""
    return builders.build_small_svs(tmp_path_factory.mktemp("small-svs"))


@pytest.fixture(scope="session")
def dicom_wsi(tmp_path_factory: pytest.TempPathFactory, small_svs: Path) -> Path:
    """Folder of DICOM-WSI instances converted from ``small_svs`` by wsidicomizer."""
    return builders.build_dicom_wsi(tmp_path_factory.mktemp("dicom-wsi"), small_svs)


@pytest.fixture(scope="session")
def truncated_svs(tmp_path_factory: pytest.TempPathFactory, real_svs: Path) -> Path:
    """The real SVS cut to 60 % of its bytes (its first IFD is lost)."""
    return builders.build_truncated_svs(tmp_path_factory.mktemp("truncated-svs"))


@pytest.fixture(scope="session")
def tile_truncated_svs(tmp_path_factory: pytest.TempPathFactory, small_svs: Path) -> Path:
    """``small_svs`` cut to 60 %: first IFD intact, later tiles and IFDs missing."""
    return builders.build_tile_truncated_svs(tmp_path_factory.mktemp("tile-truncated"), small_svs)


@pytest.fixture(scope="session")
def corrupt_tile_svs(tmp_path_factory: pytest.TempPathFactory, small_svs: Path) -> Path:
    """``small_svs`` with the tiles in ``builders.corrupt_tile_box()`` zeroed."""
    return builders.build_corrupt_tile_svs(tmp_path_factory.mktemp("corrupt-tile"), small_svs)


@pytest.fixture(scope="session")
def png_named_svs(tmp_path_factory: pytest.TempPathFactory, real_svs: Path) -> Path:
    """A real PNG of tissue named ``png-named.svs``."""
    return builders.build_png_named_svs(tmp_path_factory.mktemp("png-named"))


@pytest.fixture(scope="session")
def zero_byte_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty ``empty.svs``."""
    return builders.build_zero_byte(tmp_path_factory.mktemp("zero-byte"))


@pytest.fixture(scope="session")
def blank_svs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Aperio SVS the size of the mosaic showing only empty glass (no tissue)."""
    return builders.build_blank_svs(tmp_path_factory.mktemp("blank-svs"))


@pytest.fixture(scope="session")
def no_mpp_tiff(tmp_path_factory: pytest.TempPathFactory, real_svs: Path) -> Path:
    """The real tissue as a generic tiled TIFF with no physical resolution."""
    return builders.build_no_mpp_tiff(tmp_path_factory.mktemp("no-mpp-tiff"))


@pytest.fixture(scope="session")
def unreadable_svs(tmp_path_factory: pytest.TempPathFactory, small_svs: Path) -> Path:
    """A copy of ``small_svs`` with mode 000 (still readable when the tests run as root)."""
    return builders.build_unreadable(tmp_path_factory.mktemp("unreadable"), small_svs)
