"""Every kind of bad input is a DataError that names the file, the record and the field (and nothing is repaired)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rgnet.config import DataConfig
from rgnet.data.dataset import SplitData, open_split, read_annotations
from rgnet.data.features import HDF5Store
from rgnet.data.formats import write_dataset
from rgnet.data.records import DataError, QueryRecord

VIDEO_DIM, TEXT_DIM = 8, 6
FPS = {"mad": 5.0, "ego4d": 1.875, "native": 2.0}


def build(root: Path, layout: str, **cfg_changes: Any) -> DataConfig:
    """A valid two-video dataset (queries ``ann<v>_<i>`` on ``vid<v>``); returns the config that reads it."""
    rng = np.random.default_rng(0)
    fps = FPS[layout]
    records, videos, texts, sentences = [], {}, {}, {}
    for v in range(2):
        vid = f"vid{v}"
        videos[vid] = rng.standard_normal((20, VIDEO_DIM)).astype(np.float32)
        for i in range(2):
            qid = f"ann{v}_{i}"
            records.append(QueryRecord(qid, vid, f"where is thing {i}?", 1.0 + i, 2.5 + i, 20 / fps, vid, qid))
            texts[qid] = rng.standard_normal((5, TEXT_DIM)).astype(np.float32)
            sentences[qid] = rng.standard_normal(VIDEO_DIM).astype(np.float32)
    write_dataset(layout, root, {"train": records}, videos, texts, sentences, fps)
    cfg = DataConfig(layout=layout, root=str(root), video_dim=VIDEO_DIM, text_dim=TEXT_DIM)  # type: ignore[arg-type]
    return dataclasses.replace(cfg, **cfg_changes)


def expect(fn: Callable[[], object], *parts: str) -> DataError:
    """``fn`` raises a DataError whose message contains every one of ``parts``."""
    with pytest.raises(DataError) as info:
        fn()
    message = str(info.value)
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    return info.value


def edit_json(path: Path, change: Callable[[Any], object]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def edit_jsonl(path: Path, change: Callable[[list[Any]], object]) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    change(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def replace_h5(path: Path, name: str, value: np.ndarray) -> None:
    with h5py.File(path, "r+") as f:
        del f[name]
        f[name] = value


def ego_queries(tree: dict[str, Any], clip: int = 0) -> list[dict[str, Any]]:
    queries: list[dict[str, Any]] = tree["videos"][clip]["clips"][0]["annotations"][0]["language_queries"]
    return queries


# ---------------------------------------------------------------------------------------------------------------
# Missing or unreadable files
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("layout", "name"),
    [
        ("native", "train.jsonl"),
        ("native", "features.h5"),
        ("mad", "MAD_train.json"),
        ("mad", "CLIP_B32_frames_features_5fps.h5"),
        ("mad", "CLIP_B32_language_tokens_features.h5"),
        ("ego4d", "nlq_train.json"),
        ("ego4d", "token_features.h5"),
    ],
)
def test_missing_file(tmp_path: Path, layout: str, name: str) -> None:
    cfg = build(tmp_path, layout)
    (tmp_path / name).unlink()
    expect(lambda: open_split(cfg, "train"), str(tmp_path / name), "not found")


def test_missing_pt_folder(tmp_path: Path) -> None:
    cfg = build(tmp_path, "ego4d")
    (tmp_path / "egovlp").rename(tmp_path / "elsewhere")
    expect(lambda: open_split(cfg, "train"), str(tmp_path / "egovlp"), "folder not found")


def test_missing_parquet_file(tmp_path: Path) -> None:
    cfg = build(tmp_path, "native", annotations="{split}.parquet")
    expect(lambda: open_split(cfg, "train"), str(tmp_path / "train.parquet"), "not found")


def test_unreadable_files(tmp_path: Path) -> None:
    cfg = build(tmp_path, "native")
    (tmp_path / "features.h5").write_bytes(b"not an hdf5 file at all")
    expect(lambda: open_split(cfg, "train"), str(tmp_path / "features.h5"), "cannot open as HDF5")
    (tmp_path / "train.jsonl").write_bytes(b"\xff\xfe\x00broken")
    expect(lambda: open_split(cfg, "train"), str(tmp_path / "train.jsonl"), "cannot read")
    (tmp_path / "val.parquet").write_text("not parquet")
    expect(lambda: read_annotations("native", tmp_path / "val.parquet"), "val.parquet", "cannot read as Parquet")


def test_explicitly_named_sentence_file_must_exist(tmp_path: Path) -> None:
    cfg = build(tmp_path, "mad", sentence_features="sentences.h5")
    expect(lambda: open_split(cfg, "train"), str(tmp_path / "sentences.h5"), "not found")
    (tmp_path / "CLIP_B32_sentence_features.h5").unlink()  # the default name may be absent: no sentences
    data = open_split(build(tmp_path / "b", "mad"), "train")
    assert data.sentences is not None
    (tmp_path / "b" / "CLIP_B32_sentence_features.h5").unlink()
    data = open_split(build(tmp_path / "c", "mad"), "train")
    expect(lambda: SplitData.sentence(dataclasses.replace(data, sentences=None), "ann0_0"), "ann0_0", "no sentence")


# ---------------------------------------------------------------------------------------------------------------
# Keys missing from the feature files
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("layout", "field"), [("native", "video_id"), ("mad", "movie"), ("ego4d", "clip_uid")])
def test_unknown_video_id(tmp_path: Path, layout: str, field: str) -> None:
    cfg = build(tmp_path, layout)
    if layout == "native":
        edit_jsonl(tmp_path / "train.jsonl", lambda rows: rows[1].update(video_id="vid9"))
        record = "ann0_1"
    elif layout == "mad":
        edit_json(tmp_path / "MAD_train.json", lambda d: d["ann0_1"].update(movie="vid9"))
        record = "ann0_1"
    else:
        edit_json(tmp_path / "nlq_train.json", lambda d: d["videos"][1]["clips"][0].update(clip_uid="vid9"))
        record = "ann1_0"
    err = expect(lambda: open_split(cfg, "train"), "train", record, f"field '{field}'", "unknown video id 'vid9'")
    assert err.record == record and err.field == field


def test_query_missing_from_text_features(tmp_path: Path) -> None:
    cfg = build(tmp_path, "mad")
    with h5py.File(tmp_path / "CLIP_B32_language_tokens_features.h5", "r+") as f:
        del f["ann1_1"]
    expect(lambda: open_split(cfg, "train"), "MAD_train.json", "ann1_1", "CLIP_B32_language_tokens_features.h5")


def test_store_names_file_key_and_nearest_key(tmp_path: Path) -> None:
    build(tmp_path, "native")
    store = HDF5Store(tmp_path / "features.h5", group="queries", dim=TEXT_DIM, kind="text")
    expect(lambda: store.get("ann1_7"), "features.h5", "'ann1_7'", "nearest existing key is 'ann1_", "text")
    expect(lambda: HDF5Store(tmp_path / "features.h5", group="clips", dim=4).keys(), "no group 'clips'")


# ---------------------------------------------------------------------------------------------------------------
# Bad feature arrays
# ---------------------------------------------------------------------------------------------------------------
def test_wrong_video_width_fails_at_open(tmp_path: Path) -> None:
    cfg = build(tmp_path, "native")
    replace_h5(tmp_path / "features.h5", "videos/vid1", np.zeros((20, 7), np.float32))
    expect(lambda: open_split(cfg, "train"), "features.h5", "'vid1'", "shape (20, 7)", "expected (N, 8)", "video_dim")


def test_wrong_video_width_in_pt_file(tmp_path: Path) -> None:
    import torch

    cfg = build(tmp_path, "ego4d")
    torch.save(torch.zeros(20, 3), tmp_path / "egovlp" / "vid0.pt")
    expect(lambda: open_split(cfg, "train"), "egovlp", "'vid0'", "shape (20, 3)", "expected (N, 8)")
    torch.save({"features": torch.zeros(20, 8)}, tmp_path / "egovlp" / "vid0.pt")
    expect(lambda: open_split(cfg, "train"), "vid0.pt", "holds a dict, expected a tensor")


def test_wrong_text_rank_and_width(tmp_path: Path) -> None:
    cfg = build(tmp_path, "native")
    replace_h5(tmp_path / "features.h5", "queries/ann0_1", np.zeros(TEXT_DIM, np.float32))
    data = open_split(cfg, "train")  # text shapes are checked when read
    expect(lambda: data.text("ann0_1"), "features.h5", "'ann0_1'", f"shape ({TEXT_DIM},)", f"expected (N, {TEXT_DIM})")
    data.close()
    replace_h5(tmp_path / "features.h5", "queries/ann0_1", np.zeros((4, TEXT_DIM + 1), np.float32))
    data = open_split(cfg, "train")
    expect(lambda: data.text("ann0_1"), f"shape (4, {TEXT_DIM + 1})", "text_dim")
    data.close()
    replace_h5(tmp_path / "features.h5", "sentences/ann0_0", np.zeros((1, VIDEO_DIM), np.float32))
    expect(lambda: open_split(cfg, "train").sentence("ann0_0"), "'ann0_0'", f"expected ({VIDEO_DIM})")


def test_nan_and_inf_name_the_first_bad_row(tmp_path: Path) -> None:
    cfg = build(tmp_path, "native")
    video = np.ones((20, VIDEO_DIM), np.float32)
    video[7, 2], video[12, 0] = np.nan, np.inf
    replace_h5(tmp_path / "features.h5", "videos/vid0", video)
    data = open_split(cfg, "train")  # values are checked when read
    expect(lambda: data.video("vid0"), "features.h5", "'vid0'", "NaN or Inf", "first bad row: 7")
    expect(lambda: data.video_slice("vid0", 10, 15), "first bad row: 12")  # absolute row index, not slice-relative
    np.testing.assert_array_equal(data.video_slice("vid0", 0, 7), video[:7])  # clean rows still read
    data.close()
    tokens = np.ones((5, TEXT_DIM), np.float32)
    tokens[3, 1] = -np.inf
    replace_h5(tmp_path / "features.h5", "queries/ann1_0", tokens)
    data = open_split(cfg, "train")
    expect(lambda: data.text("ann1_0"), "'ann1_0'", "first bad row: 3")
    data.close()
    replace_h5(tmp_path / "features.h5", "sentences/ann1_1", np.full(VIDEO_DIM, np.nan, np.float32))
    expect(lambda: open_split(cfg, "train").sentence("ann1_1"), "'ann1_1'", "first bad element: 0")


def test_non_numeric_features(tmp_path: Path) -> None:
    cfg = build(tmp_path, "native")
    replace_h5(tmp_path / "features.h5", "videos/vid1", np.full((20, VIDEO_DIM), b"x", dtype="S1"))
    expect(lambda: open_split(cfg, "train").video("vid1"), "'vid1'", "dtype", "expected float")


# ---------------------------------------------------------------------------------------------------------------
# Bad annotation values
# ---------------------------------------------------------------------------------------------------------------
NATIVE_CASES = [  # (row change, field, message part)
    ({"end_sec": 0.5}, "end_sec", "before its start"),
    ({"start_sec": -1.0}, "start_sec", "negative"),
    ({"end_sec": 11.0}, "end_sec", "past the video duration"),
    ({"query": "   "}, "query", "empty query text"),
    ({"start_sec": "1.0"}, "start_sec", "expected a number, got str"),
    ({"video_id": 3}, "video_id", "expected a string, got int"),
    ({"duration_sec": None}, "duration_sec", "missing field"),
    ({"end_sec": float("nan")}, "end_sec", "finite"),
]


@pytest.mark.parametrize(("change", "field", "problem"), NATIVE_CASES)
def test_native_bad_values(tmp_path: Path, change: dict[str, Any], field: str, problem: str) -> None:
    cfg = build(tmp_path, "native")
    edit_jsonl(tmp_path / "train.jsonl", lambda rows: rows[2].update(change))
    err = expect(lambda: open_split(cfg, "train"), "train.jsonl", "'ann1_0'", f"field '{field}'", problem)
    assert err.field == field


def test_native_missing_field_and_duplicate_id(tmp_path: Path) -> None:
    cfg = build(tmp_path, "native")
    edit_jsonl(tmp_path / "train.jsonl", lambda rows: rows[1].pop("end_sec"))
    expect(lambda: open_split(cfg, "train"), "train.jsonl", "'ann0_1'", "field 'end_sec'", "missing field")
    edit_jsonl(tmp_path / "train.jsonl", lambda rows: rows.__setitem__(1, {**rows[0], "end_sec": 2.0}))
    expect(lambda: open_split(cfg, "train"), "train.jsonl", "'ann0_0'", "field 'query_id'", "duplicate query id")
    edit_jsonl(tmp_path / "train.jsonl", lambda rows: rows.__setitem__(1, ["not", "an", "object"]))
    expect(lambda: open_split(cfg, "train"), "train.jsonl", "'line 2'", "expected a JSON object")


def test_malformed_jsonl_names_the_line(tmp_path: Path) -> None:
    cfg = build(tmp_path, "native")
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    lines[2] = lines[2][:-3]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    expect(lambda: open_split(cfg, "train"), "train.jsonl", "'line 3'", "malformed JSON")


def test_malformed_json_names_the_line(tmp_path: Path) -> None:
    cfg = build(tmp_path, "mad")
    text = (tmp_path / "MAD_train.json").read_text().splitlines()
    text[5] = text[5] + " oops"
    (tmp_path / "MAD_train.json").write_text("\n".join(text))
    expect(lambda: open_split(cfg, "train"), "MAD_train.json", "malformed JSON at line 6")
    (tmp_path / "MAD_train.json").write_text("[1, 2]")
    expect(lambda: open_split(cfg, "train"), "MAD_train.json", "expected a JSON object keyed by annotation id")


MAD_CASES = [  # (field, value, message part)
    ("timestamps", [3.0, 2.0], "before its start"),
    ("timestamps", [-0.5, 2.0], "negative"),
    ("timestamps", [1.0, 4.5], "past the video duration"),
    ("timestamps", [1.0], "expected [start, end]"),
    ("sentence", "", "empty query text"),
    ("movie", None, "missing field"),
    ("movie_duration", "4", "expected a number"),
]


@pytest.mark.parametrize(("field", "value", "problem"), MAD_CASES)
def test_mad_bad_values(tmp_path: Path, field: str, value: Any, problem: str) -> None:
    cfg = build(tmp_path, "mad")
    edit_json(tmp_path / "MAD_train.json", lambda d: d["ann1_1"].update({field: value}))
    expect(lambda: open_split(cfg, "train"), "MAD_train.json", "'ann1_1'", f"field '{field}'", problem)


def test_mad_duplicate_annotation_id(tmp_path: Path) -> None:
    cfg = build(tmp_path, "mad")
    text = (tmp_path / "MAD_train.json").read_text()
    (tmp_path / "MAD_train.json").write_text(text.replace('"ann0_1"', '"ann0_0"', 1))  # json would keep the last
    expect(lambda: open_split(cfg, "train"), "MAD_train.json", "'ann0_0'", "appears twice")


def test_mad_ext_field_must_exist_when_chosen(tmp_path: Path) -> None:
    cfg = build(tmp_path, "mad", mad_gt_field="ext_timestamps")
    edit_json(tmp_path / "MAD_train.json", lambda d: d["ann0_0"].pop("ext_timestamps"))
    expect(lambda: open_split(cfg, "train"), "'ann0_0'", "field 'ext_timestamps'", "missing field")
    assert len(open_split(dataclasses.replace(cfg, mad_gt_field="timestamps"), "train").records) == 4


def test_ego4d_bad_values(tmp_path: Path) -> None:
    cfg = build(tmp_path, "ego4d")
    nlq = tmp_path / "nlq_train.json"
    edit_json(nlq, lambda d: ego_queries(d, 1)[1].update(clip_end_sec=0.5))
    expect(lambda: open_split(cfg, "train"), "nlq_train.json", "'ann1_1'", "field 'clip_end_sec'", "before its start")
    edit_json(nlq, lambda d: ego_queries(d, 1)[1].update(clip_end_sec=3.5, query=""))
    expect(lambda: open_split(cfg, "train"), "'ann1_1'", "field 'query'", "empty query text")
    edit_json(nlq, lambda d: ego_queries(d, 1)[1].update(query="ok?", clip_start_sec="2"))
    expect(lambda: open_split(cfg, "train"), "'ann1_1'", "field 'clip_start_sec'", "expected a number")
    edit_json(nlq, lambda d: ego_queries(d, 1)[1].update(clip_start_sec=2.0, clip_end_sec=11.0))
    expect(lambda: open_split(cfg, "train"), "'ann1_1'", "past the video duration")
    edit_json(nlq, lambda d: d["videos"][0]["clips"][0].pop("clip_end_sec"))
    expect(lambda: open_split(cfg, "train"), "nlq_train.json", "clip vid0", "field 'clip_end_sec'", "missing field")
    edit_json(nlq, lambda d: d.pop("videos"))
    expect(lambda: open_split(cfg, "train"), "nlq_train.json", "field 'videos'", "missing field")


def test_ego4d_duplicate_query_id(tmp_path: Path) -> None:
    cfg = build(tmp_path, "ego4d")

    def duplicate(d: dict[str, Any]) -> None:
        d["videos"][1]["clips"][0]["annotations"][0]["annotation_uid"] = "ann0"  # same uid on another clip

    edit_json(tmp_path / "nlq_train.json", duplicate)
    expect(lambda: open_split(cfg, "train"), "nlq_train.json", "'ann0_0'", "field 'annotation_uid'", "duplicate")


def test_parquet_missing_column_and_wrong_type(tmp_path: Path) -> None:
    cfg = build(tmp_path, "native", annotations="{split}.parquet")
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    table = pa.Table.from_pylist(rows)
    pq.write_table(table.drop_columns(["duration_sec"]), tmp_path / "train.parquet")
    expect(lambda: open_split(cfg, "train"), "train.parquet", "field 'duration_sec'", "missing column")
    bad = table.set_column(3, "start_sec", pa.array([str(r["start_sec"]) for r in rows]))
    pq.write_table(bad, tmp_path / "train.parquet")
    expect(lambda: open_split(cfg, "train"), "train.parquet", "'ann0_0'", "field 'start_sec'", "expected a number")


# ---------------------------------------------------------------------------------------------------------------
# Annotations that disagree with the features
# ---------------------------------------------------------------------------------------------------------------
def test_duration_must_match_the_number_of_frames(tmp_path: Path) -> None:
    cfg = build(tmp_path, "native")  # 20 frames at 2 fps = 10 s
    edit_jsonl(tmp_path / "train.jsonl", lambda rows: [r.update(duration_sec=12.0) for r in rows[2:]])
    expect(lambda: open_split(cfg, "train"), "train.jsonl", "'ann1_0'", "field 'duration_sec'", "20 frames at 2 fps")
    edit_jsonl(tmp_path / "train.jsonl", lambda rows: [r.update(duration_sec=11.4) for r in rows[2:]])
    assert len(open_split(cfg, "train").records) == 4  # within one frame + 1 s of slack


def test_fps_disagreements(tmp_path: Path) -> None:
    cfg = build(tmp_path, "native")
    expect(lambda: open_split(dataclasses.replace(cfg, fps=3.0), "train"), "features.h5", "2 fps", "data.fps is 3")
    with h5py.File(tmp_path / "features.h5", "r+") as f:
        del f.attrs["fps"]
    expect(lambda: open_split(cfg, "train"), "features.h5", "field 'fps'", "no 'fps' file attribute")
    assert open_split(dataclasses.replace(cfg, fps=2.0), "train").fps == 2.0
    mad = build(tmp_path / "mad", "mad")  # written at 5 fps; a config that says 4 fps is caught
    expect(lambda: open_split(dataclasses.replace(mad, fps=4.0), "train"), "frames_features", "5 fps", "data.fps=5")


def test_writer_rejects_inputs_it_cannot_represent(tmp_path: Path) -> None:
    rec = QueryRecord("a_0", "v", "q?", 0.0, 1.0, 2.0, "other-key", "a_0")
    arrays = {"v": np.zeros((4, 2), np.float32), "other-key": np.zeros((4, 2), np.float32)}
    with pytest.raises(ValueError, match="video_key must equal video_id"):
        write_dataset("native", tmp_path, {"train": [rec]}, arrays, {"a_0": np.zeros((2, 3))}, None, 2.0)
    ok = dataclasses.replace(rec, video_key="v")
    with pytest.raises(ValueError, match="no text features"):
        write_dataset("native", tmp_path, {"train": [ok]}, arrays, {}, None, 2.0)
    with pytest.raises(ValueError, match="unknown dataset layout"):
        write_dataset("lmdb", tmp_path, {"train": [ok]}, arrays, {"a_0": np.zeros((2, 3))}, None, 2.0)
    assert list(tmp_path.iterdir()) == []
