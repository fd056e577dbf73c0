"""runner/logging.py: the W&B mode choice, and offline W&B runs read back from their .wandb files.

The offline run folder keeps everything in one record log (run-<id>.wandb: wandb's LevelDB-style log of
wandb_internal_pb2.Record messages); `_records` reads it, so the tests see what `wandb sync` would upload.
"""

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO

from runner.logging import NoOpLogger, _auto_mode, _netrc_has, build_logger
from runner.rundir import run_stage


def _records(run_file: Path) -> list:
    """The Records of a .wandb file: 7-byte file header, then 32 KiB blocks of chunks (crc32 u32, length u16,
    type u8: 1 full, 2 first, 3 middle, 4 last); a block tail shorter than a chunk header is padding."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = run_file.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B"
    out, pos, buf = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):
            break  # a chunk still being written
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            out.append(pb.Record.FromString(buf))
            buf = b""
    return out


def _offline_run(run_dir: Path) -> dict:
    """The one offline W&B run under run_dir, as {run, config, history, summary, exit_code}."""

    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    # run.finish() returns before wandb-core has flushed the file (measured with wandb 0.31: up to ~0.2 s); its
    # last record is the exit record.
    deadline = time.monotonic() + 30
    recs = _records(run_file)
    while not any(r.WhichOneof("record_type") == "exit" for r in recs):
        assert time.monotonic() < deadline, f"{run_file}: no exit record after 30 s"
        time.sleep(0.1)
        recs = _records(run_file)
    (run,) = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    history = [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in recs
        if r.WhichOneof("record_type") == "history"
    ]
    summary = {}
    for r in recs:
        if r.WhichOneof("record_type") == "summary":
            summary.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.summary.update})
    (exit_code,) = [r.exit.exit_code for r in recs if r.WhichOneof("record_type") == "exit"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    return {"run": run, "config": config, "history": history, "summary": summary, "exit_code": exit_code}


# --- mode choice ----------------------------------------------------------------------------------------------------
@pytest.fixture
def no_netrc(tmp_path, monkeypatch):
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def test_offline_without_an_api_key(no_netrc):
    assert _auto_mode(SimpleNamespace(base_url="https://api.example.invalid", api_key=None)) == "offline"


def test_online_only_when_the_server_answers(no_netrc):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    settings = SimpleNamespace(base_url=f"http://127.0.0.1:{port}", api_key="k" * 40)
    assert _auto_mode(settings) == "online"
    server.close()  # nothing listens there now: refused at once, offline without waiting
    assert _auto_mode(settings) == "offline"


def test_a_netrc_entry_for_the_host_is_an_api_key(tmp_path, monkeypatch):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.example.org\n  login user\n  password " + "k" * 40 + "\n")
    monkeypatch.setenv("NETRC", str(netrc))
    assert _netrc_has("api.example.org") and not _netrc_has("other.example.org")
    netrc.write_text("machine\n")  # unparsable: no key, and no crash
    assert not _netrc_has("api.example.org")


def test_only_rank_0_of_a_torchrun_job_logs(compose, tmp_path, monkeypatch):
    cfg = compose(["task=generate", "debug=smoke", "logger=wandb", "logger.mode=offline"])
    monkeypatch.setenv("RANK", "1")
    assert isinstance(build_logger(cfg, tmp_path, None, "job"), NoOpLogger)


# --- one offline run per job, finished even on failure -------------------------------------------------------------
def test_failed_stage_streams_its_steps_and_finishes_its_run(compose, tmp_path):
    cfg = compose(["task=generate", "debug=smoke", "logger=wandb", "logger.mode=offline"])

    def stage(cfg, ctx):
        ctx.log_metrics({"generate/loss": 2.5}, step=0)
        ctx.log_metrics({"generate/loss": 2.0}, step=1)
        raise RuntimeError("boom")

    with pytest.raises(SystemExit):
        run_stage(cfg, stage)
    run = _offline_run(tmp_path / "run")
    assert [h["generate/loss"] for h in run["history"]] == [2.5, 2.0]
    assert run["exit_code"] == 1
    assert run["run"].job_type == "generate" and run["run"].run_group == ""  # a single run has no group
    assert run["config"]["task"]["name"] == "generate" and run["config"]["model"]["name"] == "tiny"


@pytest.mark.slow  # a few seconds of wandb; the offline sweep below checks the summary too
def test_finished_stage_sends_its_metrics_as_the_summary(compose, tmp_path):
    cfg = compose(["task=generate", "debug=smoke", "logger=wandb", "logger.mode=offline", "logger.group=mine"])
    run_stage(cfg, lambda cfg, ctx: {"generate/decode_tokens_per_s": 123.0})
    run = _offline_run(tmp_path / "run")
    assert run["summary"]["generate/decode_tokens_per_s"] == 123.0
    assert run["exit_code"] == 0 and run["run"].run_group == "mine"


@pytest.mark.slow
def test_offline_sweep_leaves_one_run_per_job_grouped_by_sweep(tmp_path, data_dir):
    # No API key anywhere: the default mode (logger.mode null, no WANDB_MODE) must be offline, without a network.
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    env.update(
        PYTHONPATH=str(REPO),
        NETRC=str(tmp_path / "no-netrc"),
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
        WANDB_DATA_DIR=str(tmp_path / "wandb-data"),
    )
    sweep = tmp_path / "sweep"
    args = ["-m", "task=generate", "debug=smoke", "logger=wandb", "task.max_new_tokens=2,4", f"hydra.sweep.dir={sweep}"]
    r = subprocess.run(
        [sys.executable, "-m", "runner", *args, f"paths.data_dir={data_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [_offline_run(sweep / job) for job in ("0", "1")]
    assert {run["run"].run_group for run in runs} == {"sweep"}  # the sweep directory's name
    assert [run["config"]["task"]["max_new_tokens"] for run in runs] == [2, 4]
    assert all(run["run"].job_type == "generate" and run["exit_code"] == 0 for run in runs)
    assert all("generate/decode_tokens_per_s" in run["summary"] for run in runs)
    assert runs[0]["run"].run_id != runs[1]["run"].run_id


def test_a_server_that_accepts_but_never_answers_falls_back_to_offline(tmp_path, data_dir):
    # issue 16: with an API key and a W&B host that accepts the connection but never answers, wandb.init gave up
    # after its timeout and the job failed. Now the stage runs, logs offline, and ends ok.
    server = socket.create_server(("127.0.0.1", 0))
    held = []  # accepted connections, kept open and never answered

    def accept_until_closed():
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:  # the test closed the server
                return

    accepting = threading.Thread(target=accept_until_closed, daemon=True)
    accepting.start()
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    env.update(
        PYTHONPATH=str(REPO),
        NETRC=str(tmp_path / "no-netrc"),
        WANDB_API_KEY="k" * 40,
        WANDB_BASE_URL=f"http://127.0.0.1:{server.getsockname()[1]}",
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
        WANDB_DATA_DIR=str(tmp_path / "wandb-data"),
    )
    run = tmp_path / "run"
    args = ["task=generate", "debug=smoke", "logger=wandb", "logger.init_timeout=2", f"hydra.run.dir={run}"]
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "runner", *args, f"paths.data_dir={data_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    server.close()
    accepting.join(timeout=10)
    for conn in held:
        conn.close()
    assert r.returncode == 0, r.stderr[-3000:]
    assert held, "the runner never connected to the listener"
    assert json.loads((run / "status.json").read_text())["status"] == "ok"
    assert _offline_run(run)["exit_code"] == 0  # the metrics went to an offline run, for `wandb sync` later
    assert time.monotonic() - t0 < 120


# --- the final summary, define_metric, artifacts --------------------------------------------------------------------
def test_summary_equals_metrics_json_after_step_rows(compose, tmp_path):
    """finetune's defect: the last step's row, still pending in wandb when summary.update ran, overwrote the run
    average (summary tokens_per_s 16,586 against metrics.json's 13,058)."""
    import json

    cfg = compose(["task=finetune", "debug=smoke", "logger=wandb", "logger.mode=offline"])

    def stage(cfg, ctx):
        ctx.log_metrics({"finetune/loss": 3.0, "finetune/tokens_per_s": 100.0}, step=1)
        ctx.log_metrics({"finetune/loss": 2.0, "finetune/tokens_per_s": 300.0, "finetune/val_loss": 2.5}, step=2)
        return {"finetune/val_loss": 2.5, "finetune/tokens_per_s": 200.0}

    run_stage(cfg, stage)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    run = _offline_run(tmp_path / "run")  # its summary: the summary records in file order, as `wandb sync` sends
    assert {k: run["summary"][k] for k in metrics} == metrics
    # define_metric: the headline's direction (finetune/val_loss: smaller is better)
    (run_file,) = (tmp_path / "run").glob("wandb/offline-run-*/run-*.wandb")
    (metric,) = [r.metric for r in _records(run_file) if r.WhichOneof("record_type") == "metric"]
    assert metric.name == "finetune/val_loss" and metric.summary.min and not metric.summary.max


def _artifact_records(run_dir: Path) -> dict:
    """{artifact type: {entry path: entry}} of the artifacts an offline run logged."""
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    arts = [r.artifact for r in _records(run_file) if r.WhichOneof("record_type") == "artifact"]
    return {a.type: {e.path: e for e in a.manifest.contents} for a in arts}


def test_recorded_files_become_artifacts_and_the_model_a_reference(compose, tmp_path):
    """The defect: no artifacts at all (model, results.json, samples)."""
    cfg = compose(["task=eval", "debug=smoke", "logger=wandb", "logger.mode=offline"])

    def stage(cfg, ctx):
        (ctx.run_dir / "results.json").write_text("{}")
        (ctx.run_dir / "samples.jsonl").write_text("{}\n")
        (ctx.run_dir / "model").mkdir()
        (ctx.run_dir / "model" / "model.safetensors").write_bytes(b"0" * 64)
        for kind, name in (("results", "results.json"), ("samples", "samples.jsonl"), ("model", "model")):
            ctx.add_artifact(kind, ctx.run_dir / name)
        return {"eval/wikitext2_ppl/ppl": 12.0}

    run_stage(cfg, stage)
    _offline_run(tmp_path / "run")  # waits until the run is complete
    arts = _artifact_records(tmp_path / "run")
    assert set(arts) == {"results", "samples", "model"}
    assert "results.json" in arts["results"] and "samples.jsonl" in arts["samples"]
    (entry,) = arts["model"].values()
    assert entry.path == "model/model.safetensors"
    assert entry.ref == (tmp_path / "run" / "model" / "model.safetensors").resolve().as_uri()


def test_sweep_summary_is_logged_to_the_group(compose, tmp_path):
    """The defect: the sweep summary (summary.csv/png) never reached W&B."""
    from runner.logging import log_sweep_summary

    cfg = compose(["task=eval", "debug=smoke", "logger=wandb", "logger.mode=offline"])
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    files = [sweep / "summary.csv", sweep / "summary.png"]
    files[0].write_text("run,quantize/ppl\n0,12.0\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.figure(figsize=(1, 1))
    plt.savefig(files[1])
    plt.close()
    log_sweep_summary(cfg, sweep, files)
    run = _offline_run(sweep)
    assert run["run"].run_group == "sweep" and run["run"].job_type == "sweep_summary"
    assert {"summary.csv", "summary.png"} <= set(_artifact_records(sweep)["sweep_summary"])
