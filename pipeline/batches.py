"""How rows travel between the job's stages, and the columns a row gains on the way.

Ray Data hands stages Arrow tables. A stage is written as a function of a dict of numpy arrays
(the columns it reads) that returns the dict with its results; arrow_stage runs it and passes
every other column through untouched, zero-copy. Arrays (the model copy, the maps) travel as
.npy bytes in binary columns, read in place from the Arrow buffers.

Every column a row gains after the listing is declared once, in COLUMNS, with its type; a stage
adds the ones it writes with `add_columns`. Those that belong in the manifest are also in
manifest.SCHEMA; the others (bytes, arrays, the device path's results) end at the finish stage.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import cv2
import numpy as np
import pyarrow as pa

from .photo import INTERMEDIATE_NAMES

# The columns of a row in flight, beyond the listing's (relpath, source_size, source_fingerprint,
# output_relpath, attempt), with their type: str and bytes columns start empty, numbers at 0.
COLUMNS: dict[str, type] = {
    # the photo's fate so far: manifest.OK, or FAILED / SKIPPED with its kind and words
    "status": str,
    "error_kind": str,
    "error": str,
    "reason": str,
    # read_stage
    "data": bytes,  # the photo's file, until it is written (or the device path encoded it)
    "model_copy": bytes,  # .npy of the photo at the models' size (the CPU path)
    "started_at": np.datetime64,
    "seconds_read": np.float32,
    "seconds_decode": np.float32,
    "storage_retries": np.int32,  # transient storage errors met reading and writing it
    "source_changed": np.bool_,  # replaced since the listing: the version read is the one recorded
    # ModelStage
    "saliency": bytes,  # .npy maps at the model copy's size, quantised (pack_saliency, pack_depth)
    "depth": bytes,
    "depth_measured": np.bool_,  # False where depth is the weight-free ground prior
    "seconds_saliency": np.float32,
    "seconds_depth": np.float32,
    "saliency_model": str,
    "saliency_version": str,
    "saliency_runtime": str,
    "depth_model": str,
    "depth_version": str,
    "depth_runtime": str,
    # the rendering, by the model actor (the device path) or the finish stage (the CPU path)
    "encoded": bytes,  # the device path's result, for the finish stage to write
    "render_path": str,
    "width": np.int32,
    "height": np.int32,
    "fg_fraction": np.float32,
    "interp_start": np.float32,
    "interp_stop": np.float32,
    "seconds_effect": np.float32,
    "seconds_encode": np.float32,
    **{f"png_{name}": bytes for name in INTERMEDIATE_NAMES},  # the device path's intermediates
    # finish_stage
    "seconds_write": np.float32,
    "output_uri": str,
}
RENDERED = (
    "render_path",
    "width",
    "height",
    "fg_fraction",
    "interp_start",
    "interp_stop",
    "seconds_effect",
    "seconds_encode",
)
INTERMEDIATE_COLUMNS = tuple(f"png_{name}" for name in INTERMEDIATE_NAMES)
ROW_STATE = ("status", "error_kind", "error", "reason")
UPDATED = (*ROW_STATE, "seconds_decode")  # columns a stage may change in place
ARRAYS = ("model_copy", "saliency", "depth")  # arrays travelling as .npy bytes
HEAVY = ("data", *ARRAYS)  # not needed once the photo is written


def pack(values: np.ndarray) -> bytes:
    """Arrays travel between stages as .npy bytes: one plain binary column, whatever the shapes."""
    values = np.ascontiguousarray(values)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(values))
    return header.getvalue() + values.data


def unpack(data) -> np.ndarray:
    """The array of pack's bytes (or of a zero-copy Arrow buffer of them), without copying."""
    view = memoryview(data)
    header = io.BytesIO(view[:1024])
    version = np.lib.format.read_magic(header)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(header)
    values = np.frombuffer(view, dtype=dtype, count=int(np.prod(shape)), offset=header.tell())
    return values.reshape(shape, order="F" if fortran_order else "C")


# Maps travel quantised, a half to a quarter of the bytes, well below visible steps.


def pack_saliency(values: np.ndarray) -> bytes:
    """A 0..1 saliency map as 8 bits."""
    return pack(cv2.convertScaleAbs(_finite(values), alpha=255))


def pack_depth(values: np.ndarray) -> bytes:
    """A depth map min-max normalised to 16 bits (the effect normalises it anyway)."""
    return pack(
        cv2.normalize(
            _finite(values),
            None,
            0,
            65535,
            cv2.NORM_MINMAX,  # type: ignore[call-overload]
            dtype=cv2.CV_16U,
        )
    )


def _finite(values: np.ndarray) -> np.ndarray:
    return np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)


def unpack_map(data) -> np.ndarray:
    """float32 0..1 from pack_saliency's or pack_depth's bytes (float arrays, as given)."""
    values = unpack(data)
    if values.dtype.kind in "ui":
        return values.astype(np.float32) * np.float32(1 / np.iinfo(values.dtype).max)
    return values.astype(np.float32)


def arrow_stage(
    table: pa.Table,
    stage: Callable[[dict], dict],
    reads: tuple[str, ...],
    drops: tuple[str, ...] = (),
    updates: tuple[str, ...] = UPDATED,
) -> pa.Table:
    """Run a stage on numpy copies of the columns it reads; the others pass through untouched.
    Of the columns it reads, only those in ``updates`` are written back.

    Ray Data hands Arrow blocks over zero-copy: the photo's bytes and the model copy ride along
    to the stage that needs them without being converted at every hop in between.
    """
    batch = stage({name: column_values(table, name) for name in reads})
    for name, values in batch.items():
        if name in reads and name not in updates:
            continue
        column = pa.array(list(values) if values.dtype == object else values)
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, column)
        else:
            table = table.append_column(name, column)
    return table.drop_columns([name for name in drops if name in table.column_names])


def column_values(table: pa.Table, name: str) -> np.ndarray:
    if name not in ARRAYS:
        return table.column(name).to_numpy(zero_copy_only=False)
    # Slices of the Arrow data buffer, one per row: unpack reads the arrays in place.
    values = np.empty(table.num_rows, dtype=object)
    row = 0
    for chunk in table.column(name).chunks:
        _, offsets, data = chunk.buffers()
        width = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        bounds = np.frombuffer(offsets, dtype=width)[chunk.offset : chunk.offset + len(chunk) + 1]
        for start, end in zip(bounds[:-1], bounds[1:]):
            values[row] = data.slice(int(start), int(end - start))
            row += 1
    return values


def add_columns(batch: dict, n: int, *names: str) -> dict:
    """New columns of n rows, each of its type in COLUMNS: empty strings or bytes, zeros."""
    for name in names:
        kind = COLUMNS[name]
        if kind is str or kind is bytes:
            batch[name] = np.array([kind()] * n, dtype=object)
        elif kind is np.datetime64:
            batch[name] = np.empty(n, dtype="datetime64[ms]")
        else:
            batch[name] = np.zeros(n, kind)
    return batch


def keep_or_add_columns(batch: dict, n: int, *names: str) -> dict:
    """Writable copies of the columns an earlier stage set (of their type), the others added."""
    for name in names:
        if name in batch:
            kind = COLUMNS[name]
            batch[name] = np.array(batch[name], dtype=object if kind in (str, bytes) else kind)
        else:
            add_columns(batch, n, name)
    return batch


def writable(batch: dict, *columns: str) -> dict:
    """Ray hands batches over zero-copy, read-only: copy the (small) columns a stage updates."""
    for column in columns:
        batch[column] = np.array(batch[column], copy=True)
    return batch
