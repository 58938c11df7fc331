"""
Export a nanoforge model as a plain transformers GPT-2 folder.

    python export.py runs/shakespeare exported/       # a train.py run folder
    python export.py runs/lora-chat exported/         # a finetune.py run (merged with --merge first, or full)
    python export.py some/model/folder exported/      # any model folder

The output is what `transformers.AutoModelForCausalLM.from_pretrained(OUT_DIR)` and
`AutoTokenizer.from_pretrained(OUT_DIR)` load, with the same logits as here: config.json (GPT2Config),
model.safetensors (GPT2LMHeadModel names, Conv1D orientation), tokenizer.json + tokenizer_config.json.
That layout is also what llama.cpp's convert_hf_to_gguf.py and other GPT-2 tooling read.
Models without biases get explicit zero biases (same function); rotary / sinusoidal positions and RMSNorm
have no GPT-2 equivalent and are refused with the reason.

From Python: `from export import export; export("runs/shakespeare", "exported/")`.
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

# GPT-2 architecture options that live in config.json's "nanoforge" section; the export writes plain GPT-2
ARCH_KEYS = ("bias", "pos_encoding", "norm", "rope_theta")


class ExportError(Exception):
    """The model cannot be exported; the message is one user-facing line."""


def resolve_model_dir(path) -> Path:
    """The model folder inside a run folder (merged fine-tune first), or the folder itself."""
    path = Path(path)
    for candidate in (path / "merged", path / "model", path):
        if (candidate / "config.json").is_file() and any(candidate.glob("*.safetensors")):
            return candidate
    if (path / "adapter" / "adapter_config.json").is_file() or (path / "adapter_config.json").is_file():
        raise ExportError(
            f"{path}: holds an adapter, not a whole model; run `python finetune.py --merge {path}` first, "
            "then export the run again"
        )
    raise ExportError(f"{path}: no model here (expected a run folder with model/ or a folder with config.json)")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def export(run_or_model_dir, out_dir) -> Path:
    """Write a transformers GPT-2 folder for a run or model folder; returns out_dir."""
    import torch
    from safetensors.torch import save_file

    from model import GPT, ModelLoadError

    src = resolve_model_dir(run_or_model_dir)
    try:
        model = GPT.from_pretrained(src)
    except ModelLoadError as e:
        raise ExportError(str(e)) from None
    ok, reason = model.config.gpt2_compatible()
    if not ok:
        raise ExportError(f"{src}: GPT-2 cannot express this model: {reason}")

    state = model.gpt2_state_dict()
    if not model.config.bias:
        # GPT-2 always has biases: zeros compute the same function.
        for name, module in model.named_modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)) and name != "lm_head":
                state[f"{name}.bias"] = torch.zeros(module.weight.shape[0])
    config = model.gpt2_config_dict()
    extras = {k: v for k, v in config.pop("nanoforge").items() if k not in ARCH_KEYS}
    saved = json.loads((src / "config.json").read_text())
    extras.update({k: v for k, v in saved.get("nanoforge", {}).items() if k not in ARCH_KEYS})
    for key in ("bos_token_id", "eos_token_id"):  # GPT2Config would otherwise default to 50256
        config[key] = saved.get(key)
    config["torch_dtype"] = "float32"
    if extras:  # e.g. the instruction template; transformers keeps unknown keys as plain attributes
        config["nanoforge"] = extras

    out = Path(out_dir)
    if out.resolve() == src.resolve():
        raise ExportError(f"{out}: the output folder must differ from the model folder")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_file({k: v.float().contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    _atomic_write(out / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    _export_tokenizer(src, out, model.config.block_size)
    return out


def _export_tokenizer(src: Path, out: Path, block_size: int) -> None:
    """tokenizer.json as is, and a tokenizer_config.json that AutoTokenizer understands."""
    if not (src / "tokenizer.json").is_file():
        raise ExportError(f"{src}: no tokenizer.json next to the model; cannot export a usable tokenizer")
    tmp = out / "tokenizer.json.tmp"
    shutil.copyfile(src / "tokenizer.json", tmp)
    os.replace(tmp, out / "tokenizer.json")
    tok_config = {}
    if (src / "tokenizer_config.json").is_file():
        tok_config = json.loads((src / "tokenizer_config.json").read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config.setdefault("model_max_length", block_size)
    _atomic_write(out / "tokenizer_config.json", (json.dumps(tok_config, indent=2) + "\n").encode())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="run folder or model folder to export")
    parser.add_argument("out_dir", help="folder to write the transformers GPT-2 model into")
    args = parser.parse_args(argv)
    try:
        out = export(args.src, args.out_dir)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {args.src} -> {out} (load with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
