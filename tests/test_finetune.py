"""finetune.py: PEFT adapters on our GPT, every method and data format, merge, run folder, resume, CLI errors.

Tiny models trained for real on a slice of tiny Shakespeare; references are PEFT's own merge_and_unload and
the unmerged adapter. Scripts run in-process through their main() where a subprocess adds nothing."""
import json
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import finetune
import sample
import train
from conftest import REPO_ROOT, subprocess_env
from data import Tokenizer
from model import GPT

FAST = ["--batch_size", "8", "--eval_iters", "2", "--threads", "1", "--sample_tokens", "16", "--log_interval", "5"]


def make_base_run(out, text: str, iters: int = 300):
    """A small character-level GPT trained by train.py: the base every fine-tune here starts from."""
    data = out.parent / f"{out.name}.txt"
    data.write_text(text, encoding="utf-8")
    code = train.main(["--data", str(data), "--out_dir", str(out), "--n_layer", "2", "--n_head", "2",
                       "--n_embd", "32", "--block_size", "96", "--batch_size", "8", "--max_iters", str(iters),
                       "--eval_interval", str(iters), "--eval_iters", "2", "--eval_samples", "0",
                       "--threads", "1", "--learning_rate", "1e-2", "--warmup_iters", "20"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_text):
    return make_base_run(tmp_path_factory.mktemp("base") / "base", tiny_text[:30_000])


@pytest.fixture(scope="module")
def new_text(tmp_path_factory, tiny_text):
    path = tmp_path_factory.mktemp("text") / "new.txt"
    path.write_text(tiny_text[30_000:50_000], encoding="utf-8")
    return path


def run_finetune(*args) -> int:
    return finetune.main([str(a) for a in args] + FAST)


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def val_losses(run):
    return [m["val_loss"] for m in metrics(run) if "val_loss" in m]


# ----------------------------------------------------------------------------------------------------------
# LoRA: what changes, what is saved, what merging gives


def test_lora_trains_only_adapter_weights_and_reloads_and_merges(base_run, tmp_path):
    from peft import PeftModel

    cfg = finetune.FinetuneConfig(base=str(base_run), lora_r=4, lora_dropout=0.0, learning_rate=1e-2)
    base = GPT.from_pretrained(base_run / "model")
    model = finetune.add_adapter(base, cfg, head=False)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = train.configure_optimizer(model, cfg, "cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(base.config.vocab_size, (4, 32), generator=gen)
    for _ in range(5):
        _, loss = model(x, torch.roll(x, -1, 1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, start[name])}
    adapters = {name for name, _ in model.named_parameters() if ".lora_" in name}
    assert changed == adapters and len(adapters) == 2 * 4 * 2  # A and B of 4 projections in 2 blocks

    model.eval()
    with torch.no_grad():
        tuned_logits = model(x)[0]
        base_logits = GPT.from_pretrained(base_run / "model")(x)[0]
    assert not torch.allclose(tuned_logits, base_logits, atol=1e-4)
    tokenizer = Tokenizer.load(base_run / "model")
    folder = finetune.save_result(model, cfg, tmp_path, tokenizer, finetune.stored_extras(cfg, {}, tokenizer))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_run)

    reloaded = PeftModel.from_pretrained(GPT.from_pretrained(base_run / "model"), str(folder)).eval()
    reference = PeftModel.from_pretrained(GPT.from_pretrained(base_run / "model"), str(folder)).merge_and_unload()
    ours = finetune.load_adapter(None, folder)  # what sample.py --adapter and --merge use
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x)[0], tuned_logits, rtol=0, atol=0)
        torch.testing.assert_close(ours(x)[0], reference.eval()(x)[0], rtol=0, atol=0)
        torch.testing.assert_close(ours(x)[0], tuned_logits, rtol=0, atol=2e-5)

    # the same adapter file works on transformers' GPT2LMHeadModel (Conv1D layers, same module names)
    from transformers import GPT2LMHeadModel

    from export import export

    hf = GPT2LMHeadModel.from_pretrained(export(base_run, tmp_path / "hf_base")).eval()
    with torch.no_grad():
        torch.testing.assert_close(PeftModel.from_pretrained(hf, str(folder)).eval()(x).logits, tuned_logits,
                                   rtol=0, atol=2e-5)


def test_lora_cli_run_folder_merge_and_same_samples(base_run, new_text, tmp_path, capsys):
    run = tmp_path / "lora"
    assert run_finetune("--base", base_run, "--data", new_text, "--out_dir", run, "--max_iters", 40,
                        "--eval_interval", 10, "--learning_rate", 1e-2, "--merge") == 0
    config = json.loads((run / "config.json").read_text())
    assert config["script"] == "finetune.py" and config["method"] == "lora" and config["base"] == str(base_run)
    assert config["n_embd"] == 32 and config["block_size"] == 96  # the shape comes from the base
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    rows = metrics(run)
    assert rows[0]["iter"] == 0 and "val_loss" in rows[0]  # the base before fine-tuning
    assert {"iter", "loss", "lr", "tokens_per_sec", "elapsed_s", "eta_s"} <= set(rows[1])
    losses = val_losses(run)
    assert len(losses) == 5 and losses[-1] < losses[0]
    sides = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert sides and all({"base", "tuned", "prompt"} <= set(s) for s in sides)
    assert any(s["base"] != s["tuned"] for s in sides)
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and sorted(adapter["target_modules"]) == ["c_attn", "c_fc", "c_proj"]
    assert (run / "merged" / "model.safetensors").is_file() and (run / "checkpoint.pt").is_file()

    texts = []
    for args in (["--model", base_run, "--adapter", run], ["--adapter", run], ["--model", run / "merged"]):
        capsys.readouterr()
        assert sample.main([str(a) for a in args] + ["--prompt", "ROMEO:", "--max_new_tokens", "60",
                                                     "--seed", "7", "--threads", "1"]) == 0
        texts.append(capsys.readouterr().out)
    capsys.readouterr()
    assert sample.main(["--model", str(base_run), "--prompt", "ROMEO:", "--max_new_tokens", "60", "--seed", "7",
                        "--threads", "1"]) == 0
    plain = capsys.readouterr().out
    assert texts[0] == texts[1] == texts[2] != plain


# ----------------------------------------------------------------------------------------------------------
# every method trains and lowers the loss


@pytest.mark.parametrize("method,extra", [
    ("lora", []), ("ia3", ["--learning_rate", "1e-1"]), ("loha", []), ("adalora", ["--learning_rate", "5e-2"]),
    ("full", ["--learning_rate", "2e-3"]),
    ("freeze", ["--trainable_layers", "1", "--learning_rate", "2e-3"]),
    ("prompt", ["--num_virtual_tokens", "8", "--learning_rate", "1e-1"]),
    ("prefix", ["--num_virtual_tokens", "8", "--learning_rate", "1e-1"]),
])
def test_each_method_lowers_the_loss(base_run, new_text, tmp_path, method, extra):
    run = tmp_path / method
    assert run_finetune("--base", base_run, "--data", new_text, "--out_dir", run, "--method", method,
                        "--max_iters", 30, "--eval_interval", 5, "--learning_rate", 1e-2, "--warmup_iters", 0,
                        "--eval_samples", 0, *extra) == 0
    losses = val_losses(run)
    assert losses[-1] < losses[0] - 0.005, losses  # losses[0]: the base, before fine-tuning
    # what was saved reproduces the last val loss on a fresh base (same val windows as the run used)
    if method in ("full", "freeze"):
        model = GPT.from_pretrained(run / "model")
    else:
        model = finetune.load_adapter(None, run)
    block = 96 - (8 if method in ("prompt", "prefix") else 0)
    prepared = data.prepare([str(new_text)], tokenizer=Tokenizer.load(base_run / "model"), block_size=block,
                            log=lambda *_: None)
    gen = torch.Generator().manual_seed(train.TrainConfig.seed + 10_000)
    batches = [train.get_batch(prepared.val, 8, block, gen, torch.device("cpu")) for _ in range(2)]
    assert train.estimate_loss(model, batches) == pytest.approx(losses[-1], abs=2e-4)


def test_freeze_trains_only_the_last_blocks(base_run):
    cfg = finetune.FinetuneConfig(base=str(base_run), method="freeze", trainable_layers=1)
    model = finetune.add_adapter(GPT.from_pretrained(base_run / "model"), cfg, head=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("transformer.h.1.") for n in trainable)
    assert not any(n.startswith("transformer.h.0.") for n in trainable)
    assert "transformer.ln_f.weight" in trainable
    assert "transformer.wte.weight" in trainable  # the LM head, tied to the token embedding


def test_prefix_adapter_is_peft_format_and_generation_uses_it(base_run, new_text, tmp_path, capsys):
    run = tmp_path / "prefix"
    assert run_finetune("--base", base_run, "--data", new_text, "--out_dir", run, "--method", "prefix",
                        "--num_virtual_tokens", 8, "--max_iters", 20, "--eval_interval", 20,
                        "--learning_rate", 3e-2) == 0
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 8
    from safetensors.torch import load_file

    assert load_file(str(run / "adapter" / "adapter_model.safetensors"))["prompt_embeddings"].shape == (8, 2 * 2 * 32)
    # generation through the KV cache equals a full forward pass over the same text (prefix included)
    model = finetune.load_adapter(None, run)
    from model import generate

    ids = Tokenizer.load(base_run / "model").encode("ROMEO:")
    new = list(generate(model, ids, 20, temperature=0))
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids + new[:-1]]))
    assert logits[0, len(ids) - 1:].argmax(-1).tolist() == new
    assert finetune.main(["--merge", str(run)]) == 2
    assert "nothing to merge" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# data formats

WORDS = ["king", "queen", "sword", "crown", "night", "love", "death", "fair"]


def instruct_file(path, n=48):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            word = WORDS[i % len(WORDS)]
            f.write(json.dumps({"prompt": f"say {word}", "response": f"{word}, {word}!"}) + "\n")
        f.write(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "say hi"},
                                         {"role": "assistant", "content": "hi!"}]}) + "\n")
    return path


def test_instruct_masks_prompt_tokens(base_run, tmp_path):
    tokenizer = Tokenizer.load(base_run / "model")
    cfg = finetune.FinetuneConfig(base=str(base_run), format="instruct",
                                  data=[str(instruct_file(tmp_path / "i.jsonl"))])
    examples, _ = finetune.load_examples(cfg, tokenizer, 96)
    x, y = finetune.get_example_batch(examples, 8, torch.Generator().manual_seed(0), "instruct", 0, "cpu")
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        text = tokenizer.decode(row_x)
        prompt_len = len(tokenizer.encode(text[: text.index("Response:\n") + len("Response:\n")]))
        # targets are next tokens; the first prompt_len - 1 predict prompt tokens: ignored
        assert all(t == -100 for t in row_y[: prompt_len - 1])
        learned = [t for t in row_y if t != -100]
        # the response and its end marker; the last target is the one token x no longer holds
        assert learned and learned[:-1] == row_x[prompt_len: prompt_len + len(learned) - 1]
        response = tokenizer.decode(learned)
        assert response.endswith(finetune.response_end(tokenizer)) and "say" not in response
    # chat messages: the system and user turns are masked too
    chat = finetune.encode_chat([("system", "Be brief."), ("user", "say hi"), ("assistant", "hi!")], tokenizer, 96)
    assert tokenizer.decode([t for t in chat[1] if t != -100]) == "hi!" + finetune.response_end(tokenizer)


def test_instruct_run_stores_template_used_by_sample(base_run, tmp_path, capsys):
    run = tmp_path / "inst"
    assert run_finetune("--base", base_run, "--format", "instruct", "--data", instruct_file(tmp_path / "i.jsonl"),
                        "--out_dir", run, "--max_iters", 60, "--eval_interval", 30, "--learning_rate", 2e-2,
                        "--merge") == 0
    losses = val_losses(run)
    assert losses[-1] < losses[0]
    stored = json.loads((run / "adapter" / "nanoforge.json").read_text())
    assert stored["prompt_template"] == finetune.PROMPT_TEMPLATE and stored["format"] == "instruct"
    merged_cfg = json.loads((run / "merged" / "config.json").read_text())["nanoforge"]
    assert merged_cfg["prompt_template"] == finetune.PROMPT_TEMPLATE
    assert "chat_template" in json.loads((run / "merged" / "tokenizer_config.json").read_text())
    outs = []
    for args in (["--adapter", run], ["--model", run / "merged"]):
        capsys.readouterr()
        assert sample.main([str(a) for a in args] + ["--prompt", "say crown", "--max_new_tokens", "40",
                                                     "--temperature", "0", "--threads", "1"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1]
    assert outs[0].startswith("### Instruction:\nsay crown\n\n### Response:\n")  # the template was applied


def test_classify_learns_a_separable_set(base_run, tmp_path):
    data = tmp_path / "reviews.csv"
    lines = ["text,label"] + [f"\"the {w} was {'good and fair' if i % 2 else 'bad and foul'}\","
                              f"{'pos' if i % 2 else 'neg'}" for i, w in enumerate(WORDS * 8)]
    data.write_text("\n".join(lines) + "\n")
    run = tmp_path / "cls"
    assert run_finetune("--base", base_run, "--format", "classify", "--data", data, "--out_dir", run,
                        "--max_iters", 40, "--eval_interval", 20, "--learning_rate", 1e-2, "--merge") == 0
    last = [m for m in metrics(run) if "val_accuracy" in m][-1]
    assert last["val_accuracy"] >= 0.95
    assert json.loads((run / "adapter" / "nanoforge.json").read_text())["labels"] == ["neg", "pos"]
    assert (run / "merged" / "head.safetensors").is_file()
    assert finetune.predict(run, ["the crown was good and fair", "the sword was bad and foul"]) == ["pos", "neg"]


def test_regress_lowers_mse(base_run, tmp_path):
    data = tmp_path / "scores.jsonl"
    data.write_text("".join(json.dumps({"text": "the king " + "ha " * n, "label": n / 4}) + "\n"
                            for n in list(range(8)) * 6))
    run = tmp_path / "reg"
    assert run_finetune("--base", base_run, "--format", "regress", "--data", data, "--out_dir", run,
                        "--max_iters", 60, "--eval_interval", 10, "--learning_rate", 1e-2) == 0
    losses = val_losses(run)
    assert losses[-1] < 0.5 * losses[0], losses


# ----------------------------------------------------------------------------------------------------------
# run-folder contract: stop with SIGTERM, resume exactly; errors


def test_sigterm_saves_and_resume_matches_uninterrupted(base_run, new_text, tmp_path):
    args = [str(a) for a in ["--base", base_run, "--data", new_text, "--max_iters", 60, "--eval_interval", 20,
                             "--learning_rate", 1e-2, "--eval_samples", 0]] + FAST[:-2] + ["--log_interval", "1"]
    assert finetune.main(args + ["--out_dir", str(tmp_path / "whole")]) == 0

    run = tmp_path / "stopped"
    cmd = [sys.executable, "finetune.py", *args, "--out_dir", str(run)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not ((run / "metrics.jsonl").is_file() and len(metrics(run)) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "stopped" and 3 <= status["iter"] < 60, (status, out[-500:])
    assert (run / "adapter" / "adapter_model.safetensors").is_file()

    assert finetune.main(["--out_dir", str(run), "--resume"]) == 0
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    whole = {m["iter"]: m.get("loss") for m in metrics(tmp_path / "whole")}
    resumed = {m["iter"]: m.get("loss") for m in metrics(run)}
    assert resumed.keys() == whole.keys() and resumed == whole


def test_errors_are_one_line(base_run, new_text, tmp_path, capsys):
    cases = [
        (["--base", "someone/no-such-model", "--data", new_text], 1, "someone/no-such-model"),
        (["--base", tmp_path, "--data", new_text], 1, "no model here"),
        (["--base", base_run, "--data", new_text, "--method", "magic"], 2, "method"),
        (["--base", base_run, "--data", new_text, "--lora_r", "x"], 2, "lora_r"),
        (["--base", base_run, "--data", new_text, "--n_layer", "8"], 2, "comes from --base"),
        (["--base", base_run, "--data", new_text, "--target_modules", "nope"], 2, "nope"),
        (["--base", base_run, "--format", "classify", "--data", new_text], 1, "one per row"),
        (["--merge", tmp_path], 2, "no adapter"),
    ]
    for args, code, words in cases:
        assert finetune.main([str(a) for a in args] + ["--out_dir", str(tmp_path / "err")]
                             if args[0] != "--merge" else [str(a) for a in args]) == code, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and words in err and len(err.splitlines()) == 1, (args, err)
