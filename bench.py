"""
Benchmarks, one JSON line per figure: {"name", "value", "unit", "config", ...}.
  train_tokens_per_sec   training throughput at a model shape (default: nanoGPT's CPU recipe, 4 x 128, block 64, batch 12)
  sample_tokens_per_sec  sampling speed, 500 new tokens through model.generate (KV cache)
  time_to_val_loss       wall time, start-up included, for `python train.py` (the defaults) to reach val loss 1.8857
  lora_step_ms           (--only lora) a LoRA fine-tuning step vs transformers GPT2LMHeadModel + PEFT, and peak memory

CPU (run it on an otherwise idle machine; about 2 minutes):
    python bench.py
    python bench.py --only train --n_layer 6 --n_head 6 --n_embd 384 --block_size 256 --batch_size 8 --steps 5
LoRA fine-tuning vs transformers + PEFT at the GPT-2 124M shape (a few minutes on 2 cores):
    python bench.py --only lora --n_layer 12 --n_head 12 --n_embd 768 --vocab_size 50257 --block_size 128 --batch_size 4 --steps 5
One GPU (GPT-2 124M shape, bf16, with and without compile):
    python bench.py --only train --n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 --vocab_size 50257 --dtype bfloat16
    python bench.py --only train --n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 --vocab_size 50257 --dtype bfloat16 --compile
accelerate launch (benchmarks are single-process; accelerate only picks the device):
    accelerate launch --num_processes 1 bench.py --only sample
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if "OMP_WAIT_POLICY" not in os.environ:  # a short OpenMP spin before sleeping: see train.py
    os.environ.setdefault("GOMP_SPINCOUNT", "2000")

import torch  # noqa: E402

from train import (HERE, ConfigError, TrainConfig, configure_optimizer, cpu_supports_bf16, parse_config, read_jsonl,
                   resolve_threads)


@dataclass
class BenchConfig:
    only: str = ""                  # train | sample | converge; empty = all three
    n_layer: int = 4                # model shape for train/sample (default: nanoGPT's CPU recipe)
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64            # context length in tokens
    vocab_size: int = 65            # 65 = tiny Shakespeare characters; 50257 = GPT-2
    batch_size: int = 12            # sequences per step
    steps: int = 50                 # timed training steps (after 3 untimed warm-up steps); the median is reported
    dtype: str = "float32"          # float32 | bfloat16 | float16 (autocast, as train.py --dtype)
    compile: bool = False           # torch.compile the model first (compile time is not counted)
    grad_checkpointing: bool = False  # recompute activations in backward
    new_tokens: int = 500           # tokens to sample for sample_tokens_per_sec
    target_loss: float = 1.8857     # val loss for time_to_val_loss (nanoGPT's CPU recipe reaches it in ~155 s)
    threads: int = 0                # CPU threads; 0 = train.py's default
    device: str = "auto"            # auto | cpu | cuda


def emit(name, value, unit, config, **extra):
    print(json.dumps({"name": name, "value": value, "unit": unit, "config": config, **extra}), flush=True)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_model(cfg, device):
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=cfg.block_size, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                          n_head=cfg.n_head, n_embd=cfg.n_embd))
    return model.to(device)


def bench_train(cfg, device, shape):
    """Training steps as train.py runs them: autocast, fused AdamW, grad clipping. Random tokens."""
    base_rss = rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    raw = make_model(cfg, device)
    raw.gradient_checkpointing = cfg.grad_checkpointing
    model = torch.compile(raw) if cfg.compile else raw
    optimizer = configure_optimizer(raw, TrainConfig(), device.type)  # train.py's AdamW settings
    dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16")
    x = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.block_size), device=device)
    y = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.block_size), device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            _, loss = model(x, y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(raw.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []  # per step, so that a burst of another process's work moves the median little
    for _ in range(cfg.steps):
        t0 = time.perf_counter()
        step().item()  # .item() waits for the GPU
        times.append(time.perf_counter() - t0)
    ms = sorted(times)[len(times) // 2] * 1000
    tokens_per_sec = cfg.batch_size * cfg.block_size * 1000 / ms
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss_mb() - base_rss
    extra = {}
    if device.type == "cuda":  # model FLOPs utilisation against the GPU's bf16 dense peak (H100/H200 SXM: 989 TFLOPS)
        n = raw.num_params(non_embedding=True)
        flops_per_token = 6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
        extra["mfu"] = round(flops_per_token * tokens_per_sec / 989e12, 4)
    emit("train_tokens_per_sec", round(tokens_per_sec), "tokens/s", shape, ms_per_iter=round(ms, 2),
         peak_memory_mb=round(peak, 1), params=raw.num_params(), **extra)


def bench_sample(cfg, device, config):
    """model.generate from a one-token prompt, top_k 200, temperature 0.8 (as sample.py's defaults)."""
    from model import generate

    model = make_model(cfg, device).eval()
    if device.type == "cpu":
        from sample import sample_threads

        torch.set_num_threads(sample_threads(model, cfg.threads))  # what sample.py and the UI use
        config = {**config, "threads": torch.get_num_threads()}
    list(generate(model, [0], 20, seed=0, top_k=200))  # warm-up
    runs = []  # best of 3: the figure is the generator's speed, not other processes' interference
    for _ in range(3):
        t0 = time.perf_counter()
        n = len(list(generate(model, [0], cfg.new_tokens, seed=1, top_k=200, temperature=0.8)))
        runs.append(time.perf_counter() - t0)
    seconds = min(runs)
    emit("sample_tokens_per_sec", round(n / seconds), "tokens/s", {**config, "new_tokens": cfg.new_tokens})


def bench_converge(cfg):
    """`python train.py` with its defaults in a subprocess; the wall clock starts before the interpreter does."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "train.py", "--out_dir", str(out)]
        t0 = time.time()
        proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        hit = None
        while proc.poll() is None:
            time.sleep(0.05)
            if hit is None:
                for row in read_jsonl(out / "metrics.jsonl"):
                    if row.get("val_loss", float("inf")) <= cfg.target_loss:
                        hit = (time.time() - t0, row)
                        break
        wall = time.time() - t0
        if proc.returncode != 0:
            raise SystemExit(f"error: train.py failed: {proc.stderr.strip().splitlines()[-1:]}")
        rows = read_jsonl(out / "metrics.jsonl")
        if hit is None:  # rows can land between the last poll and exit
            hit = next(((wall, r) for r in rows if r.get("val_loss", float("inf")) <= cfg.target_loss), None)
        # the honest number: loss over the whole val split of the final model, as sample.py --eval computes it
        from data import prepare
        from sample import eval_loss, load_model

        model, _, _ = load_model(str(out), device="cpu")
        prepared = prepare([str(HERE / "data" / "tinyshakespeare.txt")], log=lambda *_: None)
        full_val, _ = eval_loss(model, prepared.val.tolist())
        final = [r for r in rows if "val_loss" in r][-1]
        emit("time_to_val_loss", round(hit[0], 1) if hit else None, "s",
             {"command": "python train.py", "target_val_loss": cfg.target_loss},
             iter_at_target=hit[1]["iter"] if hit else None, total_wall_s=round(wall, 1),
             final_iter=final["iter"], final_val_loss=final["val_loss"], full_val_split_loss=round(full_val, 4))


def _lora_setup(impl: str, c):
    """(model, step function) for a LoRA fine-tuning step as finetune.py runs it (r 8 on c_attn, c_proj,
    c_fc, AdamW, grad clipping), on our GPT or on transformers' GPT2LMHeadModel, both through PEFT."""
    from peft import get_peft_model

    import finetune

    torch.manual_seed(0)
    lora = finetune.FinetuneConfig(lora_dropout=0.0)
    if impl == "nanoforge":
        from model import GPT, GPTConfig

        base = GPT(GPTConfig(block_size=c.block_size, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                             n_embd=c.n_embd))
        model = finetune.add_adapter(base, lora, head=False)  # exactly what finetune.py trains
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        base = GPT2LMHeadModel(GPT2Config(n_positions=c.block_size, vocab_size=c.vocab_size, n_layer=c.n_layer,
                                          n_head=c.n_head, n_embd=c.n_embd, resid_pdrop=0.0, embd_pdrop=0.0,
                                          attn_pdrop=0.0, activation_function="gelu", bos_token_id=None,
                                          eos_token_id=None))
        config = finetune.peft_config(lora, head=False)
        config.fan_in_fan_out = True  # transformers' GPT-2 keeps these projections as Conv1D
        model = get_peft_model(base, config)
    model.train()
    optimizer = configure_optimizer(model, lora, "cpu")
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randint(c.vocab_size, (c.batch_size, c.block_size), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, 1)
    dtype = {"float32": None, "bfloat16": torch.bfloat16}[c.dtype]

    def step():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            # the same next-token loss on both sides (transformers shifts the labels itself)
            loss = model(x, y)[1] if impl == "nanoforge" else model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def _lora_peak_mb(impl: str, cfg: dict, threads: int) -> float:
    """Peak RSS growth of a fresh process that builds one side and runs 3 steps (model, optimizer, steps)."""
    torch.set_num_threads(threads)
    import peft  # noqa: F401  libraries loaded before the baseline: only model, optimizer and steps count
    from transformers import GPT2LMHeadModel  # noqa: F401

    import finetune  # noqa: F401

    rss0 = rss_mb()
    _, step = _lora_setup(impl, BenchConfig(**cfg))
    for _ in range(3):
        step()
    return rss_mb() - rss0


def bench_lora(cfg, shape):
    """LoRA fine-tuning on our GPT vs transformers' GPT2LMHeadModel + PEFT: same shape, batch, dtype, random
    init, CPU. Step times are taken alternately in one process (load changes hit both sides alike);
    peak memory comes from a fresh process per side."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    peak = {}
    for impl in ("nanoforge", "transformers"):
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            peak[impl] = pool.submit(_lora_peak_mb, impl, asdict(cfg), torch.get_num_threads()).result()
    sides = {impl: _lora_setup(impl, cfg)[1] for impl in ("nanoforge", "transformers")}
    times = {impl: [] for impl in sides}
    for i in range(cfg.steps + 1):
        for impl, step in sides.items():
            t0 = time.perf_counter()
            step()
            if i:  # the first step of each side is a warm-up
                times[impl].append((time.perf_counter() - t0) * 1000)
    ours, theirs = (sorted(times[k])[len(times[k]) // 2] for k in ("nanoforge", "transformers"))
    emit("lora_step_ms", round(ours, 1), "ms", shape, transformers_peft_ms=round(theirs, 1),
         ratio=round(ours / theirs, 3), steps=cfg.steps)
    emit("lora_peak_memory_mb", round(peak["nanoforge"]), "MB", shape,
         transformers_peft_mb=round(peak["transformers"]), ratio=round(peak["nanoforge"] / peak["transformers"], 3))


def main(argv=None) -> int:
    try:
        cfg = parse_config(BenchConfig, argv, description=__doc__, presets=False)
        if cfg.only not in ("", "train", "sample", "converge", "lora"):
            raise ConfigError(f"--only must be train, sample, converge or lora, got {cfg.only!r}")
        if cfg.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtype must be float32, bfloat16 or float16, got {cfg.dtype!r}")
        if cfg.n_embd % cfg.n_head:
            raise ConfigError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head})")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(resolve_threads(cfg.threads))
    shape = {k: v for k, v in asdict(cfg).items() if k in ("n_layer", "n_head", "n_embd", "block_size",
                                                           "vocab_size", "batch_size", "dtype", "compile",
                                                           "grad_checkpointing")}
    shape.update(device=str(device), threads=torch.get_num_threads(), torch=torch.__version__,
                 cpu_bf16=cpu_supports_bf16(), load_avg=round(os.getloadavg()[0], 2))
    if cfg.only in ("", "train"):
        bench_train(cfg, device, shape)
    if cfg.only in ("", "sample"):
        bench_sample(cfg, device, shape)
    if cfg.only in ("", "converge"):
        bench_converge(cfg)
    if cfg.only == "lora":  # slow at GPT-2 size: only when asked
        bench_lora(cfg, shape)
    return 0


if __name__ == "__main__":
    sys.exit(main())
