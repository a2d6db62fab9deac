"""DICOM and high-bit-depth image decoding: the DICOM grayscale pipeline checked against NumPy formulas.

Uses pydicom's bundled test files and DICOM/16-bit PNG files written from real MRI JPEGs (skipped without them).
"""

from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder
from pydicom.uid import JPEGLSLossless, MRImageStorage

from cass_jax.data import DataError, DecodeOptions, csv_source, default_data_config, folder_sources, load_splits
from cass_jax.data import transforms
from cass_jax.data.dicom import check_dicom, decode_options_from_config, is_dicom
from cass_jax.data.sources import scan_rows, source_splits_from_config
from cass_jax.data.transforms import decode_image

BRAIN_MRI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "brain_mri_small"
needs_brain_mri = pytest.mark.skipif(not BRAIN_MRI.is_dir(), reason="../shared/data/brain_mri_small is absent")
# A window mapping 16-bit values v to v * 255 / 65535 (PS3.3 C.11.2.1.2.1), and 8-bit values to themselves.
WINDOW_16_BIT = (32768.0, 65536.0)
WINDOW_8_BIT = (128.0, 256.0)


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR window to 0..255, rounded: written out here, independently of pydicom."""
    x = np.asarray(values, np.float64)
    c, w = center - 0.5, width - 1.0
    y = np.where(x <= c - w / 2, 0.0, np.where(x > c + w / 2, 255.0, ((x - c) / w + 0.5) * 255.0))
    return np.rint(y).astype(np.uint8)


def min_max(values: np.ndarray) -> np.ndarray:
    x = np.asarray(values, np.float64)
    return np.rint((x - x.min()) * 255.0 / (x.max() - x.min())).astype(np.uint8)


def bundled(name: str) -> tuple[bytes, Dataset]:
    """A test file shipped inside the pydicom wheel (never downloaded)."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not bundled with this pydicom")
    return Path(path).read_bytes(), pydicom.dcmread(path)


def as_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def gray(rgb: np.ndarray) -> np.ndarray:
    """The single channel of a decoded grayscale image, after checking the three channels are equal."""
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 0], rgb[:, :, 2])
    return rgb[:, :, 0]


def test_ct_rescale_then_min_max_or_configured_window():
    data, ds = bundled("CT_small.dcm")  # signed 16-bit, slope 1, intercept -1024, no window
    assert ds.PixelRepresentation == 1 and "WindowCenter" not in ds
    hounsfield = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.array_equal(gray(decode_image(data, "CT_small.dcm")), min_max(hounsfield))
    windowed = gray(decode_image(data, "CT_small.dcm", DecodeOptions(window=(40, 400))))
    assert np.array_equal(windowed, linear_window(hounsfield, 40, 400))
    assert not np.array_equal(windowed, linear_window(ds.pixel_array, 40, 400))  # the rescale matters here


def test_mr_file_window_and_configured_override():
    data, ds = bundled("MR_small.dcm")  # window 600 / 1600 in the file
    raw = ds.pixel_array
    assert np.array_equal(gray(decode_image(data, "MR_small.dcm")), linear_window(raw, 600, 1600))
    override = DecodeOptions(window=(1000, 500))
    assert np.array_equal(gray(decode_image(data, "MR_small.dcm", override)), linear_window(raw, 1000, 500))


def test_monochrome1_is_inverted_after_windowing():
    _, ds = bundled("MR_small.dcm")
    raw = ds.pixel_array
    ds.PhotometricInterpretation = "MONOCHROME1"
    assert np.array_equal(gray(decode_image(as_bytes(ds), "mono1.dcm")), 255 - linear_window(raw, 600, 1600))


def test_voi_lut_sequence_is_preferred_to_the_window():
    _, ds = bundled("MR_small.dcm")
    raw = ds.pixel_array.astype(np.int64)
    entries, first = 1500, 300
    lut = np.rint(65535 * np.sqrt(np.linspace(0, 1, entries))).astype(np.int64)  # a non-linear LUT
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [entries, first, 16])
    item.add_new("LUTData", "US", lut.tolist())
    ds.VOILUTSequence = [item]
    expected = np.rint(lut[np.clip(raw - first, 0, entries - 1)] * 255 / 65535).astype(np.uint8)
    assert np.array_equal(gray(decode_image(as_bytes(ds), "voi_lut.dcm")), expected)


def test_enhanced_multi_frame_functional_groups():
    _, ds = bundled("MR_small.dcm")
    raw = ds.pixel_array
    del ds.WindowCenter, ds.WindowWidth
    ds.set_pixel_data(np.stack([raw, raw[::-1]]), "MONOCHROME2", 16)  # two frames

    def group(**elements) -> Dataset:
        transform, window, item = Dataset(), Dataset(), Dataset()
        transform.RescaleSlope, transform.RescaleIntercept = elements["slope"], elements["intercept"]
        window.WindowCenter, window.WindowWidth = elements["center"], elements["width"]
        item.PixelValueTransformationSequence, item.FrameVOILUTSequence = [transform], [window]
        return item

    ds.SharedFunctionalGroupsSequence = [group(slope=2, intercept=-100, center=1500, width=3000)]
    ds.PerFrameFunctionalGroupsSequence = [Dataset(), group(slope=1, intercept=0, center=700, width=900)]
    data = as_bytes(ds)
    first = gray(decode_image(data, "enhanced.dcm", DecodeOptions(dicom_frame=0)))
    assert np.array_equal(first, linear_window(raw * 2.0 - 100, 1500, 3000))  # the shared groups
    second = gray(decode_image(data, "enhanced.dcm", DecodeOptions(dicom_frame=1)))
    assert np.array_equal(second, linear_window(raw[::-1], 700, 900))  # frame 1's own groups win


def test_color_dicoms_pass_through_and_ybr_is_converted():
    data, ds = bundled("SC_rgb_rle.dcm")
    rgb = decode_image(data, "SC_rgb_rle.dcm")
    assert rgb.dtype == np.uint8 and np.array_equal(rgb, ds.pixel_array)
    data16, ds16 = bundled("SC_rgb_rle_16bit.dcm")  # the same picture stored as v * 257
    assert np.array_equal(ds16.pixel_array, ds.pixel_array.astype(np.uint16) * 257)
    assert np.array_equal(decode_image(data16, "SC_rgb_rle_16bit.dcm"), rgb)
    data_ybr, ds_ybr = bundled("SC_ybr_full_422_uncompressed.dcm")  # the same picture in YBR_FULL_422
    assert ds_ybr.PhotometricInterpretation == "YBR_FULL_422"
    difference = np.abs(decode_image(data_ybr, "ybr.dcm").astype(int) - rgb)
    assert difference.max() <= 8 and difference.mean() < 1.5  # colour-conversion rounding only


def test_multi_frame_needs_a_frame():
    data, ds = bundled("rtdose.dcm")  # 15 frames of 32-bit dose values
    with pytest.raises(ValueError, match=r"rtdose\.dcm: multi-frame DICOM with 15 frames; set data\.dicom_frame"):
        decode_image(data, "rtdose.dcm")
    assert "15 frames" in check_dicom(data)
    third = gray(decode_image(data, "rtdose.dcm", DecodeOptions(dicom_frame=2)))
    assert np.array_equal(third, min_max(ds.pixel_array[2]))
    with pytest.raises(ValueError, match=r"rtdose\.dcm: data\.dicom_frame=15 but the file has only 15 frames"):
        decode_image(data, "rtdose.dcm", DecodeOptions(dicom_frame=15))
    single, _ = bundled("MR_small.dcm")  # a single-frame file ignores the frame option
    assert np.array_equal(decode_image(single, "a.dcm", DecodeOptions(dicom_frame=4)), decode_image(single, "a.dcm"))


def test_compressed_pixel_data():
    plain, _ = bundled("MR_small.dcm")
    jpeg2000, _ = bundled("MR_small_jp2klossless.dcm")  # decoded by whichever plugin is installed (Pillow here)
    if get_decoder(pydicom.dcmread(io.BytesIO(jpeg2000)).file_meta.TransferSyntaxUID).is_available:
        assert np.array_equal(decode_image(jpeg2000, "j2k.dcm"), decode_image(plain, "plain.dcm"))
    jpeg_ls, _ = bundled("MR_small_jpeg_ls_lossless.dcm")
    if get_decoder(JPEGLSLossless).is_available:
        assert np.array_equal(decode_image(jpeg_ls, "jls.dcm"), decode_image(plain, "plain.dcm"))
        return
    with pytest.raises(ValueError) as error:
        decode_image(jpeg_ls, "scans/jls.dcm")
    message = str(error.value)
    assert "\n" not in message
    assert "scans/jls.dcm" in message and "JPEG-LS Lossless" in message and "pip install pylibjpeg" in message
    assert "not installed" in check_dicom(jpeg_ls)


def test_broken_dicoms_are_value_errors_naming_the_file():
    data, _ = bundled("MR_small.dcm")
    with pytest.raises(ValueError, match=r"cut\.dcm: truncated pixel data \(\d+ of 8192 bytes\)"):
        decode_image(data[:-500], "cut.dcm")
    assert check_dicom(data[:-500]).startswith("truncated pixel data")
    assert check_dicom(data) is None
    with pytest.raises(ValueError, match=r"head\.dcm: .*no 'DICM' marker"):
        decode_image(data[:100], "head.dcm")
    with pytest.raises(ValueError, match=r"report: no pixel data"):
        decode_image(bundled("test-SR.dcm")[0], "report")


def test_sixteen_bit_and_float_pil_modes():
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for mode, encoded in (("I;16", ramp.astype(np.uint16) * 257), ("I;16B", (ramp.astype(np.uint16) * 257))):
        image = Image.frombytes(mode, (16, 16), encoded.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
        for fmt in ("PNG", "TIFF") if mode == "I;16" else ("TIFF",):
            buffer = io.BytesIO()
            image.save(buffer, fmt)
            assert np.array_equal(gray(decode_image(buffer.getvalue(), f"ramp.{fmt}")), ramp)
    signed = (ramp.astype(np.int32) - 100) * 1000
    floats = np.linspace(-2.5, 7.0, 256, dtype=np.float32).reshape(16, 16)
    for values in (signed, floats):
        buffer = io.BytesIO()
        Image.fromarray(values).save(buffer, "TIFF")
        assert np.array_equal(gray(decode_image(buffer.getvalue(), "x.tif")), min_max(values))
        options = DecodeOptions(window=(float(values.mean()), float(np.ptp(values)) / 3))
        windowed = gray(decode_image(buffer.getvalue(), "x.tif", options))
        assert np.array_equal(windowed, linear_window(values, *options.window))


def test_lossy_pil_modes_are_handled_or_logged(monkeypatch, caplog):
    monkeypatch.setattr(transforms, "_warned", set())
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 200, 255
    opaque = io.BytesIO()
    Image.fromarray(rgba).save(opaque, "PNG")
    with caplog.at_level(logging.WARNING):
        assert np.array_equal(decode_image(opaque.getvalue(), "opaque.png"), rgba[..., :3])
        assert not caplog.records  # an opaque alpha channel loses nothing
        rgba[0, 0, 3] = 51
        transparent = io.BytesIO()
        Image.fromarray(rgba).save(transparent, "PNG")
        out = decode_image(transparent.getvalue(), "half.png")
        assert out[0, 0].tolist() == [40, 40, 40] and out[1, 1].tolist() == [200, 200, 200]  # 200 * 51 / 255
        cmyk = io.BytesIO()
        Image.new("CMYK", (4, 4), (0, 255, 0, 0)).save(cmyk, "TIFF")
        decode_image(cmyk.getvalue(), "print.tif")
    messages = [r.getMessage() for r in caplog.records]
    assert any("half.png (mode RGBA) has transparent pixels" in m for m in messages)
    assert any("print.tif has mode CMYK" in m for m in messages)


def test_decode_options_from_config_and_bad_values():
    config = default_data_config()
    assert decode_options_from_config(config) == DecodeOptions()
    config.window, config.dicom_frame = " 40, 400 ", 2
    assert decode_options_from_config(config) == DecodeOptions(window=(40.0, 400.0), dicom_frame=2)
    config.window = "soft tissue"
    with pytest.raises(ValueError, match=r"data\.window='soft tissue' must be 'center,width'"):
        decode_options_from_config(config)
    config.source, config.path = "folder", "/nowhere"
    with pytest.raises(DataError, match=r"data\.window"):
        source_splits_from_config(config)
    with pytest.raises(ValueError, match=r"width >= 1"):
        DecodeOptions(window=(40, 0))
    with pytest.raises(ValueError, match=r"data\.dicom_frame=-1"):
        DecodeOptions(dicom_frame=-1)


# ---- DICOMs and 16-bit PNGs written from real MRI JPEGs -----------------------------------------------------


def write_dicom(path: Path, pixels: np.ndarray, photometric: str, window: tuple[float, float] | None = None) -> None:
    """A minimal MR image file written with pydicom (explicit VR little endian, Part 10 preamble)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.Modality = "MR"
    ds.set_pixel_data(pixels, photometric, 8 * pixels.itemsize)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.save_as(path, enforce_file_format=True)


def real_gray_images(full_range: bool, count: int) -> list[tuple[Path, np.ndarray]]:
    """(path, 8-bit gray pixels) of real MRI JPEGs with equal channels (spanning 0..255 if full_range)."""
    chosen = []
    for path in sorted(BRAIN_MRI.glob("Training/*/*.jpg")):
        rgb = decode_image(path.read_bytes(), str(path))
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            if (rgb.min() == 0 and rgb.max() == 255) == full_range:
                chosen.append((path, rgb[..., 0]))
        if len(chosen) == count:
            return chosen
    pytest.skip("not enough gray MRI images")


@needs_brain_mri
def test_dicoms_of_real_images_decode_exactly_like_the_jpegs(tmp_path):
    for i, (jpeg, v8) in enumerate(real_gray_images(True, 2) + real_gray_images(False, 2)):
        spans_full_range = i < 2
        expected = decode_image(jpeg.read_bytes(), str(jpeg))
        cases = [("mono2_16_window", v8.astype(np.uint16) * 257, "MONOCHROME2", WINDOW_16_BIT),
                 ("mono1_8_window", 255 - v8, "MONOCHROME1", WINDOW_8_BIT)]
        if spans_full_range:  # without a window the min..max of the file becomes 0..255
            cases += [("mono2_16", v8.astype(np.uint16) * 257, "MONOCHROME2", None),
                      ("mono1_8", 255 - v8, "MONOCHROME1", None)]
        for name, stored, photometric, window in cases:
            path = tmp_path / f"{i}_{name}.dcm"
            write_dicom(path, stored, photometric, window)
            assert np.array_equal(decode_image(path.read_bytes(), str(path)), expected), path.name
        png16 = tmp_path / f"{i}.png"
        Image.fromarray(v8.astype(np.uint16) * 257).save(png16)
        assert Image.open(png16).mode == "I;16"
        assert np.array_equal(decode_image(png16.read_bytes(), str(png16)), expected)


@needs_brain_mri
def test_twelve_bit_png_is_scaled_as_16_bit_and_logged(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(transforms, "_warned", set())
    (jpeg, v8), = real_gray_images(True, 1)
    v12 = np.rint(v8.astype(np.float64) * 4095 / 255).astype(np.uint16)
    path = tmp_path / "twelve_bit.png"
    Image.fromarray(v12).save(path)
    with caplog.at_level(logging.WARNING):
        dark = gray(decode_image(path.read_bytes(), str(path)))
    assert np.array_equal(dark, np.rint(v12.astype(np.float64) * 255 / 65535).astype(np.uint8))
    messages = [r.getMessage() for r in caplog.records]
    assert any("twelve_bit.png" in m and "data.window='2048,4096'" in m for m in messages)
    windowed = decode_image(path.read_bytes(), str(path), DecodeOptions(window=(2048, 4096)))
    assert np.array_equal(gray(windowed), v8)


@needs_brain_mri
def test_extensionless_dicoms_load_from_class_folders_and_csv(tmp_path):
    classes = {"glioma": [], "pituitary": []}
    expected = {}
    for cls in classes:
        for i, jpeg in enumerate(sorted(BRAIN_MRI.glob(f"Training/{cls}/*.jpg"))[:10]):
            rgb = decode_image(jpeg.read_bytes(), str(jpeg))
            name = f"1.2.826.0.1.{len(expected)}" if i % 2 else f"IM{len(expected):04d}"  # UID-like or bare names
            folder = tmp_path / "folders" / cls
            folder.mkdir(parents=True, exist_ok=True)
            write_dicom(folder / name, rgb[..., 0].astype(np.uint16) * 257, "MONOCHROME2", WINDOW_16_BIT)
            classes[cls].append(name)
            expected[f"{cls}/{name}"] = rgb[..., 0]
    (tmp_path / "folders" / "glioma" / "notes").write_text("not an image, ignored")
    (tmp_path / "folders" / "glioma" / "DICOMDIR.txt").write_bytes(b"\0" * 128 + b"DICX")
    source = folder_sources(str(tmp_path / "folders"))["train"]
    assert sorted(source.ids) == sorted(expected)  # the two non-DICOM files are ignored
    for position, image_id in enumerate(source.ids):
        assert np.array_equal(gray(source[position]["image"]), expected[image_id])

    csv_path = tmp_path / "folders" / "labels.csv"
    csv_path.write_text("image,label\n" + "".join(f"{k},{k.split('/')[0]}\n" for k in expected))
    table = csv_source(str(csv_path), label_columns=("label",))  # image_extension ".jpg" is not appended
    assert table.ids == sorted(expected)
    assert np.array_equal(gray(table[3]["image"]), expected[table.ids[3]])

    for kind, path in (("folder", tmp_path / "folders"), ("csv", csv_path)):
        config = default_data_config()
        config.source, config.path, config.window = kind, str(path), "32768,65536"
        splits = load_splits(config)  # runs the corrupt-file scan over every DICOM
        assert splits.train.decode_options == DecodeOptions(window=WINDOW_16_BIT)
        total = len(splits.train_full) + len(splits.val) + len(splits.test)
        assert total == len(expected)
        worker_copy = pickle.loads(pickle.dumps(splits.test))  # as grain sends sources to worker processes
        assert worker_copy.decode_options == splits.test.decode_options
        assert np.array_equal(gray(worker_copy[0]["image"]), expected[worker_copy.ids[0]])


@needs_brain_mri
def test_corrupt_dicoms_are_reported_by_the_scan(tmp_path):
    for cls in ("a", "b"):
        for i, jpeg in enumerate(sorted(BRAIN_MRI.glob("Training/notumor/*.jpg"))[:4]):
            (tmp_path / cls).mkdir(exist_ok=True)
            write_dicom(tmp_path / cls / f"{cls}{i}.dcm", decode_image(jpeg.read_bytes(), "")[..., 0], "MONOCHROME2")
    broken = tmp_path / "b" / "b1.dcm"
    broken.write_bytes(broken.read_bytes()[:-1000])
    source = folder_sources(str(tmp_path))["train"]
    scan = scan_rows(source, list(source.rows))
    assert list(scan.corrupt.values()) == ["truncated pixel data (49176 of 50176 bytes)"]
    assert source.describe(next(iter(scan.corrupt))) == str(broken)
    config = default_data_config()
    config.source, config.path = "folder", str(tmp_path)
    with pytest.raises(DataError, match=r"1 corrupt image\(s\).*b1\.dcm: truncated pixel data"):
        load_splits(config)
    config.skip_corrupt = True
    assert len(load_splits(config).train_full) + 2 == 7  # the broken file is dropped, 1 val + 1 test held out
    with pytest.raises(ValueError, match=r"b1\.dcm: truncated pixel data"):
        source.load_image(int(source.rows[list(source.ids).index("b/b1.dcm")]))
    assert is_dicom(broken.read_bytes())
