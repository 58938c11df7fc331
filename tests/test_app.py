"""app.py driven through its API with gradio_client: the app runs in its own process on a free port, trains tiny
models for real in subprocesses, and streams samples from them."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT, subprocess_env
from hub_server import HubServer

pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

import app  # noqa: E402  (importing must not start anything)

TOKEN = "hf_fake_secret_token_app_5d2e8b"
TINY = {"preset": "tiny", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "dropout": 0.0,
        "batch_size": 8, "max_iters": 30, "learning_rate": 3e-3, "eval_interval": 15, "grad_accum": 1,
        "warmup_iters": 5, "weight_decay": 0.1, "max_minutes": 0, "dtype": "float32", "seed": 1,
        "sample_prompt": "\n", "threads": 1, "tokenizer": "char", "vocab_size": 4096,
        "pretrained_tokenizer": "gpt2", "hf_dataset": "", "hf_split": "train", "text_column": "text"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(runs_dir: Path, log_path: Path, *extra, env=None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    # --threads 1: training processes started by the app use one thread, like everything in the tests
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--runs_dir", str(runs_dir),
                                 "--threads", "1", *extra],
                                cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env or subprocess_env())
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 60
    while time.time() < deadline:
        assert proc.poll() is None, log_path.read_text()
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"app did not start: {log_path.read_text()}")


def stop_app(proc: subprocess.Popen, runs_dir: Path):
    for status in runs_dir.glob("*/status.json"):  # training runs outlive the app by design: end ours
        pid = json.loads(status.read_text()).get("pid")
        try:  # only a live process training in this test's run folder
            if str(status.parent).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.killpg(os.getpgid(pid), signal.SIGKILL)
        except (OSError, TypeError):
            pass
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def hub():
    """A local fake Hugging Face Hub (tests/hub_server.py) that accepts writes with TOKEN only."""
    with HubServer(token=TOKEN) as fake:
        yield fake


@pytest.fixture(scope="module")
def server(tmp_path_factory, hub):
    root = tmp_path_factory.mktemp("app")
    runs = root / "runs"
    # The app (and the hub.py it starts) talks to the fake Hub; no token in its environment or cache: a push
    # succeeds only with the token typed on the page.
    env = subprocess_env(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1", HF_HOME=root / "hf_home")
    env.pop("HF_TOKEN", None)
    env.pop("HUGGING_FACE_HUB_TOKEN", None)
    proc, url = start_app(runs, root / "app.log", "--max_upload_mb", "1", env=env)
    yield {"url": url, "runs": runs, "uploads": root / "uploads", "root": root, "log": root / "app.log"}
    stop_app(proc, runs)


def runs_rows(client) -> dict:
    """The Runs table as {run name: {column: value}}."""
    table, _, _ = client.predict(api_name="/runs")
    return {row[0]: dict(zip(table["headers"], row)) for row in table["data"]}


def start_args(**overrides) -> list:
    values = {**TINY, **overrides}
    return [values[f] for f in app.TRAIN_FIELDS]


def wait_for(client, predicate, timeout=90, what="condition"):
    """Poll the run the way the page's timer does, until predicate(poll outputs) holds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = client.predict(api_name="/poll")
        if predicate(out):
            return out
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last poll: {out[1:5]}")


def plot_points(plot) -> list:
    """The LinePlot value as gradio_client returns it -> its points [iter, loss, series] (the plot also holds
    one invisible point per series, loss NaN -> None)."""
    value = plot.get("value", plot) if isinstance(plot, dict) else plot
    return [row for row in (value or {}).get("data") or [] if row[1] is not None and row[1] == row[1]]


def test_upload_train_sample(server, tmp_path, tiny_text):
    client = Client(server["url"], verbose=False)
    init = client.predict(api_name="/init")
    assert "CPU" in init[0] or "GPU" in init[0]

    corpus = tmp_path / "my notes.txt"
    corpus.write_text(tiny_text[:30000], encoding="utf-8")
    summary, msg = client.predict([handle_file(str(corpus))], "text", api_name="/upload")
    assert "✓ my_notes.txt" in msg and "1 file(s)" in summary

    # corpus stats and token preview before training, for char and BPE tokenizers
    stats, preview, data_cmd = client.predict("char", 4096, "gpt2", "", "train", "text", api_name="/analyze")
    assert "| documents | 1 |" in stats and "| characters | 30,000 |" in stats
    assert "| characters per token | 1.00 |" in stats
    assert [p["token"] for p in preview[:3]] == list(tiny_text[:3])
    assert data_cmd.startswith("python data.py --data ") and "--tokenizer char" in data_cmd
    stats, preview, _ = client.predict("bpe", 300, "gpt2", "", "train", "text", api_name="/analyze")
    assert "| vocabulary (token ids) | 300 |" in stats and len(preview[0]["token"]) >= 1

    command = client.predict(*start_args(run_name="first"), api_name="/command")
    assert command.startswith("python train.py --preset tiny --data ") and "my_notes.txt" in command
    assert "--out_dir" in command and "--max_iters 30" in command and "--threads 1" in command

    # the estimate is measured by bench.py for a few real steps, and says how
    estimate, bench = client.predict(*start_args(run_name="first"), api_name="/measure")
    assert "per 1,000 iterations" in estimate and "ms/iter" in estimate and "MB" in estimate, estimate
    assert bench["value"].startswith("python bench.py --only train --n_layer 2 --n_head 2 --n_embd 32")

    msg, _, _ = client.predict(*start_args(run_name="first"), api_name="/start")
    assert "Started" in msg, msg
    run = server["runs"] / "first"
    # metrics appear, then the run finishes; the plot carries train and val points
    wait_for(client, lambda o: plot_points(o[0]), what="the first loss point")
    out = wait_for(client, lambda o: "Finished" in o[4], what="the run to finish")
    series = {row[2] if isinstance(row, list) else row["series"] for row in plot_points(out[0])}
    assert {"train", "val"} <= series
    assert "iter 30 / 30" in out[1] and "tokens/s" in out[1]
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert (run / "model" / "model.safetensors").is_file() and "iter" in out[2]  # a sample from samples.jsonl
    assert "$ python train.py --preset tiny" in (run / "train.log").read_text()

    row = runs_rows(client)["first"]
    assert row["status"] == "finished" and row["type"] == "pretrain" and row["best val loss"] > 0
    plot = client.predict(["first"], api_name="/compare")  # loss curves overlaid, drawn by matplotlib
    assert plot["type"] == "matplotlib" and len(plot["plot"]) > 1000

    # sampling streams token by token, and gives exactly what `python sample.py` prints for the same settings
    job = client.submit("first", "ROMEO:", 0.8, 200, 1.0, 1.0, 40, 7, 1, api_name="/sample")
    updates = list(job)
    text = job.outputs()[-1]
    assert len(updates) > 10 and text.startswith("ROMEO:") and len(text) > len("ROMEO:")
    with pytest.raises(Exception, match="no such run, folder or Hub id"):
        client.predict("no/such/../run", "x", 0.8, 200, 1.0, 1.0, 5, 1, 1, api_name="/sample")
    cli = subprocess.run([sys.executable, "sample.py", "--model", str(run), "--prompt", "ROMEO:",
                          "--max_new_tokens", "40", "--seed", "7", "--threads", "1"],
                         cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.startswith(text)


def raw_upload(url: str, name: str, data: bytes) -> dict:
    """Upload through the HTTP route with an arbitrary file name, as a hostile client could."""
    boundary = "nanoforgeboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: text/plain\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url + "gradio_api/upload", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    path = json.loads(urllib.request.urlopen(req, timeout=30).read())[0]
    return {"path": path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}


def test_bad_inputs_and_stop_resume(server, tmp_path, tiny_text):
    client = Client(server["url"], verbose=False)
    client.predict(api_name="/init")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    exe = tmp_path / "tool.exe"
    exe.write_bytes(b"MZ")
    zipped = tmp_path / "bundle.zip"
    with zipfile.ZipFile(zipped, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("../../evil.txt", "escaped? " * 50)
        zf.writestr("..\\..\\evil2.txt", "escaped? " * 50)
        zf.writestr("/abs/evil3.txt", "escaped? " * 50)
        zf.writestr("notes/ok.md", tiny_text[:5000])
        zf.writestr("bomb.txt", "a" * (2 * 1024 * 1024))  # unpacks past the limit
    _, msg = client.predict([handle_file(str(empty)), handle_file(str(binary)), handle_file(str(exe))], "text",
                            api_name="/upload")
    assert "✗ empty.txt: the file is empty" in msg
    assert "✗ blob.txt: binary file" in msg and str(server["uploads"]) not in msg
    assert "✗ tool.exe: unsupported file type" in msg
    with pytest.raises(urllib.error.HTTPError):  # over --max_upload_mb 1: refused by the server itself
        raw_upload(server["url"], "big.txt", b"x" * (1024 * 1024 + 10))
    _, msg = client.predict([handle_file(str(zipped))], "text", api_name="/upload")
    assert "✓ evil.txt" in msg and "✓ evil2.txt" in msg and "✓ evil3.txt" in msg and "✓ ok.md" in msg
    assert "unpacks to more than" in msg
    hostile = raw_upload(server["url"], "../../evil4.txt", b"hostile name " * 20)
    _, msg = client.predict([hostile], "text", api_name="/upload")
    assert "✓ evil4.txt" in msg
    escaped = [p for p in server["root"].rglob("evil*.txt") if server["uploads"] not in p.parents]
    assert not escaped and not (REPO_ROOT / "evil.txt").exists()
    saved = sorted(p.name for p in server["uploads"].rglob("*") if p.is_file())
    assert {"evil.txt", "evil2.txt", "evil3.txt", "evil4.txt", "ok.md"} <= set(saved)
    assert not any(n in saved for n in ("empty.txt", "blob.txt", "tool.exe", "bomb.txt"))

    # pasted text is saved like an upload
    assert "empty" in client.predict("   ", api_name="/add_text")[1]
    summary, msg = client.predict(tiny_text[:3000], api_name="/add_text")
    assert msg.startswith("✓ pasted") and "file(s)" in summary

    # A long run started from another app instance, which then crashes: the run goes on, this app finds it
    # (a refreshed page reconnects to it), refuses a second Start naming it, stops it, and resumes it.
    client.predict(api_name="/clear_data")
    other_app, other_url = start_app(server["runs"], server["root"] / "other.log")
    try:
        first = Client(other_url, verbose=False)
        msg, _, _ = first.predict(*start_args(run_name="long", max_iters=100000, eval_interval=20), api_name="/start")
        assert "Started" in msg, msg
        wait_for(first, lambda o: plot_points(o[0]), what="metrics of the long run")
    finally:
        other_app.kill()  # a UI crash
        other_app.wait()
    pid = json.loads((server["runs"] / "long" / "status.json").read_text())["pid"]
    time.sleep(1)
    os.kill(pid, 0)  # still training
    visitor = Client(server["url"], verbose=False)
    visitor.predict(api_name="/init")  # a new page: it shows the run that is training
    assert "Training" in visitor.predict(api_name="/poll")[4]
    busy, _, _ = client.predict(*start_args(run_name="second"), api_name="/start")
    assert "busy" in busy and "long" in busy
    assert not (server["runs"] / "second").exists()
    assert "Stopping" in visitor.predict(api_name="/stop")
    client = visitor
    wait_for(client, lambda o: "Stopped" in o[4], what="the run to stop")
    status = json.loads((server["runs"] / "long" / "status.json").read_text())
    assert status["status"] == "stopped" and status["iter"] > 0
    stopped_at = status["iter"]
    msg, _ = client.predict(stopped_at + 20, api_name="/resume")
    assert "Resuming" in msg and "--resume" in msg
    out = wait_for(client, lambda o: "Finished" in o[4], what="the resumed run to finish")
    rows = [json.loads(line) for line in (server["runs"] / "long" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["iter"] == stopped_at + 20 and f"iter {stopped_at + 20:,}" in out[1]
    assert "resumed from" in (server["runs"] / "long" / "train.log").read_text()

    # a failing run shows its error in plain words, not a traceback
    msg, _, _ = client.predict(*start_args(run_name="broken", n_embd=40, n_head=3), api_name="/start")
    out = wait_for(client, lambda o: "failed" in o[4], what="the failure", timeout=60)
    assert "n_embd (40) must be divisible by n_head (3)" in out[4] and "Traceback" not in out[4]

    # a run whose status says running but whose process is gone (killed, machine rebooted) shows as failed
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    ghost = server["runs"] / "ghost"
    ghost.mkdir()
    (ghost / "status.json").write_text(json.dumps({"status": "running", "pid": gone.pid, "iter": 40}))
    (ghost / "train.log").write_text("iter 40/100 | loss 2.1\n")
    row = runs_rows(client)["ghost"]
    assert row["status"] == "failed" and "ended without saying why" in row["note"]

    # deleting a run removes its folder; the app still answers
    msg, *_ = client.predict("broken", api_name="/delete_run")
    assert "Deleted" in msg and not (server["runs"] / "broken").exists()
    with pytest.raises(Exception):
        client.predict("../outside", api_name="/delete_run")
    assert "long" in client.predict(api_name="/models")


def script(*args, timeout=180) -> subprocess.CompletedProcess:
    """One of the project's scripts, run as a user would from the repository root."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=timeout)


def test_finetune_run_and_share_on_the_hub(server, hub, tmp_path, tiny_text):
    runs, fast = server["runs"], ["--batch_size", 8, "--eval_iters", 2, "--threads", 1, "--sample_tokens", 16]
    (tmp_path / "base.txt").write_text(tiny_text[:20_000], encoding="utf-8")
    with open(tmp_path / "chat.jsonl", "w", encoding="utf-8") as f:
        for word in ["king", "queen", "sword", "crown", "night", "love"] * 6:
            f.write(json.dumps({"prompt": f"say {word}", "response": f"{word}, {word}!"}) + "\n")
    done = script("train.py", "--data", tmp_path / "base.txt", "--out_dir", runs / "base", "--n_layer", 2, "--n_head",
                  2, "--n_embd", 32, "--block_size", 64, "--max_iters", 30, "--eval_interval", 15, *fast)
    assert done.returncode == 0, done.stderr[-2000:]
    # an instruction fine-tune (LoRA adapter + template) with a merged copy, made from the terminal
    done = script("finetune.py", "--base", runs / "base", "--format", "instruct", "--data", tmp_path / "chat.jsonl",
                  "--out_dir", runs / "chat", "--max_iters", 10, "--eval_interval", 5, "--learning_rate", 2e-2,
                  "--merge", *fast)
    assert done.returncode == 0, done.stderr[-2000:]

    client = Client(server["url"], verbose=False)
    client.predict(api_name="/init")
    row = runs_rows(client)["chat"]
    assert row["type"] == "lora · instruct" and row["status"] == "finished" and row["iter"] == "10 / 10"
    assert row["best val loss"] > 0 and "chat" in client.predict(api_name="/models")

    # sampled as `python sample.py --adapter RUN` samples it: base + adapter, the prompt in the stored template
    settings = ("chat", "say crown", 0.8, 200, 1.0, 1.0, 30, 3, 1)
    command = client.predict(*settings, api_name="/sample_command")
    assert command == (f"python sample.py --adapter {runs / 'chat'} --prompt 'say crown' --max_new_tokens 30 "
                       "--temperature 0.8 --top_k 200 --num_samples 1 --seed 3")
    text = client.predict(*settings, api_name="/sample")
    template = "### Instruction:\nsay crown\n\n### Response:\n"
    assert text.startswith(template) and len(text) > len(template)
    cli = script("sample.py", "--adapter", runs / "chat", "--prompt", "say crown", "--max_new_tokens", 30,
                 "--seed", 3, "--threads", 1)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout == text + "\n" + "-" * 40 + "\n"

    # Resume runs finetune.py; a run that is training cannot be pushed
    msg, _ = client.predict("chat", 14, api_name="/resume_run")
    assert f"python finetune.py --out_dir {runs / 'chat'} --resume --max_iters 14" in msg, msg
    busy, _ = client.predict("chat", "tester/chat-lora", False, False, TOKEN, api_name="/push")
    assert "is training" in busy and not hub.repos
    out = wait_for(client, lambda o: "Finished" in o[4], what="the resumed fine-tune")
    assert "adapter" in out[4] and "— base —" in out[2]
    assert json.loads((runs / "chat" / "metrics.jsonl").read_text().splitlines()[-1])["iter"] == 14

    # Share: the token typed on the page pushes the model, the adapter (private) and the merged model
    msg, command = client.predict("base", "tester/tiny-gpt", False, False, TOKEN, api_name="/push")
    assert "Pushed" in msg and f"{hub.url}/tester/tiny-gpt" in msg, msg
    assert command == f"python hub.py {runs / 'base'} tester/tiny-gpt"
    files = hub.files("tester/tiny-gpt")
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "loss_curve.png"} <= set(files)
    assert "python sample.py --model tester/tiny-gpt" in files["README.md"].decode()
    msg, command = client.predict("chat", "tester/chat-lora", True, False, TOKEN, api_name="/push")
    assert "Pushed" in msg and command.endswith(f"{runs / 'chat'} tester/chat-lora --private"), msg
    assert hub.repos["tester/chat-lora"].private
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(hub.files("tester/chat-lora"))
    msg, command = client.predict("chat", "tester/chat-merged", False, True, TOKEN, api_name="/push")
    assert "Pushed" in msg and command.endswith(" --merged"), msg
    assert {"model.safetensors", "README.md"} <= set(hub.files("tester/chat-merged"))
    # no token (and none on this machine): hub.py's one-line error; a malformed repo id never reaches hub.py
    msg, _ = client.predict("base", "tester/other", False, False, "", api_name="/push")
    assert msg.startswith("✗ **Push failed:**") and "401" in msg and "\n" not in msg and "Traceback" not in msg
    msg, _ = client.predict("base", "--merged", False, False, TOKEN, api_name="/push")
    assert "not a repository id" in msg and "tester/other" not in hub.repos and "--merged" not in hub.repos

    # the token reached the Hub (authorised commits) and nothing else: no file under the app's folders (runs,
    # uploads, Hub cache, the app's log), no pushed file, no reply
    assert sum(r["authorised"] and r["path"].endswith("/commit/main") for r in hub.requests) == 3
    for path in server["root"].rglob("*"):
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path
    for repo_id in hub.repos:
        assert not any(TOKEN.encode() in content for content in hub.files(repo_id).values()), repo_id
    assert TOKEN not in msg + command + busy


def test_commands_and_names():
    """What the buttons run is an argument list a user could type; names from visitors become bare file names."""
    for hostile, safe in [("../../evil.txt", "evil.txt"), ("..\\..\\win.txt", "win.txt"), ("/etc/passwd", "passwd"),
                          (".hidden.md", "hidden.md"), ("my notes (1).txt", "my_notes_1_.txt"), ("..", "file"),
                          ("诗歌.txt", "诗歌.txt")]:
        assert app.sanitize_filename(hostile) == safe
    typed, executed = app.launch_prefix(2)
    assert typed == ["accelerate", "launch", "--multi_gpu", "--num_processes", "2"] and executed[1:] == typed[1:]
    assert app.launch_prefix(1) == (["python"], [sys.executable])
    args = app.train_args({**TINY, "preset": "tiny", "max_iters": 50, "tokenizer": "bpe", "vocab_size": 512},
                          ["uploads/s/a.txt"], app.REPO / "runs" / "x")
    assert args[:6] == ["train.py", "--preset", "tiny", "--data", "uploads/s/a.txt", "--out_dir"]
    assert args[6] == "runs/x" and "--tokenizer" in args and "bpe" in args and "--vocab_size" in args
    assert ["--max_iters", "50"] == args[args.index("--max_iters"):args.index("--max_iters") + 2]
    assert "--n_layer" not in args  # equal to the preset's value: not repeated
    assert args[-2:] == ["--threads", "1"]
