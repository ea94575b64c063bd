"""Lazy, validated feature stores: one HDF5 file (optionally one group of it) or one folder of per-clip ``.pt`` files.

Long-video datasets do not fit in memory (MAD's frame features are tens of GB), so a store never reads a whole file:
``num_frames`` reads only metadata, ``get_slice`` reads only the rows asked for (HDF5 hyperslab reads), and an HDF5
file is opened on first use, once per process.  Ray workers are forked or spawned processes: an HDF5 handle must not
cross a fork, so the store remembers the pid that opened it, reopens in a new process, and drops the handle when
pickled.

Every array handed out is float32 and checked: a missing key, a wrong rank or width, or a NaN/Inf row is a
:class:`~rgnet.data.records.DataError` naming the file, the key and what was expected.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from rgnet.data.records import DataError


def nearest_key(key: str, keys: list[str]) -> str | None:
    """The existing key most similar to ``key`` (for "did you mean" hints), or None when there are no keys."""
    if not keys:
        return None
    if len(keys) > 50_000:  # difflib over hundreds of thousands of keys takes seconds; sample the same-prefix ones
        prefix = key[:3]
        keys = [k for k in keys if k.startswith(prefix)][:50_000] or keys[:50_000]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.0)
    return close[0] if close else None


class FeatureStore:
    """Features keyed by video id or query id; subclasses decide where they live. Arrays are float32."""

    path: Path
    kind: str  # "video", "text" or "sentence": used in messages only
    dim: int | None  # expected last dimension; None = not checked
    rank: int  # expected number of dimensions (2 for (T, D) frames or (L, D) tokens, 1 for a (D,) sentence)

    def keys(self) -> list[str]:
        raise NotImplementedError

    def __contains__(self, key: str) -> bool:
        raise NotImplementedError

    def _shape(self, key: str) -> tuple[int, ...]:
        """The stored shape of ``key``, from metadata only (no feature data read)."""
        raise NotImplementedError

    def _read(self, key: str, start: int | None, stop: int | None) -> np.ndarray:
        """Rows [start, stop) of ``key`` (all rows when both are None), as stored."""
        raise NotImplementedError

    def close(self) -> None:
        """Release open handles; the store stays usable (it reopens on the next access)."""

    # -- shared validation --------------------------------------------------------------------------------------
    def _missing(self, key: str) -> DataError:
        near = nearest_key(key, self.keys())
        hint = f"the nearest existing key is {near!r}" if near is not None else "the store holds no keys"
        return DataError(
            self.path,
            f"no {self.kind} features for key {key!r} ({hint})",
            record=key,
            fix="check that the annotations and the feature file belong to the same dataset and feature version",
        )

    def shape(self, key: str) -> tuple[int, ...]:
        """The validated stored shape of ``key`` (rank, width and non-empty checked); no feature data is read."""
        shape = self._shape(key)
        ok = len(shape) == self.rank and (self.dim is None or shape[-1] == self.dim)
        if ok and self.rank == 2 and shape[0] == 0:
            raise DataError(self.path, f"{self.kind} features of key {key!r} have no rows (shape {shape})", record=key)
        if not ok:
            want = ["N"] * (self.rank - 1) + [str(self.dim) if self.dim is not None else "D"]
            raise DataError(
                self.path,
                f"{self.kind} features of key {key!r} have shape {shape}, expected ({', '.join(want)})",
                record=key,
                fix=f"set data.{self.kind if self.kind != 'sentence' else 'video'}_dim to the width of these features "
                "or point the config at the right feature file",
            )
        return shape

    def num_frames(self, key: str) -> int:
        """Rows of ``key`` (frames of a video, tokens of a query), read from metadata."""
        return int(self.shape(key)[0])

    def get(self, key: str) -> np.ndarray:
        """The whole array of ``key`` as float32, validated."""
        self.shape(key)
        return self._checked(key, self._read(key, None, None), 0)

    def get_slice(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of ``key`` as float32; only those rows are read from disk."""
        n = self.shape(key)[0]
        if not 0 <= start <= stop <= n:
            raise ValueError(f"{self.path}: rows [{start}, {stop}) of {key!r} are outside [0, {n})")
        return self._checked(key, self._read(key, start, stop), start)

    def _checked(self, key: str, arr: np.ndarray, offset: int) -> np.ndarray:
        if arr.dtype.kind not in "fiu":
            what = f"{self.kind} features of key {key!r}"
            raise DataError(self.path, f"{what} have dtype {arr.dtype}, expected float", record=key)
        out = np.ascontiguousarray(arr, dtype=np.float32)
        finite = np.isfinite(out)
        if not finite.all():
            bad_rows = ~finite.reshape(len(out), -1).all(axis=1) if out.ndim > 1 else ~finite
            first = int(np.flatnonzero(bad_rows)[0]) + offset
            what = "row" if out.ndim > 1 else "element"
            raise DataError(
                self.path,
                f"{self.kind} features of key {key!r} contain NaN or Inf (first bad {what}: {first})",
                record=key,
                fix="re-extract the features of this item or drop it from the annotations",
            )
        return out


class HDF5Store(FeatureStore):
    """Datasets of one HDF5 file (``group`` = a subgroup such as the native layout's ``videos``), keyed by name."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        group: str | None = None,
        dim: int | None,
        rank: int = 2,
        kind: str = "video",
    ) -> None:
        self.path = Path(path)
        self.group = group
        self.dim = dim
        self.rank = rank
        self.kind = kind
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._keys: list[str] | None = None

    def __repr__(self) -> str:
        where = f"{self.path}" + (f":{self.group}" if self.group else "")
        return f"HDF5Store({where!r}, kind={self.kind!r}, dim={self.dim})"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None  # an open HDF5 handle cannot be pickled; the receiving process reopens
        state["_pid"] = None
        return state

    def _handle(self) -> h5py.File:
        if self._file is not None and self._pid == os.getpid():
            return self._file
        # A handle inherited through fork shares the parent's HDF5 state: forget it (never close it from here).
        self._file = None
        if not self.path.is_file():
            raise DataError(self.path, f"{self.kind} feature file not found", fix="check data.root and the file name")
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as err:
            raise DataError(self.path, f"cannot open as HDF5: {err}", fix="check that the file is complete") from err
        self._pid = os.getpid()
        return self._file

    def _root(self) -> h5py.Group:
        f = self._handle()
        if self.group is None:
            return f
        grp = f.get(self.group)
        if not isinstance(grp, h5py.Group):
            raise DataError(
                self.path,
                f"no group '{self.group}' holding the {self.kind} features",
                field=self.group,
                fix="native layout files keep videos/<id>, queries/<id> and sentences/<id>",
            )
        return grp

    def has_group(self) -> bool:
        """Whether ``group`` exists (always True without one); lets optional groups such as ``sentences`` be absent."""
        return self.group is None or isinstance(self._handle().get(self.group), h5py.Group)

    def file_attrs(self) -> dict[str, Any]:
        """The file-level attributes (the native layout keeps ``fps`` and the feature names there)."""
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in self._handle().attrs.items()}

    def keys(self) -> list[str]:
        if self._keys is None:
            self._keys = [k for k, v in self._root().items() if isinstance(v, h5py.Dataset)]
        return self._keys

    def __contains__(self, key: str) -> bool:
        return isinstance(self._root().get(key), h5py.Dataset)

    def _dataset(self, key: str) -> h5py.Dataset:
        ds = self._root().get(key)
        if not isinstance(ds, h5py.Dataset):
            raise self._missing(key)
        return ds

    def _shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(n) for n in self._dataset(key).shape)

    def _read(self, key: str, start: int | None, stop: int | None) -> np.ndarray:
        ds = self._dataset(key)
        if start is None:
            return np.asarray(ds[()])
        return np.asarray(ds[start:stop])  # an HDF5 hyperslab read: only these rows leave the disk

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None
        self._pid = None


class EncodedTextStore(HDF5Store):
    """Token features written by :func:`rgnet.text.encoded_text_file`: datasets named by escaped query keys."""

    def __init__(self, path: str | os.PathLike[str], *, dim: int | None) -> None:
        super().__init__(path, group=None, dim=dim, rank=2, kind="text")

    def keys(self) -> list[str]:
        from rgnet.text import unescape_key

        if self._keys is None:
            self._keys = [unescape_key(k) for k, v in self._root().items() if isinstance(v, h5py.Dataset)]
        return self._keys

    def __contains__(self, key: str) -> bool:
        from rgnet.text import escape_key

        return super().__contains__(escape_key(key))

    def _dataset(self, key: str) -> h5py.Dataset:
        from rgnet.text import escape_key

        ds = self._root().get(escape_key(key))
        if not isinstance(ds, h5py.Dataset):
            raise self._missing(key)
        return ds


class PtDirStore(FeatureStore):
    """A folder of per-item ``<key>.pt`` tensors (the Ego4D EgoVLP release), loaded with ``weights_only=True``.

    Files are memory-mapped, so reading a shape or a slice touches only the pages needed.
    """

    def __init__(self, directory: str | os.PathLike[str], *, dim: int | None, kind: str = "video") -> None:
        self.path = Path(directory)
        self.dim = dim
        self.rank = 2
        self.kind = kind
        self._keys: list[str] | None = None
        self._keyset: set[str] | None = None
        self._shapes: dict[str, tuple[int, ...]] = {}

    def __repr__(self) -> str:
        return f"PtDirStore({str(self.path)!r}, kind={self.kind!r}, dim={self.dim})"

    def keys(self) -> list[str]:
        if self._keys is None:
            if not self.path.is_dir():
                raise DataError(
                    self.path,
                    f"{self.kind} feature folder not found (expected a folder of <clip_uid>.pt files)",
                    fix="check data.root and data.video_features (a name ending in .h5 reads one HDF5 file instead)",
                )
            self._keys = sorted(p.stem for p in self.path.glob("*.pt") if p.is_file())
        return self._keys

    def __contains__(self, key: str) -> bool:
        if self._keyset is None:
            self._keyset = set(self.keys())
        return key in self._keyset

    def _load(self, key: str) -> torch.Tensor:
        file = self.path / f"{key}.pt"
        if not file.is_file():
            raise self._missing(key)
        try:
            try:
                obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # files in the legacy (pre-zip) format cannot be memory-mapped
                obj = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:
            raise DataError(file, f"cannot load the {self.kind} tensor: {err}", record=key) from err
        if not isinstance(obj, torch.Tensor):
            raise DataError(file, f"holds a {type(obj).__name__}, expected a tensor", record=key)
        return obj

    def _shape(self, key: str) -> tuple[int, ...]:
        if key not in self._shapes:
            self._shapes[key] = tuple(int(n) for n in self._load(key).shape)
        return self._shapes[key]

    def _read(self, key: str, start: int | None, stop: int | None) -> np.ndarray:
        t = self._load(key)
        if start is not None:
            t = t[start:stop]
        return t.detach().to(torch.float32).numpy().copy()  # copy: detach the result from the memory map
