"""
Train a GPT from scratch on your own text. Read it top to bottom: config, compute init, data, model,
optimizer, loop, save. Distributed training is accelerate's job; this file is the same on one CPU or 64 GPUs.

CPU (the defaults: a character-level model of the bundled tiny Shakespeare, about a minute on 2 cores):
    python train.py
    python sample.py --model runs/<the run folder it printed>
Your own text (files, folders or globs of .txt/.md/.csv/.jsonl/.json/.parquet, or a Hub dataset):
    python train.py --data my_texts/ --tokenizer bpe --vocab_size 4096 --out_dir runs/mine
    python train.py --preset tiny --data notes.md              # a seconds-long demo
One GPU (GPT-2 124M shape; --dtype auto picks bf16 where the GPU supports it):
    python train.py --preset gpt2 --data my_corpus/ --tokenizer gpt2 --out_dir runs/gpt2
Several GPUs (DDP; FSDP/DeepSpeed when your `accelerate config` says so):
    accelerate launch --num_processes 8 train.py --preset gpt2 --data my_corpus/ --tokenizer gpt2
Stop with Ctrl-C or SIGTERM (a checkpoint is saved), continue later, optionally with a bigger budget:
    python train.py --out_dir runs/mine --resume --max_iters 10000
Show the environment (devices, bf16 support, accelerate config, what --dtype auto picks):
    python train.py --check
"""
import argparse
import difflib
import inspect
import json
import math
import os
import platform
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path

# OpenMP (libgomp) threads spin ~300k iterations before sleeping; when another busy process shares the cores
# (the UI sampling, a second run) 2-thread training then collapsed from ~40 to ~2,000 ms/iter. A short spin keeps
# the idle-machine speed (40 ms/iter at the default shape, 2 cores) and degrades gently (94 ms with one core busy;
# fully sleeping waits: 59 and 64 ms). Set before torch loads OpenMP: applies when this file is the entry point.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "2000")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent


@dataclass
class TrainConfig:
    # data
    data: list[str] = field(default_factory=lambda: ["data/tinyshakespeare.txt"])  # files, folders or globs
    hf_dataset: str = ""            # Hugging Face dataset id to train on instead of --data (needs internet)
    hf_split: str = "train"         # split of --hf_dataset to read
    text_column: str = "text"       # column with the text in .csv/.jsonl/.json/.parquet files and Hub datasets
    tokenizer: str = "char"         # char | bpe | folder or Hub id with a tokenizer.json (e.g. gpt2)
    vocab_size: int = 4096          # BPE vocabulary size (char and pretrained tokenizers bring their own)
    split: str = "0.9,0.1"          # train,val[,test] fractions, split by position (last 10% = val, as nanoGPT)
    out_dir: str = ""               # run folder; empty = runs/<data name>-<YYYYmmdd-HHMMSS>
    # model: learned positions + LayerNorm + bias = GPT-2 layout, exportable to transformers and llama.cpp
    n_layer: int = 4                # transformer blocks
    n_head: int = 4                 # attention heads; must divide n_embd
    n_embd: int = 128               # width; parameters grow ~12 * n_layer * n_embd^2
    block_size: int = 64            # context length in tokens
    dropout: float = 0.0            # 0 for short runs; 0.1-0.2 once val loss rises while train loss falls
    bias: bool = True               # biases in Linear and LayerNorm (GPT-2: on)
    pos_encoding: str = "learned"   # learned | sinusoidal | rotary (rotary is not GPT-2-exportable)
    norm: str = "layernorm"         # layernorm | rmsnorm (rmsnorm is not GPT-2-exportable)
    # optimisation
    batch_size: int = 16            # sequences per micro-step per process
    grad_accum: int = 1             # micro-steps per optimizer step; tokens/iter = batch*block*accum*processes
    max_iters: int = 1100           # optimizer steps; the cosine schedule ends here
    max_minutes: float = 0.0        # wall-clock budget for this invocation in minutes; 0 = no limit
    learning_rate: float = 3.5e-3   # peak AdamW learning rate; ~1e-3 for 10M params, ~6e-4 for GPT-2 124M
    min_lr: float = 1e-4            # learning rate at max_iters (learning_rate / 10 to / 30)
    warmup_iters: int = 50          # linear warmup steps from 0 to learning_rate
    weight_decay: float = 0.1       # AdamW decay, applied to matrices only (not biases, norms)
    beta1: float = 0.9              # AdamW momentum
    beta2: float = 0.99             # AdamW second moment; 0.95 for big models, 0.99 for small batches
    grad_clip: float = 1.0          # clip the global gradient norm to this; 0 = off
    label_smoothing: float = 0.0    # 0-0.1; smooths targets (val loss is always reported without it)
    # evaluation, logging, checkpoints
    eval_interval: int = 250        # iterations between val evaluations (+ samples + checkpoint)
    eval_iters: int = 20            # val batches per evaluation (a fixed set, so evals are comparable)
    log_interval: int = 10          # iterations between log lines / metrics.jsonl rows
    save_interval: int = 0          # iterations between checkpoints; 0 = at every evaluation
    sample_prompt: str = "\n"       # prompt of the samples written to samples.jsonl at each evaluation
    sample_tokens: int = 200        # tokens per sample
    eval_samples: int = 2           # samples per evaluation (seeds seed, seed+1, ...); 0 = none
    early_stop_patience: int = 0    # stop after this many evaluations without a better val loss; 0 = off
    # compute
    dtype: str = "auto"             # auto | float32 | bfloat16 | float16 (float16 needs CUDA; uses a grad scaler)
    compile: bool = False           # torch.compile the model (helps on GPUs; nothing on CPU)
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    threads: int = 0                # CPU threads per process; 0 = auto (see resolve_threads)
    seed: int = 1337                # seeds init, batches, dropout and samples (each process adds its rank)
    resume: bool = False            # continue the run in --out_dir from its checkpoint.pt
    # sharing
    push_to_hub: str = ""           # Hub repo id (user/name) to upload the model to at the end
    hub_private: bool = False       # create that Hub repo as private


CHOICES = {
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "pos_encoding": ("learned", "sinusoidal", "rotary"),
    "norm": ("layernorm", "rmsnorm"),
}
RUN_META_KEYS = ("script", "command", "data_stats", "hardware")  # also in a run's config.json; not fields


class ConfigError(Exception):
    """A user mistake in flags or config files: one line on stderr, exit code 2."""


class RunError(Exception):
    """A run cannot continue (NaN loss, bad resume, out of memory): one line on stderr, exit code 1."""


# ----------------------------------------------------------------------------------------------------------
# config parsing: dataclass defaults < --preset < --config < explicit flags (--resume: the run's config.json
# replaces the defaults)


def _field_help(cls) -> dict:
    """The `# comment` after each field in the dataclass source, used as --help text."""
    helps = {}
    for klass in reversed(cls.__mro__):
        if not hasattr(klass, "__dataclass_fields__"):
            continue
        for m in re.finditer(r"^\s+(\w+)\s*:[^\n#]*#\s*(.+)$", inspect.getsource(klass), re.M):
            helps[m.group(1)] = m.group(2).strip()
    return helps


def _coerce(name, ftype, value, where):
    """Type-check a value from a YAML/JSON file against the field's type."""
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }
    if ftype == list[str]:
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise ConfigError(f"{where}: '{name}' must be a string or a list of strings, got {value!r}")
    if not ok[ftype](value):
        raise ConfigError(f"{where}: '{name}' must be {ftype.__name__}, got {value!r}")
    return float(value) if ftype is float else value


def load_config_file(path, cls, where=None) -> dict:
    """Read a YAML or JSON mapping of config keys; reject unknown keys and wrong types."""
    path = Path(path)
    where = where or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        if path.suffix == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except Exception as e:
        raise ConfigError(f"{where} is not valid {path.suffix[1:].upper() or 'YAML'}: "
                          f"{str(e).splitlines()[0]}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of config keys to values")
    types = {f.name: f.type for f in fields(cls)}
    out = {}
    for key, value in values.items():
        if key in RUN_META_KEYS:
            continue
        if key not in types:
            close = difflib.get_close_matches(str(key), types, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key '{key}'{hint}")
        out[key] = _coerce(key, types[key], value, where)
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message; the caller prints it and exits 2
        raise ConfigError(f"{message} (see --help)")


def parse_config(cls, argv=None, description=None, presets=True):
    """Build the config `cls` (a dataclass like TrainConfig) from defaults, --preset, --config and flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    helps = _field_help(cls)
    parser = _Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML or JSON file of config keys")
    if presets:
        parser.add_argument("--preset", help=f"preset name, one of: {', '.join(list_presets()) or 'none'}")
    defaults = cls()
    for f in fields(cls):
        kw = dict(default=argparse.SUPPRESS, help=helps.get(f.name, "").replace("%", "%%"))
        if f.type is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif f.type == list[str]:
            kw.update(nargs="+", metavar="PATH")
        else:
            kw.update(type=f.type, metavar=f.type.__name__.upper())
        if f.name in CHOICES:
            kw["choices"] = CHOICES[f.name]
        kw["help"] += f" (default: {getattr(defaults, f.name)!r})".replace("%", "%%")
        parser.add_argument(f"--{f.name}", **kw)
    args = vars(parser.parse_args(argv))
    preset, config_file = args.pop("preset", None), args.pop("config", None)

    layers = []
    if preset:
        path = HERE / "configs" / f"{preset}.yaml"
        if not re.fullmatch(r"[\w.-]+", preset) or not path.is_file():
            raise ConfigError(f"unknown preset '{preset}' (available: {', '.join(list_presets())})")
        layers.append(load_config_file(path, cls, where=f"preset {preset}"))
    if config_file:
        layers.append(load_config_file(config_file, cls))
    layers.append(args)
    values = {}
    for layer in layers:
        values.update(layer)
    if values.get("resume"):
        if not values.get("out_dir"):
            raise ConfigError("--resume needs --out_dir RUN_FOLDER")
        run_config = Path(values["out_dir"]) / "config.json"
        if run_config.is_file():  # the run's own config is the base; presets/files/flags given now override
            values = {**load_config_file(run_config, cls), **values}
    cfg = cls(**values)
    for name, choices in CHOICES.items():
        if hasattr(cfg, name) and getattr(cfg, name) not in choices:
            raise ConfigError(f"'{name}' must be one of {', '.join(choices)}, got {getattr(cfg, name)!r}")
    return cfg


def list_presets() -> list[str]:
    return sorted(p.stem for p in (HERE / "configs").glob("*.yaml"))


def parse_split(split: str) -> tuple:
    """'0.9,0.1' -> (0.9, 0.1); two or three positive fractions that sum to 1."""
    try:
        parts = tuple(float(s) for s in split.split(","))
    except ValueError:
        parts = ()
    if len(parts) not in (2, 3) or min(parts) <= 0 or abs(sum(parts) - 1) > 1e-6:
        raise ConfigError(f"'split' must be train,val[,test] fractions summing to 1 (e.g. 0.9,0.1), got {split!r}")
    return parts


def check_config(cfg: TrainConfig):
    """Value checks shared by train.py and finetune.py (types are already checked by parse_config)."""
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
    positive = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "max_iters",
                "eval_interval", "eval_iters", "log_interval")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"'{name}' must be at least 1, got {getattr(cfg, name)}")
    if not 0 <= cfg.dropout < 1 or not 0 <= cfg.label_smoothing < 1:
        raise ConfigError("'dropout' and 'label_smoothing' must be in [0, 1)")
    if cfg.learning_rate <= 0 or cfg.min_lr < 0:
        raise ConfigError("'learning_rate' must be > 0 and 'min_lr' >= 0")
    if cfg.data == [] and not cfg.hf_dataset:
        raise ConfigError("no training text: pass --data FILES or --hf_dataset NAME")
    parse_split(cfg.split)


# ----------------------------------------------------------------------------------------------------------
# compute init and helpers shared with finetune.py


def print0(*args, **kwargs):
    """print() on the main process only, flushed, and without breaking a tqdm progress bar."""
    from tqdm import tqdm

    if int(os.environ.get("RANK", "0")) == 0:  # set by accelerate launch / torchrun for every process
        tqdm.write(" ".join(str(a) for a in args), file=sys.stdout, **kwargs)
        sys.stdout.flush()


def resolve_threads(threads: int, local_processes: int = 1) -> int:
    """CPU threads per process. Auto: the cores this process may use, split between local processes."""
    if threads > 0:
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // local_processes)


def cpu_supports_bf16() -> bool:
    mkldnn = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(mkldnn and mkldnn())


def resolve_dtype(dtype: str, device_type: str, block_params: int) -> str:
    """What --dtype auto means: bf16 on GPUs that have it, else fp16; on CPUs with native bf16 (AVX512-BF16,
    AMX) only for models whose blocks have >= 10M parameters: bf16 autocast is ~1.6x faster there, and gains
    nothing on smaller models where the step is not matmul-bound."""
    if dtype != "auto":
        return dtype
    if device_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device_type == "cpu" and cpu_supports_bf16() and block_params >= 10_000_000:
        return "bfloat16"
    return "float32"


def compute_init(cfg):
    """Create the Accelerator (device, DDP/FSDP/DeepSpeed, mixed precision), set threads and seeds."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    block_params = 12 * cfg.n_layer * cfg.n_embd**2
    dtype = resolve_dtype(cfg.dtype, state.device.type, block_params)
    if dtype == "float16" and state.device.type != "cuda":
        raise ConfigError("--dtype float16 needs a CUDA GPU; use bfloat16 or float32 here")
    precision = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[dtype]
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=cfg.grad_accum,
                              dynamo_backend="inductor" if cfg.compile else "no")
    if accelerator.device.type == "cpu":
        torch.set_num_threads(resolve_threads(cfg.threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    torch.manual_seed(cfg.seed)  # identical init on every process
    return accelerator, dtype


def write_json_atomic(path, obj):
    """Write JSON to a temporary name, then rename: readers never see a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def append_jsonl(path, obj):
    """Append one JSON line in a single write (O_APPEND: a kill never interleaves or splits earlier lines)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")


def read_jsonl(path) -> list:
    """Rows of a .jsonl file, skipping a torn last line."""
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def truncate_jsonl(path, max_iter: int):
    """Drop rows logged after the checkpoint a resumed run restarts from (atomic rewrite)."""
    path = Path(path)
    if path.is_file():
        rows = [r for r in read_jsonl(path) if r.get("iter", 0) <= max_iter]
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, path)


def set_status(out_dir, status, iter_num=0, message=""):
    """status.json: running | finished | stopped | failed, read by the UI."""
    write_json_atomic(Path(out_dir) / "status.json", {
        "status": status, "pid": os.getpid(), "iter": iter_num, "message": message,
        "updated": datetime.now().isoformat(timespec="seconds")})


def save_checkpoint(path, state: dict):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Our own checkpoints only; weights_only=True never unpickles code."""
    return torch.load(path, map_location=map_location, weights_only=True)


def agree_to_stop(accelerator, stop: "StopFlag", out_of_time: bool) -> bool:
    """Make every process stop together (a signal may reach only some); returns the shared out_of_time."""
    if accelerator.num_processes == 1:
        return out_of_time
    flags = torch.tensor([float(bool(stop)), float(out_of_time)], device=accelerator.device)
    flags = accelerator.reduce(flags, reduction="sum")
    if flags[0].item() > 0 and not stop:
        stop.signal = "stop"
    return flags[1].item() > 0


def push_finished_run(cfg, out_dir, iter_num: int, what: str) -> int:
    """--push_to_hub once the run is saved (main process, after wait_for_everyone); returns the exit code."""
    import hub

    try:
        hub.push_run(str(out_dir), cfg.push_to_hub, private=cfg.hub_private, log=print0)
    except hub.HubError as e:
        set_status(out_dir, "finished", iter_num, f"{what} finished; {e}")
        print(f"error: {what} finished and saved, but {e}", file=sys.stderr)
        return 1
    return 0


def rng_state(batch_gen: torch.Generator, device) -> dict:
    """This process's random state and data position (its batch sampler), one entry per process in checkpoints."""
    return {"torch": torch.get_rng_state(), "batch": batch_gen.get_state(),
            "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}


def restore_state(ckpt: dict, optimizer, accelerator, batch_gen: torch.Generator, device, rank: int, world: int):
    """Put back the optimizer, the fp16 grad scaler, and this process's random state and data position."""
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler") and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(ckpt["scaler"])
    rng = ckpt["rng"]
    if len(rng) != world:
        print0(f"resuming with {world} processes instead of {len(rng)}: batches will differ from an "
               f"uninterrupted run")
        return
    torch.set_rng_state(rng[rank]["torch"])
    batch_gen.set_state(rng[rank]["batch"])
    if device.type == "cuda" and rng[rank].get("cuda") is not None:
        torch.cuda.set_rng_state(rng[rank]["cuda"])


def user_errors() -> tuple:
    """The exceptions that are user mistakes or expected run failures: one line, no traceback."""
    from data import DataError
    from model import ModelLoadError

    return ConfigError, DataError, ModelLoadError, RunError, torch.OutOfMemoryError


def exit_with_error(e: Exception, cfg=None, oom_advice: str = "lower --batch_size") -> int:
    """Print a user error as one line on stderr and return the exit code (2: config, 1: data or runtime).
    A run folder that already has a status.json is marked failed with the same line, for the UI."""
    if isinstance(e, ConfigError):
        print(f"error: {e}", file=sys.stderr)
        return 2
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, torch.OutOfMemoryError):
        message = f"out of memory: {oom_advice}"
    status_file = Path(cfg.out_dir) / "status.json" if cfg is not None and cfg.out_dir else None
    if status_file is not None and status_file.is_file() and int(os.environ.get("RANK", "0")) == 0:
        set_status(cfg.out_dir, "failed", json.loads(status_file.read_text()).get("iter", 0), message)
    print(f"error: {message}", file=sys.stderr)
    return 1


def default_out_dir(cfg) -> str:
    name = cfg.hf_dataset.split("/")[-1] if cfg.hf_dataset else Path(cfg.data[0].rstrip("/*")).stem or "data"
    name = re.sub(r"[^\w.-]+", "-", name).strip("-.") or "run"
    return str(Path("runs") / f"{name}-{datetime.now():%Y%m%d-%H%M%S}")


def resolve_data_paths(inputs: list[str]) -> list[str]:
    """Relative paths that do not exist here but do next to this script (the bundled data) resolve there."""
    return [p if Path(p).exists() or not (HERE / p).exists() else str(HERE / p) for p in inputs]


def get_batch(data, batch_size: int, block_size: int, generator: torch.Generator, device):
    """Random windows of a token array (np.memmap). Returns x, y: (B, T) int64, y shifted by one."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator).numpy()  # window + target
    buf = torch.from_numpy(data[ix[:, None] + np.arange(block_size + 1)].astype(np.int64))  # (B, T+1)
    x, y = buf[:, :-1], buf[:, 1:]
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def get_lr(it: int, cfg) -> float:
    """Linear warmup to learning_rate, then cosine decay to min_lr at max_iters."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    progress = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def estimate_loss(model, batches) -> float:
    """Mean loss over a list of (x, y) batches (no label smoothing), model restored to train mode."""
    was_training = model.training
    model.eval()
    losses = [model(x, y)[1].float() for x, y in batches]
    model.train(was_training)
    return torch.stack(losses).mean().item()


def configure_optimizer(model, cfg, device_type: str):
    """AdamW, weight decay on >= 2-D parameters (matrices, embeddings) only; fused kernels where available."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = device_type in ("cuda", "cpu") and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused or None)


class StopFlag:
    """Set by SIGINT/SIGTERM: the loop finishes its step, saves and exits 0. A second Ctrl-C aborts."""

    def __init__(self):
        self.signal = None

    def __bool__(self):
        return self.signal is not None


def install_signal_handlers(flag: StopFlag) -> dict:
    """Route SIGINT/SIGTERM to `flag`; returns the previous handlers for restore_signal_handlers()."""

    def handler(signum, frame):
        if flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.signal = signal.Signals(signum).name
        print0(f"{flag.signal}: stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
    return previous


def restore_signal_handlers(previous: dict):
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the tokenizer's JSON: resuming with another vocabulary must be refused."""
    import hashlib

    return hashlib.sha256(tokenizer.tok.to_str().encode()).hexdigest()[:16]


def hardware_summary(device, world: int = 1) -> str:
    """What a run trained on, for config.json and the model card: GPU name or CPU, processes, torch."""
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        what = f"CPU ({platform.machine()}, {torch.get_num_threads()} threads/process)"
    return f"{what} x {world} process(es), torch {torch.__version__}"


def format_best_val(best_val: float) -> str:
    return f"best val {best_val:.4f}" if math.isfinite(best_val) else "no evaluation yet"


def format_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def print_environment():
    """`train.py --check`: what this machine offers and what the defaults will use."""
    import accelerate
    from accelerate.commands.config.config_args import default_config_file

    cfg = TrainConfig()
    print(f"python {platform.python_version()}, torch {torch.__version__}, accelerate {accelerate.__version__}")
    print(f"cpu: {os.cpu_count()} cores ({resolve_threads(0)} usable), bf16 kernels: "
          f"{'yes' if cpu_supports_bf16() else 'no'}, default threads: {resolve_threads(cfg.threads)}")
    if torch.cuda.is_available():
        print(f"cuda {torch.version.cuda}: {torch.cuda.device_count()} GPU(s), bf16: {torch.cuda.is_bf16_supported()}")
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB")
    else:
        print("cuda: no GPU (0 GPUs)")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        print("mps: available")
    path = Path(os.environ.get("ACCELERATE_CONFIG_FILE", default_config_file))
    if path.is_file():
        print(f"accelerate config: {path}")
        for line in path.read_text().splitlines():
            print(f"  {line}")
    else:
        print(f"accelerate config: none ({path} missing): one process; `accelerate config` to set up more")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    small = resolve_dtype("auto", device, 12 * cfg.n_layer * cfg.n_embd**2)
    big = resolve_dtype("auto", device, 85_000_000)
    print(f"--dtype auto on {device}: {small} for the default model, {big} for GPT-2 124M")


# ----------------------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, argv: list) -> int:
    from accelerate.utils import gather_object
    from tqdm import tqdm

    import data as datamod
    from model import GPT, GPTConfig, generate

    # --- config ----------------------------------------------------------------------------------------
    check_config(cfg)
    split = parse_split(cfg.split)

    # --- compute init ----------------------------------------------------------------------------------
    accelerator, dtype = compute_init(cfg)
    device, master = accelerator.device, accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    if not cfg.out_dir:
        from accelerate.utils import broadcast_object_list

        cfg.out_dir = broadcast_object_list([default_out_dir(cfg)])[0]  # same timestamp on every process
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "checkpoint.pt"
    resume_ckpt = None
    if cfg.resume and ckpt_path.is_file():
        resume_ckpt = load_checkpoint(ckpt_path)
    elif cfg.resume:
        print0(f"no checkpoint in {out_dir} yet: starting from scratch")
    elif ckpt_path.is_file():
        raise ConfigError(f"{out_dir} already holds a run: add --resume to continue it, or pick another --out_dir")

    def start_run(data_stats=None):  # a resumed run starts once past the checks below: a refusal changes nothing
        if master:
            out_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out_dir / "config.json", {**asdict(cfg), "script": "train.py",
                                                        "command": ["train.py", *argv], "data_stats": data_stats,
                                                        "hardware": hardware_summary(device, world)})
            set_status(out_dir, "running", resume_ckpt["iter"] if resume_ckpt else 0)

    if resume_ckpt is None:
        if master:  # a fresh run in a reused folder starts fresh logs
            for name in ("metrics.jsonl", "samples.jsonl"):
                (out_dir / name).unlink(missing_ok=True)
        start_run()
    print0(f"run folder {out_dir} | {world} process(es) on {device} | {dtype} | "
           f"{torch.get_num_threads()} thread(s)/process")

    # --- data ------------------------------------------------------------------------------------------
    with accelerator.main_process_first():  # the main process tokenises and caches; the others read the cache
        inputs = [] if cfg.hf_dataset else resolve_data_paths(cfg.data)  # a Hub dataset replaces --data
        prepared = datamod.prepare(inputs, tokenizer=cfg.tokenizer, vocab_size=cfg.vocab_size,
                                   text_column=cfg.text_column, hf_dataset=cfg.hf_dataset, hf_split=cfg.hf_split,
                                   split=split, block_size=cfg.block_size, log=print0)
    tokenizer = prepared.tokenizer
    if resume_ckpt is None:
        start_run(prepared.stats)  # now with the corpus stats (the model card shows them)
    batch_gen = torch.Generator().manual_seed(cfg.seed + rank)  # the data position: saved in checkpoints
    eval_gen = torch.Generator().manual_seed(cfg.seed + 10_000 + rank)  # a fixed val set for every eval
    val_batches = [get_batch(prepared.val, cfg.batch_size, cfg.block_size, eval_gen, device)
                   for _ in range(cfg.eval_iters)]
    test_batches = [get_batch(prepared.test, cfg.batch_size, cfg.block_size, eval_gen, device)
                    for _ in range(cfg.eval_iters)] if prepared.test is not None else None

    # --- model -----------------------------------------------------------------------------------------
    model_config = GPTConfig(block_size=cfg.block_size, vocab_size=tokenizer.vocab_size, n_layer=cfg.n_layer,
                             n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias,
                             pos_encoding=cfg.pos_encoding, norm=cfg.norm)
    raw_model = GPT(model_config)  # the plain module we sample from and save; never the wrapped one
    raw_model.gradient_checkpointing = cfg.grad_checkpointing
    fingerprint = tokenizer_fingerprint(tokenizer)
    if resume_ckpt is not None:
        saved = resume_ckpt["model_config"]
        for key, value in asdict(model_config).items():
            if key != "dropout" and saved.get(key) != value:
                raise ConfigError(f"cannot resume {out_dir}: its model has {key}={saved.get(key)!r}, the config "
                                  f"asks for {value!r}; drop that flag or use a new --out_dir")
        if resume_ckpt["tokenizer"] != fingerprint:
            raise ConfigError(f"cannot resume {out_dir}: the tokenizer differs from the checkpoint's (other "
                              f"--tokenizer, --vocab_size or data vocabulary); use a new --out_dir")
        raw_model.load_state_dict(resume_ckpt["model"])
        start_run(prepared.stats)
    raw_model.to(device)
    ok, why = model_config.gpt2_compatible()
    print0(f"model: {raw_model.num_params() / 1e6:.2f}M parameters, {cfg.n_layer} layers x {cfg.n_embd} wide, "
           f"context {cfg.block_size}" + ("" if ok else f" (not GPT-2-exportable: {why})"))

    # --- optimizer -------------------------------------------------------------------------------------
    optimizer = configure_optimizer(raw_model, cfg, device.type)
    model, optimizer = accelerator.prepare(raw_model, optimizer)
    iter_num, best_val, bad_evals, elapsed_before = 0, float("inf"), 0, 0.0
    if resume_ckpt is not None:
        restore_state(resume_ckpt, optimizer, accelerator, batch_gen, device, rank, world)
        iter_num, best_val = resume_ckpt["iter"], resume_ckpt["best_val"]
        bad_evals, elapsed_before = resume_ckpt["bad_evals"], resume_ckpt["elapsed_s"]
        if master:
            truncate_jsonl(out_dir / "metrics.jsonl", iter_num)
            truncate_jsonl(out_dir / "samples.jsonl", iter_num)
        print0(f"resumed from {ckpt_path} at iter {iter_num} ({format_best_val(best_val)})")
        del resume_ckpt
    else:
        torch.manual_seed(cfg.seed + rank)  # dropout differs per process

    def save():
        """checkpoint.pt + model/ (main process), each file tmp + rename; all processes must call this."""
        rngs = gather_object([rng_state(batch_gen, device)])  # one entry per process
        if master:
            save_checkpoint(ckpt_path, {
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "iter": iter_num, "best_val": best_val, "bad_evals": bad_evals,
                "elapsed_s": elapsed_before + time.time() - t_start, "rng": rngs,
                "model_config": asdict(model_config), "tokenizer": fingerprint})
            raw_model.save_pretrained(out_dir / "model", tokenizer=tokenizer)

    # --- loop ------------------------------------------------------------------------------------------
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.grad_accum * world
    print0(f"{tokens_per_iter:,} tokens/iter, {cfg.max_iters:,} iters, lr {cfg.learning_rate:g} "
           f"(warmup {cfg.warmup_iters}, cosine to {cfg.min_lr:g})")
    prompt_ids = tokenizer.encode(cfg.sample_prompt) or ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
    save_every = cfg.save_interval or cfg.eval_interval
    stop = StopFlag()
    previous_handlers = install_signal_handlers(stop)
    bar = tqdm(total=cfg.max_iters, initial=iter_num, disable=not (master and sys.stdout.isatty()),
               dynamic_ncols=True, leave=False)
    t_start = t_last = time.time()
    iters_since_log, ms_per_iter, status, message = 0, None, "finished", ""
    if iter_num >= cfg.max_iters:
        print0(f"already at iter {iter_num} of max_iters {cfg.max_iters}: raise --max_iters to continue")
    model.train()
    try:
        while iter_num < cfg.max_iters:
            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for _ in range(cfg.grad_accum):
                with accelerator.accumulate(model):  # DDP syncs gradients only on the last micro-step
                    x, y = get_batch(prepared.train, cfg.batch_size, cfg.block_size, batch_gen, device)
                    _, loss = model(x, y, label_smoothing=cfg.label_smoothing)
                    accelerator.backward(loss)  # divides by grad_accum
                    if accelerator.sync_gradients and cfg.grad_clip > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    optimizer.step()  # a no-op until the last micro-step
                    optimizer.zero_grad(set_to_none=True)
                loss_sum = loss_sum + loss.detach()
            iter_num += 1
            iters_since_log += 1
            bar.update(1)

            last = iter_num == cfg.max_iters
            out_of_time = cfg.max_minutes > 0 and time.time() - t_start > cfg.max_minutes * 60
            out_of_time = agree_to_stop(accelerator, stop, out_of_time)
            evaluate = iter_num % cfg.eval_interval == 0 or last or out_of_time
            save_now = iter_num % save_every == 0 or last
            if iter_num % cfg.log_interval == 0 or evaluate or save_now or stop:  # also checks the loss
                now = time.time()
                ms = (now - t_last) * 1000 / iters_since_log
                ms_per_iter = ms if ms_per_iter is None else 0.7 * ms_per_iter + 0.3 * ms
                t_last, iters_since_log = now, 0
                lossf = (loss_sum / cfg.grad_accum).item()
                elapsed = elapsed_before + now - t_start
                eta = (cfg.max_iters - iter_num) * ms_per_iter / 1000
                if cfg.max_minutes > 0:
                    eta = min(eta, max(0.0, cfg.max_minutes * 60 - (now - t_start)))
                row = {"iter": iter_num, "loss": round(lossf, 4), "lr": lr, "ms": round(ms, 2),
                       "tokens_per_sec": round(tokens_per_iter * 1000 / ms), "elapsed_s": round(elapsed, 2),
                       "eta_s": round(eta, 1), "max_iters": cfg.max_iters}
                if not math.isfinite(lossf):
                    raise RunError(f"loss is {lossf} at iter {iter_num}: training diverged; lower --learning_rate "
                                   f"(now {cfg.learning_rate:g}) or raise --warmup_iters; the last good "
                                   f"checkpoint is kept")
                line = (f"iter {iter_num:>{len(str(cfg.max_iters))}}/{cfg.max_iters} | loss {lossf:.4f} | "
                        f"lr {lr:.2e} | {ms:.1f} ms/iter | {row['tokens_per_sec']:,} tok/s | "
                        f"{format_time(elapsed)} elapsed | eta {format_time(eta)}")
                if evaluate:
                    val_loss = estimate_loss(model, val_batches)
                    if world > 1:
                        val_loss = accelerator.reduce(torch.tensor(val_loss, device=device), "mean").item()
                    if not math.isfinite(val_loss):
                        raise RunError(f"val loss is {val_loss} at iter {iter_num}: training diverged; lower "
                                       f"--learning_rate; the last good checkpoint is kept")
                    improved = val_loss < best_val
                    best_val, bad_evals = min(best_val, val_loss), 0 if improved else bad_evals + 1
                    row["val_loss"] = round(val_loss, 4)
                    line += f" | val {val_loss:.4f}" + (" *" if improved else "")
                    if (last or out_of_time) and test_batches is not None:
                        test_loss = estimate_loss(model, test_batches)
                        if world > 1:
                            test_loss = accelerator.reduce(torch.tensor(test_loss, device=device), "mean").item()
                        row["test_loss"] = round(test_loss, 4)
                        line += f" | test {test_loss:.4f}"
                if master:
                    append_jsonl(out_dir / "metrics.jsonl", row)
                print0(line)
                if evaluate and master and cfg.eval_samples > 0 and prompt_ids:
                    raw_model.eval()
                    for i in range(cfg.eval_samples):
                        ids = list(generate(raw_model, prompt_ids, cfg.sample_tokens, temperature=0.8,
                                            top_k=200, seed=cfg.seed + i))
                        append_jsonl(out_dir / "samples.jsonl", {"iter": iter_num, "prompt": cfg.sample_prompt,
                                                                 "text": tokenizer.decode(ids)})
                    raw_model.train()
                if evaluate and cfg.early_stop_patience and bad_evals >= cfg.early_stop_patience:
                    message = f"early stop: val loss did not improve for {bad_evals} evaluations"
                    print0(message)
                    save()
                    break
            if stop:
                status, message = "stopped", f"stopped by {stop.signal} at iter {iter_num}"
                print0(f"{message}; resume with: python train.py --out_dir {out_dir} --resume")
                save()
                break
            if out_of_time:
                message = f"time budget of {cfg.max_minutes:g} min reached at iter {iter_num}"
                print0(message)
                save()
                break
            if save_now:
                save()
            if evaluate or save_now:
                t_last = time.time()  # ms/iter and tokens/s count training steps, not evals and saves
    finally:
        bar.close()
        restore_signal_handlers(previous_handlers)

    # --- save ------------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if master:
        set_status(out_dir, status, iter_num, message)
        print0(f"{status} at iter {iter_num}, {format_best_val(best_val)}, "
               f"{format_time(elapsed_before + time.time() - t_start)}; model in {out_dir / 'model'}")
        print0(f"sample it: python sample.py --model {out_dir}")
    if cfg.push_to_hub and status == "finished" and master:  # after wait_for_everyone: pushed once
        if push_finished_run(cfg, out_dir, iter_num, "training"):
            return 1
    accelerator.end_training()
    return 0


def main(argv=None) -> int:
    """Command-line entry point; returns the exit code. User errors are one line on stderr, no traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--check" in argv:
        print_environment()
        return 0
    cfg = None
    try:
        cfg = parse_config(TrainConfig, argv, description=__doc__)
        return train(cfg, argv)
    except user_errors() as e:
        return exit_with_error(e, cfg, oom_advice="lower --batch_size (raise --grad_accum to keep tokens/iter) "
                                                  "or use --grad_checkpointing")


if __name__ == "__main__":
    sys.exit(main())
