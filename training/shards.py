"""Each rank's own rows of a dataset, read through a memory map of a .npy or uncompressed IDX file, so that
a data set larger than one host's memory is spread over the ranks' memory.

Ownership: of a file of N rows, rank r of W owns the rows [N r / W, N (r + 1) / W) and holds, of every
split (train, valid, test), the rows that lie there: PPCA sums over them, evaluation reduces their sums and
counts. Those bytes of the file are the only ones it maps for them (:meth:`MappedImages.read` maps the
byte range from the first to the last row it reads). The VAEs' training batches are dealt afresh each epoch
by a DistributedSampler over all training rows (training/vae_epoch.py); a rank reads the rows of its own
batches, one batch at a time, and no other rank reads them in that epoch.

Each rank checks its own rows once at the start (pixel range, NaN, whether the data are binary); the ranks
then compare notes, so a bad row stops every rank with the same :class:`DataError`.

Other sources (the embedded sets, image folders, .npz archives, gzipped IDX) cannot be read row by row:
every rank loads them whole (:func:`training.data.load_dataset`) and uses its share of each split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.data import (
    EMBEDDED,
    TEST_FRACTION,
    VALID_FRACTION,
    ImageData,
    _random_split,
    _valid_split,
    check_fractions,
    load_dataset,
    reload_dataset,
)
from training.distributed import Dist
from training.user_data import CHANNELS, DataError, _array_channels, _check_side, _to_unit_images, idx_header

SCAN_ROWS = 4096  # rows per read while a rank checks its own rows: bounded memory whatever the file


def mappable(spec: str | Path) -> bool:
    """Whether `spec` names a file read row by row: a .npy array or an uncompressed IDX file."""
    if str(spec) in EMBEDDED or not Path(spec).is_file():
        return False
    path = Path(spec)
    if path.suffix.lower() == ".npy":
        return True
    return path.suffix.lower() != ".gz" and ("idx" in "".join(path.suffixes[-2:]).lower()
                                             or path.name.endswith("-ubyte"))


@dataclass(frozen=True)
class MappedImages:
    """The images of one file, rows first, converted to float64 rows in [0, 1] only as they are read."""

    path: Path
    dtype: np.dtype
    shape: tuple[int, ...]  # the file's array: rows first
    offset: int  # bytes before the first row
    channels: int | None  # --channels: convert to 1 or 3, or None for the data's own
    image_shape: tuple[int, int]
    n_channels: int

    @classmethod
    def open(cls, path: Path, channels: int | None) -> MappedImages | None:
        """Read and check the header (no row); None for a Fortran-order .npy, which has no rows to map."""
        size = path.stat().st_size
        with open(path, "rb") as f:
            if path.suffix.lower() == ".npy":
                try:
                    version = np.lib.format.read_magic(f)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read_header(f)
                except ValueError as e:
                    raise DataError(f"{path}: not a readable .npy array ({e})") from e
                offset = f.tell()
                if dtype.hasobject:
                    raise DataError(f"{path}: not a readable .npy array (it holds Python objects; expected "
                                    "numbers)")
                if fortran and len(shape) > 1:
                    return None
                needed = offset + int(np.prod(shape)) * dtype.itemsize
                if size < needed:
                    raise DataError(f"{path}: the .npy header declares shape {list(shape)} ({needed - offset} bytes "
                                    f"of data) but the file holds {size - offset} bytes")
            else:
                dtype, shape, offset = idx_header(f.read(1024), size, path)
        if len(shape) == 0:
            _to_unit_images(np.zeros((), dtype), path)  # raises its DataError: a scalar holds no images
        # The shape checks of whole-file loading, on a zero row: no row of the file is read here.
        probe = _array_channels(_to_unit_images(np.zeros((min(1, shape[0]), *shape[1:]), dtype), path), channels)
        return cls(path, dtype, tuple(shape), offset, channels, (int(probe.shape[1]), int(probe.shape[2])),
                   3 if probe.ndim == 4 else 1)

    @property
    def n(self) -> int:
        return int(self.shape[0])

    @property
    def data_dim(self) -> int:
        return self.image_shape[0] * self.image_shape[1] * self.n_channels

    def _raw(self, rows: np.ndarray) -> np.ndarray:
        """The file's values of `rows` (indices, any order), copied out of a map of the bytes from the first
        to the last of them (numpy starts the map at the page boundary below)."""
        if len(rows) == 0:
            return np.empty((0, *self.shape[1:]), dtype=self.dtype)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        mm = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset + lo * row_bytes,
                       shape=(hi - lo, *self.shape[1:]))
        try:
            return np.array(mm[rows - lo])
        finally:
            del mm

    def read(self, rows) -> np.ndarray:
        """Rows (file indices, any order) as float64 [k, D] in [0, 1]; a value out of range raises DataError."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) == 0:
            return np.empty((0, self.data_dim))
        images = _array_channels(_to_unit_images(self._raw(rows), self.path), self.channels)
        return images.reshape(len(rows), -1)

    def check(self, lo: int, hi: int) -> bool:
        """Read rows [lo, hi) in pieces (every value checked); return whether all of them are 0 or 1."""
        binary = True
        for start in range(lo, hi, SCAN_ROWS):
            x = self.read(np.arange(start, min(start + SCAN_ROWS, hi)))
            binary = binary and bool(np.isin(x, (0.0, 1.0)).all())
        return binary


class RowView:
    """The rows of one split of a :class:`MappedImages` (their file indices, in the split's order), read when
    indexed: ``view[positions]`` and ``view[a:b]`` give float64 [k, D] arrays."""

    def __init__(self, images: MappedImages, rows: np.ndarray):
        self.images, self.rows = images, np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.rows), self.images.data_dim

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, int | np.integer):
            return self.images.read(self.rows[[key]])[0]
        return self.images.read(self.rows[key])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        x = self.images.read(self.rows)
        return x if dtype is None else x.astype(dtype)


def owned_rows(n: int, dist: Dist) -> tuple[int, int]:
    """The file rows [lo, hi) that rank dist.rank owns."""
    s = dist.shard(n)
    return s.start, s.stop


def local(rows: np.ndarray | RowView, dist: Dist) -> tuple[np.ndarray, np.ndarray]:
    """(positions in the split, those rows as float64 [k, D]) of a split's rows that this rank holds:
    for a RowView the rows in its owned part of the file, for rows in memory a contiguous share."""
    if isinstance(rows, RowView):
        lo, hi = owned_rows(rows.images.n, dist)
        positions = np.flatnonzero((rows.rows >= lo) & (rows.rows < hi))
        return positions, rows[positions]
    s = dist.shard(len(rows))
    return np.arange(s.start, s.stop), rows[s]


def row_fetcher(rows: np.ndarray | RowView, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """positions -> those rows as float32 [k, D] on `device`: rows in memory go to the device once and are
    indexed there; a RowView reads each batch's rows from its file."""
    if isinstance(rows, RowView):
        return lambda pos: torch.as_tensor(rows[pos.cpu().numpy()], dtype=torch.float32).to(device)
    x = torch.as_tensor(np.asarray(rows), dtype=torch.float32, device=device)
    return lambda pos: x[pos.to(device)]


def open_dataset(spec: str | Path, dist: Dist, *, valid_fraction: float = VALID_FRACTION,
                 test_fraction: float = TEST_FRACTION, image_size: tuple[int, int] | None = None,
                 channels: int | None = None) -> ImageData:
    """:func:`training.data.load_dataset`'s data and split, with the rows of a .npy or IDX file left in the file.

    The splits are then :class:`RowView` s, and each rank has checked its owned rows. Any other source is
    loaded whole, as load_dataset does. A collective: every rank of `dist` calls it, and an error on any rank
    (a bad row, a file missing on one host) stops them all with its message.
    """
    error, images, data, binary = None, None, None, True
    try:
        check_fractions(valid_fraction, test_fraction)
        if mappable(spec):
            if channels not in (None, *CHANNELS):
                raise DataError(f"--channels {channels}: expected 1 (grayscale) or 3 (RGB)")
            images = MappedImages.open(Path(spec), channels)
        if images is None:
            data = load_dataset(spec, valid_fraction=valid_fraction, test_fraction=test_fraction,
                                image_size=image_size, channels=channels)
        else:
            if image_size is not None:
                _check_side(tuple(image_size), "--image-size")
                if tuple(image_size) != images.image_shape:
                    raise DataError(f"{images.path}: --image-size resizes the images of a folder only; this file "
                                    f"holds {images.image_shape[0]}x{images.image_shape[1]} images (leave "
                                    "--image-size out, or resize the array)")
            binary = images.check(*owned_rows(images.n, dist))
    except (ValueError, OSError) as e:  # DataError is a ValueError
        error = e
    notes = dist.gather((None if error is None else str(error), binary))
    if error is not None:
        raise error
    for rank, (message, _) in enumerate(notes):
        if message is not None:
            raise DataError(f"{message} (found by rank {rank})")
    if data is not None:
        return data
    train, test = _random_split(images.n, test_fraction, valid_fraction, str(images.path))
    train, valid = _valid_split(train, valid_fraction)
    return ImageData(name=images.path.name, image_shape=images.image_shape, train=RowView(images, train),
                     valid=RowView(images, valid), test=RowView(images, test),
                     binary=all(b for _, b in notes), channels=images.n_channels)


def reopen_dataset(meta: dict) -> ImageData:
    """:func:`training.data.reload_dataset`, with a .npy or IDX file's rows left in the file (one process)."""
    if not mappable(meta["dataset"]):
        return reload_dataset(meta)
    return open_dataset(meta["dataset"], Dist(), valid_fraction=meta.get("valid_fraction", VALID_FRACTION),
                        test_fraction=meta.get("test_fraction", TEST_FRACTION), channels=meta.get("channels", 1))
