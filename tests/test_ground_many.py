"""Many queries per video: `ground_many` against one `ground` call per query, the query groups that bound memory,
the plain two-stage reference, `rgnet predict --queries` and its bad inputs, and peak memory independent of Q."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import save_tiny_checkpoint

from pipelines import predict as predict_cli
from pipelines.runtime import resolve_paths
from rgnet.config import Config, load_config
from rgnet.data.samples import gather_windows, pad_texts
from rgnet.data.windows import window_bounds
from rgnet.eval.inference import query_groups
from rgnet.model import build_model
from rgnet.predict import WindowSpec, ground, ground_many, prepare_tokens
from rgnet.train.checkpoint import make_payload, save_checkpoint
from rgnet.train.loop import seed_everything

ROOT = Path(__file__).resolve().parent.parent


def tiny_cfg(tmp: Path, *extra: str) -> Config:
    return resolve_paths(
        load_config(
            "tiny",
            overrides=[f"data.root={tmp / 'data'}", f"train.output_dir={tmp / 'runs'}", "train.progress=false", *extra],
        )
    )


def random_queries(cfg: Config, n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((int(rng.integers(2, 10)), cfg.data.text_dim)).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("window_chunk", [256, 12])
def test_ground_many_equals_one_ground_call_per_query(tmp_path: Path, window_chunk: int) -> None:
    """With the default chunk the 7 queries share every encoder pass; with 12 they go in 4 groups of at most
    12 // 3 = 4 ... 2 queries and 6 windows per pass.  Either way each answer is the single query's."""
    cfg = tiny_cfg(tmp_path, "eval.top_k_windows=3", f"eval.window_chunk={window_chunk}")
    seed_everything(0)
    model = build_model(cfg.model, cfg.data.video_dim, cfg.data.text_dim).eval()
    rng = np.random.default_rng(1)
    frames = rng.standard_normal((263, cfg.data.video_dim)).astype(np.float32)  # 131.5 s at 2 fps: 12 windows
    tokens = random_queries(cfg, 7)
    names = [f"q{i}" for i in range(7)]
    many = ground_many(model, cfg, frames, 2.0, tokens, video="v", queries=names, top_n=6)
    assert [a.query for a in many] == names
    for i, answer in enumerate(many):
        one = ground(model, cfg, frames, 2.0, tokens[i], video="v", query=names[i], top_n=6)
        assert len(answer.moments) == len(one.moments) >= 1
        np.testing.assert_allclose(np.array(answer.moments), np.array(one.moments), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(answer.scores.context_logit, one.scores.context_logit, rtol=1e-5, atol=1e-5)
        assert [w[:2] for w in answer.windows] == [w[:2] for w in one.windows]
    # the queries are not all alike: the comparison above is not vacuous
    assert len({tuple(a.moments[0]) for a in many}) > 1


@pytest.mark.parametrize("kernels", ["eager", "fused"])
def test_inference_equals_the_plain_two_stage_reference(tmp_path: Path, kernels: str) -> None:
    """Projecting the video once, grouping queries and chunking windows change nothing: every window's context
    score equals model.encode on that (query, raw window) pair alone."""
    cfg = tiny_cfg(tmp_path, "eval.top_k_windows=2", "eval.window_chunk=5", f"eval.kernels={kernels}")
    seed_everything(2)
    model = build_model(cfg.model, cfg.data.video_dim, cfg.data.text_dim).eval()
    rng = np.random.default_rng(3)
    frames = rng.standard_normal((211, cfg.data.video_dim)).astype(np.float32)  # the last window is padded
    tokens = random_queries(cfg, 5, seed=4)
    answers = ground_many(model, cfg, frames, 2.0, tokens)
    spec = WindowSpec.from_config(cfg.windows, 2.0)
    bounds = window_bounds(len(frames), spec.length, spec.stride)
    windows, mask = gather_windows(torch.from_numpy(frames), bounds, spec.length)
    assert not bool(mask.all())
    with torch.no_grad():
        for i, t in enumerate(tokens):
            text, text_mask = pad_texts([prepare_tokens(t, cfg.data.max_query_tokens, cfg.data.normalize_text)])
            p = len(bounds)
            enc = model.encode(windows, mask, text, text_mask, torch.arange(p), torch.zeros(p, dtype=torch.long))
            tol = 1e-5 if kernels == "eager" else 1e-4
            np.testing.assert_allclose(answers[i].scores.context_logit[0], enc.context_logit, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    ("q", "k", "chunk", "per_pass"),
    [(1, 5, 256, 32), (64, 30, 256, 32), (64, 30, 256, 10), (9, 30, 256, 32), (300, 1, 256, 256), (5, 300, 8, 8)],
)
def test_query_groups_bound_the_kept_pairs(q: int, k: int, chunk: int, per_pass: int) -> None:
    groups = query_groups(q, k, chunk, per_pass)
    assert [i for g in groups for i in g] == list(range(q))  # every query once, in order
    assert all(len(g) * k <= max(chunk, k) for g in groups)  # kept top-k encodings <= window_chunk pairs
    assert all(len(g) <= per_pass for g in groups)  # one window per query fits a pass
    assert max(map(len, groups)) - min(map(len, groups)) <= 1  # balanced
    assert len(groups) == -(-q // max(1, min(chunk // k, per_pass)))  # no more groups than needed


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Path]:
    tmp = tmp_path_factory.mktemp("many")
    cfg = tiny_cfg(tmp)
    return cfg, save_tiny_checkpoint(cfg, tmp / "tiny.pt")


def test_cli_queries_file_gives_one_json_line_per_query(tiny_model: tuple[Config, Path], tmp_path: Path, capsys):
    cfg, ckpt = tiny_model
    f = Path(cfg.data.root) / "features.h5"
    queries = tmp_path / "queries.jsonl"
    keys = ["syn-a0016_0", "syn-a0016_1", "syn-a0017_0"]
    lines = [{"id": f"id-{i}", "query_features": f"{f}:queries/{k}"} for i, k in enumerate(keys)]
    lines[1]["query"] = "a label for the features"
    queries.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")  # a trailing blank line is skipped
    out = tmp_path / "answers.jsonl"
    video = f"{f}:videos/syn-v0016"
    rc = predict_cli.main(["--checkpoint", str(ckpt), "--video", video, "--queries", str(queries), "--top", "3"])
    assert rc == 0
    assert "[id-0]" in capsys.readouterr().out
    plots = tmp_path / "plots"
    args = ["--queries", str(queries), "--top", "3", "--json", str(out), "--plot-dir", str(plots)]
    assert predict_cli.main(["--checkpoint", str(ckpt), "--video", video, *args]) == 0
    capsys.readouterr()
    answers = [json.loads(x) for x in out.read_text().splitlines()]
    assert [a["id"] for a in answers] == ["id-0", "id-1", "id-2"]
    assert len({a["plot"] for a in answers}) == 3  # one timeline per query, named by its id
    assert all(Path(a["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for a in answers)
    assert answers[1]["query"] == "a label for the features"
    for key, answer in zip(keys, answers):
        single = tmp_path / f"{key}.json"
        args = ["--video", video, "--query-features", f"{f}:queries/{key}", "--top", "3", "--json", str(single)]
        assert predict_cli.main(["--checkpoint", str(ckpt), *args]) == 0
        want = json.loads(single.read_text())
        assert set(answer) == {"id", "plot", *want}  # the fields --json writes for one query, plus the id (and plot)
        got_m = [[m["start_sec"], m["end_sec"], m["score"]] for m in answer["moments"]]
        want_m = [[m["start_sec"], m["end_sec"], m["score"]] for m in want["moments"]]
        np.testing.assert_allclose(got_m, want_m, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"id": 1, "query_features": "{f}:queries/syn-a0016_0"}\n{"id": 2, "query": }\n', "line 2: not JSON"),
        ('{"id": 1, "query_features": "{f}:queries/syn-a0016_0"}\n{"id": 2}\n', "line 2: has neither 'query' nor"),
        ('{"id": 1, "query_features": "{f}:queries/nope"}\n', "line 1, field 'query_features': "),
        ("", "holds no queries"),
        ("\n  \n", "holds no queries"),
        ('["a list"]\n', "line 1: a JSON list, not an object"),
        ('{"id": 1, "query": "a sentence"}\n', "line 1, field 'query': this model reads precomputed 48-d"),
        ('{"id": "a", "query_features": "{f}:queries/syn-a0016_0"}\n{"id": "a", "query": "x"}\n', "already used"),
    ],
)
def test_bad_queries_file_is_one_clear_error(
    tiny_model: tuple[Config, Path], tmp_path: Path, capsys, content: str, message: str
) -> None:
    cfg, ckpt = tiny_model
    f = Path(cfg.data.root) / "features.h5"
    queries = tmp_path / "queries.jsonl"
    queries.write_text(content.replace("{f}", str(f)))
    rc = predict_cli.main(["--checkpoint", str(ckpt), "--video", f"{f}:videos/syn-v0016", "--queries", str(queries)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"{queries}" in err and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    if "nope" in content:
        assert "no text features under key 'queries/nope'" in err, err  # the features file's own error, kept


def _peak_rss_mib(tmp: Path, ckpt: Path, movie: Path, num_queries: int) -> float:
    """Peak RSS of a fresh process that grounds ``num_queries`` queries on ``movie`` with ground_many."""
    script = textwrap.dedent(f"""
        import resource
        import numpy as np, torch
        from rgnet.predict import ground_many
        from rgnet.train.checkpoint import load_checkpoint, model_from_payload
        torch.set_num_threads(1)
        model, cfg = model_from_payload(load_checkpoint({str(ckpt)!r}))
        frames = np.load({str(movie)!r})
        rng = np.random.default_rng(0)
        tokens = [rng.standard_normal((8, cfg.data.text_dim)).astype(np.float32) for _ in range({num_queries})]
        answers = ground_many(model, cfg, frames, 2.0, tokens, top_n=5)
        assert len(answers) == {num_queries}
        print("PEAK_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split("PEAK_KIB")[1].split()[0]) / 1024


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_number_of_queries(tmp_path: Path) -> None:
    """A 1-hour video (39 windows of 3 minutes), top-18, at most 36 pairs held at once: keeping every query's 18
    encoded windows at once would take 32 x 18 x 360 frames x 32 floats = 27 MB more at Q = 32 than at Q = 1, plus
    the running top-k's copies (the inference before query groups peaked 257 MB higher at Q = 32: measured); the
    groups keep 2 queries' windows at a time, and each encoder pass holds the same number of pairs at any Q."""
    cfg = tiny_cfg(tmp_path, "windows.length_sec=180", "eval.top_k_windows=18", "eval.window_chunk=36")
    seed_everything(0)
    model = build_model(cfg.model, cfg.data.video_dim, cfg.data.text_dim)
    ckpt = save_checkpoint(make_payload(model, cfg, epoch=0, global_step=0), tmp_path / "m.pt")
    movie = tmp_path / "movie.npy"
    np.save(movie, np.random.default_rng(0).standard_normal((3600 * 2, cfg.data.video_dim)).astype(np.float32))
    one = _peak_rss_mib(tmp_path, ckpt, movie, 1)
    many = _peak_rss_mib(tmp_path, ckpt, movie, 32)
    print(f"peak RSS {one:.1f} MiB at Q = 1, {many:.1f} MiB at Q = 32")
    assert many - one < 20, f"peak RSS {one:.0f} MiB at Q = 1, {many:.0f} MiB at Q = 32"


def test_fused_copy_is_a_cached_inference_copy(tmp_path: Path) -> None:
    """eval.kernels=fused runs a copy; the copy follows the model's weights when they change."""
    from rgnet.model.fused import inference_model

    cfg = tiny_cfg(tmp_path)
    seed_everything(0)
    model = build_model(cfg.model, cfg.data.video_dim, cfg.data.text_dim).eval()
    cpu = torch.device("cpu")
    fused = inference_model(model, cfg.eval, cpu)
    assert fused is not model and inference_model(model, cfg.eval, cpu) is fused
    assert inference_model(model, replace(cfg.eval, kernels="eager"), cpu) is model
    assert not any(isinstance(m, torch.nn.Linear) for m in fused.modules())
    assert not any(p.requires_grad for p in fused.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the model itself is untouched
    frames = np.random.default_rng(0).standard_normal((101, cfg.data.video_dim)).astype(np.float32)
    tokens = random_queries(cfg, 1)
    before = ground_many(model, cfg, frames, 2.0, tokens)[0].scores.context_logit
    with torch.no_grad():
        model.context_head.weight.mul_(-1.0)  # type: ignore[union-attr]
    assert inference_model(model, cfg.eval, cpu) is not fused
    after = ground_many(model, cfg, frames, 2.0, tokens)[0].scores.context_logit
    np.testing.assert_allclose(after, -before, rtol=1e-4, atol=1e-4)
