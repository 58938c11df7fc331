"""Sharing on the Hub: the real huggingface_hub client against a local fake Hub (tests/hub_server.py).

train.py pushes a model, finetune.py downloads it as its base and pushes a private adapter, sample.py loads
both back by repo id; the model cards carry their metadata; the token is used but appears in no file."""
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import yaml

import sample
from conftest import REPO_ROOT, subprocess_env
from hub_server import HubServer

TOKEN = "hf_fake_secret_token_3f9a1c77e2"
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "64", "--batch_size", "8",
        "--eval_iters", "2", "--threads", "1", "--sample_tokens", "16"]


@pytest.fixture(scope="module")
def hub():
    with HubServer(token=TOKEN) as server:
        yield server


def run(args, env, log):
    """A script in a subprocess talking to the fake Hub; stdout+stderr kept in a log file (scanned later)."""
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, *map(str, args)], cwd=REPO_ROOT, env=env, stdout=f,
                              stderr=subprocess.STDOUT, timeout=180)
    return proc.returncode, log.read_text()


def card(server, repo_id) -> tuple[dict, str]:
    text = server.files(repo_id)["README.md"].decode()
    _, meta, body = text.split("---\n", 2)
    return yaml.safe_load(meta), body


def test_push_model_and_adapter_then_load_them_back(hub, tmp_path, tiny_text, capsys):
    env = subprocess_env(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1",
                         HF_HOME=tmp_path / "hf_home")
    (tmp_path / "base.txt").write_text(tiny_text[:30_000])
    (tmp_path / "new.txt").write_text(tiny_text[30_000:45_000])

    # train.py --push_to_hub: the model folder + a card
    code, log = run(["train.py", "--data", tmp_path / "base.txt", "--out_dir", tmp_path / "base", *TINY,
                     "--max_iters", 100, "--eval_interval", 50, "--learning_rate", 1e-2,
                     "--push_to_hub", "tester/tiny-gpt"], env, tmp_path / "train.log")
    assert code == 0, log[-2000:]
    files = hub.files("tester/tiny-gpt")
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
            "loss_curve.png"} <= set(files)
    assert "checkpoint.pt" not in files and files["loss_curve.png"].startswith(b"\x89PNG")
    meta, body = card(hub, "tester/tiny-gpt")
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] and "nanoforge" in meta["tags"] and "base_model" not in meta
    assert "python sample.py --model tester/tiny-gpt" in body and "![loss curve](loss_curve.png)" in body
    assert "final val loss" in body and '"n_layer": 2' in body and "Hardware" in body

    # finetune.py with the Hub model as its base, pushing a private adapter
    code, log = run(["finetune.py", "--base", "tester/tiny-gpt", "--data", tmp_path / "new.txt", "--out_dir",
                     tmp_path / "lora", "--max_iters", 20, "--eval_interval", 10, "--batch_size", 8,
                     "--eval_iters", 2, "--threads", 1, "--sample_tokens", 16, "--learning_rate", 1e-2,
                     "--push_to_hub", "tester/tiny-lora", "--hub_private"], env, tmp_path / "finetune.log")
    assert code == 0, log[-2000:]
    assert hub.repos["tester/tiny-lora"].private
    with pytest.raises(urllib.error.HTTPError) as anonymous:  # private: invisible without the token
        urllib.request.urlopen(f"{hub.url}/api/models/tester/tiny-lora")
    assert anonymous.value.code == 404
    files = hub.files("tester/tiny-lora")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= set(files)
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "tester/tiny-gpt"
    meta, body = card(hub, "tester/tiny-lora")
    assert meta["library_name"] == "peft" and meta["base_model"] == "tester/tiny-gpt"
    assert {"peft", "lora", "nanoforge"} <= set(meta["tags"])
    assert "python sample.py --model tester/tiny-gpt --adapter tester/tiny-lora" in body
    assert "base:" in body and "tuned:" in body  # the side-by-side samples

    # loading back by repo id through the real download path gives what the local folders give
    prompt = ["--prompt", "ROMEO:", "--max_new_tokens", "40", "--seed", "5", "--threads", "1"]
    code, remote = run(["sample.py", "--adapter", "tester/tiny-lora", *prompt], env, tmp_path / "sample.log")
    assert code == 0, remote[-2000:]
    code, remote_base = run(["sample.py", "--model", "tester/tiny-gpt", *prompt], env, tmp_path / "sample2.log")
    assert code == 0, remote_base[-2000:]
    capsys.readouterr()
    assert sample.main(["--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "lora"), *prompt]) == 0
    local = capsys.readouterr().out
    assert sample.main(["--model", str(tmp_path / "base"), *prompt]) == 0
    local_base = capsys.readouterr().out
    assert local in remote and local_base in remote_base and local != local_base

    # the push action the UI uses, with a wrong token: a one-line error, no token anywhere
    bad_env = {**env, "HF_TOKEN": "hf_wrong_token_0000"}
    code, out = run(["hub.py", tmp_path / "lora", "tester/other"], bad_env, tmp_path / "bad.log")
    assert code == 1 and out.startswith("error: ") and "401" in out and len(out.strip().splitlines()) == 1
    assert "hf_wrong_token_0000" not in out

    # the token was sent (authorised commits) but written nowhere: run folders, logs, Hub cache, pushed files
    assert any(r["authorised"] and r["path"].endswith("/commit/main") for r in hub.requests)
    for root, _, names in os.walk(tmp_path):
        for name in names:
            assert TOKEN.encode() not in open(os.path.join(root, name), "rb").read(), os.path.join(root, name)
    for repo_id in hub.repos:
        for path, content in hub.files(repo_id).items():
            assert TOKEN.encode() not in content, (repo_id, path)
            assert str(tmp_path).encode() not in content, (repo_id, path)  # no local folder layout either


def test_offline_hub_id_fails_fast_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "sample.py", "--model", "tester/not-there", "--adapter", "tester/x"],
                          cwd=REPO_ROOT, env=subprocess_env(HF_HOME=tmp_path), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ")
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_accelerate_launch_two_processes_pushes_once(hub, tmp_path, tiny_text):
    from test_finetune import make_base_run

    base = make_base_run(tmp_path / "base", tiny_text[:20_000], iters=50)
    (tmp_path / "new.txt").write_text(tiny_text[30_000:40_000])
    env = subprocess_env(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1",
                         HF_HOME=tmp_path / "hf_home", ACCELERATE_USE_CPU="1")
    code, log = run(["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                     "--mixed_precision", "no", "--dynamo_backend", "no", "finetune.py", "--base", base,
                     "--data", tmp_path / "new.txt", "--out_dir", tmp_path / "ddp", "--max_iters", 10,
                     "--eval_interval", 5, "--batch_size", 4, "--eval_iters", 1, "--threads", 1,
                     "--eval_samples", 0, "--log_interval", 1, "--push_to_hub", "tester/ddp-lora"],
                    env, tmp_path / "ddp.log")
    assert code == 0, log[-3000:]
    assert "2 process(es)" in log
    iters = [json.loads(line)["iter"] for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert iters == list(range(11))  # one writer: every iteration logged once
    assert len(hub.repos["tester/ddp-lora"].commits) == 2  # the repo's first commit + exactly one push
    assert TOKEN not in log
