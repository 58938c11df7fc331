"""train.py: a real tiny run and its run folder, exact resume after SIGTERM, config and data errors, NaN."""
import json
import math
import signal
import subprocess
import sys
import time
from dataclasses import fields

import pytest
import torch
from conftest import subprocess_env

import train

# 2 layers x 32 wide, context 32: trains for real in a second or two on one thread
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "8",
        "--threads", "1", "--eval_iters", "4", "--sample_tokens", "20", "--eval_samples", "1", "--warmup_iters", "10",
        "--learning_rate", "3e-3", "--min_lr", "3e-4"]


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_text):
    path = tmp_path_factory.mktemp("data") / "shakespeare.txt"
    path.write_text(tiny_text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert train.main([*TINY, "--data", str(corpus), "--out_dir", str(out), "--max_iters", "120",
                       "--eval_interval", "40", "--log_interval", "10"]) == 0
    return out


def test_tiny_run_learns_and_writes_the_run_folder(tiny_run, corpus):
    from model import GPT

    assert {p.name for p in tiny_run.iterdir()} == {"config.json", "metrics.jsonl", "samples.jsonl", "status.json",
                                                   "model", "checkpoint.pt"}
    config = json.loads((tiny_run / "config.json").read_text())
    meta = {"script", "command", "data_stats", "hardware"}
    assert set(config) == {f.name for f in fields(train.TrainConfig)} | meta
    stats = config["data_stats"]
    assert stats["vocab_size"] == len(set(corpus.read_text())) and stats["train_tokens"] > 40_000
    assert config["script"] == "train.py" and config["command"][0] == "train.py" and config["n_embd"] == 32

    metrics = rows(tiny_run / "metrics.jsonl")
    assert [r["iter"] for r in metrics] == list(range(10, 121, 10))
    for r in metrics:
        assert {"iter", "loss", "lr", "ms", "tokens_per_sec", "elapsed_s", "eta_s", "max_iters"} <= set(r)
        assert r["tokens_per_sec"] > 0 and r["max_iters"] == 120
    val = [r["val_loss"] for r in metrics if "val_loss" in r]
    assert [r["iter"] for r in metrics if "val_loss" in r] == [40, 80, 120]
    assert val[0] < math.log(65) - 0.5 and val[-1] < val[0] - 0.1  # learned, and kept learning
    assert metrics[-1]["eta_s"] == 0

    samples = rows(tiny_run / "samples.jsonl")
    assert [s["iter"] for s in samples] == [40, 80, 120]
    assert all(s["prompt"] == "\n" and len(s["text"]) > 0 for s in samples)

    status = json.loads((tiny_run / "status.json").read_text())
    assert status["status"] == "finished" and status["iter"] == 120

    ckpt = train.load_checkpoint(tiny_run / "checkpoint.pt")
    assert ckpt["iter"] == 120 and ckpt["best_val"] == pytest.approx(min(val), abs=1e-4)
    assert len(ckpt["rng"]) == 1 and ckpt["model_config"]["n_layer"] == 2
    model = GPT.from_pretrained(tiny_run / "model")  # the model folder holds the same weights as the checkpoint
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, ckpt["model"][name], rtol=0, atol=0)
    assert (tiny_run / "model" / "tokenizer.json").is_file()
    assert not list(tiny_run.glob(".*tmp*"))  # no temporary files left behind


def test_sigterm_saves_and_resume_equals_uninterrupted(tmp_path, corpus):
    args = [*TINY, "--data", str(corpus), "--max_iters", "400", "--eval_interval", "100", "--log_interval", "1",
            "--eval_samples", "0", "--dropout", "0.1"]  # dropout: the RNG state must be restored too
    full = tmp_path / "full"
    assert train.main([*args, "--out_dir", str(full)]) == 0

    stopped = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "train.py", *args, "--out_dir", str(stopped)], cwd=train.HERE,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        metrics = stopped / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 20:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    status = json.loads((stopped / "status.json").read_text())
    assert status["status"] == "stopped", (out, err)
    stop_iter = train.load_checkpoint(stopped / "checkpoint.pt")["iter"]
    assert 20 <= stop_iter < 400 and status["iter"] == stop_iter
    assert "--resume" in out

    # the run's config.json is the base config: --out_dir and --resume are all it takes
    assert train.main(["--out_dir", str(stopped), "--resume"]) == 0
    assert json.loads((stopped / "status.json").read_text())["status"] == "finished"
    a, b = rows(full / "metrics.jsonl"), rows(stopped / "metrics.jsonl")
    assert [r["iter"] for r in a] == [r["iter"] for r in b] == list(range(1, 401))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r.get("val_loss") for r in a] == [r.get("val_loss") for r in b]
    assert b[-1]["elapsed_s"] >= b[stop_iter - 1]["elapsed_s"]  # time keeps counting across the restart


def test_resume_without_checkpoint_starts_from_scratch(tmp_path, corpus, capsys):
    out = tmp_path / "new"
    assert train.main([*TINY, "--data", str(corpus), "--out_dir", str(out), "--resume", "--max_iters", "4",
                       "--eval_interval", "4", "--eval_samples", "0"]) == 0
    assert "starting from scratch" in capsys.readouterr().out
    assert train.load_checkpoint(out / "checkpoint.pt")["iter"] == 4


def test_resume_refuses_another_model_shape(tiny_run, capsys):
    before = (tiny_run / "checkpoint.pt").read_bytes()
    assert train.main(["--out_dir", str(tiny_run), "--resume", "--n_layer", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot resume") and "n_layer" in err and "\n" not in err
    assert (tiny_run / "checkpoint.pt").read_bytes() == before


def test_diverging_run_fails_clearly_and_keeps_the_last_good_checkpoint(tmp_path, corpus, capsys):
    out = tmp_path / "nan"
    base = [*TINY, "--data", str(corpus), "--out_dir", str(out), "--max_iters", "20", "--eval_interval", "10",
            "--eval_samples", "0", "--log_interval", "2"]
    assert train.main(base) == 0
    good = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert train.main(["--out_dir", str(out), "--resume", "--max_iters", "40", "--learning_rate", "1e30"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "diverged" in err and "\n" not in err
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "failed" and "diverged" in status["message"]
    assert (out / "checkpoint.pt").read_bytes() == good


@pytest.mark.parametrize("argv, message", [
    (["--lerning_rate", "1"], "unrecognized arguments: --lerning_rate"),
    (["--max_iters", "ten"], "invalid int value: 'ten'"),
    (["--dtype", "float8"], "invalid choice: 'float8'"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--n_embd", "30", "--n_head", "4"], "n_embd (30) must be divisible by n_head (4)"),
    (["--split", "0.9"], "'split' must be train,val[,test] fractions"),
    (["--resume"], "--resume needs --out_dir"),
])
def test_config_errors_exit_2_with_one_line(argv, message, capsys):
    assert train.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and message in captured.err
    assert captured.err.count("\n") == 1 and captured.out == ""


def test_config_file_unknown_key_and_wrong_type(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lerning_rate: 0.1\n")
    assert train.main(["--config", str(bad)]) == 2
    assert "unknown key 'lerning_rate' (did you mean 'learning_rate'?)" in capsys.readouterr().err
    bad.write_text("max_iters: lots\n")
    assert train.main(["--config", str(bad)]) == 2
    assert "'max_iters' must be int, got 'lots'" in capsys.readouterr().err
    cfg_json = tmp_path / "ok.json"
    cfg_json.write_text('{"n_layer": 3, "data": "x.txt", "learning_rate": 1}')
    cfg = train.parse_config(train.TrainConfig, ["--preset", "tiny", "--config", str(cfg_json), "--n_layer", "5"])
    # precedence: defaults < preset < --config < flags
    assert (cfg.n_layer, cfg.n_embd, cfg.data, cfg.learning_rate) == (5, 64, ["x.txt"], 1.0)


def test_every_preset_parses(repo_root):
    presets = train.list_presets()
    assert {"tiny", "gpt2", "shakespeare_char"} <= set(presets)
    for name in presets:
        assert (repo_root / "configs" / f"{name}.yaml").read_text().startswith(f"# {name}: ")
        train.check_config(train.parse_config(train.TrainConfig, ["--preset", name]))


def test_cli_errors_have_no_traceback(tmp_path):
    """The real command line: a config error exits 2, a data error exits 1, each one line on stderr."""
    for argv, code in ((["--max_iters", "-"], 2), (["--data", str(tmp_path / "missing.txt")], 1)):
        proc = subprocess.run([sys.executable, "train.py", *argv, "--out_dir", str(tmp_path / "run")],
                              cwd=train.HERE, env=subprocess_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == code, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr


def test_data_error_exits_1(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert train.main(["--data", str(empty), "--out_dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert json.loads((tmp_path / "run" / "status.json").read_text())["status"] == "failed"


def test_get_lr_schedule():
    cfg = train.TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert train.get_lr(0, cfg) < train.get_lr(9, cfg) < 1.0
    assert train.get_lr(10, cfg) == pytest.approx(1.0)
    assert train.get_lr(60, cfg) == pytest.approx(0.55)
    assert train.get_lr(110, cfg) == pytest.approx(0.1) and train.get_lr(500, cfg) == pytest.approx(0.1)


def test_check_prints_the_environment(capsys):
    assert train.main(["--check"]) == 0
    out = capsys.readouterr().out
    for word in ("torch " + torch.__version__, "bf16", "GPU", "accelerate config", "--dtype auto"):
        assert word in out


def test_grad_accum_matches_one_big_batch(tmp_path, corpus):
    """2 micro-batches of 4 give the update of one batch of 8 (same windows): the loss is scaled right."""
    states = []
    for batch, accum in ((8, 1), (4, 2)):
        out = tmp_path / f"b{batch}x{accum}"
        assert train.main([*TINY, "--data", str(corpus), "--out_dir", str(out), "--max_iters", "2",
                           "--eval_interval", "2", "--eval_samples", "0", "--batch_size", str(batch),
                           "--grad_accum", str(accum)]) == 0
        states.append(train.load_checkpoint(out / "checkpoint.pt")["model"])
    for name, tensor in states[0].items():
        torch.testing.assert_close(tensor, states[1][name], rtol=1e-4, atol=1e-6)


def test_time_budget_and_early_stopping(tmp_path, corpus, capsys):
    out = tmp_path / "budget"
    assert train.main([*TINY, "--data", str(corpus), "--out_dir", str(out), "--max_iters", "100000",
                       "--max_minutes", "0.002", "--eval_samples", "0", "--label_smoothing", "0.1"]) == 0
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "finished" and "time budget" in status["message"] and status["iter"] < 100000
    last = rows(out / "metrics.jsonl")[-1]
    assert last["iter"] == status["iter"] and "val_loss" in last  # evaluated and saved before stopping
    assert train.load_checkpoint(out / "checkpoint.pt")["iter"] == status["iter"]

    out = tmp_path / "early"
    assert train.main([*TINY, "--data", str(corpus), "--out_dir", str(out), "--max_iters", "50",
                       "--eval_interval", "2", "--eval_samples", "0", "--learning_rate", "1e-12", "--min_lr", "0",
                       "--early_stop_patience", "2"]) == 0
    status = json.loads((out / "status.json").read_text())
    assert status["iter"] == 6 and "early stop" in status["message"]  # evals at 2 (best), 4 and 6: no better
