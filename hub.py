"""
Share a run on the Hugging Face Hub: the model folder (or the adapter) plus a generated model card.

    python hub.py runs/shakespeare you/shakespeare-gpt               # a train.py run: the model
    python hub.py runs/lora-chat you/chat-lora --private             # a finetune.py run: the adapter
    python hub.py runs/lora-chat you/chat-merged --merged            # ... or its merged model
    python train.py ... --push_to_hub you/name [--hub_private]       # push at the end of training

The token comes from HF_TOKEN or `hf auth login` (huggingface_hub reads both); it is only ever sent to
the Hub, never written to a file, a log or the config, never printed. The card (README.md) carries YAML
metadata (library_name, tags, license, datasets, base_model for adapters, pipeline_tag), the training
config, data stats, final train/val loss, a loss-curve PNG, a few samples, hardware, wall time, and the
commands to load and sample the model. Only safetensors, JSON and text are uploaded, never checkpoint.pt.
"""

import argparse
import io
import json
import re
import sys
from pathlib import Path

# files a model or adapter folder may contribute to the repo (weights, configs, tokenizer, template)
UPLOAD_PATTERNS = ("*.safetensors", "*.json", "*.txt", "*.jinja")
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$|^[\w.-]+$")


class HubError(Exception):
    """Pushing failed; the message is one user-facing line (and never holds the token)."""


# ----------------------------------------------------------------------------------------------------------
# Reading a run folder


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill: skip it
                pass
    return rows


def find_upload_folder(path: Path, merged: bool = False) -> tuple[Path, str]:
    """(folder whose files are uploaded, "model" | "adapter") for a run, model or adapter folder."""
    if merged:
        if (path / "merged" / "config.json").is_file():
            return path / "merged", "model"
        raise HubError(f"{path}: no merged model yet; run `python finetune.py --merge {path}` first")
    for folder, kind in ((path / "adapter", "adapter"), (path, "adapter"), (path / "model", "model"), (path, "model")):
        marker = "adapter_config.json" if kind == "adapter" else "config.json"
        if (folder / marker).is_file() and any(folder.glob("*.safetensors")):
            return folder, kind
    raise HubError(f"{path}: nothing to push (expected a run folder with model/ or adapter/, or a model folder)")


# ----------------------------------------------------------------------------------------------------------
# The model card


def loss_curve_png(metrics: list[dict]) -> bytes | None:
    """PNG of train and val loss against iterations, or None without any logged loss."""
    train = [(m["iter"], m["loss"]) for m in metrics if "loss" in m and "iter" in m]
    val = [(m["iter"], m["val_loss"]) for m in metrics if "val_loss" in m and "iter" in m]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax.plot(*zip(*val), label="val", marker="o", markersize=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _is_hub_id(name) -> bool:
    return isinstance(name, str) and bool(REPO_ID.match(name)) and not Path(name).exists()


def _yaml_list(key: str, values) -> list[str]:
    return [f"{key}:"] + [f"- {json.dumps(v)}" for v in values] if values else []


PEFT_NAMES = {"LORA": "LoRA", "IA3": "IA3", "LOHA": "LoHa", "ADALORA": "AdaLoRA", "PROMPT_TUNING": "prompt-tuning",
              "PREFIX_TUNING": "prefix-tuning"}


def adapter_base(upload: Path, base_model: str | None = None) -> tuple[str, bool]:
    """(the base an adapter names on the Hub, whether that is a Hub id): base_model, else the recorded one,
    a local path cut to its last part (the repo must not publish the user's folder layout)."""
    if base_model:
        return base_model, True
    base = _read_json(upload / "adapter_config.json").get("base_model_name_or_path") or ""
    return str(_public(base)), _is_hub_id(base)


def model_card(run: Path, repo_id: str, kind: str, upload: Path, license: str = "mit", has_plot: bool = False,
               base_model: str | None = None) -> str:
    """README.md for the repo: YAML metadata, then what it is, how to use it, and how it was trained."""
    config = _read_json(run / "config.json") if run != upload else {}  # a bare model folder: no run info
    metrics = _read_jsonl(run / "metrics.jsonl")
    samples = _read_jsonl(run / "samples.jsonl")
    status = _read_json(run / "status.json")
    adapter = _read_json(upload / "adapter_config.json") if kind == "adapter" else {}
    base, base_on_hub = adapter_base(upload, base_model) if kind == "adapter" else (None, False)
    model_cfg = _read_json(upload / "config.json") if kind == "model" else {}
    extras = model_cfg.get("nanoforge", {})
    # transformers reads the folder as it is only with GPT-2's architecture, biases included
    gpt2_ok = (extras.get("pos_encoding", "learned"), extras.get("norm", "layernorm"), extras.get("bias", True)) \
        == ("learned", "layernorm", True)

    tags = ["nanoforge", "gpt2", "text-generation"]
    if kind == "adapter":
        tags += ["peft", str(adapter.get("peft_type", "lora")).lower()]
    if config.get("method"):
        tags.append(f"method-{config['method']}")
    meta = [f"library_name: {'peft' if kind == 'adapter' else ('transformers' if gpt2_ok else 'nanoforge')}"]
    meta += [f"license: {license}", "pipeline_tag: text-generation"]
    meta += _yaml_list("tags", list(dict.fromkeys(tags)))
    if config.get("hf_dataset"):
        meta += _yaml_list("datasets", [config["hf_dataset"]])
    if kind == "adapter" and base_on_hub:
        meta.append(f"base_model: {base}")

    last_train = next((m for m in reversed(metrics) if "loss" in m), {})
    last_val = next((m for m in reversed(metrics) if "val_loss" in m), {})
    wall = max((m.get("elapsed_s", 0) for m in metrics), default=0)
    script = config.get("script", "train.py")
    lines = ["---", *meta, "---", "", f"# {repo_id.split('/')[-1]}", ""]
    if kind == "adapter":
        lines += [f"A {PEFT_NAMES.get(adapter.get('peft_type'), adapter.get('peft_type'))} adapter for `{base}`, "
                  f"fine-tuned with nanoforge `finetune.py` (format: {config.get('format', 'text')})."
                  + ("" if base_on_hub else f" `{base}` is a local model: push it too and pass its repo id "
                     "to `--model`."), ""]
    else:
        n = {k: model_cfg.get(k) for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")}
        lines += [f"A GPT trained with nanoforge `{script}`: {n['n_layer']} layers, {n['n_head']} heads, "
                  f"{n['n_embd']} wide, context {n['n_positions']}, vocabulary {n['vocab_size']}.", ""]

    lines += ["## Use it", "", "With nanoforge (`git clone` it, `pip install -r requirements.txt`):", "", "```bash"]
    if kind == "adapter":
        lines.append(f"python sample.py --model {base} --adapter {repo_id} --prompt \"Hello\" --seed 1")
    else:
        lines.append(f"python sample.py --model {repo_id} --prompt \"Hello\" --seed 1")
    lines += ["```", ""]
    if kind == "model" and gpt2_ok:
        lines += ["With transformers (GPT-2 layout):", "", "```python",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f"model = AutoModelForCausalLM.from_pretrained({repo_id!r})",
                  f"tokenizer = AutoTokenizer.from_pretrained({repo_id!r})", "```", ""]
    if (tmpl := extras.get("prompt_template") or _read_json(upload / "nanoforge.json").get("prompt_template")):
        lines += ["Prompts are wrapped in this template (sample.py does it for you):", "", "```",
                  tmpl, "```", ""]

    lines += ["## Training", ""]
    if last_train or last_val:
        lines += ["| iterations | final train loss | final val loss | wall time |", "|---|---|---|---|",
                  f"| {last_train.get('iter', last_val.get('iter', '-'))} | {last_train.get('loss', float('nan')):.4f} "
                  f"| {last_val.get('val_loss', float('nan')):.4f} | {wall:.0f} s |", ""]
    if has_plot:
        lines += ["![loss curve](loss_curve.png)", ""]
    if config.get("hardware"):
        lines += [f"Hardware: {config['hardware']}.", ""]
    if status.get("status"):
        lines += [f"Run status: {status['status']}.", ""]
    if config.get("data_stats"):
        lines += ["Data:", "", "```json", json.dumps(config["data_stats"], indent=2), "```", ""]
    shown = {k: _public(v) for k, v in config.items()
             if k not in ("command", "data_stats", "hardware", "out_dir", "push_to_hub", "hub_private", "resume")}
    if shown:
        lines += ["Training config:", "", "```json", json.dumps(shown, indent=2, default=str), "```", ""]
    if config.get("command"):
        lines += ["Command:", "", "```bash", "python " + " ".join(_quote(_public(a)) for a in config["command"]),
                  "```", ""]
    if samples:
        last = max(s.get("iter", 0) for s in samples)
        lines += ["## Samples", "", f"At iteration {last}:", ""]
        for s in [s for s in samples if s.get("iter", 0) == last][:3]:
            lines += [f"Prompt: `{json.dumps(s.get('prompt', ''))[1:-1]}`", ""]
            if "base" in s and "tuned" in s:  # fine-tunes: the base model and the tuned one, same seed
                lines += ["base:", "", "```", str(s["base"]), "```", "", "tuned:", "", "```", str(s["tuned"]),
                          "```", ""]
            else:
                lines += ["```", str(s.get("text", "")), "```", ""]
                if "label" in s:
                    lines += [f"(true label: {s['label']})", ""]
    return "\n".join(lines)


def _public(value):
    """Local paths reduced to their last part: the card must not publish the user's folder layout."""
    if isinstance(value, list):
        return [_public(v) for v in value]
    if isinstance(value, str) and ("/" in value or "\\" in value) and (
            Path(value).exists() or Path(value).is_absolute()):
        return Path(value).name
    return value


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(str(arg))


# ----------------------------------------------------------------------------------------------------------
# Pushing


def push_run(path, repo_id: str, private: bool = False, token: str | None = None, *, merged: bool = False,
             license: str = "mit", base_model: str | None = None, commit_message: str | None = None,
             log=print) -> str:
    """Create `repo_id` (if needed) and upload the run's model or adapter, README.md and loss_curve.png.

    token=None lets huggingface_hub use HF_TOKEN or the cached login. Returns the repo URL. Raises HubError
    with a one-line message (never containing the token). Call it from the main process only."""
    path = Path(path)
    if not path.is_dir():
        raise HubError(f"{path}: no such folder")
    if not REPO_ID.match(repo_id or ""):
        raise HubError(f"{repo_id!r}: not a Hub repo id; use user/name (letters, digits, '-', '_', '.')")
    upload, kind = find_upload_folder(path, merged)
    run = path if (path / "config.json").is_file() and upload != path else upload

    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    plot = loss_curve_png(_read_jsonl(run / "metrics.jsonl"))
    card = model_card(run, repo_id, kind, upload, license=license, has_plot=plot is not None, base_model=base_model)
    files = sorted({f for pattern in UPLOAD_PATTERNS for f in upload.glob(pattern) if f.is_file()})
    rewritten = {}  # files whose recorded base model is named as on the Hub, not by a local path
    if kind == "adapter":
        rewritten["adapter_config.json"] = {**_read_json(upload / "adapter_config.json"),
                                            "base_model_name_or_path": adapter_base(upload, base_model)[0]}
    for name in ("config.json", "nanoforge.json"):
        content = _read_json(upload / name)
        section = content.get("nanoforge", {}) if name == "config.json" else content
        if section.get("base"):
            section["base"] = base_model or _public(section["base"])
            rewritten[name] = content
    operations = [CommitOperationAdd(path_in_repo=f.name, path_or_fileobj=str(f)) for f in files
                  if f.name != "README.md" and f.name not in rewritten]
    operations += [CommitOperationAdd(path_in_repo=name,
                                      path_or_fileobj=(json.dumps(content, indent=2) + "\n").encode())
                   for name, content in rewritten.items()]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    if plot is not None:
        operations.append(CommitOperationAdd(path_in_repo="loss_curve.png", path_or_fileobj=plot))
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.create_commit(repo_id, operations, commit_message=commit_message or f"Upload {kind} with nanoforge")
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", "?")
        hint = " (check HF_TOKEN or `hf auth login`, and write access to the namespace)" if status in (401, 403) else ""
        raise HubError(f"pushing to {repo_id} failed: HTTP {status}{hint}") from None
    except (OSError, ValueError) as e:  # no connection, offline mode, a malformed card
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"pushing to {repo_id} failed: {reason}") from None
    log(f"pushed {kind} {upload} -> {url}")
    return str(url)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("run", help="run folder (train.py / finetune.py), model folder or adapter folder")
    parser.add_argument("repo_id", help="Hub repo to create or update, user/name")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--merged", action="store_true", help="push a fine-tune's merged model, not its adapter")
    parser.add_argument("--license", default="mit", help="license in the card's metadata (default mit)")
    parser.add_argument("--base_model", help="Hub id of an adapter's base, when it was trained on a local folder")
    args = parser.parse_args(argv)
    try:
        push_run(args.run, args.repo_id, private=args.private, merged=args.merged, license=args.license,
                 base_model=args.base_model)
    except HubError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
