import numpy as np
import pytest

from nucseg.slides import SlideError, open_slide, resolve_mpp

from .conftest import CMU, FIXTURES, TCGA_TS, need


@pytest.mark.parametrize("backend", ["tiffslide", "openslide"])
def test_demo_slide_pyramid_and_mpp(demo_slide, backend):
    with open_slide(demo_slide, backend) as slide:
        assert slide.dimensions == (1536, 1280)
        assert len(slide.level_dimensions) >= 2
        assert slide.mpp == pytest.approx(0.25)
        # A read at 1 µm/px uses the 4x level and returns the requested size.
        assert slide.best_level(4.0) == 1
        region = slide.read_scaled((0, 0, 800, 400), 0.25)
        assert region.shape == (100, 200, 3) and region.dtype == np.uint8


@pytest.mark.parametrize("backend", ["tiffslide", "openslide"])
def test_real_aperio_slides(backend):
    with open_slide(need(CMU), backend) as slide:
        assert slide.dimensions == (2220, 2967)
        assert slide.mpp == pytest.approx(0.499, abs=1e-3)
        thumb, scale = slide.read_thumbnail(8.0, slide.mpp)
        assert thumb.shape[1] == round(2220 * slide.mpp / 8.0)
        assert 150 < thumb.mean() < 250
    with open_slide(need(TCGA_TS), backend) as slide:
        assert slide.level_downsamples[1] == pytest.approx(2.0, rel=0.01)
        assert slide.mpp is None  # this file really has no mpp
        # JPEG 2000 tiles decode to tissue, not blank.
        region = slide.read_region((2000, 1700), 0, (256, 256))
        assert region.std() > 5


def test_resolve_mpp_order():
    assert resolve_mpp(0.5, override=0.25).source == "override"
    assert resolve_mpp(0.5, fallback=0.25).mpp == 0.5
    info = resolve_mpp(None, fallback=0.25)
    assert (info.mpp, info.source) == (0.25, "fallback")
    # The 72-dpi default of generic TIFFs is ~353 µm/px: not a microscope pixel size.
    assert resolve_mpp(352.8, fallback=0.5).source == "fallback"
    with pytest.raises(SlideError, match="no fallback"):
        resolve_mpp(None)


def test_unreadable_files_raise_naming_the_file(tmp_path, demo_slide):
    text = tmp_path / "notes.svs"
    text.write_text("not a slide")
    with pytest.raises(SlideError, match="notes.svs"):
        open_slide(text)
    with pytest.raises(SlideError, match="not found"):
        open_slide(tmp_path / "missing.svs")
    truncated = tmp_path / "truncated.tiff"
    truncated.write_bytes(demo_slide.read_bytes()[:5000])
    with pytest.raises(SlideError, match="truncated.tiff"):
        with open_slide(truncated) as slide:
            slide.read_region((0, 0), 0, slide.dimensions)


def test_format_fixture_with_nonsense_mpp():
    with open_slide(need(FIXTURES / "boxes.tiff")) as slide:
        assert len(slide.level_dimensions) == 4
        assert resolve_mpp(slide.mpp, fallback=0.5).source == "fallback"


@pytest.mark.parametrize("scale", [1.0, 0.499 / 0.25, 0.25 / 0.5])
def test_read_grid_is_tiling_independent(demo_slide, scale):
    with open_slide(demo_slide) as slide:
        a = slide.read_grid((100, 80), (200, 160), scale)
        b = slide.read_grid((150, 120), (200, 160), scale)
        # Overlapping reads agree, whatever their origins (up to 1 grey level of interpolation rounding).
        assert np.abs(a[40:, 50:].astype(int) - b[:120, :150].astype(int)).max() <= 1
        ref = slide.read_scaled((100 / scale, 80 / scale, 200 / scale, 160 / scale), scale, (200, 160))
        assert np.abs(ref.astype(int) - a.astype(int)).mean() < 12
        edge = slide.read_grid((-20, -10), (60, 40), scale)
        assert (edge[:10] == 255).all() and (edge[:, :20] == 255).all()


def test_reader_is_picked_by_content_not_by_name(tmp_path, demo_slide):
    from nucseg.slides import pick_reader

    renamed = tmp_path / "scan.bin"
    renamed.write_bytes(demo_slide.read_bytes())
    assert pick_reader(renamed).name == "tiffslide"
    with open_slide(renamed) as slide:
        assert slide.backend == "tiffslide" and slide.dimensions == (1536, 1280)
    fake = tmp_path / "fake.svs"
    fake.write_text("not a slide")
    with pytest.raises(SlideError, match="not a readable slide .no reader recognises it"):
        open_slide(fake)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlideError, match="no slide file in this folder"):
        open_slide(tmp_path / "empty")


def test_a_new_format_is_one_registered_reader(tmp_path, monkeypatch):
    """A reader for PNG files, registered once, is picked for a PNG by its content and read like a slide."""
    from PIL import Image

    import nucseg.slides
    from nucseg.slides import Reader, register_reader

    class PngSlide:
        def __init__(self, path):
            self.image = np.asarray(Image.open(path).convert("RGB"))
            self.dimensions = (self.image.shape[1], self.image.shape[0])
            self.level_dimensions, self.level_downsamples = [self.dimensions], [1.0]
            self.properties = {"png.mpp-x": "0.5", "png.mpp-y": "0.5"}

        def read_region(self, location, level, size):
            (x, y), (w, h) = location, size
            out = np.full((h, w, 3), 255, np.uint8)
            crop = self.image[y:y + h, x:x + w]
            out[:crop.shape[0], :crop.shape[1]] = crop
            return Image.fromarray(out)

        def close(self):
            pass

    def is_png(path):
        with open(path, "rb") as fh:
            return fh.read(8) == b"\x89PNG\r\n\x1a\n"

    monkeypatch.setattr(nucseg.slides, "READERS", dict(nucseg.slides.READERS))
    register_reader(Reader("png", is_png, PngSlide))
    image = np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8)
    Image.fromarray(image).save(tmp_path / "tile.dat", format="PNG")
    with open_slide(tmp_path / "tile.dat") as slide:
        assert slide.backend == "png" and slide.dimensions == (60, 40) and slide.mpp == 0.5
        assert np.array_equal(slide.read_region((0, 0), 0, (60, 40)), image)
    with open_slide(tmp_path / "tile.dat", "png") as slide:   # or forced by its name
        assert slide.backend == "png"
    with pytest.raises(ValueError, match="unknown slide backend"):
        open_slide(tmp_path / "tile.dat", "nosuchreader")


def test_config_schema_offers_every_registered_reader():
    import yaml

    from nucseg.slides import BACKENDS

    from .conftest import REPO

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert tuple(schema["properties"]["slide_backend"]["enum"]) == BACKENDS
