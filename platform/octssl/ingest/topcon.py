"""Topcon readers: ``.fds`` (Triton / Maestro raw) and ``.fda`` (3D OCT-1000/2000), on oct-converter's formats.

oct-converter 0.7.0 (the latest release) reads these files with ``np.fromstring``'s binary mode, which
numpy 2.3 removed (numpy PR #28254), so its ``FDS``/``FDA`` readers fail on every file here. We keep its
chunk header definitions (``fds_binary``/``fda_binary``) and its metadata and spacing methods, and do the
byte reading ourselves with ``np.frombuffer``: a 15-byte 'FOCT' header, then chunks of (u8 name length,
name, u32 size, data).

Intensity: ``.fda`` B-scans stored as JPEG (``@IMG_JPEG``) are the device's 8-bit display images and are
kept as they are. 16-bit B-scans (``.fds`` ``@IMG_SCAN_03``, ``.fda`` ``@IMG_MOT_COMP_03``) are scaled
linearly from their recorded bit depth to 8 bits (Topcon documents no other display curve).
Localizer: the grey ``@IMG_TRC_02`` image when present, else the colour fundus as luma (ITU-R 601).
Registration: ``@REGIST_INFO`` gives the scan area's box on the fundus (x0, y0, x1, y1 pixels); B-scan i
runs from x0 to x1 at row y0 + i (y1 - y0) / (nB - 1); pixel size = scan width in mm / box width.
No real Topcon file is in the test data: only malformed files are tested (they must be rejected).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from construct import ConstructError
from PIL import Image

from octssl.errors import IngestError
from octssl.ingest.scan import LINE, RADIAL, RASTER, Scan, normalise_laterality

#: Topcon ``scan_mode`` in the OCT header: 2 = 3D, 3 = radial, 4 = cross (two lines).
PATTERNS = {2: RASTER, 3: RADIAL, 4: LINE}
HEADER_BYTES = 15


def _name(raw: bytes) -> str:
    text = raw.decode("ascii", errors="replace")
    return text if text.isprintable() and "\ufffd" not in text else repr(raw[:16])


def chunk_index(data: bytes, where: str) -> dict[bytes, tuple[int, int]]:
    """{chunk name: (offset of its data, size)} of a 'FOCT' file (first occurrence of repeated names)."""
    chunks: dict[bytes, tuple[int, int]] = {}
    pos = HEADER_BYTES
    while pos < len(data):
        length = data[pos]
        if length == 0:
            break
        name = data[pos + 1 : pos + 1 + length]
        if pos + 5 + length > len(data):
            raise IngestError(f"{where}: truncated file (chunk table ends inside chunk {_name(name)})")
        size = int(np.frombuffer(data, "<u4", 1, pos + 1 + length)[0])
        start = pos + 5 + length
        if start + size > len(data):
            raise IngestError(f"{where}: truncated file (chunk {_name(name)} needs {size} "
                              f"bytes, {len(data) - start} left)")
        chunks.setdefault(name, (start, size))
        pos = start + size
    return chunks


def _uint16_volume(data: bytes, start: int, header, where: str) -> tuple[np.ndarray, int]:
    count = header.width * header.height * header.number_slices
    pixels = np.frombuffer(data, "<u2", count, start)  # raises ValueError when the chunk is short
    volume = pixels.reshape(header.number_slices, header.height, header.width).astype(np.float32)
    bits = int(header.bits_per_pixel) or 16
    return np.clip(np.rint(volume * (255.0 / (2**bits - 1))), 0, 255).astype(np.uint8), bits


def _bscans(data: bytes, chunks: dict, fds: bool, where: str) -> tuple[np.ndarray, dict]:
    from oct_converter.readers.binary_structs import fda_binary, fds_binary

    if fds and b"@IMG_SCAN_03" in chunks:
        start, _ = chunks[b"@IMG_SCAN_03"]
        header = fds_binary.oct_header.parse(data[start : start + fds_binary.oct_header.sizeof()])
        return _uint16_volume(data, start + fds_binary.oct_header.sizeof(), header, where)[0], dict(header)
    if not fds and b"@IMG_JPEG" in chunks:
        start, _ = chunks[b"@IMG_JPEG"]
        header = fda_binary.oct_header.parse(data[start : start + fda_binary.oct_header.sizeof()])
        pos, slices = start + fda_binary.oct_header.sizeof(), []
        for _ in range(header.number_slices):
            size = int(np.frombuffer(data, "<i4", 1, pos)[0])
            with Image.open(io.BytesIO(data[pos + 4 : pos + 4 + size])) as image:
                slices.append(np.asarray(image.convert("L")))
            pos += 4 + size
        return np.stack(slices), dict(header)
    if not fds and b"@IMG_MOT_COMP_03" in chunks:
        start, _ = chunks[b"@IMG_MOT_COMP_03"]
        size = fda_binary.oct_header_2.sizeof()
        header = fda_binary.oct_header_2.parse(data[start : start + size])
        return _uint16_volume(data, start + size, header, where)[0], dict(header)
    raise IngestError(f"{where}: no OCT B-scan chunk (@IMG_SCAN_03, @IMG_JPEG or @IMG_MOT_COMP_03)")


def _grey(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3:  # RGB
        image = image[..., 0] * 0.299 + image[..., 1] * 0.587 + image[..., 2] * 0.114
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _localizer(reader, data: bytes, chunks: dict, fds: bool) -> np.ndarray | None:
    from oct_converter.readers.binary_structs import fds_binary

    if fds and b"@IMG_OBS" in chunks:
        start, _ = chunks[b"@IMG_OBS"]
        header = fds_binary.fundus_header.parse(data[start : start + fds_binary.fundus_header.sizeof()])
        pixels = np.frombuffer(data, np.uint8, header.size, start + fds_binary.fundus_header.sizeof())
        return _grey(pixels.reshape(header.height, header.width, 3)[..., ::-1])  # stored BGR
    if not fds:
        for key, read in ((b"@IMG_TRC_02", reader.read_fundus_image_gray_scale), (b"@IMG_FUNDUS", reader.read_fundus_image)):
            if key in chunks:
                return _grey(read().image)
    return None


def _info(reader, chunks: dict, *names: str) -> dict:
    for name in names:
        key = f"@{name}".encode()
        if key in chunks:
            return reader.read_any_info_and_make_dict(key) or {}
    return {}


def read_topcon(path: Path) -> list[Scan]:
    """Read a Topcon ``.fds`` or ``.fda`` file (chosen by its 'FOCT' header type)."""
    from oct_converter.readers import FDA, FDS

    where = str(path)
    data = path.read_bytes()
    fds = data[4:7] == b"FDS"
    chunks = chunk_index(data, where)
    reader = (FDS if fds else FDA).__new__(FDS if fds else FDA)  # skip __init__: it needs np.fromstring
    reader.filepath, reader.chunk_dict, reader.header = path, {k: list(v) for k, v in chunks.items()}, {}
    try:
        bscans, header = _bscans(data, chunks, fds, where)
        localizer = _localizer(reader, data, chunks, fds)
        has_params = b"@PARAM_SCAN_04" in chunks or b"@PARAM_SCAN_02" in chunks
        spacing = reader.read_scan_params(header) if has_params else [0.0, 0.0, 0.0]  # (W, nB, D) in mm
        patient = _info(reader, chunks, "PATIENT_INFO_02", "PATIENT_INFO")
        capture = _info(reader, chunks, "CAPTURE_INFO_02", "CAPTURE_INFO")
        hardware = _info(reader, chunks, "HW_INFO_03", "HW_INFO_02")
        regist = _info(reader, chunks, "REGIST_INFO")
    except (ValueError, IndexError, KeyError, EOFError, OSError, ConstructError) as err:
        raise IngestError(f"{where}: truncated or unreadable Topcon file ({err})") from err
    mode = int(header.get("scan_mode", 2))
    if mode not in PATTERNS:
        raise IngestError(f"{where}: unsupported scan pattern {mode} (Topcon scan modes: {sorted(PATTERNS)})")
    pattern = LINE if PATTERNS[mode] == RASTER and bscans.shape[0] == 1 else PATTERNS[mode]
    date = capture.get("cap_date")
    positions, loc_spacing = _registration(regist, localizer, bscans.shape[0], float(spacing[0]) * bscans.shape[2])
    return [
        Scan(
            bscans=bscans,
            spacing_mm=(float(spacing[1]), float(spacing[2]), float(spacing[0])),
            scan_pattern=pattern,
            laterality=normalise_laterality({0: "OD", 1: "OS"}.get(int(capture.get("eye", -1)), "")),
            device=f"Topcon {str(hardware.get('model_name', '')).strip()}".strip(),
            acquired=f"{date[0]:04d}-{date[1]:02d}-{date[2]:02d}" if date and date[0] else None,
            device_patient_id=str(patient.get("patient_id", "")).strip() or None,
            localizer=localizer,  # kept at native size even when the registration is unknown
            localizer_spacing_mm=loc_spacing,
            positions_mm=positions,
        )
    ]


def _registration(regist: dict, localizer: np.ndarray | None, n_bscans: int, width_mm: float):
    box = regist.get("bounding_box_in_fundus_pixels")
    if localizer is None or not box or width_mm <= 0:
        return None, None
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 <= x0:
        return None, None
    mm_per_px = width_mm / (x1 - x0)
    rows = np.linspace(y0, y1, n_bscans) if n_bscans > 1 else np.array([(y0 + y1) / 2])
    start = np.stack([np.full_like(rows, x0), rows], 1)
    end = np.stack([np.full_like(rows, x1), rows], 1)
    return np.stack([start, end], 1) * mm_per_px, (mm_per_px, mm_per_px)
