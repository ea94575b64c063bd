"""`rgnet predict`: one query on a video of any length, its bad inputs, and the raw-text path (no Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import save_tiny_checkpoint

from pipelines import predict as predict_cli
from pipelines.runtime import resolve_paths
from rgnet.config import Config, load_config
from rgnet.data.synthetic import ensure_configured_dataset
from rgnet.model import build_model
from rgnet.predict import FeatureSource, ground, read_features
from rgnet.span_ops import pairwise_iou
from rgnet.train.checkpoint import make_payload, save_checkpoint
from rgnet.train.loop import seed_everything

ROOT = Path(__file__).resolve().parent.parent
# The documented bound for `rgnet predict` on a 3-hour video at 5 fps with 512-d features (README, "Predict"):
# the features (110 MB), torch itself and the bounded window chunks.
THREE_HOUR_PEAK_RSS_MIB = 1536


def tiny_cfg(tmp: Path, *extra: str) -> Config:
    return resolve_paths(
        load_config(
            "tiny",
            overrides=[f"data.root={tmp / 'data'}", f"train.output_dir={tmp / 'runs'}", "train.progress=false", *extra],
        )
    )


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Path]:
    """The tiny preset's data and a seeded (untrained) tiny model saved as a checkpoint."""
    tmp = tmp_path_factory.mktemp("predict")
    cfg = tiny_cfg(tmp)
    return cfg, save_tiny_checkpoint(cfg, tmp / "tiny.pt")


def features(cfg: Config) -> Path:
    return Path(cfg.data.root) / "features.h5"


def test_moments_are_inside_the_video_sorted_and_nms_ed(tiny_model: tuple[Config, Path]) -> None:
    cfg, _ = tiny_model
    cfg = replace(cfg, eval=replace(cfg.eval, nms_iou=0.2))  # strict enough that this untrained model's spans clash
    seed_everything(1)
    model = build_model(cfg.model, cfg.data.video_dim, cfg.data.text_dim).eval()
    rng = np.random.default_rng(0)
    frames = rng.standard_normal((301, cfg.data.video_dim)).astype(np.float32)  # 150.5 s at 2 fps
    tokens = rng.standard_normal((6, cfg.data.text_dim)).astype(np.float32)
    answer = ground(model, cfg, frames, 2.0, tokens, video="v", query="q", top_n=8)
    moments = np.array(answer.moments)
    assert 1 <= len(moments) <= 8
    assert answer.duration_sec == pytest.approx(150.5)
    assert (moments[:, 0] >= 0).all() and (moments[:, 1] <= 150.5).all() and (moments[:, 0] <= moments[:, 1]).all()
    assert (np.diff(moments[:, 2]) <= 0).all()  # best first
    iou = pairwise_iou(torch.tensor(moments[:, :2]), torch.tensor(moments[:, :2])).numpy()
    np.fill_diagonal(iou, 0.0)
    assert iou.max() <= cfg.eval.nms_iou + 1e-9  # NMS: no two kept moments overlap more than eval.nms_iou
    # without NMS the decoder's raw spans do overlap more: the check above is not vacuous
    raw = ground(model, replace(cfg, eval=replace(cfg.eval, nms_iou=1.0)), frames, 2.0, tokens, top_n=50)
    raw_se = torch.tensor(np.array(raw.moments)[:, :2])
    raw_iou = pairwise_iou(raw_se, raw_se).numpy()
    np.fill_diagonal(raw_iou, 0.0)
    assert raw_iou.max() > cfg.eval.nms_iou
    # the windows are ranked, every window once
    assert len(answer.windows) == len(answer.bounds)
    assert [w[2] for w in answer.windows] == sorted((w[2] for w in answer.windows), reverse=True)


def test_cli_one_query_table_json_and_plot(tiny_model: tuple[Config, Path], tmp_path: Path, capsys) -> None:
    cfg, ckpt = tiny_model
    f = features(cfg)
    out = tmp_path / "answer.json"
    rc = predict_cli.main(
        [
            "--checkpoint",
            str(ckpt),
            "--video",
            f"{f}:videos/syn-v0016",
            "--query-features",
            f"{f}:queries/syn-a0016_0",
            "--query",
            "last how biba duba is",
            "--top",
            "4",
            "--json",
            str(out),
            "--plot-dir",
            str(tmp_path / "plots"),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "rank" in printed and "start (s)" in printed
    answer = json.loads(out.read_text())
    assert answer["video"] == "syn-v0016" and answer["fps"] == 2.0 and len(answer["moments"]) == 4
    assert [m["rank"] for m in answer["moments"]] == [1, 2, 3, 4]
    assert all(0 <= m["start_sec"] <= m["end_sec"] <= answer["duration_sec"] for m in answer["moments"])
    png = Path(answer["plot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--video", "{f}:videos/syn-v9999", "--query-features", "{f}:queries/syn-a0016_0"],
            "record 'videos/syn-v9999', field 'key': no video features under key",
        ),
        (
            ["--video", "{f}:queries/syn-a0016_0", "--query-features", "{f}:queries/syn-a0016_0"],
            "field 'shape': video features 'queries/syn-a0016_0' have shape (5, 48), but this model expects "
            "(T, D) with D = 32",
        ),
        (
            ["--video", "{f}:videos/syn-v0016", "--query-features", "{f}:videos/syn-v0016"],
            "field 'shape': text features 'videos/syn-v0016' have shape",
        ),
        (["--video", "{f}:videos/syn-v0016", "--query", "   "], "the query is empty"),
        (
            ["--video", "{f}:videos/syn-v0016", "--query", "a person walks"],
            "this model reads precomputed 48-d query token features",
        ),
        (["--video", "{f}", "--query-features", "{f}:queries/syn-a0016_0"], "datasets"),
        (["--video", "/nonexistent/features.h5:movie", "--query", "x"], "video feature file not found"),
    ],
)
def test_bad_input_is_a_clear_error(tiny_model: tuple[Config, Path], capsys, args: list[str], message: str) -> None:
    cfg, ckpt = tiny_model
    f = str(features(cfg))
    rc = predict_cli.main(["--checkpoint", str(ckpt), *[a.format(f=f) for a in args]])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err, err
    assert "Traceback" not in err


def test_a_model_uri_that_does_not_exist(tiny_model: tuple[Config, Path], tmp_path: Path, capsys) -> None:
    cfg, _ = tiny_model
    f = features(cfg)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = predict_cli.main(
        [
            "--model-uri",
            "runs:/0123456789abcdef/model",
            "--tracking-uri",
            store,
            "--video",
            f"{f}:videos/syn-v0016",
            "--query",
            "x",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "cannot download runs:/0123456789abcdef/model" in err, err
    rc = predict_cli.main(["--checkpoint", str(tmp_path / "missing.pt"), "--video", f"{f}:videos/syn-v0016"])
    err = capsys.readouterr().err
    assert rc == 2 and "missing.pt does not exist" in err, err


def test_feature_sources(tmp_path: Path) -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "a.npy", arr)
    torch.save({"clip": torch.from_numpy(arr)}, tmp_path / "b.pt")
    with h5py.File(tmp_path / "c.h5", "w") as fh:
        fh.create_dataset("movie/one", data=arr).attrs["fps"] = 5.0
    for spec in (f"{tmp_path}/a.npy", f"{tmp_path}/b.pt:clip", f"{tmp_path}/c.h5:movie/one", f"{tmp_path}/c.h5"):
        got, _, _ = read_features(FeatureSource.parse(spec), kind="video", dim=4)
        np.testing.assert_array_equal(got, arr)
    assert read_features(FeatureSource.parse(f"{tmp_path}/c.h5"), kind="video", dim=4)[2] == 5.0
    arr[1, 2] = np.nan
    np.save(tmp_path / "bad.npy", arr)
    with pytest.raises(ValueError, match="contain NaN or Inf"):
        read_features(FeatureSource.parse(f"{tmp_path}/bad.npy"), kind="video", dim=4)
    with pytest.raises(ValueError, match="holds a dict of tensors: say which one"):
        read_features(FeatureSource.parse(f"{tmp_path}/b.pt"), kind="video", dim=4)


@pytest.mark.slow
def test_three_hour_video_has_bounded_memory(tmp_path: Path) -> None:
    """A 3-hour video at 5 fps (54,000 x 512 features) in a fresh process: peak RSS under the documented bound."""
    cfg = tiny_cfg(tmp_path, "data.video_dim=512", "data.fps=5", "windows.length_sec=180")
    seed_everything(0)
    model = build_model(cfg.model, cfg.data.video_dim, cfg.data.text_dim)
    ckpt = save_checkpoint(make_payload(model, cfg, epoch=0, global_step=0), tmp_path / "m.pt")
    frames = 3 * 3600 * 5
    with h5py.File(tmp_path / "movie.h5", "w") as fh:
        ds = fh.create_dataset("movie", shape=(frames, 512), dtype="float32")
        rng = np.random.default_rng(0)
        for a in range(0, frames, 6000):
            ds[a : a + 6000] = rng.standard_normal((min(6000, frames - a), 512), dtype=np.float32)
    np.save(tmp_path / "q.npy", rng.standard_normal((10, cfg.data.text_dim), dtype=np.float32))
    script = textwrap.dedent(f"""
        import json, resource, sys
        from pipelines.predict import main
        rc = main(["--checkpoint", {str(ckpt)!r}, "--video", {str(tmp_path / "movie.h5")!r} + ":movie",
                   "--query-features", {str(tmp_path / "q.npy")!r}, "--json", {str(tmp_path / "a.json")!r}])
        print("PEAK_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        sys.exit(rc)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak_mib = int(proc.stdout.split("PEAK_KIB")[1].split()[0]) / 1024
    answer = json.loads((tmp_path / "a.json").read_text())
    assert answer["duration_sec"] == pytest.approx(10800.0)
    assert all(0 <= m["start_sec"] <= m["end_sec"] <= 10800.0 for m in answer["moments"])
    assert peak_mib < THREE_HOUR_PEAK_RSS_MIB, f"peak RSS {peak_mib:.0f} MiB"


@pytest.mark.slow
def test_a_model_trained_with_the_text_encoder_takes_raw_text(tmp_path: Path, capsys) -> None:
    """data.text_encoder=minilm: the split's sentences are encoded once (cached), training runs on them, and
    `rgnet predict --query "..."` encodes raw text the same way."""
    from rgnet.data.dataset import open_split
    from rgnet.text import cache_path
    from rgnet.train.run import train_local

    cfg = tiny_cfg(tmp_path, "data.text_encoder=minilm", "data.text_dim=384", "train.epochs=1")
    ensure_configured_dataset(cfg.data)
    val = open_split(cfg.data, "val")
    cache = cache_path(cfg.data.root, "minilm", "val")
    assert cache.is_file() and val.text(val.records[0].query_key).shape[1] == 384
    stamp = cache.stat().st_mtime_ns
    open_split(cfg.data, "val").close()
    assert cache.stat().st_mtime_ns == stamp  # reused, not re-encoded
    train_local(cfg, test=False)
    best = Path(cfg.train.output_dir) / cfg.train.run_name / "best.pt"
    rec = val.records[0]
    capsys.readouterr()  # the training log
    rc = predict_cli.main(
        [
            "--checkpoint",
            str(best),
            "--video",
            f"{features(cfg)}:videos/{rec.video_key}",
            "--query",
            rec.query,
            "--json",
            "-",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    answer = json.loads(out.out)
    assert answer["query"] == rec.query and 1 <= len(answer["moments"]) <= 10
    # the dimension rule is checked up front
    with pytest.raises(ValueError, match="data.text_encoder=minilm gives 384-d token features"):
        open_split(tiny_cfg(tmp_path, "data.text_encoder=minilm").data, "val")


@pytest.mark.parametrize("key", ["a", "uid/0", "x.y", ".hidden", "50%/2", "%2F"])
def test_query_keys_survive_the_hdf5_name_escape(key: str) -> None:
    from rgnet.text import escape_key, unescape_key

    name = escape_key(key)
    assert "/" not in name and not name.startswith(".")
    assert unescape_key(name) == key
