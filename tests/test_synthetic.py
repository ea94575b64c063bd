"""The planted-moment generator: seeded, planted where annotated, weakly solvable by frozen features, readable."""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest

from pipelines import prepare
from rgnet.config import ConfigError, DataConfig, SyntheticConfig, load_config
from rgnet.data.records import DataError, QueryRecord
from rgnet.data.synthetic import (
    MARKER,
    SyntheticData,
    ensure_dataset,
    frozen_retrieval_recall,
    make_synthetic,
    read_marker,
    write_synthetic,
)

LAYOUTS = ("mad", "ego4d", "native")


def tiny_cfg(**changes: object) -> SyntheticConfig:
    """The tiny preset's generator, shrunk to a few videos (the tests write it many times)."""
    cfg = load_config("tiny").data.synthetic
    small = {"num_train_videos": 3, "num_val_videos": 2, "num_test_videos": 2}
    return dataclasses.replace(cfg, **{**small, **changes})  # type: ignore[arg-type]


def data_cfg(root: Path, layout: str, syn: SyntheticConfig) -> DataConfig:
    """The tiny preset's data config pointed at ``root``; data.fps says the rate (MAD/Ego4D readers assume 5/1.875)."""
    base = load_config("tiny").data
    syn = dataclasses.replace(syn, layout=layout)  # type: ignore[arg-type]
    return dataclasses.replace(base, root=str(root), layout=layout, fps=syn.fps, synthetic=syn)  # type: ignore[arg-type]


def all_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def frames_of(rec: QueryRecord, fps: float) -> tuple[int, int]:
    return round(rec.start_sec * fps), round(rec.end_sec * fps)


# ---------------------------------------------------------------------------------------------------------------
# The pure, in-memory part
# ---------------------------------------------------------------------------------------------------------------
def test_same_seed_same_arrays_and_other_seed_differs() -> None:
    a, b, c = make_synthetic(tiny_cfg()), make_synthetic(tiny_cfg()), make_synthetic(tiny_cfg(seed=1))
    assert a.splits == b.splits
    for store in ("videos", "texts", "sentences"):
        x, y = getattr(a, store), getattr(b, store)
        assert x.keys() == y.keys()
        assert all(np.array_equal(x[k], y[k]) for k in x)
    assert not np.array_equal(a.videos["syn-v0000"], c.videos["syn-v0000"])
    assert a.splits != c.splits


def test_shapes_ids_durations_and_disjoint_splits() -> None:
    cfg = tiny_cfg()
    data = make_synthetic(cfg)
    videos_per_split = {s: {r.video_id for r in recs} for s, recs in data.splits.items()}
    assert [len(videos_per_split[s]) for s in ("train", "val", "test")] == [3, 2, 2]
    assert not (
        videos_per_split["train"] & videos_per_split["val"] or videos_per_split["val"] & videos_per_split["test"]
    )
    assert sum(len(r) for r in data.splits.values()) == 7 * cfg.queries_per_video
    for recs in data.splits.values():
        for rec in recs:
            assert re.fullmatch(r"syn-v\d{4}", rec.video_id)
            uid, idx = rec.query_id.rsplit("_", 1)  # the Ego4D "<annotation_uid>_<index>" form
            assert uid == rec.video_id.replace("syn-v", "syn-a") and idx.isdigit()
            video = data.videos[rec.video_key]
            assert video.dtype == np.float32 and video.shape[1] == cfg.video_dim
            assert rec.duration_sec == len(video) / cfg.fps  # exactly T / fps
            assert cfg.video_min_sec - 1 / cfg.fps <= rec.duration_sec <= cfg.video_max_sec + 1 / cfg.fps
            assert 0 <= rec.start_sec < rec.end_sec <= rec.duration_sec
            assert (
                cfg.moment_min_sec - 0.5 / cfg.fps <= rec.end_sec - rec.start_sec <= cfg.moment_max_sec + 0.5 / cfg.fps
            )
            text = data.texts[rec.query_key]
            assert text.dtype == np.float32 and text.shape[1] == cfg.text_dim
            assert cfg.query_min_tokens <= len(text) <= cfg.query_max_tokens
            assert len(rec.query.split()) == len(text)  # one token feature per word
            sentence = data.sentences[rec.query_key]
            assert sentence.shape == (cfg.video_dim,) and math.isclose(
                float(np.linalg.norm(sentence)), 1.0, rel_tol=1e-5
            )


def test_planted_moments_are_where_the_annotations_say() -> None:
    """Frames inside the GT project markedly higher on the query's direction A_v z than frames outside.

    Outside frames still hold other queries' moments and distractors (partial projections), and the scene content
    projects with std ``scene_scale``; a margin of half the plant strength holds for well over 90% of queries.
    """
    cfg = load_config("tiny").data.synthetic
    data = make_synthetic(cfg)
    ok = []
    for rec in [r for recs in data.splits.values() for r in recs]:
        proj = data.videos[rec.video_key] @ data.planted_direction[rec.query_id]  # (T,)
        start, stop = frames_of(rec, data.fps)
        outside = np.ones(len(proj), bool)
        outside[max(start - 1, 0) : stop + 1] = False  # the soft onset frames are neither inside nor outside
        ok.append(proj[start:stop].mean() > proj[outside].mean() + 0.5 * cfg.plant_strength)
    assert np.mean(ok) >= 0.9


def test_distractors_exist_carry_part_of_the_query_and_avoid_the_moment() -> None:
    cfg = load_config("tiny").data.synthetic
    data = make_synthetic(cfg)
    records = [r for recs in data.splits.values() for r in recs]
    counts = [len(data.distractor_spans_sec[r.query_id]) for r in records]
    assert np.mean(np.array(counts) == cfg.distractors_per_query) >= 0.95  # only a full short video skips one
    gaps_in, gaps_d = [], []
    for rec in records:
        proj = data.videos[rec.video_key] @ data.planted_direction[rec.query_id]
        start, stop = frames_of(rec, data.fps)
        for d_start_sec, d_end_sec in data.distractor_spans_sec[rec.query_id]:
            assert 0 <= d_start_sec < d_end_sec <= rec.duration_sec
            assert d_end_sec < rec.start_sec or d_start_sec > rec.end_sec  # disjoint from the GT (with a gap)
            d_start, d_stop = round(d_start_sec * data.fps), round(d_end_sec * data.fps)
            gaps_in.append(proj[start:stop].mean())
            gaps_d.append(proj[d_start:d_stop].mean())
    # A distractor carries distractor_overlap (0.5) of the plant along z: between background and the moment.
    assert np.median(gaps_in) - np.median(gaps_d) > 0.3 * cfg.plant_strength
    assert np.median(gaps_d) > 0.25 * cfg.plant_strength


def test_concepts_recorded_and_distinct_within_a_video() -> None:
    data = make_synthetic(tiny_cfg())
    for recs in data.splits.values():
        by_video: dict[str, set[frozenset[int]]] = {}
        for rec in recs:
            pair = frozenset((data.concept_of_query[rec.query_id], data.attribute_of_query[rec.query_id]))
            assert len(pair) == 2
            assert pair not in by_video.setdefault(rec.video_id, set())  # the answer is unique in its video
            by_video[rec.video_id].add(pair)


def test_frozen_similarity_is_weakly_informative() -> None:
    """Frozen max-cosine window ranking beats a random order, but is far from solving the task.

    Measured on the tiny generator with 40 test videos (160 queries) so the estimate is stable: R@1 is 0.42
    against a random 0.30 (the sentence feature is only ``alignment`` = 0.35 aligned with the video tower, and
    scene content, style, distractors and frame noise compete with the 1-2 positive windows among ~7).
    """
    cfg = tiny_cfg(num_train_videos=0, num_val_videos=0, num_test_videos=40)
    r = frozen_retrieval_recall(make_synthetic(cfg), "test", load_config("tiny").windows.length_sec, (1, 5))
    assert r["queries"] == 160
    assert r["random_R@1"] + 0.05 < r["R@1"] < 0.6
    # with perfect alignment and no nuisance or noise the same ranking is far better
    easy = dataclasses.replace(cfg, alignment=1.0, nuisance_scale=0.0, frame_noise=0.0, scene_scale=0.1)
    assert frozen_retrieval_recall(make_synthetic(easy), "test", 20.0, (1,))["R@1"] > r["R@1"] + 0.2


def test_frozen_retrieval_recall_hand_case() -> None:
    """One 10-frame video, 4-frame windows (stride 2 -> starts 0, 2, 4, 6), GT frames [4, 5): two positives."""
    fps = 1.0
    video = np.zeros((10, 3), np.float32)
    video[:, 1] = 1.0
    video[4] = [1.0, 0.0, 0.0]  # the only frame aligned with the sentence
    rec = QueryRecord("q_0", "v", "w", 4.0, 5.0, 10.0, "v", "q_0")
    data = SyntheticData(
        splits={"test": [rec]}, videos={"v": video}, texts={}, sentences={"q_0": np.array([1.0, 0, 0], np.float32)},
        fps=fps, concept_of_query={}, distractor_spans_sec={},
    )  # fmt: skip
    r = frozen_retrieval_recall(data, "test", 4.0, (1, 2, 4))
    assert r["windows_per_video"] == 4  # starts 0, 2, 4, 6: the last covers [6, 10)
    assert r["R@1"] == 1.0
    assert r["random_R@1"] == pytest.approx(2 / 4)  # windows starting at 2 and 4 overlap [4, 5)
    assert r["random_R@2"] == pytest.approx(1 - 1 / 6)  # 1 - C(2, 2) / C(4, 2)
    assert r["random_R@4"] == 1.0


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"video_dim": 20}, "video_dim"),
        ({"moment_max_sec": 500.0}, "moment_max_sec"),
        ({"queries_per_video": 1000}, "queries_per_video"),
        ({"query_min_tokens": 1}, "query_min_tokens"),
        ({"alignment": 1.5}, "alignment"),
    ],
)
def test_bad_knobs_are_named(change: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        make_synthetic(tiny_cfg(**change))


# ---------------------------------------------------------------------------------------------------------------
# Files on disk
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_same_seed_byte_identical_files(tmp_path: Path, layout: str) -> None:
    a = write_synthetic(tiny_cfg(), tmp_path / "a", layout)
    b = write_synthetic(tiny_cfg(), tmp_path / "b", layout)
    files_a, files_b = all_bytes(a), all_bytes(b)
    assert MARKER in files_a and len(files_a) >= 3
    assert files_a == files_b
    c = write_synthetic(tiny_cfg(seed=7), tmp_path / "c", layout)
    files_c = all_bytes(c)
    assert files_c.keys() == files_a.keys()
    assert all(files_c[k] != files_a[k] for k in files_a)  # annotations, features and marker all change


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_through_each_layout(tmp_path: Path, layout: str) -> None:
    from rgnet.data.dataset import open_split

    syn = tiny_cfg(layout=layout)
    data = make_synthetic(syn)
    cfg = data_cfg(tmp_path / layout, layout, syn)
    write_synthetic(syn, cfg.root, layout, data=data)
    for split in ("train", "val", "test"):
        opened = open_split(cfg, split)
        assert opened.fps == pytest.approx(data.fps)
        got = {r.query_id: r for r in opened.records}
        want = {r.query_id: r for r in data.splits[split]}
        assert got.keys() == want.keys()
        for qid, rec in want.items():
            g = got[qid]
            assert (g.video_id, g.query) == (rec.video_id, rec.query)
            assert (g.start_sec, g.end_sec, g.duration_sec) == pytest.approx(
                (rec.start_sec, rec.end_sec, rec.duration_sec)
            )
            np.testing.assert_array_equal(opened.video_slice(g.video_key, 0, opened.num_frames(g.video_key)),
                                          data.videos[rec.video_key])  # fmt: skip
            text = opened.text(g.query_key)
            want_text = data.texts[rec.query_key]
            if cfg.normalize_text:  # the reader L2-normalises tokens
                want_text = want_text / np.linalg.norm(want_text, axis=1, keepdims=True)
            np.testing.assert_allclose(text, want_text, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(opened.sentence(g.query_key).reshape(-1), data.sentences[rec.query_key],
                                       rtol=1e-6)  # fmt: skip


def test_ensure_dataset_generates_once_then_reuses(tmp_path: Path) -> None:
    root = tmp_path / "tiny"
    cfg = data_cfg(root, "native", tiny_cfg())
    assert ensure_dataset(cfg) == root
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert read_marker(root) is not None
    assert ensure_dataset(cfg) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == mtimes  # reused, nothing rewritten

    changed = dataclasses.replace(cfg, synthetic=dataclasses.replace(cfg.synthetic, seed=3))
    ensure_dataset(changed)
    marker = read_marker(root)
    assert marker is not None and marker["config"]["seed"] == 3  # a different config regenerates
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders left behind


def test_generator_never_overwrites_a_foreign_folder(tmp_path: Path) -> None:
    root = tmp_path / "real"
    root.mkdir()
    (root / "MAD_train.json").write_text("{}")
    with pytest.raises(DataError, match=r"SYNTHETIC\.json"):
        ensure_dataset(data_cfg(root, "native", tiny_cfg()))
    assert (root / "MAD_train.json").read_text() == "{}"


def test_ensure_dataset_rejects_a_config_the_reader_would_reject(tmp_path: Path) -> None:
    cfg = data_cfg(tmp_path / "x", "native", tiny_cfg())
    with pytest.raises(ConfigError, match="video_dim"):
        ensure_dataset(dataclasses.replace(cfg, video_dim=64))
    with pytest.raises(ConfigError, match="fps"):
        ensure_dataset(dataclasses.replace(cfg, layout="mad", fps=0.0))  # MAD's reader assumes 5 fps, tiny is 2


# ---------------------------------------------------------------------------------------------------------------
# The prepare job
# ---------------------------------------------------------------------------------------------------------------
def test_prepare_synthetic_then_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ego"
    small = ["data.synthetic.num_train_videos=2", "data.synthetic.num_val_videos=1", "data.synthetic.num_test_videos=1"]
    argv = ["synthetic", "--preset", "tiny", "--no-progress", "data.layout=ego4d", f"data.root={out}", *small]
    assert prepare.main(argv) == 0
    printed = capsys.readouterr().out
    assert "train: 2 videos, 8 queries" in printed and "R@1" in printed and "random" in printed
    assert prepare.main(["check", "--preset", "tiny", "data.layout=ego4d", f"data.root={out}", "data.fps=2.0"]) == 0
    assert "ok" in capsys.readouterr().out

    # corrupt one annotation: check fails with code 2 and names the file
    ann = next(p for p in out.rglob("*.json") if p.name != MARKER)
    ann.write_text(ann.read_text().replace('"clip_end_sec"', '"clip_end"', 1))
    assert prepare.main(["check", "--preset", "tiny", "data.layout=ego4d", f"data.root={out}", "data.fps=2.0"]) == 2
    assert ann.name in capsys.readouterr().err


def test_prepare_every_option_has_help() -> None:
    parser = prepare.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("synthetic", "check"):
        for action in sub.choices[name]._actions:
            assert action.help, f"{name}: {action.dest}"


@pytest.mark.parametrize(
    ("flag", "instead"),
    [
        ("--set", "give the overrides as positional key=value (e.g. data.synthetic.num_train_videos=4)"),
        ("--layout", "give data.layout=mad|ego4d|native (the layout the readers read is the one written)"),
        ("--out", "give data.root=DIR"),
        ("--seed", "give data.synthetic.seed=N"),
        ("--window-sec", "give windows.length_sec=S (the frozen retrieval diagnostic uses the training windows)"),
    ],
)
def test_prepare_flags_that_shadowed_config_keys_are_gone(
    flag: str, instead: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The one override dialect: a removed flag names the config key to give instead and exits 2 before any work."""
    with pytest.raises(SystemExit) as e:
        prepare.main(["synthetic", "--preset", "tiny", f"data.root={tmp_path / 'd'}", flag, "x"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == f"rgnet prepare synthetic: error: {flag} was removed: {instead}"
    assert not (tmp_path / "d").exists()
