"""`rgnet bench` inference rows (in process, tiny sizes): per-Q latency, FLOPs per query, floor and the table."""

from __future__ import annotations

import pytest
import torch

from pipelines import bench


@pytest.mark.slow
def test_inference_rows_count_flops_per_query_and_the_floor() -> None:
    args = bench.build_parser().parse_args([*_tiny(), "--queries", "4", "1", "--repeats", "2"])
    cfg = bench.bench_config(args.preset, args.overrides)
    torch.set_num_threads(1)
    # 2 minutes at 5 fps = 600 frames, windows of 40 at stride 20: 29 windows
    r = bench.bench_infer(bench.sizes(args), cfg, 2.0, 40)
    assert (r["frames"], r["windows"], r["top_k"]) == (600, 29, 29)
    assert [row["queries"] for row in r["by_queries"]] == [1, 4]  # ascending
    assert [row["runs"] for row in r["by_queries"]] == [2, 1]  # repeats at Q = 1 only
    flops, peak = r["flops"], r["matmul_peak"]
    assert flops["project"] > 0 and flops["encode"] > 10 * flops["project"] and flops["decode"] > 0
    assert peak["flops_per_s"] == max(v for k, v in peak.items() if k != "flops_per_s")
    for row in r["by_queries"]:
        q = row["queries"]
        assert row["flops_per_query"] == pytest.approx(flops["project"] / q + flops["encode"] + flops["decode"])
        assert row["latency_per_query_s"] == pytest.approx(row["total_s"] / q)
        assert row["queries_per_s"] == pytest.approx(q / row["total_s"])
        assert row["floor_per_query_s"] == pytest.approx(row["flops_per_query"] / peak["flops_per_s"])
        assert row["latency_over_floor"] == pytest.approx(row["latency_per_query_s"] / row["floor_per_query_s"])
        assert row["latency_over_floor"] > 1.0  # nothing beats the measured peak
        assert row["predictions"] >= 1 and row["peak_rss_gib"] > 0
    # the encoder FLOPs per query grow with the number of windows (a longer video)
    longer = bench.bench_infer(
        bench.sizes(bench.build_parser().parse_args([*_tiny(), "--queries", "1", "--repeats", "1"])), cfg, 4.0, 40
    )
    assert longer["windows"] == 59
    assert longer["flops"]["encode"] == pytest.approx(flops["encode"] * 59 / 29, rel=0.05)
    table = bench.inference_table([r, longer])
    assert table.count("\n| 40 | ") == 3 and "| 40 | 2 min | 29 | 4 |" in table
    assert "Floor = FLOPs / matmul peak (fp32" in table


@pytest.mark.slow
def test_training_rows_time_real_steps_and_count_their_flops() -> None:
    """`rgnet bench` without --no-train: full optimizer steps through rgnet.train.loop.train_step on a batch in the
    layout the data pipeline delivers (a change of that layout breaks this test, not only the benchmark)."""
    tiny = ["--preset", "tiny", "--feature-dim", "32", "train.threads=1", "train.batch_size=4", "--peak-seconds", "0.2"]
    args = bench.build_parser().parse_args([*tiny, "--train-steps", "1", "--window-frames", "40"])
    cfg = bench.bench_config(args.preset, args.overrides)
    torch.set_num_threads(1)
    r = bench.bench_train(bench.sizes(args), cfg)
    assert (r["batch_queries"], r["pairs_per_step"], r["window_frames"]) == (4, 16, 40)
    assert r["step_seconds"] > 0 and r["window_pairs_per_s"] == pytest.approx(16 / r["step_seconds"])
    assert r["flops_per_step"] > 0 and 0 < r["fraction_of_matmul_peak"] < 1
    assert r["num_parameters"] > 0


def _tiny() -> list[str]:
    return ["--preset", "tiny", "--feature-dim", "32", "train.threads=1", "--peak-seconds", "0.2"]


def test_bench_config_reads_the_keys_the_flags_shadowed() -> None:
    """The benchmark's settings are config keys: its defaults, then positional key=value; the model is full-size
    RGNet unless --preset."""
    cfg = bench.bench_config()
    assert (cfg.eval.top_k_windows, cfg.train.batch_size, cfg.train.device, cfg.data.fps) == (30, 8, "cpu", 5.0)
    assert (cfg.model.hidden_dim, cfg.model.decoder_layers, cfg.eval.kernels) == (256, 6, "fused")
    over = ["eval.top_k_windows=10", "eval.window_chunk=64", "eval.kernels=eager", "train.batch_size=4"]
    cfg = bench.bench_config("tiny", over)
    assert (cfg.eval.top_k_windows, cfg.eval.window_chunk, cfg.eval.kernels, cfg.train.batch_size) == (
        10,
        64,
        "eager",
        4,
    )
    assert cfg.model == bench.bench_config("tiny").model != bench.bench_config().model


@pytest.mark.parametrize(("flag", "key"), sorted(bench.REMOVED_FLAGS.items()))
def test_removed_bench_flags_name_the_key(flag: str, key: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A flag that shadowed a config key exits 2 with one line naming the key, before anything runs."""
    with pytest.raises(SystemExit) as e:
        bench.main(["--no-train", flag, "1"])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"rgnet bench: error: {flag} was removed: give {key}=VALUE instead\n"


def test_a_bad_bench_override_fails_before_any_child(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--no-train", "eval.top_k_window=3"]) == 2
    assert "eval.top_k_window" in capsys.readouterr().err
