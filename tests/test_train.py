"""Local training, checkpoints, resume and two-stage inference on the tiny synthetic preset (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipelines import evaluate as evaluate_cli
from rgnet.config import load_config
from rgnet.data.dataset import open_split
from rgnet.data.samples import iter_videos
from rgnet.eval.inference import infer_video
from rgnet.model import build_model
from rgnet.train import checkpoint as ckpt
from rgnet.train.loop import evaluate_model, seed_everything
from rgnet.train.run import train_local


def tiny(tmp_path, *overrides: str):
    return load_config(
        "tiny",
        overrides=[
            f"data.root={tmp_path / 'data'}",
            f"train.output_dir={tmp_path / 'runs'}",
            "train.progress=false",
            *overrides,
        ],
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    cfg = tiny(tmp)
    reports = train_local(cfg, test=False)
    return cfg, reports


@pytest.mark.slow  # the `trained` fixture trains for about 15 s
def test_training_learns(trained) -> None:
    cfg, reports = trained
    run_dir = cfg.train.output_dir + "/" + cfg.train.run_name
    history = json.loads(Path(f"{run_dir}/history.json").read_text())
    for png in ("loss.png", "val.png"):  # the per-epoch curves of a local run
        assert Path(f"{run_dir}/plots/{png}").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert history[-1]["loss"] < 0.8 * history[0]["loss"]
    seed_everything(cfg.train.seed)
    untrained = build_model(cfg.model, cfg.data.video_dim, cfg.data.text_dim)
    val = open_split(cfg.data, cfg.data.val_split)
    base, _ = evaluate_model(untrained, val, cfg.windows, cfg.eval, torch.device("cpu"))
    trained_m = reports["val"]["metrics"]
    assert trained_m["R1@0.3"] > base["metrics"]["R1@0.3"]


@pytest.mark.slow
def test_checkpoint_round_trip_and_cli_evaluate(trained, tmp_path) -> None:
    cfg, reports = trained
    best = f"{cfg.train.output_dir}/{cfg.train.run_name}/best.pt"
    model, cfg2 = ckpt.load_model(best)
    assert cfg2.model == cfg.model
    out = tmp_path / "report.json"
    assert evaluate_cli.main(["--checkpoint", best, "--split", "val", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["metrics"] == reports["val"]["metrics"]
    # save -> load -> identical outputs
    path = ckpt.save_checkpoint(ckpt.make_payload(model, cfg, epoch=1, global_step=5), tmp_path / "c.pt")
    again, _ = ckpt.load_model(path)
    item = next(iter_videos(open_split(cfg.data, cfg.data.val_split), cfg.windows))
    rows_a, _ = infer_video(model, item, cfg.eval, torch.device("cpu"))
    rows_b, _ = infer_video(again, item, cfg.eval, torch.device("cpu"))
    assert [r.predictions for r in rows_a] == [r.predictions for r in rows_b]


@pytest.mark.slow
def test_predictions_are_valid(trained) -> None:
    cfg, _ = trained
    model, _ = ckpt.load_model(f"{cfg.train.output_dir}/{cfg.train.run_name}/best.pt")
    for item in iter_videos(open_split(cfg.data, cfg.data.val_split), cfg.windows):
        rows, scores = infer_video(model, item, cfg.eval, torch.device("cpu"))
        assert scores.context_logit.shape == (len(item.records), len(item.bounds))
        for row in rows:
            p = torch.tensor(row.predictions)
            assert len(p) >= 1
            assert (p[:, 0] >= 0).all() and (p[:, 1] <= item.duration_sec + 1e-6).all() and (p[:, 0] <= p[:, 1]).all()
            assert (p[:-1, 2] >= p[1:, 2]).all()  # sorted by score


@pytest.mark.slow
def test_decoder_sees_only_top_k(trained) -> None:
    """Decoder work is top_k windows per query, whatever the number of windows or the chunk size."""
    cfg, _ = trained
    model, _ = ckpt.load_model(f"{cfg.train.output_dir}/{cfg.train.run_name}/best.pt")
    item = next(iter_videos(open_split(cfg.data, cfg.data.val_split), cfg.windows))
    seen: list[int] = []
    orig = model.decode
    model.decode = lambda enc, select=None: (seen.append(enc.memory.shape[0]), orig(enc, select))[1]  # type: ignore
    rows_small, _ = infer_video(
        model, item, cfg.eval.__class__(**{**cfg.eval.__dict__, "window_chunk": 1}), torch.device("cpu")
    )
    decoded_small, seen[:] = sum(seen), []
    rows_big, _ = infer_video(model, item, cfg.eval, torch.device("cpu"))
    k = min(cfg.eval.top_k_windows, len(item.bounds))
    # the decoder runs in passes that bound its memory; in all, it decodes exactly k windows per query
    assert decoded_small == sum(seen) == k * len(item.records)
    for a, b in zip(rows_small, rows_big):  # chunking changes nothing
        assert torch.allclose(torch.tensor(a.predictions), torch.tensor(b.predictions), atol=1e-5)


def test_resume_continues_at_the_right_step(tmp_path) -> None:
    cfg = tiny(tmp_path, "train.epochs=2")
    train_local(cfg, test=False)
    last = ckpt.load_checkpoint(tmp_path / "runs" / cfg.train.run_name / "last.pt")
    assert last["epoch"] == 2
    steps_per_epoch = last["global_step"] // 2
    cfg3 = tiny(tmp_path, "train.epochs=3")
    train_local(cfg3, test=False)
    history = json.loads(Path(tmp_path / "runs" / cfg.train.run_name / "history.json").read_text())
    assert [h["epoch"] for h in history] == [3]  # only the new epoch ran
    resumed = ckpt.load_checkpoint(tmp_path / "runs" / cfg.train.run_name / "last.pt")
    assert resumed["epoch"] == 3 and resumed["global_step"] == 3 * steps_per_epoch
