"""
Fine-tune a GPT with PEFT adapters: train.py plus a marked adapter block. Same config style, run folder
(config.json, metrics.jsonl, samples.jsonl, status.json, checkpoint.pt), SIGTERM saves and --resume.

CPU, LoRA on your own train.py run, continued pretraining on new text:
    python finetune.py --base runs/shakespeare --data my_texts/ --out_dir runs/lora-mine
    python sample.py --model runs/shakespeare --adapter runs/lora-mine
Instructions (JSONL with prompt/response or chat "messages"; loss on the responses only):
    python finetune.py --base gpt2 --format instruct --data chat.jsonl --out_dir runs/chat --merge
    python sample.py --model runs/chat/merged --prompt "Write a haiku about rain"
Classification / regression (CSV or JSONL with text,label; a head on the last token's hidden state):
    python finetune.py --base runs/shakespeare --format classify --data reviews.csv --out_dir runs/cls
Other methods: --method ia3 | loha | adalora | full | freeze --trainable_layers 2 | prompt | prefix
One GPU: the same commands (--dtype auto picks bf16). Several GPUs:
    accelerate launch --num_processes 4 finetune.py --base gpt2 --data corpus/ --out_dir runs/ft
Merge an adapter into a standalone model folder later, stop/resume, share:
    python finetune.py --merge runs/chat
    python finetune.py --out_dir runs/chat --resume --max_iters 1000
    python finetune.py ... --push_to_hub you/chat-lora        # the adapter + a model card

--base is a train.py run folder, a GPT-2-layout model folder (as transformers' save_pretrained writes it)
or a Hub id (gpt2, distilgpt2, user/model). Outputs: <out_dir>/adapter/ (PEFT format: adapter_config.json +
adapter_model.safetensors, base recorded) for adapter methods, <out_dir>/model/ for full/freeze, and
<out_dir>/merged/ with --merge. The instruction template is stored with them, so sample.py applies it.
"""
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from train import (ConfigError, RunError, StopFlag, TrainConfig, agree_to_stop, append_jsonl, check_config,
                   compute_init, configure_optimizer, default_out_dir, estimate_loss, exit_with_error,
                   format_best_val, format_time, get_batch, get_lr, hardware_summary, install_signal_handlers,
                   load_checkpoint, parse_config, parse_split, print0, push_finished_run, read_jsonl,
                   resolve_data_paths, restore_signal_handlers, restore_state, rng_state, save_checkpoint, set_status,
                   truncate_jsonl, user_errors, write_json_atomic)

METHODS = ("lora", "ia3", "loha", "adalora", "full", "freeze", "prompt", "prefix")
WEIGHT_ADAPTERS = ("lora", "ia3", "loha", "adalora")  # peft methods that change weights (mergeable)
FORMATS = ("text", "instruct", "classify", "regress")
# train.py flags that the base model decides here (its shape, architecture and tokenizer)
FROM_BASE = ("--tokenizer", "--vocab_size", "--n_layer", "--n_head", "--n_embd", "--bias", "--no-bias",
             "--pos_encoding", "--norm")
IGNORE_INDEX = -100


@dataclass
class FinetuneConfig(TrainConfig):
    # what to fine-tune, and how (the model shape, tokenizer and architecture come from --base)
    base: str = ""                  # train.py run folder, GPT-2-layout model folder, or Hub id (gpt2, user/model)
    method: str = "lora"            # lora | ia3 | loha | adalora | full | freeze | prompt | prefix
    format: str = "text"            # text | instruct (prompt/response) | classify | regress (text,label)
    lora_r: int = 8                 # adapter rank (lora, loha, adalora's target rank); 4-64
    lora_alpha: int = 16            # adapter scale numerator: the update is scaled by alpha / r
    lora_dropout: float = 0.05      # dropout on the adapter's input (0 for tiny data, 0.05-0.1 otherwise)
    target_modules: str = "c_attn,c_proj,c_fc"  # comma-separated layers to adapt: attention and MLP projections
    trainable_layers: int = 2       # --method freeze: train the last N blocks plus the final norm and head
    num_virtual_tokens: int = 16    # --method prompt / prefix: learned tokens in front of every sequence
    label_column: str = "label"     # column of the label in classify / regress data
    merge: bool = False             # also write <out_dir>/merged/: base + adapter as one standalone model
    # train.py defaults that differ for fine-tuning
    data: list[str] = field(default_factory=list)  # text files (--format text) or .jsonl/.json/.csv examples
    block_size: int = 0             # context in tokens; 0 = the base model's (shorter is faster)
    max_iters: int = 300            # optimizer steps
    learning_rate: float = 5e-4     # peak lr; LoRA likes 1e-4..1e-3, full fine-tuning 1e-5..1e-4
    min_lr: float = 5e-5            # lr at max_iters
    warmup_iters: int = 20          # linear warmup steps
    weight_decay: float = 0.0       # AdamW decay on trainable matrices (adapters usually need none)
    eval_interval: int = 50         # iterations between val evaluations (+ samples + checkpoint)
    sample_prompt: str = ""         # prompt of the base-vs-tuned samples; "" = the first val example's prompt
    sample_tokens: int = 100        # tokens per sample


# ----------------------------------------------------------------------------------------------------------
# adapter block: base models, adapters, instruction / classification data (what train.py does not have)

# The instruction template, stored with the model ("nanoforge" section of config.json / nanoforge.json)
# and applied by sample.py and the UI: the user's text goes in {prompt}, the model writes the response.
PROMPT_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
SYSTEM_TEMPLATE = "{system}\n\n"
RESPONSE_ENDS = ("\n###", "\n\n\n")  # ends a response when the tokenizer has no end-of-text token
# The same template for transformers' tokenizer.apply_chat_template (tokenizer_config.json "chat_template")
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n### Response:\n"
    "{% else %}{{ m['content'] }}{{ END }}{% endif %}{% endfor %}"
)


def response_end(tokenizer) -> str:
    """The text that ends a response: "" when the tokenizer has an end-of-text token (that ends it), else
    the first marker the tokenizer can spell (a char vocabulary may lack "#")."""
    if tokenizer.eos_id is not None:
        return ""
    for end in RESPONSE_ENDS:
        if tokenizer.decode(tokenizer.encode(end)) == end:
            return end
    raise ConfigError("--format instruct: the tokenizer has no end-of-text token and cannot spell a newline")


def resolve_base(base: str) -> Path:
    """The model folder for --base: run folder -> its merged/ or model/, a model folder, or a Hub download."""
    from model import ModelLoadError, _download

    if not base:
        raise ConfigError("--base is required: a train.py run folder, a model folder, or a Hub id such as gpt2")
    path = Path(base)
    for candidate in (path / "merged", path / "model", path):
        if (candidate / "config.json").is_file():
            return candidate
    if path.exists():
        raise ModelLoadError(f"{base}: no model here (expected a run folder with model/ or a folder with config.json)")
    return _download(base)  # ModelLoadError with one line when offline or unknown


def adapter_dir(path) -> Path:
    """A fine-tune run's adapter/ folder, or the folder itself when it holds adapter_config.json."""
    path = Path(path)
    return path / "adapter" if (path / "adapter" / "adapter_config.json").is_file() else path


class SequenceHead(nn.Module):
    """GPT + a linear head on the last real token's final hidden state: classification or regression."""

    def __init__(self, gpt, num_outputs: int, task: str):
        super().__init__()
        self.gpt, self.task = gpt, task
        self.config = gpt.config
        self.score = nn.Linear(gpt.config.n_embd, num_outputs)
        nn.init.normal_(self.score.weight, std=0.02)
        nn.init.zeros_(self.score.bias)

    def forward(self, idx, targets=None, lengths=None):
        """idx (B, T) right-padded; lengths (B,) real tokens per row; targets (B,) class ids or values."""
        h = self.gpt.hidden_states(idx)  # (B, T, C)
        last = (lengths - 1) if lengths is not None else torch.full((idx.size(0),), idx.size(1) - 1)
        logits = self.score(h[torch.arange(idx.size(0), device=idx.device), last.to(idx.device)])  # (B, K)
        if targets is None:
            return logits, None
        if self.task == "regress":
            return logits, F.mse_loss(logits.float().squeeze(-1), targets.float())
        return logits, F.cross_entropy(logits.float(), targets)


class GrowingCache:
    """A KV cache that concatenates instead of writing in place, so gradients flow through it (training
    prompt / prefix tuning), and whose first `keep` positions (the learned prefix) survive a reset: generate()
    sets pos = 0 when the context is full, which here truncates back to the prefix. Duck-types KVCache."""

    def __init__(self, k: list, v: list, keep: int):
        self.k, self.v, self.keep, self._pos = k, v, keep, keep  # per layer (B, H, pos, D) or None

    @property
    def pos(self) -> int:
        return self._pos

    @pos.setter
    def pos(self, value: int):
        value = max(value, self.keep)
        if value < self._pos:
            self.k = [k[:, :, :value] if k is not None else None for k in self.k]
            self.v = [v[:, :, :value] if v is not None else None for v in self.v]
        self._pos = value

    def update(self, layer: int, k, v):
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def reorder(self, batch_index):
        self.k = [k.index_select(0, batch_index) if k is not None else None for k in self.k]
        self.v = [v.index_select(0, batch_index) if v is not None else None for v in self.v]


class PrefixLM(nn.Module):
    """Prompt tuning (P learned input vectors) or prefix tuning (P learned keys/values in every layer) in
    front of every sequence of a frozen GPT. Real tokens sit at positions P.., as in transformers + PEFT.

    The learned tensor has PEFT's layout ("prompt_embeddings": (P, C) for prompt tuning, (P, 2 * n_layer * C)
    for prefix tuning without projection), so the saved adapter is a regular PEFT adapter. Quacks like a
    GPT for generate() (config, lm_head, new_kv_cache, forward): the prefix fills the first P cache slots,
    and config.block_size is what that leaves for the text."""

    def __init__(self, gpt, kind: str, num_virtual_tokens: int, init_ids=None):
        super().__init__()
        c = gpt.config
        self.gpt, self.kind, self.num_virtual_tokens = gpt, kind, num_virtual_tokens
        # the text gets what the prefix leaves of the context (generate() and sample.py --eval read this)
        self.config, self.lm_head = replace(c, block_size=c.block_size - num_virtual_tokens), gpt.lm_head
        if num_virtual_tokens > c.block_size // 4:
            raise ConfigError(f"--num_virtual_tokens {num_virtual_tokens} is too many for a context of "
                              f"{c.block_size}; use at most {c.block_size // 4}")
        width = c.n_embd if kind == "prompt" else 2 * c.n_layer * c.n_embd
        self.prompt_embeddings = nn.Parameter(torch.zeros(num_virtual_tokens, width))
        if init_ids is not None:  # start from real tokens: their embeddings, or their keys/values
            with torch.no_grad():
                ids = torch.as_tensor(init_ids)[None].to(gpt.lm_head.weight.device)
                if kind == "prompt":
                    self.prompt_embeddings.copy_(gpt.transformer.wte(ids)[0])
                else:
                    cache = GrowingCache([None] * c.n_layer, [None] * c.n_layer, 0)
                    gpt.hidden_states(ids, kv_cache=cache)
                    kv = torch.stack([torch.stack(cache.k), torch.stack(cache.v)], 1)  # (L, 2, 1, H, P, D)
                    self.prompt_embeddings.copy_(kv[:, :, 0].permute(3, 0, 1, 2, 4).reshape(num_virtual_tokens, -1))

    def new_kv_cache(self, batch_size: int, max_len=None) -> GrowingCache:
        """A cache holding the prefix for batch_size sequences (prompt tuning runs the vectors through)."""
        c, P = self.gpt.config, self.num_virtual_tokens
        if self.kind == "prefix":
            # PEFT's order: (P, L * 2 * C) -> (P, L*2, H, D) -> (L*2, B, H, P, D), keys then values per layer
            kv = self.prompt_embeddings.view(P, c.n_layer * 2, c.n_head, c.n_embd // c.n_head)
            kv = kv.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch_size, -1, -1, -1)
            return GrowingCache(list(kv[0::2]), list(kv[1::2]), P)
        cache = GrowingCache([None] * c.n_layer, [None] * c.n_layer, 0)
        embeds = self.prompt_embeddings[None].expand(batch_size, -1, -1)
        self.gpt.hidden_states(None, kv_cache=cache, inputs_embeds=embeds)
        cache.keep = P
        return cache

    def forward(self, idx, targets=None, *, kv_cache=None, label_smoothing: float = 0.0, logits_slice=None):
        if kv_cache is None:  # a whole sequence (training, evaluation): a fresh prefix for this batch
            kv_cache = self.new_kv_cache(idx.size(0))
        return self.gpt(idx, targets, kv_cache=kv_cache, label_smoothing=label_smoothing, logits_slice=logits_slice)

    def peft_config(self, base: str):
        """The PEFT config describing this adapter (adapter_config.json)."""
        import peft

        c = self.config
        cls = peft.PromptTuningConfig if self.kind == "prompt" else peft.PrefixTuningConfig
        return cls(task_type="CAUSAL_LM", num_virtual_tokens=self.num_virtual_tokens, token_dim=c.n_embd,
                   num_transformer_submodules=1, num_attention_heads=c.n_head, num_layers=c.n_layer,
                   base_model_name_or_path=base)


def peft_config(cfg, head: bool):
    """The peft config for --method; the head (classify/regress) is trained in full next to the adapter."""
    import peft

    targets = [t.strip() for t in cfg.target_modules.split(",") if t.strip()]
    save = ["score"] if head else None
    common = dict(target_modules=targets, modules_to_save=save)
    if cfg.method == "lora":
        return peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, **common)
    if cfg.method == "loha":
        return peft.LoHaConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, module_dropout=cfg.lora_dropout, **common)
    if cfg.method == "adalora":
        # starts at 1.5 x the target rank and prunes to lora_r over the middle of the run
        return peft.AdaLoraConfig(init_r=max(cfg.lora_r * 3 // 2, cfg.lora_r + 1), target_r=cfg.lora_r,
                                  lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                  total_step=cfg.max_iters, tinit=cfg.max_iters // 10,
                                  tfinal=cfg.max_iters // 5, deltaT=max(1, cfg.max_iters // 50), **common)
    if cfg.method == "ia3":
        # IA3 scales outputs, except for MLP-output layers whose inputs it scales ("feedforward" modules)
        return peft.IA3Config(feedforward_modules=[t for t in targets if t.endswith("c_proj")], **common)
    raise ValueError(cfg.method)


def add_adapter(model, cfg, head: bool):
    """Make only what --method trains trainable. Returns the module to train (a PeftModel for adapters)."""
    if cfg.method in ("prompt", "prefix"):
        if head:
            raise ConfigError(f"--method {cfg.method} works with --format text or instruct only")
        model.requires_grad_(False)
        model.gradient_checkpointing = False  # its recomputation path does not take a KV cache
        init = torch.randint(model.config.vocab_size, (cfg.num_virtual_tokens,),
                             generator=torch.Generator().manual_seed(cfg.seed))
        return PrefixLM(model, cfg.method, cfg.num_virtual_tokens, init_ids=init)
    if cfg.method in WEIGHT_ADAPTERS:
        from peft import get_peft_model

        try:
            peft_model = get_peft_model(model, peft_config(cfg, head))
        except ValueError as e:  # e.g. --target_modules that match no layer
            raise ConfigError(f"--method {cfg.method}: {str(e).splitlines()[0]}") from None
        # recorded in adapter_config.json: what sample.py --adapter loads when no --model is given
        peft_model.peft_config["default"].base_model_name_or_path = cfg.base
        return peft_model
    model.requires_grad_(cfg.method == "full")
    if cfg.method == "freeze":
        gpt = model.gpt if head else model
        n = min(cfg.trainable_layers, len(gpt.transformer.h))
        for block in list(gpt.transformer.h)[len(gpt.transformer.h) - n:]:
            block.requires_grad_(True)
        gpt.transformer.ln_f.requires_grad_(True)
        (model.score if head else gpt.lm_head).requires_grad_(True)  # the LM head is tied to wte
    return model


def adalora_regularizer(peft_model) -> torch.Tensor:
    """AdaLoRA's orthogonality penalty, mean ||P P^T - I||_F over its P (lora_A) and Q (lora_B) matrices,
    times orth_reg_weight. PEFT adds it only to transformers-style outputs, so the loop adds it here."""
    terms = []
    for name, p in peft_model.named_parameters():
        if p.requires_grad and (".lora_A." in name or ".lora_B." in name):
            cov = p @ p.T if ".lora_A." in name else p.T @ p  # (r, r)
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.size(0), device=cov.device)))
    return peft_model.peft_config["default"].orth_reg_weight * torch.stack(terms).mean()


def trainable_state(model, cfg) -> dict:
    """What a checkpoint must hold to resume: adapter weights (+ head, AdaLoRA's ranks) or all weights."""
    state = model.state_dict()
    if cfg.method in ("full", "freeze"):
        return state
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # peft adapter tensors all carry the adapter name ("default"), including buffers such as AdaLoRA's ranknum
    return {k: v for k, v in state.items() if k in trainable or ".default" in k}


def gpt_of(model):
    """The GPT inside a PeftModel and/or SequenceHead (the module generate() runs on)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.gpt if isinstance(model, SequenceHead) else model


# --- data: examples for instruct / classify / regress


def read_examples(inputs: list[str], columns=()) -> list[tuple[str, dict]]:
    """(source, row) for every row of the .jsonl / .json / .csv / .parquet files, folders or globs given."""
    import data as datamod

    files = datamod.resolve_inputs(resolve_data_paths(inputs))
    for path in files:
        if path.suffix.lower() not in datamod.TABLE_EXTENSIONS:
            raise datamod.DataError(f"{path}: examples must be one per row in {' '.join(datamod.TABLE_EXTENSIONS)} "
                                    f"files (plain text is for --format text)")
    rows = [row for path in files for row in datamod.read_records(path, columns)]
    if not rows:
        raise datamod.DataError(f"no examples in {', '.join(inputs)}")
    return rows


def encode_chat(turns: list[tuple[str, str]], tokenizer, block_size: int) -> tuple[list[int], list[int]]:
    """(role, text) turns -> input ids and next-token targets with IGNORE_INDEX everywhere except on the
    assistant's responses (and their end marker): the model learns to answer, not to write prompts."""
    ids, learn = [], []
    end_ids = [tokenizer.eos_id] if tokenizer.eos_id is not None else tokenizer.encode(response_end(tokenizer))
    for role, text in turns:
        if role == "system":
            piece, trained = tokenizer.encode(SYSTEM_TEMPLATE.format(system=text)), False
        elif role == "user":
            piece, trained = tokenizer.encode(PROMPT_TEMPLATE.format(prompt=text)), False
        else:
            piece, trained = tokenizer.encode(text) + end_ids, True
        ids += piece
        learn += [trained] * len(piece)
    ids, learn = ids[: block_size + 1], learn[: block_size + 1]  # long examples are cut at the context
    targets = [t if ok else IGNORE_INDEX for t, ok in zip(ids[1:], learn[1:])]
    return ids[:-1], targets


def load_examples(cfg, tokenizer, block_size: int) -> tuple[list[dict], dict]:
    """Tokenised examples for --format instruct / classify / regress, and what the head needs (labels)."""
    from data import DataError

    columns = () if cfg.format == "instruct" else (cfg.text_column, cfg.label_column)
    rows = read_examples(cfg.data, columns)
    examples, meta = [], {}
    if cfg.format == "instruct":
        for source, row in rows:
            if "messages" in row:
                msgs = row["messages"]
                if not isinstance(msgs, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m)
                                                         for m in msgs):
                    raise DataError(f"{source}: 'messages' must be a list of {{\"role\", \"content\"}} objects")
                turns = [(m["role"], str(m["content"])) for m in msgs]
            elif "prompt" in row and "response" in row:
                turns = [("user", str(row["prompt"])), ("assistant", str(row["response"]))]
            else:
                raise DataError(f"{source}: an instruct example needs 'prompt' and 'response' (or 'messages')")
            if not any(role == "assistant" for role, _ in turns):
                raise DataError(f"{source}: no assistant response to learn")
            x, y = encode_chat(turns, tokenizer, block_size)
            if all(t == IGNORE_INDEX for t in y):
                raise DataError(f"{source}: the prompt fills the whole context ({block_size} tokens); shorten it")
            first_user = next((t for r, t in turns if r == "user"), "")
            examples.append({"x": x, "y": y, "prompt": first_user})
        return examples, meta
    values = []
    for source, row in rows:
        if cfg.text_column not in row or cfg.label_column not in row:
            raise DataError(f"{source}: needs '{cfg.text_column}' and '{cfg.label_column}' fields "
                            f"(--text_column / --label_column)")
        values.append((source, str(row[cfg.text_column]), row[cfg.label_column]))
    if cfg.format == "classify":
        meta["labels"] = sorted({str(v) for _, _, v in values})
        if len(meta["labels"]) < 2:
            raise DataError(f"--format classify needs at least 2 different labels, found {meta['labels']}")
        index = {label: i for i, label in enumerate(meta["labels"])}
    for source, text, value in values:
        if cfg.format == "classify":
            target = index[str(value)]
        else:
            try:
                target = float(value)
            except (TypeError, ValueError):
                raise DataError(f"{source}: --format regress needs a numeric label, got {value!r}") from None
        ids = tokenizer.encode(text)[:block_size] or ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        if not ids:
            raise DataError(f"{source}: empty text")
        examples.append({"x": ids, "target": target, "prompt": text})
    return examples, meta


def split_examples(examples: list, split: tuple, seed: int) -> tuple[list, list]:
    """Shuffle once (seeded) and split train/val by the --split fractions; val keeps at least one."""
    from data import DataError

    if len(examples) < 2:
        raise DataError(f"need at least 2 examples (one for validation), got {len(examples)}")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(len(examples) - 1, max(1, round(len(examples) * split[1])))
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def collate(rows: list[dict], fmt: str, pad_id: int, device):
    """Right-padded batch: (x, y) for instruct (y = IGNORE_INDEX on prompts and padding), or
    (x, targets, lengths) for classify / regress."""
    T = max(len(r["x"]) for r in rows)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : len(r["x"])] = torch.tensor(r["x"])
    if fmt == "instruct":
        y = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        for i, r in enumerate(rows):
            y[i, : len(r["y"])] = torch.tensor(r["y"])
        return x.to(device), y.to(device)
    dtype = torch.float32 if fmt == "regress" else torch.long
    targets = torch.tensor([r["target"] for r in rows], dtype=dtype)
    lengths = torch.tensor([len(r["x"]) for r in rows])
    return x.to(device), targets.to(device), lengths.to(device)


def get_example_batch(examples, batch_size, generator, fmt, pad_id, device):
    ix = torch.randint(len(examples), (batch_size,), generator=generator).tolist()
    return collate([examples[i] for i in ix], fmt, pad_id, device)


@torch.no_grad()
def evaluate_head(model, batches, fmt: str) -> tuple[float, float | None]:
    """(mean loss, accuracy or None) of a classify / regress model over fixed val batches."""
    was_training = model.training
    model.eval()
    losses, correct, count = [], 0, 0
    for x, targets, lengths in batches:
        logits, loss = model(x, targets, lengths)
        losses.append(loss.float() * len(targets))
        if fmt == "classify":
            correct += (logits.argmax(-1) == targets).sum().item()
        count += len(targets)
    model.train(was_training)
    return (torch.stack(losses).sum() / count).item(), (correct / count if fmt == "classify" else None)


def stored_extras(cfg, meta: dict, tokenizer) -> dict:
    """What sample.py and the UI need to use the result, stored with it: format, template, labels."""
    extras = {"format": cfg.format, "method": cfg.method, "base": cfg.base}
    if cfg.format == "instruct":
        extras["prompt_template"] = PROMPT_TEMPLATE
        extras["stop"] = response_end(tokenizer)
    if cfg.method in ("prompt", "prefix"):
        extras["num_virtual_tokens"] = cfg.num_virtual_tokens
    extras.update(meta)
    return extras


def save_tokenizer(tokenizer, folder: Path, extras: dict):
    """tokenizer.json + tokenizer_config.json (with the chat template for instruct models)."""
    tokenizer.save(folder)
    if extras.get("format") == "instruct":
        path = folder / "tokenizer_config.json"
        tok_config = json.loads(path.read_text()) if path.is_file() else {}
        end = extras["stop"] or tokenizer.decode([tokenizer.eos_id])
        tok_config["chat_template"] = CHAT_TEMPLATE.replace("{{ END }}", end)
        write_json_atomic(path, tok_config)


def save_result(model, cfg, out_dir: Path, tokenizer, extras: dict) -> Path:
    """adapter/ (PEFT format) for adapter methods, model/ for full and freeze. The adapter folder is
    written aside and swapped in, so a kill mid-save leaves the previous one whole."""
    import shutil

    if cfg.method in ("full", "freeze"):
        head = model if isinstance(model, SequenceHead) else None
        save_model_folder(head.gpt if head else model, head, out_dir / "model", tokenizer, extras)
        return out_dir / "model"
    folder, tmp, old = out_dir / "adapter", out_dir / ".adapter.tmp", out_dir / ".adapter.old"
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(model, PrefixLM):
        from safetensors.torch import save_file

        model.peft_config(cfg.base).save_pretrained(str(tmp))
        save_file({"prompt_embeddings": model.prompt_embeddings.detach().float().contiguous()},
                  str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    else:
        # adapter_config.json + adapter_model.safetensors (+ the head); the embeddings are never resized here
        model.save_pretrained(str(tmp), save_embedding_layers=False)
        (tmp / "README.md").unlink(missing_ok=True)  # peft's placeholder card; hub.py writes the real one
    write_json_atomic(tmp / "nanoforge.json", extras)
    save_tokenizer(tokenizer, tmp, extras)
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def save_model_folder(gpt, head, folder: Path, tokenizer, extras: dict):
    """A standalone model folder (GPT.save_pretrained + tokenizer), plus head.safetensors for a head."""
    from safetensors.torch import save_file

    gpt.save_pretrained(folder, extra_config=extras)
    save_tokenizer(tokenizer, folder, extras)
    if head is not None:
        tmp = folder / "head.safetensors.tmp"
        save_file({k: v.detach().float().contiguous() for k, v in head.score.state_dict().items()}, str(tmp))
        os.replace(tmp, folder / "head.safetensors")


def find_adapter(adapter) -> tuple[Path, dict]:
    """(local adapter folder, its nanoforge.json extras) for a run folder, adapter folder or Hub id."""
    from model import ModelLoadError, _download

    folder = adapter_dir(adapter)
    if not (folder / "adapter_config.json").is_file():
        if Path(adapter).exists():
            raise ModelLoadError(f"{adapter}: no adapter here (expected adapter_config.json or adapter/)")
        folder = _download(str(adapter))
        if not (folder / "adapter_config.json").is_file():
            raise ModelLoadError(f"{adapter}: that Hub repo holds no adapter_config.json")
    extras = json.loads((folder / "nanoforge.json").read_text()) if (folder / "nanoforge.json").is_file() else {}
    return folder, extras


def adapter_base(adapter) -> str:
    """The base model an adapter records (adapter_config.json's base_model_name_or_path)."""
    from model import ModelLoadError

    folder, _ = find_adapter(adapter)
    base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{adapter}: the adapter does not record its base model; pass --model BASE")
    return base


def load_adapter(model, adapter, device=None, head: bool = False):
    """Apply an adapter (run folder, adapter folder or Hub id) to a base and merge it in: what
    `sample.py --adapter` runs. model is a GPT, or a base name/path (None: the base the adapter records).
    The result is the merged GPT, the same weights `finetune.py --merge` saves, so both give the same text.
    head=True returns the SequenceHead of a classify / regress adapter instead."""
    from peft import PeftModel

    from model import GPT, ModelLoadError

    folder, extras = find_adapter(adapter)
    if model is None or isinstance(model, (str, Path)):
        model = GPT.from_pretrained(resolve_base(str(model or adapter_base(adapter))))
    is_head = extras.get("format") in ("classify", "regress")
    if is_head != head:
        raise ModelLoadError(f"{adapter}: a {extras.get('format')} adapter; "
                             + ("use finetune.predict() for its labels" if is_head else "it generates text"))
    if device is not None:
        model = model.to(device)
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    if adapter_config.get("peft_type") in ("PROMPT_TUNING", "PREFIX_TUNING"):
        from safetensors.torch import load_file

        kind = "prompt" if adapter_config["peft_type"] == "PROMPT_TUNING" else "prefix"
        prefix = PrefixLM(model, kind, adapter_config["num_virtual_tokens"])
        try:
            prefix.load_state_dict({"prompt_embeddings": load_file(str(folder / "adapter_model.safetensors"))
                                    ["prompt_embeddings"]}, strict=False)
        except (RuntimeError, KeyError) as e:
            raise ModelLoadError(f"{adapter}: does not fit the base model ({str(e).splitlines()[0]})") from None
        return prefix.to(model.lm_head.weight.device).eval()  # learned inputs, not weights: nothing to merge
    if is_head:
        model = SequenceHead(model, len(extras.get("labels", [])) or 1, extras["format"])
    try:
        peft_model = PeftModel.from_pretrained(model.eval(), str(folder))
    except (ValueError, RuntimeError, KeyError) as e:
        raise ModelLoadError(f"{adapter}: does not fit the base model ({str(e).splitlines()[0]})") from None
    return peft_model.merge_and_unload().eval()


@torch.no_grad()
def predict(run, texts: list[str], device=None) -> list:
    """Labels (classify) or values (regress) for texts, from a classify / regress fine-tune run."""
    import data as datamod

    folder, extras = find_adapter(run)
    model = load_adapter(None, run, device=device, head=True)
    tokenizer = datamod.Tokenizer.load(str(folder))
    pad = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    rows = [{"x": tokenizer.encode(t)[: model.config.block_size] or [pad], "target": 0} for t in texts]
    x, _, lengths = collate(rows, "regress", pad, model.score.weight.device)
    out, _ = model(x, None, lengths)
    if extras["format"] == "classify":
        return [extras["labels"][i] for i in out.argmax(-1).tolist()]
    return out[:, 0].tolist()


class _AdapterOff(nn.Module):
    """The GPT with its peft adapter layers switched off, for base-model samples."""

    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model
        self.config = gpt_of(peft_model).config
        self.lm_head = gpt_of(peft_model).lm_head

    def new_kv_cache(self, *args, **kwargs):
        return gpt_of(self.peft_model).new_kv_cache(*args, **kwargs)

    def forward(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return gpt_of(self.peft_model)(*args, **kwargs)


def merge_run(run, log=print) -> Path:
    """`finetune.py --merge RUN`: base + the run's adapter -> RUN/merged (a standalone model folder)."""
    import data as datamod

    run = Path(run)
    folder = adapter_dir(run)
    if not (folder / "adapter_config.json").is_file():
        raise ConfigError(f"{run}: no adapter to merge (full and freeze runs already hold a whole model in model/)")
    folder, extras = find_adapter(folder)
    if extras.get("method") in ("prompt", "prefix"):
        raise ConfigError(f"{run}: {extras['method']} tuning learns inputs, not weights; there is nothing to "
                          f"merge (sample it with --adapter)")
    head = extras.get("format") in ("classify", "regress")
    merged = load_adapter(None, folder, head=head)
    tokenizer = datamod.Tokenizer.load(str(folder))
    head = merged if head else None
    out = run / "merged"
    save_model_folder(head.gpt if head else merged, head, out, tokenizer, extras)
    log(f"merged {folder} into {out}")
    return out


# ----------------------------------------------------------------------------------------------------------


def finetune(cfg: FinetuneConfig, argv: list) -> int:
    from tqdm import tqdm

    import data as datamod
    from model import GPT

    # --- config ----------------------------------------------------------------------------------------
    if cfg.method not in METHODS:
        raise ConfigError(f"'method' must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    if cfg.format not in FORMATS:
        raise ConfigError(f"'format' must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    if cfg.method in ("prompt", "prefix") and cfg.format not in ("text", "instruct"):
        raise ConfigError(f"--method {cfg.method} works with --format text or instruct only")
    from_base = [a for a in argv if a.split("=")[0] in FROM_BASE]
    if from_base:
        raise ConfigError(f"{from_base[0].split('=')[0]} comes from --base in finetune.py; drop it")
    base_dir = resolve_base(cfg.base)
    base_config = GPT.config_from_dict(json.loads((base_dir / "config.json").read_text()))
    # the shape comes from the base; recorded in config.json so --resume checks it
    for key in ("n_layer", "n_head", "n_embd", "bias", "pos_encoding", "norm"):
        setattr(cfg, key, getattr(base_config, key))
    cfg.block_size = min(cfg.block_size or base_config.block_size, base_config.block_size)
    check_config(cfg)
    split = parse_split(cfg.split)
    head = cfg.format in ("classify", "regress")

    # --- compute init ----------------------------------------------------------------------------------
    accelerator, dtype = compute_init(cfg)
    device, master = accelerator.device, accelerator.is_main_process
    rank, world = accelerator.process_index, accelerator.num_processes
    if not cfg.out_dir:
        from accelerate.utils import broadcast_object_list

        cfg.out_dir = broadcast_object_list([default_out_dir(cfg).replace("runs/", "runs/ft-", 1)])[0]
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "checkpoint.pt"
    resume_ckpt = None
    if cfg.resume:
        if ckpt_path.is_file():
            resume_ckpt = load_checkpoint(ckpt_path)
        else:
            print0(f"no checkpoint in {out_dir} yet: starting from scratch")
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "config.json", {**asdict(cfg), "script": "finetune.py",
                                                    "command": ["finetune.py", *argv]})
        set_status(out_dir, "running", resume_ckpt["iter"] if resume_ckpt else 0)
        if resume_ckpt is None:
            for name in ("metrics.jsonl", "samples.jsonl"):
                (out_dir / name).unlink(missing_ok=True)
    print0(f"run folder {out_dir} | base {cfg.base} | {cfg.method} | {cfg.format} | {world} process(es) on "
           f"{device} | {dtype}")

    # --- data ------------------------------------------------------------------------------------------
    tokenizer = datamod.Tokenizer.load(str(base_dir))
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0  # padding is never attended to nor learned
    batch_gen = torch.Generator().manual_seed(cfg.seed + rank)
    eval_gen = torch.Generator().manual_seed(cfg.seed + 10_000 + rank)
    block_size = cfg.block_size - (cfg.num_virtual_tokens if cfg.method in ("prompt", "prefix") else 0)
    if block_size < 8:
        raise ConfigError(f"--num_virtual_tokens {cfg.num_virtual_tokens} leaves no room in a context of "
                          f"{cfg.block_size}")
    meta = {}
    if cfg.format == "text":
        with accelerator.main_process_first():
            prepared = datamod.prepare(resolve_data_paths(cfg.data), tokenizer=tokenizer, text_column=cfg.text_column,
                                       hf_dataset=cfg.hf_dataset, hf_split=cfg.hf_split, split=split,
                                       block_size=block_size, log=print0)
        data_stats = prepared.stats
        next_batch = lambda: get_batch(prepared.train, cfg.batch_size, block_size, batch_gen, device)  # noqa: E731
        val_batches = [get_batch(prepared.val, cfg.batch_size, block_size, eval_gen, device)
                       for _ in range(cfg.eval_iters)]
        prompts = [cfg.sample_prompt or "\n"]
    else:
        examples, meta = load_examples(cfg, tokenizer, block_size)
        train_ex, val_ex = split_examples(examples, split, cfg.seed)
        data_stats = {"examples": len(examples), "train_examples": len(train_ex), "val_examples": len(val_ex),
                      "train_tokens": sum(len(e["x"]) for e in train_ex), **meta}
        print0(f"data: {len(train_ex)} train / {len(val_ex)} val examples" +
               (f", labels {meta['labels']}" if "labels" in meta else ""))
        next_batch = lambda: get_example_batch(  # noqa: E731
            train_ex, cfg.batch_size, batch_gen, cfg.format, pad_id, device)
        n_eval = min(len(val_ex), cfg.eval_iters * cfg.batch_size)
        val_batches = [collate(val_ex[i: i + cfg.batch_size], cfg.format, pad_id, device)
                       for i in range(0, n_eval, cfg.batch_size)]
        prompts = [cfg.sample_prompt] if cfg.sample_prompt else [e["prompt"] for e in val_ex[:max(1, cfg.eval_samples)]]
    extras = stored_extras(cfg, meta, tokenizer)
    if master:  # config.json again, now with the data stats (the model card shows them)
        write_json_atomic(out_dir / "config.json", {**asdict(cfg), "script": "finetune.py",
                                                    "command": ["finetune.py", *argv], "data_stats": data_stats,
                                                    "hardware": hardware_summary(device, world)})

    # --- model -----------------------------------------------------------------------------------------
    gpt = GPT.from_pretrained(base_dir, dropout=cfg.dropout)
    gpt.gradient_checkpointing = cfg.grad_checkpointing
    model = SequenceHead(gpt, len(meta["labels"]) if cfg.format == "classify" else 1, cfg.format) if head else gpt
    # ======================================== adapter block ========================================
    raw_model = add_adapter(model, cfg, head)
    n_train = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in raw_model.parameters())
    print0(f"model: {gpt.num_params() / 1e6:.2f}M parameters from {base_dir}; {cfg.method} trains "
           f"{n_train:,} ({100 * n_train / n_all:.2f}%)")
    # ================================================================================================
    if resume_ckpt is not None:
        if resume_ckpt.get("method") != cfg.method or resume_ckpt.get("base") != cfg.base:
            raise ConfigError(f"cannot resume {out_dir}: it fine-tunes {resume_ckpt.get('base')} with "
                              f"{resume_ckpt.get('method')}; use a new --out_dir")
        _, unexpected = raw_model.load_state_dict(resume_ckpt["model"], strict=False)
        if unexpected or set(resume_ckpt["model"]) != set(trainable_state(raw_model, cfg)):
            raise RunError(f"cannot resume {out_dir}: its checkpoint does not match this model")
    raw_model.to(device)
    sampler = raw_model if isinstance(raw_model, PrefixLM) else gpt_of(raw_model)  # what generate() runs

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
        print0(f"resumed from {ckpt_path} at iter {iter_num}")
        del resume_ckpt
    else:
        torch.manual_seed(cfg.seed + rank)

    def save(status=None):
        """checkpoint.pt (trainable weights) + adapter/ or model/ (main process); all processes call it."""
        from accelerate.utils import gather_object

        rngs = gather_object([rng_state(batch_gen, device)])  # one entry per process
        if master:
            save_checkpoint(ckpt_path, {
                "model": trainable_state(raw_model, cfg), "optimizer": optimizer.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "iter": iter_num, "best_val": best_val, "bad_evals": bad_evals, "base": cfg.base,
                "method": cfg.method, "elapsed_s": elapsed_before + time.time() - t_start, "rng": rngs})
            save_result(raw_model, cfg, out_dir, tokenizer, extras)
            if status:
                set_status(out_dir, status, iter_num)

    def samples(it):
        """Base vs tuned side by side (same prompt and seed); classify/regress: predictions on val examples."""
        if head:
            x, targets, lengths = collate(val_ex[: len(prompts)], cfg.format, pad_id, device)
            raw_model.eval()
            with torch.no_grad():
                logits, _ = model(x, targets, lengths)
            for i, p in enumerate(prompts):
                pred = meta["labels"][logits[i].argmax()] if cfg.format == "classify" else round(logits[i, 0].item(), 4)
                truth = meta["labels"][targets[i]] if cfg.format == "classify" else targets[i].item()
                append_jsonl(out_dir / "samples.jsonl", {"iter": it, "prompt": p, "text": str(pred), "label": truth})
            raw_model.train()
            return
        from sample import stream_text  # the UI's incremental decoder: stops cut, UTF-8 safe

        for i, p in enumerate(prompts):
            text = PROMPT_TEMPLATE.replace("{prompt}", p) if cfg.format == "instruct" else p
            kw = dict(max_new_tokens=cfg.sample_tokens, temperature=0.8, top_k=200, seed=cfg.seed + i,
                      stop_ids=[tokenizer.eos_id] if tokenizer.eos_id is not None else [],
                      stop_strings=[extras["stop"]] if extras.get("stop") else [])
            raw_model.eval()
            tuned = "".join(stream_text(sampler, tokenizer, text, **kw))
            if p not in base_samples:
                base_samples[p] = "".join(stream_text(base_sampler(), tokenizer, text, **kw))
            raw_model.train()
            append_jsonl(out_dir / "samples.jsonl", {"iter": it, "prompt": p, "text": tuned,
                                                     "base": base_samples[p], "tuned": tuned})

    def base_sampler():
        """The base model for the side-by-side: the adapter switched off, or a fresh copy of the base."""
        if cfg.method in WEIGHT_ADAPTERS:
            return _AdapterOff(raw_model)
        if cfg.method in ("prompt", "prefix"):
            return raw_model.gpt
        return GPT.from_pretrained(base_dir).to(device).eval()

    base_samples = {r["prompt"]: r["base"] for r in read_jsonl(out_dir / "samples.jsonl") if "base" in r}

    def evaluate_val():
        """(val loss, val accuracy or None), averaged over processes."""
        if head:
            val_loss, accuracy = evaluate_head(model, val_batches, cfg.format)
        else:
            val_loss, accuracy = estimate_loss(model, val_batches), None
        if world > 1:
            val_loss = accelerator.reduce(torch.tensor(val_loss, device=device), "mean").item()
            if accuracy is not None:
                accuracy = accelerator.reduce(torch.tensor(accuracy, device=device), "mean").item()
        return val_loss, accuracy

    # --- loop ------------------------------------------------------------------------------------------
    if iter_num == 0:  # where the base stands on this data: the row at iter 0 of the val curve
        val_loss, accuracy = evaluate_val()
        row = {"iter": 0, "val_loss": round(val_loss, 4), "max_iters": cfg.max_iters}
        if accuracy is not None:
            row["val_accuracy"] = round(accuracy, 4)
        if master:
            append_jsonl(out_dir / "metrics.jsonl", row)
        print0(f"before fine-tuning: val {val_loss:.4f}"
               + (f" | val acc {accuracy:.3f}" if accuracy is not None else ""))
    save_every = cfg.save_interval or cfg.eval_interval
    stop = StopFlag()
    previous_handlers = install_signal_handlers(stop)
    bar = tqdm(total=cfg.max_iters, initial=iter_num, disable=not (master and sys.stdout.isatty()),
               dynamic_ncols=True, leave=False)
    t_start = t_last = time.time()
    iters_since_log, tokens_since_log, ms_per_iter, status, message = 0, 0, None, "finished", ""
    adalora = cfg.method == "adalora"
    model.train()
    try:
        while iter_num < cfg.max_iters:
            lr = get_lr(iter_num, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for _ in range(cfg.grad_accum):
                with accelerator.accumulate(model):
                    batch = next_batch()
                    tokens_since_log += batch[0].numel() * world  # examples vary in length (padded)
                    if cfg.format in ("text", "instruct"):
                        _, loss = model(*batch, label_smoothing=cfg.label_smoothing)
                    else:
                        _, loss = model(*batch)
                    # AdaLoRA's penalty is trained on but not logged: the logged loss stays the LM's
                    accelerator.backward(loss + adalora_regularizer(raw_model) if adalora else loss)
                    if accelerator.sync_gradients and cfg.grad_clip > 0:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    optimizer.step()
                    if adalora and accelerator.sync_gradients:  # prune ranks using this step's gradients
                        raw_model.base_model.update_and_allocate(iter_num)
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
            if iter_num % cfg.log_interval == 0 or evaluate or save_now or stop:
                now = time.time()
                ms = (now - t_last) * 1000 / iters_since_log
                ms_per_iter = ms if ms_per_iter is None else 0.7 * ms_per_iter + 0.3 * ms
                tokens_per_sec = tokens_since_log / max(now - t_last, 1e-9)
                t_last, iters_since_log, tokens_since_log = now, 0, 0
                lossf = (loss_sum / cfg.grad_accum).item()
                elapsed = elapsed_before + now - t_start
                eta = (cfg.max_iters - iter_num) * ms_per_iter / 1000
                row = {"iter": iter_num, "loss": round(lossf, 4), "lr": lr, "ms": round(ms, 2),
                       "tokens_per_sec": round(tokens_per_sec), "elapsed_s": round(elapsed, 2),
                       "eta_s": round(eta, 1), "max_iters": cfg.max_iters}
                if not math.isfinite(lossf):
                    raise RunError(f"loss is {lossf} at iter {iter_num}: training diverged; lower --learning_rate "
                                   f"(now {cfg.learning_rate:g}); the last good checkpoint is kept")
                line = (f"iter {iter_num:>{len(str(cfg.max_iters))}}/{cfg.max_iters} | loss {lossf:.4f} | "
                        f"lr {lr:.2e} | {ms:.1f} ms/iter | {tokens_per_sec:,.0f} tok/s | "
                        f"{format_time(elapsed)} elapsed | eta {format_time(eta)}")
                if evaluate:
                    val_loss, accuracy = evaluate_val()
                    improved = val_loss < best_val
                    best_val, bad_evals = min(best_val, val_loss), 0 if improved else bad_evals + 1
                    row["val_loss"] = round(val_loss, 4)
                    line += f" | val {val_loss:.4f}" + (" *" if improved else "")
                    if accuracy is not None:
                        row["val_accuracy"] = round(accuracy, 4)
                        line += f" | val acc {accuracy:.3f}"
                if master:
                    append_jsonl(out_dir / "metrics.jsonl", row)
                print0(line)
                if evaluate and master and cfg.eval_samples > 0:
                    samples(iter_num)
                if evaluate and cfg.early_stop_patience and bad_evals >= cfg.early_stop_patience:
                    message = f"early stop: val loss did not improve for {bad_evals} evaluations"
                    print0(message)
                    save()
                    break
            if stop:
                status, message = "stopped", f"stopped by {stop.signal} at iter {iter_num}"
                print0(f"{message}; resume with: python finetune.py --out_dir {out_dir} --resume")
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
                tokens_since_log = 0
    finally:
        bar.close()
        restore_signal_handlers(previous_handlers)

    # --- save ------------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if master:
        if cfg.merge and cfg.method in WEIGHT_ADAPTERS:
            merge_run(out_dir, log=print0)
        elif cfg.merge and cfg.method in ("prompt", "prefix"):
            print0(f"--merge: {cfg.method} tuning learns inputs, not weights; there is nothing to merge "
                   f"(sample with --adapter {out_dir})")
        elif cfg.merge:
            print0(f"--merge: {cfg.method} already saved a whole model in {out_dir / 'model'}")
        set_status(out_dir, status, iter_num, message)
        print0(f"{status} at iter {iter_num}, {format_best_val(best_val)}, "
               f"{format_time(elapsed_before + time.time() - t_start)}; output in {out_dir}")
        if not head:
            print0(f"sample it: python sample.py --model {out_dir}" if cfg.method in ("full", "freeze") else
                   f"sample it: python sample.py --model {cfg.base} --adapter {out_dir}")
    if cfg.push_to_hub and status == "finished" and master:  # after wait_for_everyone: pushed once
        if push_finished_run(cfg, out_dir, iter_num, "fine-tuning"):
            return 1
    accelerator.end_training()
    return 0


def main(argv=None) -> int:
    """Command-line entry point; user errors are one line on stderr (exit 2 config, 1 data/runtime)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = None
    try:
        if argv[:1] == ["--merge"] and len(argv) == 2 and not argv[1].startswith("-"):
            merge_run(argv[1])  # python finetune.py --merge RUN
            return 0
        cfg = parse_config(FinetuneConfig, argv, description=__doc__.strip().splitlines()[0])
        return finetune(cfg, argv)
    except user_errors() as e:
        return exit_with_error(e, cfg, oom_advice="lower --batch_size or --block_size, or use --grad_checkpointing")


if __name__ == "__main__":
    sys.exit(main())
