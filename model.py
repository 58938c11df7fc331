"""
The nanoforge GPT: a GPT-2-compatible decoder and the one seeded sampling generator.

Parameter names and shapes follow GPT-2 (transformer.wte, transformer.h.N.attn.c_attn, ..., lm_head), so a
model folder written by `save_pretrained` is what transformers' GPT2LMHeadModel reads, and GPT-2 checkpoints
(OpenAI's `gpt2`, `distilgpt2`, or any transformers `save_pretrained` folder) load here unchanged.

    from model import GPT, generate
    model = GPT.from_pretrained("runs/shakespeare/model").eval()
    for token_id in generate(model, [0], max_new_tokens=100, seed=1):
        ...

Options beyond GPT-2 (all off by default):
    pos_encoding = "sinusoidal" | "rotary"   fixed / rotary positions instead of learned ones
    norm = "rmsnorm"                         RMSNorm instead of LayerNorm
    bias = False                             no biases in Linear and LayerNorm layers
Models with learned positions and LayerNorm (bias on or off) stay GPT-2-exportable: a missing bias is
exported as zeros. Sinusoidal, rotary and RMSNorm models save and load here, but GPT-2 cannot express them.

This file holds only the model and generation: no CLI, data, Hub upload or UI code.
"""

import json
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # targets with this value add nothing to the loss (padding, prompt tokens)

# GPT-2 stores these four projections as Conv1D, whose weight is (in, out); nn.Linear's is (out, in).
CONV1D_SUFFIXES = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


class ModelLoadError(Exception):
    """A model folder or Hub id that cannot be loaded; the message is one user-facing line."""


@dataclass
class GPTConfig:
    block_size: int = 256  # context length in tokens (GPT-2: 1024)
    vocab_size: int = 65  # tokens in the tokenizer (GPT-2: 50257)
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # attention heads; n_embd must divide evenly
    n_embd: int = 384  # residual stream width
    dropout: float = 0.0  # 0 for pretraining small data quickly; 0.1-0.2 when it overfits
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2 has
    pos_encoding: str = "learned"  # learned (GPT-2) | sinusoidal | rotary
    norm: str = "layernorm"  # layernorm (GPT-2) | rmsnorm
    activation: str = "gelu"  # gelu (exact) | gelu_new (tanh approximation used by OpenAI's GPT-2 weights)
    layer_norm_epsilon: float = 1e-5
    rope_theta: float = 10000.0  # rotary base frequency (pos_encoding="rotary" only)

    def __post_init__(self):
        checks = [
            (self.pos_encoding in ("learned", "sinusoidal", "rotary"), "pos_encoding must be learned, sinusoidal or rotary"),
            (self.norm in ("layernorm", "rmsnorm"), "norm must be layernorm or rmsnorm"),
            (self.activation in ("gelu", "gelu_new"), "activation must be gelu or gelu_new"),
            (self.n_embd % self.n_head == 0, f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"),
            (self.pos_encoding != "rotary" or (self.n_embd // self.n_head) % 2 == 0, "rotary needs an even head size"),
            (min(self.block_size, self.vocab_size, self.n_layer, self.n_head) > 0, "sizes must be positive"),
            (0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def gpt2_compatible(self) -> tuple[bool, str]:
        """Whether transformers' GPT2LMHeadModel can express this model exactly, and if not, why."""
        if self.pos_encoding != "learned":
            return False, f"pos_encoding={self.pos_encoding} (GPT-2 has learned positions only)"
        if self.norm != "layernorm":
            return False, f"norm={self.norm} (GPT-2 has LayerNorm only)"
        return True, ""


# ----------------------------------------------------------------------------------------------------------
# Building blocks


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=config.layer_norm_epsilon)
    return nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon, bias=config.bias)


def sinusoid_table(length: int, dim: int) -> torch.Tensor:
    """(length, dim) fixed position encodings of "Attention Is All You Need"."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)[:, : dim // 2]
    return table


def rotary_tables(length: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (length, head_dim // 2) for rotary position embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) queries or keys by position; cos/sin are (T, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.type_as(x)


class KVCache:
    """Keys and values of every layer for incremental decoding: (n_layer, B, H, max_len, D) each.

    `pos` counts the tokens stored. Storage is allocated on the first update, in the dtype the attention
    produces (so it matches under autocast)."""

    def __init__(self, n_layer: int, batch_size: int, n_head: int, head_dim: int, max_len: int, device):
        self.shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.device = device
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self.pos = 0

    @property
    def max_len(self) -> int:
        return self.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) after the current position; return all keys/values so far."""
        if self.k is None:
            self.k = torch.empty(self.shape, dtype=k.dtype, device=self.device)
            self.v = torch.empty(self.shape, dtype=v.dtype, device=self.device)
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, batch_index: torch.Tensor) -> None:
        """Keep the sequences at batch_index (beam search picks which beams continue)."""
        if self.k is not None:
            self.k = self.k.index_select(1, batch_index)
            self.v = self.v.index_select(1, batch_index)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, kv_cache: Optional[KVCache] = None, layer: int = 0):
        B, T, C = x.shape
        # (B, T, 3C) -> three (B, H, T, D)
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        past = 0
        if kv_cache is not None:
            past = kv_cache.pos
            k, v = kv_cache.update(layer, k, v)
        if past == 0 or T == 1:
            # no cache, a fresh prefill, or one new token that may attend to everything before it
            mask, causal = None, past == 0 and T > 1
        else:
            # T new tokens after `past` cached ones: token i sees cache positions <= past + i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh" if config.activation == "gelu_new" else "none")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, kv_cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), rope, kv_cache, layer)
        return x + self.mlp(self.ln_2(x))


# ----------------------------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False  # recompute block activations in backward to save memory
        parts = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=make_norm(config),
        )
        if config.pos_encoding == "learned":
            parts["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(parts)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in GPT-2
        # fixed tables are recomputed, never saved (persistent=False)
        if config.pos_encoding == "sinusoidal":
            self.register_buffer("pos_table", sinusoid_table(config.block_size, config.n_embd), persistent=False)
        if config.pos_encoding == "rotary":
            cos, sin = rotary_tables(config.block_size, config.n_embd // config.n_head, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections that write into the residual stream
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); non_embedding leaves out the position table."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def new_kv_cache(self, batch_size: int, max_len: Optional[int] = None) -> KVCache:
        c = self.config
        device = self.lm_head.weight.device
        return KVCache(c.n_layer, batch_size, c.n_head, c.n_embd // c.n_head, max_len or c.block_size, device)

    def hidden_states(
        self, idx: Optional[torch.Tensor], kv_cache: Optional[KVCache] = None, inputs_embeds: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """(B, T) token ids -> (B, T, n_embd) final hidden states (after ln_f). inputs_embeds (B, T, n_embd)
        replaces the token embeddings (idx is then None): prompt tuning feeds learned vectors this way."""
        x = self.transformer.wte(idx) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        T = x.size(1)
        past = kv_cache.pos if kv_cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens is longer than the context ({self.config.block_size})")
        rope = None
        if self.config.pos_encoding == "learned":
            x = x + self.transformer.wpe.weight[past : past + T]  # a slice: no index tensor per step
        elif self.config.pos_encoding == "sinusoidal":
            x = x + self.pos_table[past : past + T]
        else:
            rope = (self.rope_cos[past : past + T], self.rope_sin[past : past + T])
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope, kv_cache, layer)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, *, kv_cache=None, label_smoothing: float = 0.0, logits_slice=None):
        """idx (B, T) token ids; targets (B, T) next-token ids (IGNORE_INDEX to skip a position).

        Returns (logits, loss): logits (B, T, vocab) (only the positions in logits_slice when given, e.g.
        slice(-1, None) for the last one), loss the mean cross-entropy in nats or None without targets."""
        x = self.hidden_states(idx, kv_cache)
        if targets is None:
            return self.lm_head(x if logits_slice is None else x[:, logits_slice]), None
        logits = self.lm_head(x)
        loss = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            label_smoothing=label_smoothing,
        )
        return logits, loss

    # ------------------------------------------------------------------------------------------------------
    # GPT-2 layout on disk: config.json + model.safetensors (+ the tokenizer, written by the caller's object)

    def gpt2_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under GPT-2's names and orientation (Conv1D weights transposed, lm_head left out: tied)."""
        out = {}
        for name, tensor in self.state_dict().items():
            if name == "lm_head.weight":
                continue
            if name.endswith(CONV1D_SUFFIXES):
                tensor = tensor.t()
            out[name] = tensor.detach().contiguous()
        return out

    def gpt2_config_dict(self) -> dict:
        """config.json content: transformers' GPT2Config keys, plus our extras under "nanoforge"."""
        c = self.config
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": c.vocab_size,
            "n_positions": c.block_size,
            "n_ctx": c.block_size,
            "n_embd": c.n_embd,
            "n_layer": c.n_layer,
            "n_head": c.n_head,
            "n_inner": None,
            "activation_function": c.activation,
            "resid_pdrop": c.dropout,
            "embd_pdrop": c.dropout,
            "attn_pdrop": c.dropout,
            "layer_norm_epsilon": c.layer_norm_epsilon,
            "initializer_range": 0.02,
            "scale_attn_weights": True,
            "tie_word_embeddings": True,
            "use_cache": True,
            "nanoforge": {k: v for k, v in asdict(c).items() if k in ("bias", "pos_encoding", "norm", "rope_theta")},
        }

    def save_pretrained(self, out_dir, tokenizer=None, extra_config: Optional[dict] = None) -> None:
        """Write a self-describing model folder. Every file goes to a temporary name first and is renamed,
        so an interrupted save leaves the previous files intact. extra_config entries are merged into the
        "nanoforge" section of config.json (e.g. a prompt template)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = self.gpt2_config_dict()
        config["nanoforge"].update(extra_config or {})
        if tokenizer is not None and getattr(tokenizer, "eos_id", None) is not None:
            config["bos_token_id"] = config["eos_token_id"] = tokenizer.eos_id
        tmp = out / "model.safetensors.tmp"
        save_file(self.gpt2_state_dict(), str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / "model.safetensors")
        tmp = out / "config.json.tmp"
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, out / "config.json")
        if tokenizer is not None:
            tokenizer.save(out)

    @staticmethod
    def config_from_dict(cfg: dict, **overrides) -> GPTConfig:
        """GPTConfig from a transformers GPT-2 config.json dict (ours or anyone's)."""
        if cfg.get("model_type", "gpt2") != "gpt2":
            raise ModelLoadError(f"model_type is {cfg.get('model_type')!r}; only GPT-2-layout models are supported")
        n_embd = cfg["n_embd"]
        if cfg.get("n_inner") not in (None, 4 * n_embd):
            raise ModelLoadError(f"n_inner={cfg['n_inner']} is not supported (the MLP is 4 x n_embd wide)")
        if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("reorder_and_upcast_attn"):
            raise ModelLoadError("scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported")
        act = cfg.get("activation_function", "gelu_new")
        act = {"gelu_pytorch_tanh": "gelu_new", "gelu_fast": "gelu_new"}.get(act, act)
        if act not in ("gelu", "gelu_new"):
            raise ModelLoadError(f"activation_function={act!r} is not supported (gelu or gelu_new)")
        extras = cfg.get("nanoforge", {})
        kwargs = dict(
            block_size=cfg.get("n_positions", cfg.get("n_ctx", 1024)),
            vocab_size=cfg["vocab_size"],
            n_layer=cfg["n_layer"],
            n_head=cfg["n_head"],
            n_embd=n_embd,
            dropout=cfg.get("resid_pdrop", 0.0),
            activation=act,
            layer_norm_epsilon=cfg.get("layer_norm_epsilon", 1e-5),
        )
        kwargs.update({k: extras[k] for k in ("bias", "pos_encoding", "norm", "rope_theta") if k in extras})
        kwargs.update(overrides)
        return GPTConfig(**kwargs)

    @classmethod
    def from_pretrained(cls, name_or_path, device="cpu", dtype=None, **overrides) -> "GPT":
        """Load a GPT-2-layout folder (config.json + *.safetensors), or a Hub id such as "gpt2".

        overrides replace config values, e.g. dropout=0.1 for fine-tuning. Raises ModelLoadError with a
        one-line message when the folder or repo cannot be used."""
        folder = Path(name_or_path)
        if not folder.is_dir():
            folder = _download(str(name_or_path))
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{folder}: no config.json here; expected a model folder (config.json + model.safetensors)")
        try:
            cfg = json.loads((folder / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelLoadError(f"{folder / 'config.json'}: not valid JSON ({e})") from None
        try:
            config = cls.config_from_dict(cfg, **overrides)
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"{folder / 'config.json'}: not a usable GPT-2 config ({e})") from None
        state = _load_gpt2_weights(folder)
        model = cls(config)
        ours = {}
        for name, tensor in state.items():
            name = name if name.startswith("transformer.") or name == "lm_head.weight" else "transformer." + name
            if name.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # old transformers' causal-mask buffers
            ours[name] = tensor.t() if name.endswith(CONV1D_SUFFIXES) else tensor
        ours.pop("lm_head.weight", None)  # tied to wte
        missing, unexpected = model.load_state_dict(ours, strict=False)
        missing = [m for m in missing if m != "lm_head.weight"]
        if missing or unexpected:
            raise ModelLoadError(
                f"{folder}: weights do not match the config (missing: {missing[:3]}, unexpected: {unexpected[:3]})"
            )
        return model.to(device=device, dtype=dtype)


def _download(repo_id: str) -> Path:
    """Fetch a model repo from the Hugging Face Hub (safetensors, configs and tokenizer only, no pickles)."""
    if repo_id.startswith((".", "/", "~")) or repo_id.count("/") > 1:
        raise ModelLoadError(f"{repo_id}: no such folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.md"]))
    except Exception as e:  # offline, unknown repo, no access: all end the same way for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"{repo_id}: not a local folder and could not be fetched from the Hugging Face Hub ({reason})"
        ) from None


def _load_gpt2_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        hint = " (pickle checkpoints such as pytorch_model.bin are not loaded)" if (folder / "pytorch_model.bin").exists() else ""
        raise ModelLoadError(f"{folder}: no model.safetensors{hint}")
    state = {}
    for f in files:
        state.update(load_file(str(folder / f)))
    return state


# ----------------------------------------------------------------------------------------------------------
# Generation


def sample_next(
    logits: torch.Tensor,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
) -> int:
    """Pick one token id from (vocab,) logits: greedy at temperature 0, else top-k, then top-p (nucleus)."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        logits, index = torch.topk(logits, top_k)  # sorted, largest first
    elif top_p is not None and top_p < 1.0:
        logits, index = torch.sort(logits, descending=True)
    else:
        index = None
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        # drop tokens once the more likely ones already cover top_p of the mass (the first always stays)
        probs = probs.masked_fill(probs.cumsum(-1) - probs > top_p, 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)
    return int(index[choice] if index is not None else choice)


def _penalise(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style repetition penalty on (..., vocab) logits for tokens already in the text."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


@torch.inference_mode()
def generate(
    model: GPT,
    prompt_ids: Sequence[int],
    max_new_tokens: int = 256,
    *,
    temperature: float = 0.8,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    repetition_penalty: float = 1.0,
    num_beams: int = 1,
    seed: Optional[int] = None,
    stop_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    decode=None,
) -> Iterator[int]:
    """Yield new token ids one at a time; the one sampling loop the CLI, the tests and the UI share.

    Sampling draws only from this call's own torch.Generator seeded with `seed` (random when None), so the
    same seed gives the same text whatever else the process does. temperature=0 is greedy; num_beams > 1 is
    beam search (the best beam's tokens come at the end). Generation stops after max_new_tokens, after a
    token in stop_ids, or once the text ends with one of stop_strings (these need `decode`, ids -> str; the
    stop token or string is the last thing yielded). A prompt longer than the context keeps its last
    block_size tokens; past the context window the cache is refilled with the most recent 3/4 of it.
    Call model.eval() first."""
    if len(prompt_ids) == 0:
        raise ValueError("the prompt must hold at least one token")
    if stop_strings and decode is None:
        raise ValueError("stop_strings need a decode function")
    if seed is None:
        seed = random.SystemRandom().randrange(2**63)
    if num_beams > 1:
        yield from _beam_search(model, list(prompt_ids), max_new_tokens, num_beams, set(stop_ids))
        return
    block = model.config.block_size
    device = model.lm_head.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = list(prompt_ids)[-block:]
    stop_ids = set(stop_ids)
    longest_stop = max((len(s) for s in stop_strings), default=0)
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=device)
        seen[torch.tensor(tokens, device=device)] = True
    cache = model.new_kv_cache(1)
    feed = tokens  # tokens not yet in the cache
    new = []
    for _ in range(max_new_tokens):
        if cache.pos + len(feed) > block:  # context full: start again from the most recent 3/4 of it
            cache.pos = 0
            feed = tokens[-(block - block // 4) :]
        logits, _ = model(torch.tensor([feed], device=device), kv_cache=cache, logits_slice=slice(-1, None))
        logits = logits[0, -1]
        if seen is not None:
            logits = _penalise(logits, seen, repetition_penalty)
        token = sample_next(logits, generator, temperature, top_k, top_p)
        yield token
        tokens.append(token)
        new.append(token)
        if seen is not None:
            seen[token] = True
        if token in stop_ids:
            return
        if stop_strings and decode(new[-longest_stop - 2 :]).endswith(tuple(stop_strings)):
            return
        feed = [token]


def _beam_search(model: GPT, prompt: list[int], max_new_tokens: int, num_beams: int, stop_ids: set) -> Iterator[int]:
    """Deterministic beam search; the score is the summed log-probability divided by the length."""
    block = model.config.block_size
    device = model.lm_head.weight.device
    beams = [list() for _ in range(num_beams)]  # new tokens of each live beam
    scores = torch.full((num_beams,), float("-inf"), device=device)
    scores[0] = 0.0  # identical beams at the start: expand only the first
    finished = []  # (normalised score, tokens)
    context = prompt[-block:]
    cache = model.new_kv_cache(num_beams)
    feed = torch.tensor([context] * num_beams, device=device)
    for step in range(max_new_tokens):
        if cache.pos + feed.size(1) > block:
            keep = block - block // 4
            cache.pos = 0
            feed = torch.tensor([(context + b)[-keep:] for b in beams], device=device)
        logits, _ = model(feed, kv_cache=cache, logits_slice=slice(-1, None))
        logprobs = torch.log_softmax(logits[:, -1].float(), dim=-1)  # (num_beams, vocab)
        vocab = logprobs.size(-1)
        total = (scores[:, None] + logprobs).view(-1)
        top_scores, top_index = total.topk(min(2 * num_beams, total.numel()))
        next_beams, next_scores, parents, next_tokens = [], [], [], []
        for score, index in zip(top_scores.tolist(), top_index.tolist()):
            parent, token = divmod(index, vocab)
            seq = beams[parent] + [token]
            if token in stop_ids:
                finished.append((score / len(seq), seq))
            else:
                next_beams.append(seq)
                next_scores.append(score)
                parents.append(parent)
                next_tokens.append(token)
            if len(next_beams) == num_beams:
                break
        best_live = max(next_scores) / (step + 1) if next_scores else float("-inf")
        if not next_beams or (len(finished) >= num_beams and max(f[0] for f in finished) >= best_live):
            break
        beams = next_beams
        scores = torch.tensor(next_scores, device=device)
        cache.reorder(torch.tensor(parents, device=device))
        feed = torch.tensor(next_tokens, device=device)[:, None]
    candidates = finished + [(s / max(len(b), 1), b) for s, b in zip(scores.tolist(), beams)]
    yield from max(candidates, key=lambda c: c[0])[1]
