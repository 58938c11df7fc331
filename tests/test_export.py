"""export.py: our model folder -> a transformers GPT-2 folder with the same logits, and a usable tokenizer."""
import json
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from conftest import REPO_ROOT, subprocess_env
from export import ExportError, export
from model import GPT, GPTConfig

ALPHABET = "abcdefghijklmnopqrstuvwxyz .,\n"


def char_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(ALPHABET)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return tok


def random_model_folder(path, **overrides):
    """A randomly initialised model (biases and norms perturbed too, so zero biases would show) on disk."""
    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=len(ALPHABET))
    model = GPT(GPTConfig(**{**cfg, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path)
    char_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 32}))
    return model


@pytest.mark.parametrize("bias", [True, False])
def test_export_loads_in_transformers_with_same_logits(tmp_path, bias):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

    ours = random_model_folder(tmp_path / "run" / "model", bias=bias)
    (tmp_path / "run" / "config.json").write_text("{}")  # a run folder: export finds model/ inside
    out = export(tmp_path / "run", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(hf, GPT2LMHeadModel)
    idx = torch.randint(0, len(ALPHABET), (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], rtol=0, atol=1e-5)
    tok = AutoTokenizer.from_pretrained(out)
    text = "to be, or not to be.\n"
    assert tok(text)["input_ids"] == char_tokenizer().encode(text).ids
    assert tok.decode(tok(text)["input_ids"]) == text
    # and the export still loads here (a missing bias comes back as zeros)
    again = GPT.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(idx)[0], ours(idx)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("option", [{"pos_encoding": "rotary"}, {"pos_encoding": "sinusoidal"}, {"norm": "rmsnorm"}])
def test_export_refuses_what_gpt2_cannot_express(tmp_path, option):
    random_model_folder(tmp_path / "m", **option)
    with pytest.raises(ExportError, match="GPT-2 cannot express"):
        export(tmp_path / "m", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_cli(tmp_path):
    random_model_folder(tmp_path / "m")
    ok = subprocess.run([sys.executable, "export.py", str(tmp_path / "m"), str(tmp_path / "out")],
                        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in (tmp_path / "out").iterdir()}
    random_model_folder(tmp_path / "r", pos_encoding="rotary")
    bad = subprocess.run([sys.executable, "export.py", str(tmp_path / "r"), str(tmp_path / "out2")],
                         cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert bad.stderr.startswith("error: ") and "rotary" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_transformers_model_fine_tuned_through_base_folder_and_exported_back(tmp_path):
    """The reverse direction: a transformers GPT2LMHeadModel folder is a --base; the result exports back."""
    import finetune
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=len(ALPHABET), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                    activation_function="gelu", bos_token_id=None, eos_token_id=None)).eval()
    hf.save_pretrained(tmp_path / "hf_base")
    char_tokenizer().save(str(tmp_path / "hf_base" / "tokenizer.json"))
    idx = torch.randint(0, len(ALPHABET), (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # the folder loads here with transformers' logits
        torch.testing.assert_close(GPT.from_pretrained(tmp_path / "hf_base").eval()(idx)[0], hf(idx).logits,
                                   rtol=0, atol=1e-5)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog.\n" * 60)
    code = finetune.main(["--base", str(tmp_path / "hf_base"), "--data", str(text), "--method", "full",
                          "--out_dir", str(tmp_path / "run"), "--max_iters", "8", "--eval_interval", "4",
                          "--eval_iters", "1", "--batch_size", "4", "--block_size", "32", "--threads", "1",
                          "--eval_samples", "0", "--learning_rate", "1e-3"])
    assert code == 0
    tuned = GPT.from_pretrained(tmp_path / "run" / "model").eval()
    out = export(tmp_path / "run", tmp_path / "hf_again")
    back = GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        assert not torch.allclose(back(idx).logits, hf(idx).logits, atol=1e-3)  # it was fine-tuned
        torch.testing.assert_close(back(idx).logits, tuned(idx)[0], rtol=0, atol=1e-5)
