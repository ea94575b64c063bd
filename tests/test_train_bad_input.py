"""`rgnet train` (distributed) refuses bad input before Ray or any worker starts, with a message that says why."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from pipelines import runtime, trainer
from pipelines import train as train_cli
from rgnet.config import load_config
from rgnet.data.dataset import open_split
from rgnet.data.records import DataError


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fails the test if the driver gets as far as starting or joining Ray."""
    calls: list[str] = []

    def init_ray(cfg: object) -> bool:
        calls.append("init_ray")
        raise AssertionError("Ray was started for bad input")

    monkeypatch.setattr(trainer, "init_ray", init_ray)
    return calls


def argv(tmp: Path, *extra: str) -> list[str]:
    return [
        "--preset",
        "tiny",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        f"data.root={tmp / 'data'}",
        f"train.output_dir={tmp / 'runs'}",
        f"ray.storage_path={tmp / 'ray_results'}",
        *extra,
    ]


def test_missing_dataset(tmp_path: Path, no_ray: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    cfg = load_config("tiny", overrides=[f"data.root={tmp_path / 'data'}"])
    with pytest.raises(DataError) as expected:
        open_split(cfg.data, cfg.data.train_split)
    assert train_cli.main(argv(tmp_path, "data.generate_if_missing=false")) == 2
    err = capsys.readouterr().err
    assert f"error: {expected.value}" in err  # the reader's own message, naming the missing file
    assert not (tmp_path / "mlflow.db").exists()  # nothing was tracked for a run that never started


def test_malformed_annotations(tmp_path: Path, no_ray: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from rgnet.data.synthetic import ensure_dataset

    cfg = load_config("tiny", overrides=[f"data.root={tmp_path / 'data'}"])
    ensure_dataset(cfg.data)
    ann = tmp_path / "data" / "val.jsonl"  # the native layout's {split}.jsonl
    lines = ann.read_text().splitlines()
    row = json.loads(lines[2])
    row["end_sec"] = "soon"
    lines[2] = json.dumps(row)
    ann.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as expected:
        open_split(cfg.data, cfg.data.val_split)
    assert (
        str(ann) in str(expected.value)
        and "'end_sec'" in str(expected.value)
        and row["query_id"] in str(expected.value)
    )
    assert train_cli.main(argv(tmp_path)) == 2
    assert f"error: {expected.value}" in capsys.readouterr().err


@pytest.mark.slow  # waits out the tracking probe's timeout (pipelines.tracking.PROBE_TIMEOUT_S)
def test_unreachable_tracking_server_fails_fast(
    tmp_path: Path, no_ray: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from rgnet.data.synthetic import ensure_dataset

    ensure_dataset(load_config("tiny", overrides=[f"data.root={tmp_path / 'data'}"]).data)
    # a server that accepts connections but never answers: the worst case for a client without a timeout
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        t0 = time.monotonic()
        rc = train_cli.main([*argv(tmp_path), f"tracking.uri=http://127.0.0.1:{port}"])
        elapsed = time.monotonic() - t0
    assert rc == 2 and elapsed < 30, elapsed
    err = capsys.readouterr().err
    assert f"cannot reach the MLflow tracking server at http://127.0.0.1:{port}" in err, err
    assert not no_ray


def test_nothing_listening_fails_fast(tmp_path: Path, no_ray: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from rgnet.data.synthetic import ensure_dataset

    ensure_dataset(load_config("tiny", overrides=[f"data.root={tmp_path / 'data'}"]).data)
    # a port nobody listens on: bound but not listening, and held for the whole test so that no other process can
    # take it meanwhile (connecting to a bound, non-listening port is refused)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        result: dict[str, int] = {}
        thread = threading.Thread(
            target=lambda: result.update(rc=train_cli.main([*argv(tmp_path), f"tracking.uri=http://127.0.0.1:{port}"]))
        )
        thread.start()
        thread.join(timeout=30)
    assert not thread.is_alive() and result["rc"] == 2
    assert "Connection refused" in capsys.readouterr().err


def test_smoke_test_config(tmp_path: Path) -> None:
    args = train_cli.build_parser().parse_args(["--smoke-test", "train.batch_size=4"])
    cfg = train_cli.config_from_args(args)
    assert cfg.train.epochs == 2 and cfg.train.run_name == "tiny-smoke" and cfg.train.batch_size == 4
    assert cfg.model.hidden_dim == load_config("tiny").model.hidden_dim
    args = train_cli.build_parser().parse_args(["--smoke-test", "train.epochs=3", "train.run_name=x"])
    cfg = train_cli.config_from_args(args)
    assert cfg.train.epochs == 3 and cfg.train.run_name == "x"


def test_resuming_another_experiment_is_refused(
    tmp_path: Path, no_ray: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Ray resumes by (storage path, run name) alone: a run recorded with another model is not continued."""
    from rgnet.data.synthetic import ensure_dataset

    args = argv(tmp_path)
    ensure_dataset(load_config("tiny", overrides=args[3:]).data)
    earlier = runtime.resolve_paths(load_config("tiny", overrides=[*args[3:], "model.hidden_dim=64"]))
    trainer.check_same_run(earlier)  # what the first start of that run records
    assert train_cli.main(args) == 2
    err = capsys.readouterr().err
    assert "was started with other settings (model.hidden_dim: 64 -> 32)" in err and "--fresh" in err, err
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize(
    ("flag", "key"), [("--tracking-uri", "tracking.uri=URI"), ("--init-from", "train.init_from=CHECKPOINT")]
)
def test_train_flags_that_shadowed_config_keys_are_gone(
    flag: str, key: str, tmp_path: Path, no_ray: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """One override dialect: the removed flag exits 2 with a line naming the config key, before any work."""
    with pytest.raises(SystemExit) as e:
        train_cli.main([*argv(tmp_path)[:2], flag, "x", *argv(tmp_path)[2:]])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith(f"rgnet train: error: {flag} was removed: give {key} ")
    assert not no_ray and not (tmp_path / "data").exists()
