"""Dataset layouts: round trips through every writer/reader pair, deterministic and atomic writes, lazy stores."""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing as mp
import pickle
import random
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from rgnet.config import DataConfig
from rgnet.data.dataset import SplitData, default_paths, open_split, read_annotations
from rgnet.data.features import HDF5Store, PtDirStore
from rgnet.data.formats import write_dataset
from rgnet.data.records import QueryRecord

VIDEO_DIM, TEXT_DIM = 8, 6
# (layout, file-name overrides for writer and config, fps written)
VARIANTS: dict[str, tuple[str, dict[str, str], float]] = {
    "mad": ("mad", {}, 5.0),
    "ego4d-pt": ("ego4d", {}, 1.875),
    "ego4d-h5": ("ego4d", {"video_features": "egovlp_features.h5"}, 1.875),
    "native-jsonl": ("native", {}, 2.0),
    "native-parquet": ("native", {"annotations": "{split}.parquet"}, 2.0),
}


@dataclasses.dataclass
class Inputs:
    splits: dict[str, list[QueryRecord]]
    videos: dict[str, np.ndarray]
    texts: dict[str, np.ndarray]
    sentences: dict[str, np.ndarray]


def make_inputs(fps: float, seed: int = 0, *, zero_length: int = 0) -> Inputs:
    """Two splits of two videos each, three queries per video (Ego4D-style ids ``<uid>_<index>``)."""
    rng = np.random.default_rng(seed)
    splits: dict[str, list[QueryRecord]] = {"train": [], "val": []}
    videos, texts, sentences = {}, {}, {}
    for v in range(4):
        vid = f"vid{v}"
        frames = int(rng.integers(20, 40))
        videos[vid] = rng.standard_normal((frames, VIDEO_DIM)).astype(np.float32)
        duration = frames / fps
        for i in range(3):
            qid = f"ann{v}_{i}"
            start = float(np.round(rng.uniform(0, duration / 2), 3))
            end = start if i < zero_length else float(np.round(rng.uniform(start + 0.1, duration), 3))
            rec = QueryRecord(qid, vid, f"query {v} {i}?", start, end, duration, vid, qid)
            splits["train" if v < 2 else "val"].append(rec)
            texts[qid] = rng.standard_normal((int(rng.integers(3, 9)), TEXT_DIM)).astype(np.float32)
            sentences[qid] = rng.standard_normal(VIDEO_DIM).astype(np.float32)
    return Inputs(splits, videos, texts, sentences)


def config(root: Path, layout: str, paths: dict[str, str], **changes: Any) -> DataConfig:
    base = DataConfig(layout=layout, root=str(root), video_dim=VIDEO_DIM, text_dim=TEXT_DIM)  # type: ignore[arg-type]
    return dataclasses.replace(base, **{**paths, **changes})


def write(root: Path, layout: str, data: Inputs, fps: float, paths: dict[str, str] | None = None, **kw: Any) -> None:
    write_dataset(layout, root, data.splits, data.videos, data.texts, data.sentences, fps, paths=paths, **kw)


def all_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip(tmp_path: Path, variant: str) -> None:
    layout, paths, fps = VARIANTS[variant]
    data = make_inputs(fps)
    write(tmp_path, layout, data, fps, paths)
    cfg = config(tmp_path, layout, paths, normalize_text=False, max_query_tokens=100)
    for split, want in data.splits.items():
        got = open_split(cfg, split)
        assert got.records == want  # ids, texts, times and durations exactly, in file order
        assert got.fps == fps and got.dropped == {} and got.split == split
        for rec in want:
            np.testing.assert_array_equal(got.video(rec.video_key), data.videos[rec.video_key])
            assert got.num_frames(rec.video_key) == len(data.videos[rec.video_key])
            np.testing.assert_array_equal(got.text(rec.query_key), data.texts[rec.query_key])
            np.testing.assert_array_equal(got.sentence(rec.query_key), data.sentences[rec.query_key])
            assert got.video(rec.video_key).dtype == np.float32
    expected_store = PtDirStore if variant == "ego4d-pt" else HDF5Store
    assert isinstance(open_split(cfg, "train").videos, expected_store)


def test_default_paths_are_what_the_writers_write(tmp_path: Path) -> None:
    for layout, _, fps in (VARIANTS["mad"], VARIANTS["ego4d-pt"], VARIANTS["native-jsonl"]):
        write(tmp_path / layout, layout, make_inputs(fps), fps)
        names = default_paths(layout)
        for key in ("annotations", "video_features", "text_features", "sentence_features"):
            assert (tmp_path / layout / names[key].replace("{split}", "train")).exists(), (layout, key)
    assert default_paths("mad")["annotations"] == "MAD_{split}.json"
    assert default_paths("ego4d")["video_features"] == "egovlp"
    assert default_paths("native")["annotations"] == "{split}.jsonl"


def test_sentence_features_are_optional(tmp_path: Path) -> None:
    for layout, _, fps in (VARIANTS["mad"], VARIANTS["native-jsonl"]):
        data = make_inputs(fps)
        write_dataset(layout, tmp_path / layout, data.splits, data.videos, data.texts, None, fps)
        assert open_split(config(tmp_path / layout, layout, {}), "train").sentences is None


def test_native_fps_comes_from_the_file_and_names_are_stored(tmp_path: Path) -> None:
    data = make_inputs(2.0)
    write(tmp_path, "native", data, 2.0, video_feature_name="egovlp", text_feature_name="clip-b32")
    assert open_split(config(tmp_path, "native", {}), "train").fps == 2.0
    assert open_split(config(tmp_path, "native", {}, fps=2.0), "train").fps == 2.0  # agreeing override is fine
    with h5py.File(tmp_path / "features.h5") as f:
        assert dict(f.attrs) == {"fps": 2.0, "video_feature_name": "egovlp", "text_feature_name": "clip-b32"}
        assert set(f) == {"videos", "queries", "sentences"}


def test_mad_reads_the_chosen_ground_truth_field(tmp_path: Path) -> None:
    data = make_inputs(5.0)
    rec = data.splits["train"][0]
    write(tmp_path, "mad", data, 5.0, ext_timestamps={rec.query_id: (rec.start_sec, rec.end_sec + 0.5)})
    raw = json.loads((tmp_path / "MAD_train.json").read_text())
    assert raw[rec.query_id]["ext_timestamps"] == [rec.start_sec, rec.end_sec + 0.5]
    other = raw[data.splits["train"][1].query_id]
    assert other["ext_timestamps"] == other["timestamps"]
    plain = open_split(config(tmp_path, "mad", {}), "train").records[0]
    ext = open_split(config(tmp_path, "mad", {}, mad_gt_field="ext_timestamps"), "train").records[0]
    assert (plain.end_sec, ext.end_sec) == (rec.end_sec, rec.end_sec + 0.5)


def test_ego4d_writer_layout_and_skipped_queries_keep_their_index(tmp_path: Path) -> None:
    data = make_inputs(1.875)
    # ann0_1 removed: the writer leaves an entry without "query" at index 1, which the reader skips and counts
    data.splits["train"] = [r for r in data.splits["train"] if r.query_id != "ann0_1"]
    write(tmp_path, "ego4d", data, 1.875)
    tree = json.loads((tmp_path / "nlq_train.json").read_text())
    clip = tree["videos"][0]["clips"][0]
    assert tree["videos"][0]["video_uid"] == clip["clip_uid"] == "vid0"
    queries = clip["annotations"][0]["language_queries"]
    assert [("query" in q) for q in queries] == [True, False, True]
    records, dropped = read_annotations("ego4d", tmp_path / "nlq_train.json")
    assert [r.query_id for r in records[:2]] == ["ann0_0", "ann0_2"]
    assert dropped == {"no_query": 1}
    with pytest.raises(ValueError, match="annotation_uid"):
        bad = dataclasses.replace(data.splits["train"][0], query_id="noindex", query_key="noindex")
        write_dataset("ego4d", tmp_path / "bad", {"train": [bad]}, data.videos, {"noindex": data.texts["ann0_0"]},
                      None, 1.875)  # fmt: skip


@pytest.mark.parametrize("layout", ["mad", "ego4d", "native"])
def test_zero_length_moments_are_dropped_counted_and_warned(
    tmp_path: Path, layout: str, caplog: pytest.LogCaptureFixture
) -> None:
    fps = {"mad": 5.0, "ego4d": 1.875, "native": 2.0}[layout]
    data = make_inputs(fps, zero_length=1)  # the first query of every video has start == end
    write(tmp_path, layout, data, fps)
    with caplog.at_level(logging.WARNING):
        got = open_split(config(tmp_path, layout, {}), "train")
    assert got.dropped == {"zero_length": 2}
    assert [r.query_id for r in got.records] == [r.query_id for r in data.splits["train"] if r.end_sec > r.start_sec]
    assert any("2 zero-length" in m for m in caplog.messages)
    kept = open_split(config(tmp_path, layout, {}, drop_zero_length=False), "train")
    assert kept.records == data.splits["train"] and kept.dropped == {}


# ---------------------------------------------------------------------------------------------------------------
# Writers: deterministic bytes, atomic files
# ---------------------------------------------------------------------------------------------------------------
def test_writing_twice_gives_identical_bytes(tmp_path: Path) -> None:
    for variant, (layout, paths, fps) in VARIANTS.items():
        write(tmp_path / "a" / variant, layout, make_inputs(fps), fps, paths)
    time.sleep(1.1)  # HDF5 modification times have one-second resolution: a timestamp would now differ
    for variant, (layout, paths, fps) in VARIANTS.items():
        data = make_inputs(fps)
        shuffled = list(data.videos.items())
        random.Random(1).shuffle(shuffled)
        data.videos = dict(shuffled)  # the order of the feature mappings does not matter
        write(tmp_path / "b" / variant, layout, data, fps, paths)
    a, b = all_bytes(tmp_path / "a"), all_bytes(tmp_path / "b")
    assert a.keys() == b.keys() and len(a) > 20
    assert [k for k in a if a[k] != b[k]] == []
    write(tmp_path / "c", "native", make_inputs(2.0, seed=1), 2.0)
    assert all_bytes(tmp_path / "c")["features.h5"] != a["native-jsonl/features.h5"]


def test_interrupted_hdf5_writer_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = h5py.Group.create_dataset
    calls = {"n": 0}

    def failing(self: h5py.Group, *args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (simulated)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing)
    for layout, fps in (("native", 2.0), ("mad", 5.0)):
        calls["n"] = 0
        with pytest.raises(OSError, match="simulated"):
            write(tmp_path / layout, layout, make_inputs(fps), fps)
        assert calls["n"] == 3
        left = sorted(p.name for p in (tmp_path / layout).iterdir())
        assert left == [], left  # neither the final name nor a temporary file


def test_interrupted_pt_writer_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import rgnet.data.formats as formats

    real = formats.torch.save
    calls = {"n": 0}

    def failing(obj: Any, f: Any) -> None:
        calls["n"] += 1
        real(obj, f)
        if calls["n"] == 2:
            raise RuntimeError("killed (simulated)")

    monkeypatch.setattr(formats.torch, "save", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        write(tmp_path, "ego4d", make_inputs(1.875), 1.875)
    assert sorted(p.name for p in (tmp_path / "egovlp").iterdir()) == ["vid0.pt"]  # only the completed clip


# ---------------------------------------------------------------------------------------------------------------
# Lazy feature stores
# ---------------------------------------------------------------------------------------------------------------
def test_hdf5_slices_read_only_their_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_inputs(2.0)
    write(tmp_path, "native", data, 2.0)
    store = HDF5Store(tmp_path / "features.h5", group="videos", dim=VIDEO_DIM)
    reads: list[Any] = []
    real = h5py.Dataset.__getitem__

    def spy(self: h5py.Dataset, sel: Any) -> Any:
        reads.append(sel)
        return real(self, sel)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    assert store.num_frames("vid1") == len(data.videos["vid1"]) and reads == []  # metadata only
    part = store.get_slice("vid1", 5, 12)
    assert reads == [slice(5, 12)]
    np.testing.assert_array_equal(part, store.get("vid1")[5:12])
    np.testing.assert_array_equal(part, data.videos["vid1"][5:12])
    assert store.get_slice("vid1", 3, 3).shape == (0, VIDEO_DIM)
    with pytest.raises(ValueError, match="outside"):
        store.get_slice("vid1", 0, len(data.videos["vid1"]) + 1)


def test_pt_store_slices_match_and_shapes_come_without_full_reads(tmp_path: Path) -> None:
    data = make_inputs(1.875)
    write(tmp_path, "ego4d", data, 1.875)
    store = PtDirStore(tmp_path / "egovlp", dim=VIDEO_DIM)
    assert store.keys() == sorted(data.videos) and "vid2" in store and "nope" not in store
    assert store.num_frames("vid2") == len(data.videos["vid2"])
    np.testing.assert_array_equal(store.get_slice("vid2", 4, 9), data.videos["vid2"][4:9])
    np.testing.assert_array_equal(store.get_slice("vid2", 4, 9), store.get("vid2")[4:9])


def _child_reads(store: HDF5Store, key: str, out: Any) -> None:
    arr = store.get(key)
    out.put((float(arr.sum()), store._pid))


def test_hdf5_store_pickles_and_reopens_after_fork(tmp_path: Path) -> None:
    import os

    data = make_inputs(2.0)
    write(tmp_path, "native", data, 2.0)
    store = HDF5Store(tmp_path / "features.h5", group="videos", dim=VIDEO_DIM)
    want = store.get("vid0")  # the parent now holds an open handle
    assert store._pid == os.getpid()
    clone = pickle.loads(pickle.dumps(store))
    assert clone._file is None
    np.testing.assert_array_equal(clone.get("vid3"), data.videos["vid3"])

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_reads, args=(store, "vid0", queue))  # inherited, not pickled
    child.start()
    total, child_pid = queue.get(timeout=30)
    child.join(timeout=30)
    assert child.exitcode == 0
    assert total == pytest.approx(float(want.sum())) and child_pid == child.pid  # the child opened its own handle
    np.testing.assert_array_equal(store.get("vid0"), want)  # the parent's handle still works
    store.close()
    np.testing.assert_array_equal(store.get("vid1"), data.videos["vid1"])  # and reopens after close


def test_split_data_pickles(tmp_path: Path) -> None:
    data = make_inputs(2.0)
    write(tmp_path, "native", data, 2.0)
    split = open_split(config(tmp_path, "native", {}), "val")
    split.video("vid2")
    clone: SplitData = pickle.loads(pickle.dumps(split))
    assert clone.records == split.records
    np.testing.assert_array_equal(clone.video_slice("vid2", 1, 4), data.videos["vid2"][1:4])


def test_text_is_truncated_and_normalised_per_token(tmp_path: Path) -> None:
    data = make_inputs(2.0)
    qid = data.splits["train"][0].query_id
    tokens = np.random.default_rng(3).standard_normal((10, TEXT_DIM)).astype(np.float32) * 5
    tokens[1] = 0.0  # an all-zero token must stay zero, not become NaN
    data.texts[qid] = tokens
    write(tmp_path, "native", data, 2.0)
    got = open_split(config(tmp_path, "native", {}, max_query_tokens=4), "train").text(qid)
    assert got.shape == (4, TEXT_DIM) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), [1, 0, 1, 1], rtol=1e-6)
    want = tokens[:4] / np.maximum(np.linalg.norm(tokens[:4], axis=1, keepdims=True), 1e-12)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    raw = open_split(config(tmp_path, "native", {}, max_query_tokens=4, normalize_text=False), "train").text(qid)
    np.testing.assert_array_equal(raw, tokens[:4])
    short = data.splits["train"][1].query_id  # shorter than the cap: unchanged length
    assert open_split(config(tmp_path, "native", {}), "train").text(short).shape == data.texts[short].shape
