"""data.py: readers, tokenizers, token files, cache, errors. CPU only, no network."""
import json
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data
from conftest import subprocess_env
from data import DataError, Tokenizer, prepare

MIXED = ("Hello, world! Ünïcödé café — Ωμέγα.\n你好，世界。日本語のテキスト。한국어 텍스트.\n"
         "Emoji: 👍🏽 🧑‍🚀 🇯🇵 and tabs\tand spaces  end.\n")


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


def quiet(_):
    pass


# --- tokenizers ---------------------------------------------------------------

def test_char_round_trip_and_unseen_characters():
    tok = Tokenizer.char(MIXED)
    ids = tok.encode(MIXED)
    assert len(ids) == len(MIXED) and tok.vocab_size == len(set(MIXED)) and tok.eos_id is None
    assert tok.decode(ids) == MIXED
    # ids in code-point order, as nanoGPT's sorted(set(text))
    assert ids == [sorted(set(MIXED)).index(c) for c in MIXED]
    # unseen characters are dropped, the same way by the fast path and by the saved tokenizers pipeline
    probe = "Hello QXZ 猫 🐈 world\r\n"
    assert tok.decode(tok.encode(probe)) == "Hello    world\n"
    assert tok.encode(probe) == tok.tok.encode(probe).ids
    assert tok.encode(MIXED) == tok.tok.encode(MIXED).ids


def test_bpe_round_trip(tiny_text):
    tok = Tokenizer.train_bpe([tiny_text, MIXED], vocab_size=400)
    assert tok.vocab_size == 400 and tok.eos_token == data.EOS_TOKEN and tok.eos_id == 0
    for text in (tiny_text[:2000], MIXED, "never seen: 鬱 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🦜", ""):
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("a" + data.EOS_TOKEN + "b")[1] == tok.eos_id
    with pytest.raises(DataError, match="at least 257"):
        Tokenizer.train_bpe([tiny_text], vocab_size=100)


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory, tiny_text):
    """A tokenizer folder as transformers writes it (not nanoforge): byte-level BPE with a </s> token."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([tiny_text], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path_factory.mktemp("pretrained")
    PreTrainedTokenizerFast(tokenizer_object=hf, eos_token="</s>").save_pretrained(folder)
    return folder


def test_pretrained_tokenizer_from_folder(pretrained_dir):
    tok = Tokenizer.load(pretrained_dir)
    assert tok.kind == "pretrained" and tok.vocab_size == 300 and tok.eos_token == "</s>"
    assert tok.decode(tok.encode(MIXED)) == MIXED
    assert Tokenizer.load(pretrained_dir / "tokenizer.json").encode(MIXED) == tok.encode(MIXED)


@pytest.mark.parametrize("kind", ["char", "bpe", "pretrained"])
def test_saved_tokenizer_loads_in_transformers_identically(kind, tmp_path, tiny_text, pretrained_dir):
    from transformers import AutoTokenizer
    corpus = tiny_text[:5000] + MIXED
    tok = {"char": lambda: Tokenizer.char(corpus), "bpe": lambda: Tokenizer.train_bpe([corpus], 400),
           "pretrained": lambda: Tokenizer.load(pretrained_dir)}[kind]()
    tok.save(tmp_path / "tok")
    again = Tokenizer.load(tmp_path / "tok")
    assert (again.kind, again.vocab_size, again.eos_id) == (tok.kind, tok.vocab_size, tok.eos_id)
    auto = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(auto) == tok.vocab_size
    for text in (corpus[:3000], MIXED, "unseen 猫 🐈\r\n"):
        ids = tok.encode(text)
        assert auto(text)["input_ids"] == ids == again.encode(text)
        assert auto.decode(ids) == tok.decode(ids)
    if tok.eos_id is not None:
        assert auto.eos_token_id == tok.eos_id


def test_hub_tokenizer_offline_fails_fast():
    start = time.time()
    with pytest.raises(DataError, match="nobody-xyz/no-such-tokenizer.*local Hub cache"):
        Tokenizer.load("nobody-xyz/no-such-tokenizer")
    with pytest.raises(DataError, match="not a Hub id"):
        Tokenizer.load("no/such/folder")
    assert time.time() - start < 5


# --- reading messy inputs -----------------------------------------------------

@pytest.fixture
def messy(tmp_path):
    """A folder of every supported format, with CRLF, a BOM, a nested folder and files to ignore."""
    root = tmp_path / "messy"
    write(root / "a.txt", "\ufeffFirst line\r\nsecond line\rthird 你好\r\n")
    write(root / "b.md", "# Title\n\nSome *markdown* 👍🏽\n")
    write(root / "c.csv", 'id,text\r\n1,"quoted, with comma\r\nand a newline"\r\n2,plain row\r\n3,\r\n')
    write(root / "d.jsonl", json.dumps({"text": "json line one", "x": 1}) + "\n\n"
          + json.dumps({"text": "二行目 \u00e9"}, ensure_ascii=True) + "\n" + json.dumps({"text": None}) + "\n")
    write(root / "e.json", json.dumps([{"text": "from a json list"}, {"text": "second item"}]))
    (root / "sub").mkdir()
    table = pa.table({"text": ["parquet row", None, "pärquet 🚀"], "n": [1, 2, 3]})
    pq.write_table(table, root / "sub" / "f.parquet")
    write(root / "empty.txt", "")
    write(root / "notes.pdf", b"%PDF-1.4 ignored: unsupported types are skipped in folders")
    write(root / ".hidden" / "secret.txt", "hidden folders are skipped")
    expected = ["First line\nsecond line\nthird 你好\n", "# Title\n\nSome *markdown* 👍🏽\n",
                "quoted, with comma\nand a newline", "plain row", "json line one", "二行目 é",
                "from a json list", "second item", "parquet row", "pärquet 🚀"]
    return root, expected


def test_folder_of_every_format(messy):
    root, expected = messy
    assert [p.name for p in data.resolve_inputs([root])] == [
        "a.txt", "b.md", "c.csv", "d.jsonl", "e.json", "empty.txt", "f.parquet"]
    assert [text for _, text in data.read_documents([root])] == expected
    p = prepare([root], block_size=4, split="0.5,0.5", log=quiet)
    whole = np.concatenate([p.train, p.val])
    assert p.tokenizer.decode(whole) == data.DOC_SEPARATOR.join(expected)
    stats = p.stats
    assert stats["documents"] == len(expected) and stats["characters"] == sum(map(len, expected))
    assert stats["distinct_characters"] == len(set("".join(expected)))
    assert stats["vocab_size"] == len(set("".join(expected) + "\n"))
    assert stats["tokens"] == stats["train_tokens"] + stats["val_tokens"] == len(whole)


def test_glob_and_several_inputs(messy):
    root, expected = messy
    files = data.resolve_inputs([str(root / "**" / "*.parquet"), root / "e.json", str(root / "*.json*")])
    assert [f.name for f in files] == ["f.parquet", "e.json", "d.jsonl"]  # order kept, duplicates dropped


def test_saved_char_tokenizer_is_reused_on_new_text(tmp_path, tiny_text):
    """A run's char tokenizer applied to other text keeps its ids; characters it lacks are dropped."""
    first = prepare([write(tmp_path / "a.txt", tiny_text)], block_size=8, log=quiet)
    first.tokenizer.save(tmp_path / "run_tokenizer")
    new_text = "New text with 猫 and ZEBRAS.\n" * 20
    other = prepare([write(tmp_path / "b.txt", new_text)], tokenizer=str(tmp_path / "run_tokenizer"), block_size=8,
                    log=quiet)
    assert other.tokenizer.kind == "char" and other.stats["vocab_size"] == first.stats["vocab_size"]
    known = "".join(c for c in new_text if c in set(tiny_text))
    assert "猫" not in known and len(known) < len(new_text)
    assert other.tokenizer.decode(np.concatenate([other.train, other.val])) == known


def test_bpe_and_pretrained_join_documents_with_eos(messy, pretrained_dir):
    root, expected = messy
    for tokenizer in ("bpe", str(pretrained_dir)):
        p = prepare([root], tokenizer=tokenizer, vocab_size=300, block_size=4, log=quiet)
        tokens = np.concatenate([p.train, p.val])
        assert (tokens == p.tokenizer.eos_id).sum() == len(expected) - 1
        assert p.tokenizer.decode(tokens) == p.tokenizer.eos_token.join(expected)


@pytest.mark.parametrize("name, content", [
    ("t.csv", "id,body\n1,hello there\n"),
    ("t.jsonl", '{"body": "hello there"}\n'),
    ("t.json", '[{"body": "hello there"}]'),
    ("t.parquet", None),
])
def test_missing_text_column_lists_columns(tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        pq.write_table(pa.table({"id": [1], "body": ["hello there"]}), path)
    else:
        write(path, content)
    with pytest.raises(DataError, match=rf"{name}.*no column 'text'.*body.*text_column"):
        prepare([path], log=quiet)
    assert [t for _, t in data.read_documents([path], text_column="body")] == ["hello there"]


def test_invalid_utf8_names_file_and_offset(tmp_path):
    path = write(tmp_path / "bad.txt", b"hello\n" * 1000 + b"caf\xe9 latin-1\n")
    with pytest.raises(DataError, match=r"bad\.txt: not valid UTF-8 at byte offset 6003;"):
        prepare([path], log=quiet)


def test_reader_blocks_keep_offsets_crlf_and_characters(tmp_path, monkeypatch):
    """Tiny read blocks split CRLF pairs and multi-byte characters: the text and offsets must not change."""
    monkeypatch.setattr(data, "PIECE_BYTES", 5)
    text = "ab\r\ncd\r\n你好👍🏽\r\r\nend line\n" * 5
    path = write(tmp_path / "t.txt", text)
    assert "".join(data.read_text(path)) == text.replace("\r\n", "\n").replace("\r", "\n")
    bad = write(tmp_path / "bad.txt", "你好世界".encode() + b"\xe4\xbd" + "x".encode())
    with pytest.raises(DataError, match="offset 12;"):
        list(data.read_text(bad))


def test_binary_file_rejected(tmp_path):
    path = write(tmp_path / "image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(DataError, match=r"image\.txt: binary file.*offset 8"):
        prepare([path], log=quiet)
    utf16 = write(tmp_path / "utf16.txt", "hello".encode("utf-16"))
    with pytest.raises(DataError, match="utf16.txt: binary file"):
        prepare([utf16], log=quiet)


def test_bad_inputs_have_one_line_messages(tmp_path, tiny_text):
    good = write(tmp_path / "good.txt", tiny_text[:5000])
    cases = [
        ([tmp_path / "missing.txt"], {}, "missing.txt: no such file or folder"),
        ([str(tmp_path / "*.nothing")], {}, r"\*.nothing: no .* files match"),
        ([write(tmp_path / "doc.pdf", "x")], {}, r"doc.pdf: unsupported file type '.pdf'"),
        ([write(tmp_path / "empty" / "e.txt", "")], {}, "e.txt: no text found"),
        ([(tmp_path / "nothing").mkdir() or tmp_path / "nothing"], {}, "folder holds no"),
        ([], {}, "no input"),
        ([write(tmp_path / "j.jsonl", '{"text": "ok"}\n{broken\n')], {}, r"j.jsonl line 2: not valid JSON"),
        ([write(tmp_path / "n.jsonl", '{"text": 5}\n')], {}, r"n.jsonl line 1 'text': expected text, got int"),
        ([write(tmp_path / "l.json", '{"text": "not a list"}')], {}, "expected a JSON list"),
        ([write(tmp_path / "p.parquet", "not parquet")], {}, "not a readable Parquet file"),
        ([good], {"split": "0.9"}, "split '0.9': give 2 or 3"),
        ([good], {"split": "0.5,0.6"}, "sum to 1"),
        ([good], {"split": "0.9,x"}, "split '0.9,x'"),
        ([good], {"split": "1,0"}, "positive"),
        ([good], {"tokenizer": str(tmp_path / "no_such_tokenizer")}, "not a Hub id|local Hub cache"),
    ]
    for inputs, kwargs, message in cases:
        with pytest.raises(DataError, match=message) as err:
            prepare(inputs, log=quiet, **kwargs)
        assert "\n" not in str(err.value)


def test_too_little_data_says_how_much_is_needed(tmp_path):
    path = write(tmp_path / "small.txt", "To be, or not to be: that is the question.\n" * 20)  # 860 chars
    with pytest.raises(DataError, match=r"val split has 86 tokens but block_size 256 needs at least 257.*"
                                        r"needs about 2,571 tokens \(~2,571 characters\)"):
        prepare([path], block_size=256, log=quiet)
    p = prepare([path], block_size=64, log=quiet)  # same text, smaller context: fine
    assert len(p.val) == 86
    with pytest.raises(DataError, match="test split has"):
        prepare([path], block_size=64, split="0.8,0.15,0.05", log=quiet)


# --- token files, split, cache ------------------------------------------------

def test_split_by_position(tmp_path, tiny_text):
    path = write(tmp_path / "s.txt", tiny_text)
    p = prepare([path], block_size=32, log=quiet)
    n = len(tiny_text)
    assert (len(p.train), len(p.val), p.test) == (int(n * 0.9), n - int(n * 0.9), None)
    assert p.tokenizer.decode(p.val) == tiny_text[int(n * 0.9):]  # val is exactly the tail
    assert p.tokenizer.decode(p.train) == tiny_text[:int(n * 0.9)]
    assert isinstance(p.train, np.memmap) and p.train.dtype == np.uint16
    three = prepare([path], block_size=32, split="0.8,0.1,0.1", log=quiet)
    assert three.cache_path == p.cache_path  # the split is applied at load time, the tokens are shared
    n_train, n_val = int(n * 0.8), int(n * 0.1)
    assert (len(three.train), len(three.val), len(three.test)) == (n_train, n_val, n - n_train - n_val)
    assert three.tokenizer.decode(three.test) == tiny_text[len(three.train) + len(three.val):]
    assert three.stats["test_tokens"] == len(three.test)


def test_uint32_when_vocabulary_exceeds_uint16(tmp_path):
    chars = [chr(c) for c in range(0x4E00, 0xA000)] + [chr(c) for c in range(0x20000, 0x20000 + 45_000)]
    assert len(chars) > 2**16
    text = "".join(chars) * 2
    p = prepare([write(tmp_path / "cjk.txt", text)], block_size=16, log=quiet)
    assert p.stats["vocab_size"] == len(chars) and p.train.dtype == np.uint32 and p.val.dtype == np.uint32
    assert p.tokenizer.decode(p.val) == text[len(p.train):]


def test_cache_is_reused_and_keyed_by_content(tmp_path, tiny_text):
    path = write(tmp_path / "c.txt", tiny_text)
    first_log, second_log = [], []
    first = prepare([path], tokenizer="bpe", vocab_size=300, block_size=16, log=first_log.append)
    tokens_file = first.cache_path / "tokens.bin"
    mtime = tokens_file.stat().st_mtime_ns
    second = prepare([path], tokenizer="bpe", vocab_size=300, block_size=16, log=second_log.append)
    assert any("tokenising" in line for line in first_log)
    assert any("cached" in line for line in second_log) and not any("tokenising" in line for line in second_log)
    assert second.cache_path == first.cache_path and tokens_file.stat().st_mtime_ns == mtime
    assert np.array_equal(second.val, first.val) and second.stats == first.stats
    # the same content under another name is the same data; other content or settings are not
    assert prepare([write(tmp_path / "copy.txt", tiny_text)], tokenizer="bpe", vocab_size=300, block_size=16,
                   log=quiet).cache_path == first.cache_path
    assert prepare([path], tokenizer="bpe", vocab_size=320, block_size=16, log=quiet).cache_path != first.cache_path
    write(path, tiny_text + "one more line\n")
    assert prepare([path], tokenizer="bpe", vocab_size=300, block_size=16, log=quiet).cache_path != first.cache_path
    assert not list(first.cache_path.parent.glob(".*tmp*"))  # no half-written folders left behind


def test_pieces_encode_like_the_whole_text(tmp_path, monkeypatch, tiny_text):
    """Large files are read and encoded in pieces; the ids must equal encoding the whole text at once."""
    monkeypatch.setattr(data, "PIECE_BYTES", 997)
    text = tiny_text[:20000] + "\n  indented \n\n\n" + MIXED * 20 + "   \n" + tiny_text[20000:30000]
    path = write(tmp_path / "big.txt", text)
    assert len(list(data.read_text(path))) > 20
    for tokenizer in ("char", "bpe"):
        p = prepare([path], tokenizer=tokenizer, vocab_size=400, block_size=8, cache_dir=tmp_path / "c", log=quiet)
        assert p.stats["documents"] == 1
        assert np.concatenate([p.train, p.val]).tolist() == p.tokenizer.tok.encode(text).ids


def test_bpe_trains_on_an_evenly_spread_sample(tmp_path, monkeypatch, tiny_text):
    monkeypatch.setattr(data, "PIECE_BYTES", 1000)
    monkeypatch.setattr(data, "BPE_TRAIN_BYTES", 10_000)
    path = write(tmp_path / "t.txt", tiny_text)
    sample = "".join(data._bpe_sample(data._Corpus([path])))
    assert 10_000 <= len(sample) <= 12_000
    # whole pieces from the start, middle and end of the corpus, not just its first 10 kB
    assert sample[:500] == tiny_text[:500] and sample[-500:] in tiny_text[-3000:]
    assert sample[5000:5500] in tiny_text[20_000:30_000]
    p = prepare([path], tokenizer="bpe", vocab_size=300, block_size=8, log=quiet)
    assert p.tokenizer.decode(np.concatenate([p.train, p.val])) == tiny_text  # all of it is encoded


def test_stats_and_preview_for_the_ui(tmp_path, tiny_text):
    path = write(tmp_path / "ui.txt", tiny_text[:20000] + MIXED)
    stats = data.corpus_stats([path], tokenizer="bpe", vocab_size=400)
    assert stats["documents"] == 1 and stats["characters"] == 20000 + len(MIXED)
    assert stats["distinct_characters"] == len(set(tiny_text[:20000] + MIXED))
    assert stats["vocab_size"] == 400 and stats["chars_per_token"] == round(stats["characters"] / stats["tokens"], 3)
    preview = data.token_preview([path], tokenizer="bpe", vocab_size=400, n_tokens=50)
    assert len(preview) == 50 and "".join(t for t, _ in preview) == tiny_text[:len("".join(t for t, _ in preview))]
    assert [i for _, i in preview] == Tokenizer.load(prepare([path], tokenizer="bpe", vocab_size=400, block_size=8,
                                                             log=quiet).cache_path).encode(tiny_text[:2000])[:50]
    assert data.token_preview([path], n_tokens=5) == [(c, sorted(set(tiny_text[:20000] + MIXED)).index(c))
                                                      for c in tiny_text[:5]]


# --- Hub dataset --------------------------------------------------------------

def test_hub_dataset_from_a_local_folder(tmp_path, monkeypatch):
    """The `datasets` path for real, on a dataset folder laid out as on the Hub (no network needed)."""
    import datasets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    folder = tmp_path / "my_dataset"
    (folder / "data").mkdir(parents=True)
    rows = ["first row 你好\r\n" * 20, None, "second row 👍🏽 " * 20]
    pq.write_table(pa.table({"text": rows, "label": [0, 1, 2]}), folder / "data" / "train-00000-of-00001.parquet")
    p = prepare([], hf_dataset=str(folder), block_size=8, log=quiet)
    expected = ["first row 你好\n" * 20, "second row 👍🏽 " * 20]
    assert p.stats["documents"] == 2
    assert p.tokenizer.decode(np.concatenate([p.train, p.val])) == data.DOC_SEPARATOR.join(expected)
    with pytest.raises(DataError, match=r"no column 'body' \(columns: text, label\)"):
        prepare([], hf_dataset=str(folder), text_column="body", log=quiet)
    with pytest.raises(DataError, match=r"hf_dataset '.*my_dataset' \(split 'validation'\): .*validation"):
        prepare([], hf_dataset=str(folder), hf_split="validation", log=quiet)


def test_hub_dataset_offline_fails_fast():
    start = time.time()
    with pytest.raises(DataError, match=r"hf_dataset 'nobody-xyz/no-such-data' \(split 'train'\).*HF_HUB_OFFLINE"):
        prepare([], hf_dataset="nobody-xyz/no-such-data", log=quiet)
    assert time.time() - start < 5


def test_cli_unreachable_hub_fails_fast_without_traceback(tmp_path):
    """Not marked offline, but no network (here: a closed local port): one line, exit 1, within seconds."""
    env = subprocess_env(HF_ENDPOINT="http://127.0.0.1:9", NANOFORGE_CACHE=tmp_path)
    env.pop("HF_HUB_OFFLINE")
    env.pop("HF_DATASETS_OFFLINE")
    start = time.time()
    out = subprocess.run([sys.executable, "data.py", "--hf_dataset", "nobody-xyz/no-such-data"],
                         cwd=data.DEFAULT_DATA.parents[1], env=env, capture_output=True, text=True, timeout=60)
    assert time.time() - start < 15
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: hf_dataset 'nobody-xyz/no-such-data': cannot reach the Hugging Face Hub (http://127.0.0.1:9); "
        "check your connection, or set HF_HUB_OFFLINE=1 to use a copy in your local cache"]


def test_cli_prepares_and_prints_stats(tmp_path, tiny_text):
    path = write(tmp_path / "cli.txt", tiny_text[:10000])
    out = subprocess.run([sys.executable, "data.py", "--data", str(path), "--block_size", "64", "--preview", "3"],
                         cwd=data.DEFAULT_DATA.parents[1], env=subprocess_env(NANOFORGE_CACHE=tmp_path / "c"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert "tokenising" in lines[0] and lines[2].startswith("data: 1 document, 10,000 characters")
    stats = json.loads(lines[-1])
    assert stats["characters"] == 10000 and stats["train_tokens"] == 9000
    assert lines[-2] == "'F':" + str(sorted(set(tiny_text[:10000])).index("F")) + " 'i':" \
        + str(sorted(set(tiny_text[:10000])).index("i")) + " 'r':" + str(sorted(set(tiny_text[:10000])).index("r"))
