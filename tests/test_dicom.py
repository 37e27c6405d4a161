"""DICOM files in image folders and CSVs: rescale slope and intercept, the header's window,
MONOCHROME1 inverted, unreadable and multi-frame files handled like other bad images."""

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from ssl_pipeline.data import build_dataset
from ssl_pipeline.data.bad_images import BadImage
from ssl_pipeline.data.dicom import read_dicom
from ssl_pipeline.recipe import DataConfig


def write_dicom(path: Path, pixels: np.ndarray, slope=1.0, intercept=0.0, window=None,
                photometric="MONOCHROME2", frames: int = 1) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = np.ascontiguousarray(pixels.astype(np.uint16)).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_rescale_and_window_make_8_bits(tmp_path):
    stored = np.array([[0, 1000], [2000, 4000]], np.uint16)
    # CT: HU = stored - 1024; a window of center 0, width 2000 maps -1000..1000 HU to 0..255
    ct = read_dicom(write_dicom(tmp_path / "ct.dcm", stored, slope=1, intercept=-1024,
                                window=(0, 2000)))
    hu = stored.astype(float) - 1024
    expected = np.clip(np.rint((hu + 1000) / 2000 * 255), 0, 255)
    assert ct.mode == "L" and np.array_equal(np.asarray(ct), expected.astype(np.uint8))
    # no window in the header: the image's own range; a slope of 2 changes nothing then
    plain = np.asarray(read_dicom(write_dicom(tmp_path / "a.dcm", stored, slope=2.0)))
    assert plain.min() == 0 and plain.max() == 255 and plain[0, 1] == round(1000 / 4000 * 255)
    inverted = np.asarray(read_dicom(write_dicom(tmp_path / "m1.dcm", stored,
                                                 photometric="MONOCHROME1")))
    assert np.array_equal(inverted, 255 - plain)


def test_dicom_folders_and_bad_files(tmp_path):
    rng = np.random.default_rng(0)
    for c, name in enumerate(["normal", "nodule"]):
        for i in range(6):
            write_dicom(tmp_path / "scans" / name / f"{i}.dcm",
                        rng.integers(0, 500, (16, 16)) + 1500 * c)
    bundle = build_dataset(DataConfig(name="image_folder", root=str(tmp_path / "scans"),
                                      val_fraction=0.25, test_fraction=0.25))
    assert bundle.class_names == ["nodule", "normal"] and len(bundle.train) == 6
    image, _ = bundle.train[0]
    assert image.mode == "RGB" and image.size == (16, 16)
    assert bundle.image_size == 16  # the scans' own size, read from their headers
    (tmp_path / "scans" / "normal" / "5.dcm").write_bytes(b"not a dicom file at all" * 10)
    write_dicom(tmp_path / "scans" / "nodule" / "5.dcm", rng.integers(0, 9, (2, 16, 16)), frames=2)
    bundle = build_dataset(DataConfig(name="image_folder", root=str(tmp_path / "scans"),
                                      val_fraction=0.25, test_fraction=0.25))
    source = bundle.train.source
    for bad, reason in (("normal/5.dcm", "DICOM"), ("nodule/5.dcm", "multi-frame")):
        with pytest.raises(BadImage, match=f"{bad}.*{reason}"):
            source[source.paths.index(tmp_path / "scans" / bad)]
    skipped = build_dataset(DataConfig(name="image_folder", root=str(tmp_path / "scans"),
                                       val_fraction=0.25, test_fraction=0.25, on_bad_image="skip"))
    assert skipped.skipped_images["count"] == 2


def test_a_csv_can_list_dicom_files(tmp_path):
    for i in range(8):
        write_dicom(tmp_path / "dcm" / f"{i}.dcm", np.full((8, 8), 100 * i))
    lines = ["path,label"] + [f"dcm/{i}.dcm,{'ab'[i % 2]}" for i in range(8)]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    bundle = build_dataset(DataConfig(name="csv", root=str(tmp_path / "t.csv"),
                                      val_fraction=0.25, test_fraction=0.25))
    assert bundle.num_classes == 2 and bundle.train[0][0].mode == "RGB"
