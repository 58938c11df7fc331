"""`accelerate launch` runs train.py as 2 real DDP processes (gloo on CPU); only the main process writes."""
import json
import socket
import subprocess
import sys

import torch
from conftest import subprocess_env

import train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_two_cpu_processes(tmp_path, tiny_text):
    corpus = tmp_path / "shakespeare.txt"
    corpus.write_text(tiny_text, encoding="utf-8")
    out = tmp_path / "ddp"
    # on CPU, accelerate starts 2 real processes only with ACCELERATE_USE_CPU=1 and --multi_gpu
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),
           "train.py", "--data", str(corpus), "--out_dir", str(out), "--n_layer", "2", "--n_head", "2",
           "--n_embd", "32", "--block_size", "32", "--batch_size", "4", "--max_iters", "12", "--eval_interval", "6",
           "--log_interval", "3", "--eval_iters", "2", "--sample_tokens", "10", "--threads", "1"]
    proc = subprocess.run(cmd, cwd=train.HERE, env=subprocess_env(ACCELERATE_USE_CPU="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout

    # only the main process logged and wrote: one row per logged iteration, no stray temporary files
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in metrics] == [3, 6, 9, 12]
    assert sum("val_loss" in r for r in metrics) == 2
    assert [json.loads(line)["iter"] for line in (out / "samples.jsonl").read_text().splitlines()] == [6, 6, 12, 12]
    assert proc.stdout.count("iter 12/12") == 1
    assert {p.name for p in out.iterdir()} == {"config.json", "metrics.jsonl", "samples.jsonl", "status.json",
                                              "model", "checkpoint.pt"}
    assert json.loads((out / "status.json").read_text())["status"] == "finished"

    # both ranks trained: the checkpoint holds each rank's RNG and batch-sampler state, and they differ
    ckpt = train.load_checkpoint(out / "checkpoint.pt")
    assert ckpt["iter"] == 12 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["batch"], ckpt["rng"][1]["batch"])
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])
    assert "4 x 32 x 1 x 2 = 256 tokens/iter" in proc.stdout or "256 tokens/iter" in proc.stdout
