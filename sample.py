"""
Sample text from a trained GPT, streamed to the terminal, or measure its loss on a text file.

CPU:
    python sample.py --model runs/<run folder> --prompt "ROMEO:" --num_samples 3 --seed 1
    python sample.py --model runs/<run folder> --temperature 0           # greedy; --num_beams 4 for beam search
    python sample.py --model runs/<run folder> --eval held_out.txt        # last line: loss=X ppl=Y tokens=N
    python sample.py --model gpt2 --prompt "Once upon a time" --top_p 0.95  # a Hub id (downloaded once)
One GPU (picked automatically; bf16 where supported):
    python sample.py --model runs/gpt2 --prompt "..." --max_new_tokens 500
accelerate launch (sampling is a single process; accelerate only picks the device):
    accelerate launch --num_processes 1 sample.py --model runs/gpt2 --prompt "..."
"""
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

if "OMP_WAIT_POLICY" not in os.environ:  # a short OpenMP spin before sleeping: see train.py
    os.environ.setdefault("GOMP_SPINCOUNT", "2000")

import torch  # noqa: E402

from train import ConfigError, parse_config, resolve_threads


@dataclass
class SampleConfig:
    model: str = ""                 # run folder, model folder (config.json + model.safetensors) or Hub id
    adapter: str = ""               # PEFT adapter on top of --model: a fine-tune run or adapter folder, or Hub id
    prompt: str = "\n"              # text to continue; FILE:path.txt reads it from a file
    max_new_tokens: int = 300       # tokens to generate per sample
    temperature: float = 0.8        # < 1 sharper, > 1 more random; 0 = greedy
    top_k: int = 200                # sample among the k most likely tokens; 0 = all
    top_p: float = 1.0              # nucleus sampling: smallest set of tokens with this total probability
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the text (1.1-1.3)
    num_samples: int = 1            # samples, with seeds seed, seed+1, ...
    seed: int = 1337                # same seed, same text
    num_beams: int = 1              # > 1: beam search (deterministic, shows the text when done)
    stop: list[str] = field(default_factory=list)  # stop at any of these strings (not printed)
    eval: str = ""                  # text file: print its loss per token instead of sampling
    device: str = "auto"            # auto | cpu | cuda | cuda:1 | mps
    threads: int = 0                # CPU threads; 0 = auto (1 for models under 10M parameters, see sample_threads)


def sample_threads(model, threads: int = 0) -> int:
    """CPU threads for generation. One token at a time is matrix-vector work: for small models one thread
    is fastest (4 x 128 model, 2-core CPU: 1,350 tokens/s on 1 thread, 420 on 2 while another process ran),
    and it leaves the other cores to training; bigger models use the cores they can get."""
    if threads > 0:
        return threads
    return 1 if model.num_params() < 10_000_000 else resolve_threads(0)


def resolve_device(device=None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(model, adapter=None, device=None):
    """(model in eval mode, tokenizer, info) from a run folder (uses RUN/model), a model folder or a Hub id.

    info: {"source": "run" | "folder" | "hub", "path": where the weights came from, "config": config.json
    of the model, "adapter": the adapter given or None}. Raises ModelLoadError with a one-line message."""
    from data import Tokenizer
    from model import GPT, ModelLoadError

    device = resolve_device(device)
    if not model and adapter:  # the base the adapter was trained on
        from finetune import adapter_base

        model = adapter_base(adapter)
    path = Path(model).expanduser()
    if (path / "model" / "config.json").is_file():
        source, path = "run", path / "model"
    elif path.is_dir() and (not (path / "config.json").is_file() or (path / "status.json").is_file()):
        raise ModelLoadError(f"{model} holds no model yet: expected RUN/model/ or a model folder (config.json + "
                             f"model.safetensors); for a fine-tune run use --model BASE --adapter {model}")
    elif path.is_dir():
        source = "folder"
    elif path.is_absolute() or str(model).startswith((".", "~")) or Path(path.parts[0]).is_dir():
        raise ModelLoadError(f"no model at {model}: expected a run folder, a model folder or a Hub id")
    else:
        source = "hub"
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    gpt = GPT.from_pretrained(str(path) if source != "hub" else str(model), device=device, dtype=dtype)
    if source == "hub":
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(str(model), allow_patterns=["*.json"]))  # cached by from_pretrained
    if not (path / "tokenizer.json").is_file():
        raise ModelLoadError(f"{path} has no tokenizer.json; save the model with its tokenizer")
    tokenizer = Tokenizer.load(str(path))
    info = {"source": source, "path": str(path), "config": json.loads((path / "config.json").read_text()),
            "adapter": adapter or None}
    info["nanoforge"] = info["config"].get("nanoforge", {})  # fine-tunes store their prompt template here
    if adapter:  # PEFT adapters (LoRA, ...) are finetune.py's business; it applies one onto the base model
        try:
            from finetune import find_adapter, load_adapter
        except ImportError:
            raise ModelLoadError("--adapter needs finetune.py and the peft package") from None
        gpt = load_adapter(gpt, adapter, device=device)
        info["nanoforge"] = {**info["nanoforge"], **find_adapter(adapter)[1]}
    return gpt.eval(), tokenizer, info


def instruction_prompt(info, tokenizer, prompt: str) -> tuple[str, dict]:
    """(prompt, generate kwargs) for a model fine-tuned on instructions: the prompt goes into the template
    stored with it, and generation stops where a response ends. Other models: (prompt, {})."""
    settings = info.get("nanoforge", {})
    template = settings.get("prompt_template")
    if not template:
        return prompt, {}
    stops = {"stop_strings": (settings["stop"],)} if settings.get("stop") else {}
    if tokenizer.eos_id is not None:
        stops["stop_ids"] = (tokenizer.eos_id,)
    return template.replace("{prompt}", prompt), stops


def stream_text(model, tokenizer, prompt: str, **gen_kwargs):
    """Yield the generated text in pieces as tokens arrive (the prompt itself is not repeated).

    Decoding is incremental and UTF-8-safe: a byte-level token that ends inside a multi-byte character
    decodes to U+FFFD, so text is held back until the character is complete. Text matching one of
    gen_kwargs["stop_strings"] ends the stream and is not yielded. Other kwargs go to model.generate."""
    from model import generate

    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        if tokenizer.eos_id is None:
            raise ValueError("the prompt is empty (or has no known tokens) and the tokenizer has no end token")
        prompt_ids = [tokenizer.eos_id]
    stops = tuple(s for s in gen_kwargs.get("stop_strings", ()) if s)
    hold = max((len(s) for s in stops), default=1) - 1  # characters that may be the start of a stop string
    ids, prefix, read, pending = [], 0, 0, ""
    for token in generate(model, prompt_ids, decode=tokenizer.decode, **gen_kwargs):
        ids.append(token)
        text = tokenizer.decode(ids[prefix:])
        if text.endswith("\ufffd"):
            continue
        done = tokenizer.decode(ids[prefix:read])
        pending += text[len(done):]
        prefix, read = read, len(ids)
        hits = [pending.index(s) for s in stops if s in pending]
        if hits:
            yield pending[: min(hits)]
            return
        if len(pending) > hold:
            yield pending[: len(pending) - hold]
            pending = pending[len(pending) - hold:]
    pending += tokenizer.decode(ids[prefix:])[len(tokenizer.decode(ids[prefix:read])):]
    hits = [pending.index(s) for s in stops if s in pending]
    if pending:
        yield pending[: min(hits)] if hits else pending


@torch.no_grad()
def eval_loss(model, ids: list[int], batch_size: int = 16) -> tuple[float, int]:
    """Mean next-token loss (nats) over `ids` in non-overlapping context-length windows, and the number of
    predicted tokens (len(ids) - 1). The same quantity as the val loss train.py logs."""
    T = model.config.block_size
    device = model.lm_head.weight.device
    data = torch.tensor(ids, dtype=torch.long)
    n = len(ids) - 1
    total = 0.0
    starts = list(range(0, n, T))
    for i in range(0, len(starts), batch_size):
        group = starts[i:i + batch_size]
        full = [s for s in group if s + T <= n]  # whole windows go in batches; the last short one alone
        chunks = [full] if full else []
        chunks += [[s] for s in group if s + T > n]
        for chunk in chunks:
            length = min(T, n - chunk[0])
            x = torch.stack([data[s:s + length] for s in chunk]).to(device)
            y = torch.stack([data[s + 1:s + 1 + length] for s in chunk]).to(device)
            logits, _ = model(x)
            total += torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(),
                                                       reduction="sum").item()
    return total / n, n


def main(argv=None) -> int:
    from data import DataError
    from model import ModelLoadError

    try:
        cfg = parse_config(SampleConfig, argv, description=__doc__, presets=False)
        if not cfg.model and not cfg.adapter:
            raise ConfigError("--model is required: a run folder, a model folder or a Hub id")
        if cfg.num_samples < 1 or cfg.max_new_tokens < 1 or cfg.num_beams < 1:
            raise ConfigError("--num_samples, --max_new_tokens and --num_beams must be at least 1")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        model, tokenizer, info = load_model(cfg.model, cfg.adapter or None, cfg.device)
        if model.lm_head.weight.device.type == "cpu":
            torch.set_num_threads(sample_threads(model, cfg.threads) if not cfg.eval else resolve_threads(cfg.threads))
        if cfg.eval:
            try:
                text = Path(cfg.eval).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"cannot read {cfg.eval}: {getattr(e, 'strerror', None) or e}") from None
            ids = tokenizer.encode(text)
            if len(ids) < 2:
                raise DataError(f"{cfg.eval} holds {len(ids)} token(s); --eval needs at least 2")
            loss, n = eval_loss(model, ids)
            print(f"{cfg.eval}: {n:,} tokens in windows of {model.config.block_size}")
            print(f"loss={loss:.4f} ppl={math.exp(loss):.2f} tokens={n}")
            return 0
        prompt = cfg.prompt
        if prompt.startswith("FILE:"):
            try:
                prompt = Path(prompt[5:]).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise DataError(f"cannot read the prompt file {prompt[5:]}: {getattr(e, 'strerror', None) or e}") \
                    from None
        prompt, stops = instruction_prompt(info, tokenizer, prompt)
        gen = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
                   top_p=cfg.top_p if cfg.top_p < 1 else None, repetition_penalty=cfg.repetition_penalty,
                   num_beams=cfg.num_beams, stop_strings=tuple(cfg.stop) + stops.pop("stop_strings", ()), **stops)
        for i in range(cfg.num_samples):
            sys.stdout.write(prompt)
            for piece in stream_text(model, tokenizer, prompt, seed=cfg.seed + i, **gen):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n" + "-" * 40 + "\n")
            sys.stdout.flush()
        return 0
    except (ModelLoadError, DataError, ValueError) as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
