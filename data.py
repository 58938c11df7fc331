"""
Text in, tokens out: read a corpus, build or load a tokenizer, and write the token stream once to a
memory-mapped file that training slices by position into train / val (/ test).

Prepare a corpus and print its stats (train.py calls the same `prepare()`, so this is optional):
    python data.py                                              # bundled tiny Shakespeare, char-level
    python data.py --data my_texts/ --tokenizer bpe --vocab_size 4096
    python data.py --data "notes/**/*.md" reviews.csv --text_column body --split 0.8,0.1,0.1
    python data.py --data my.txt --tokenizer path/to/tokenizer_folder --preview 30
    python data.py --hf_dataset karpathy/tiny_shakespeare --hf_split train   # needs the Hub (or its cache)

From Python:
    from data import prepare
    p = prepare(["data/tinyshakespeare.txt"], tokenizer="bpe", vocab_size=4096, block_size=256)
    p.train, p.val                       # np.memmap of token ids (uint16, or uint32 for vocabularies > 65536)
    p.tokenizer.decode(p.val[:100])

Inputs: files, folders (recursive, sorted, hidden files skipped), or globs of .txt .md (one document per
file) and .csv .jsonl .json .parquet (one document per row, from `text_column`), plus an optional Hub dataset
through the `datasets` library. Text must be UTF-8; newlines are normalised to "\n" and a BOM is dropped.

Tokenizers are Hugging Face `tokenizers` objects saved as tokenizer.json (+ tokenizer_config.json, so
`transformers.AutoTokenizer.from_pretrained(folder)` loads them):
  char        one id per distinct character of the corpus, in code-point order (tiny Shakespeare gets
              nanoGPT's 65 ids). Characters the corpus never had are dropped at encode time: the model has
              never seen them, and an extra <unk> id would only cost a vocabulary slot.
  bpe         byte-level BPE (GPT-2's scheme) trained on the corpus with `vocab_size`, plus <|endoftext|>.
              Any text encodes, CJK and emoji included. Corpora over 8 MB train it on an evenly spread
              8 MB sample, which keeps memory bounded (see _bpe_sample).
  otherwise   a pretrained tokenizer.json: a folder (or the file itself) or a Hub id such as gpt2.
Documents are joined with the end-of-text token when the tokenizer has one (bpe, most pretrained), else
with a blank line "\n\n" (char).

Cache: tokens.bin + tokenizer files + meta.json in <cache>/<key>, where <cache> is `cache_dir`,
$NANOFORGE_CACHE or ~/.cache/nanoforge/data and <key> hashes the input file contents (not their names) and the
tokenizer settings. The split is applied when loading, so changing --split or --block_size reuses the cache.
Files are streamed in pieces of about 256K characters, so memory stays flat whatever the corpus size.
"""

import argparse
import codecs
import csv
import glob
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence
from urllib.parse import urlparse

import numpy as np

TEXT_EXTENSIONS = (".txt", ".md")                        # one document per file
TABLE_EXTENSIONS = (".csv", ".jsonl", ".json", ".parquet")  # one document per row
EXTENSIONS = TEXT_EXTENSIONS + TABLE_EXTENSIONS
DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "tinyshakespeare.txt"
EOS_TOKEN = "<|endoftext|>"       # bpe's end-of-text token (GPT-2's spelling)
EOS_NAMES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")  # recognised in pretrained ones
DOC_SEPARATOR = "\n\n"            # joins documents when the tokenizer has no end-of-text token
PIECE_BYTES = 1 << 18             # files are read, encoded and written in pieces of ~256 KiB: flat memory
BPE_TRAIN_BYTES = 8 << 20         # bpe is trained on at most this much text, sampled evenly (bounded memory)
CACHE_VERSION = 1                 # bump when tokenisation or the cache layout changes: old caches are not reused


class DataError(Exception):
    """A problem with the user's data or settings: one line naming the file/field and what to do."""


# -----------------------------------------------------------------------------
# reading text

def _listing(items: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def resolve_inputs(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files, folders and globs -> the sorted, de-duplicated list of supported files they name."""
    files = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise DataError(f"{item}: folder holds no {' '.join(EXTENSIONS)} files")
        elif path.is_file():
            if path.suffix.lower() not in EXTENSIONS:
                raise DataError(f"{item}: unsupported file type '{path.suffix or '(none)'}'; "
                                f"use {' '.join(EXTENSIONS)}")
            found = [path]
        elif glob.has_magic(str(item)):
            matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(str(item)), recursive=True))
            found = [p for p in matches if p.is_file() and p.suffix.lower() in EXTENSIONS]
            if not found:
                raise DataError(f"{item}: no {' '.join(EXTENSIONS)} files match this pattern")
        else:
            raise DataError(f"{item}: no such file or folder")
        files += found
    unique = {}
    for f in files:  # the same file named twice (a folder and a glob, say) is read once
        unique.setdefault(f.resolve(), f)
    return list(unique.values())


def _normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _cut(text: str) -> int:
    """Where to cut a long piece of text: just before a newline that follows a non-space character.
    Byte-level BPE's pre-tokenizer (GPT-2's regex) never joins anything across that point, so encoding
    piece by piece gives exactly the ids of encoding the whole text. 0 = keep reading."""
    i = text.rfind("\n")
    while i > 0 and text[i - 1].isspace():
        i = text.rfind("\n", 0, i)
    if i > 0:
        return i
    return len(text) if len(text) > 16 * PIECE_BYTES else 0  # no usable line break at all: cut anyway


def read_text(path: Path) -> Iterator[str]:
    """A UTF-8 text file as newline-normalised pieces of about PIECE_BYTES, cut at line ends (see _cut).
    Raises DataError for binary files (NUL bytes) and invalid UTF-8, with the byte offset."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, text, carry = 0, "", ""
    with open(path, "rb") as f:
        while True:
            block = f.read(PIECE_BYTES)
            nul = block.find(b"\0")
            if nul >= 0:  # UTF-16 and binary files both have NULs; real text never does
                raise DataError(f"{path}: binary file, not UTF-8 text (NUL byte at byte offset {offset + nul}); "
                                "save it as UTF-8 text or remove it")
            buffered = len(decoder.getstate()[0])  # bytes of a character split across blocks
            try:
                raw = carry + decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not valid UTF-8 at byte offset {offset - buffered + e.start}; "
                                "re-save the file as UTF-8") from None
            if offset == 0:
                raw = raw.removeprefix("\ufeff")  # byte-order mark some editors write
            offset += len(block)
            # a trailing \r waits for the next block, which may start with the \n of a \r\n
            carry = "\r" if block and raw.endswith("\r") else ""
            text += _normalise_newlines(raw[:len(raw) - len(carry)])
            if not block:
                if text:
                    yield text
                return
            if len(text) >= PIECE_BYTES and (cut := _cut(text)):
                yield text[:cut]
                text = text[cut:]


def _lines(path: Path) -> Iterator[str]:
    rest = ""
    for piece in read_text(path):
        *lines, rest = (rest + piece).split("\n")
        yield from (line + "\n" for line in lines)
    if rest:
        yield rest


def _check_text(source: str, value) -> str:
    if not isinstance(value, str):
        raise DataError(f"{source}: expected text, got {type(value).__name__}; pick a text column with text_column")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape in JSON ("\ud800") is not text
        raise DataError(f"{source}: invalid text (lone surrogate escape); fix or remove this row") from None
    return _normalise_newlines(value)


def read_records(path: Path, columns: Sequence[str] = ()) -> Iterator[tuple[str, dict]]:
    """Rows of a .csv / .jsonl / .json / .parquet file as (source, record) pairs, source naming the file and
    row. `columns` must exist (DataError listing the available ones) and restricts what parquet reads."""
    suffix = path.suffix.lower()

    def missing(available):
        absent = [c for c in columns if c not in available]
        if absent:
            raise DataError(f"{path}: no column '{absent[0]}' (columns: {_listing(list(available))}); "
                            "set text_column to one of them")

    if suffix == ".csv":
        csv.field_size_limit(2**31 - 1)  # whole documents in one cell are normal here
        reader = csv.reader(_lines(path))
        header = next(reader, None)
        if header is None:
            return
        missing(header)
        for row_number, row in enumerate(reader, 2):  # row 1 is the header
            if row:
                yield f"{path} row {row_number}", dict(zip(header, row))
    elif suffix == ".jsonl":
        for line_number, line in enumerate(_lines(path), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {line_number}: not valid JSON ({e.msg}); "
                                "each line must hold one JSON object") from None
            if not isinstance(record, dict):
                raise DataError(f"{path} line {line_number}: expected a JSON object, got {type(record).__name__}")
            missing(record)
            yield f"{path} line {line_number}", record
    elif suffix == ".json":
        try:
            records = json.loads("".join(read_text(path)) or "[]")
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}); "
                            "expected a list of objects") from None
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise DataError(f"{path}: expected a JSON list of objects (one per document); "
                            "use .jsonl for one object per line")
        for i, record in enumerate(records):
            missing(record)
            yield f"{path} item {i}", record
    elif suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            parquet = pq.ParquetFile(path)
        except Exception as e:  # pyarrow reports corrupt files with several exception types
            raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
        missing(parquet.schema_arrow.names)
        row_number = 0
        for batch in parquet.iter_batches(batch_size=1024, columns=list(columns) or None):
            for record in batch.to_pylist():
                yield f"{path} row {row_number}", record
                row_number += 1
    else:
        raise DataError(f"{path}: unsupported file type '{suffix}'; use {' '.join(EXTENSIONS)}")


def _hub_reachable() -> bool:
    """A 3-second TCP check of the Hub endpoint. Offline, huggingface_hub retries for ~25 s before failing;
    this lets us fail fast and say why."""
    from huggingface_hub import constants
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=3).close()
        return True
    except OSError:
        return False


def _load_hub_dataset(name: str, split: str, text_column: str):
    import datasets
    from huggingface_hub import constants
    if not os.path.exists(name) and not constants.HF_HUB_OFFLINE and not _hub_reachable():
        raise DataError(f"hf_dataset '{name}': cannot reach the Hugging Face Hub ({constants.ENDPOINT}); "
                        "check your connection, or set HF_HUB_OFFLINE=1 to use a copy in your local cache")
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types (connection, not found, bad split): report its words
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"hf_dataset '{name}' (split '{split}'): {reason}; check the name and split"
                        + (" (offline: HF_HUB_OFFLINE is set, so only datasets in the local cache load)"
                           if constants.HF_HUB_OFFLINE else "")) from None
    if text_column not in ds.column_names:
        raise DataError(f"hf_dataset '{name}': no column '{text_column}' (columns: {_listing(ds.column_names)}); "
                        "set text_column to one of them")
    return ds.select_columns([text_column])


class _Corpus:
    """The resolved inputs, readable as many times as preparation needs (vocabulary pass, encoding pass)."""

    def __init__(self, inputs, text_column="text", hf_dataset="", hf_split="train"):
        if isinstance(inputs, (str, os.PathLike)):
            inputs = [inputs]
        self.files = resolve_inputs(inputs or [])
        self.text_column = text_column
        self.hf_name, self.hf_split = hf_dataset, hf_split
        self.hf = _load_hub_dataset(hf_dataset, hf_split, text_column) if hf_dataset else None
        if not self.files and self.hf is None:
            raise DataError("no input: give files, folders or globs of text, or a Hub dataset (hf_dataset)")

    def describe(self) -> str:
        names = [str(f) for f in self.files] + ([f"{self.hf_name}[{self.hf_split}]"] if self.hf else [])
        return _listing(names, 3)

    def fingerprint(self) -> dict:
        """What the tokens depend on: file types and contents (not names), the text column, the Hub data."""
        files = []
        for f in self.files:
            with open(f, "rb") as fh:
                files.append([f.suffix.lower(), hashlib.file_digest(fh, "sha256").hexdigest()])
        hub = [self.hf_name, self.hf_split, self.hf._fingerprint] if self.hf is not None else None
        tabular = hub or any(f.suffix.lower() in TABLE_EXTENSIONS for f in self.files)
        return {"files": files, "text_column": self.text_column if tabular else None, "hub": hub}

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files) + (self.hf.data.nbytes if self.hf is not None else 0)

    def pieces(self) -> Iterator[tuple[str, str]]:
        """(source, text) pieces. A long text file comes as several consecutive pieces with the same source;
        a new source starts a new document. Empty documents are skipped."""
        for path in self.files:
            if path.suffix.lower() in TEXT_EXTENSIONS:
                for piece in read_text(path):
                    yield str(path), piece
            else:
                for source, record in read_records(path, [self.text_column]):
                    value = record.get(self.text_column)  # a short CSV row has no value for it
                    if value is not None and (text := _check_text(f"{source} '{self.text_column}'", value)):
                        yield source, text
        if self.hf is not None:
            for start in range(0, len(self.hf), 1000):
                for i, value in enumerate(self.hf[start:start + 1000][self.text_column], start):
                    source = f"{self.hf_name}[{self.hf_split}] row {i}"
                    if value is not None and (text := _check_text(source, value)):
                        yield source, text


def read_documents(inputs, text_column="text", hf_dataset="", hf_split="train") -> Iterator[tuple[str, str]]:
    """(source, text) for every piece of text in the inputs; see _Corpus.pieces for how documents are cut."""
    yield from _Corpus(inputs, text_column, hf_dataset, hf_split).pieces()


# -----------------------------------------------------------------------------
# tokenizers

class Tokenizer:
    """A Hugging Face `tokenizers` tokenizer plus what training needs: kind, vocabulary size, end-of-text id.
    encode() never adds special tokens (no BOS/CLS): training streams are plain token sequences."""

    def __init__(self, tok, kind: str, config: dict | None = None):
        self.tok, self.kind = tok, kind
        self.config = config or {}  # tokenizer_config.json entries worth keeping (special tokens, template)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        eos = self.config.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        names = [eos] if eos else EOS_NAMES
        self.eos_id = next((tok.token_to_id(n) for n in names if tok.token_to_id(n) is not None), None)
        self.eos_token = tok.id_to_token(self.eos_id) if self.eos_id is not None else None
        if kind == "char":
            # code point -> id table, so that a 100 MB corpus encodes in ~1 s rather than minutes through the
            # tokenizer's per-character pipeline; same ids (the tests check it), unknown characters -> -1
            vocab = tok.get_vocab()
            self._lut = np.full(max(map(ord, vocab)) + 2, -1, dtype=np.int64)
            self._lut[[ord(c) for c in vocab]] = list(vocab.values())

    @classmethod
    def char(cls, chars: Iterable[str]) -> "Tokenizer":
        """WordLevel over single characters in code-point order; a normalizer drops unseen characters."""
        from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer
        chars = sorted(set(chars))
        if not chars:
            raise DataError("char tokenizer: the corpus has no characters")
        tok = HFTokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
        ranges, start = [], 0  # "[^a-zA-Z...]" built from runs of consecutive code points
        for i in range(1, len(chars) + 1):
            if i == len(chars) or ord(chars[i]) != ord(chars[i - 1]) + 1:
                a, b = ord(chars[start]), ord(chars[i - 1])
                ranges.append(f"\\x{{{a:x}}}" + (f"-\\x{{{b:x}}}" if b > a else ""))
                start = i
        tok.normalizer = normalizers.Replace(Regex(f"[^{''.join(ranges)}]"), "")
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character
        tok.decoder = decoders.Fuse()  # ids -> characters, concatenated with nothing in between
        return cls(tok, "char")

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Byte-level BPE as GPT-2 does it (its pre-tokenizer regex over bytes), trained on `texts`."""
        from tokenizers import decoders, pre_tokenizers, trainers
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.models import BPE
        if vocab_size < 257:
            raise DataError(f"vocab_size {vocab_size} is too small for byte-level BPE: use at least 257 "
                            "(256 bytes + end-of-text); 4096-16384 suits small corpora")
        tok = HFTokenizer(BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        return cls(tok, "bpe", {"eos_token": EOS_TOKEN})

    @classmethod
    def load(cls, name_or_path: str | os.PathLike) -> "Tokenizer":
        """A folder holding tokenizer.json (ours or transformers'), the tokenizer.json file, or a Hub id."""
        from tokenizers import Tokenizer as HFTokenizer
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            file, config_file = path / "tokenizer.json", path / "tokenizer_config.json"
            if not file.is_file():
                raise DataError(f"{path}: no tokenizer.json in this folder; give a folder saved by "
                                "nanoforge or transformers, or a Hub id")
        elif path.is_file():
            file, config_file = path, path.with_name("tokenizer_config.json")
        else:
            file, config_file = _hub_tokenizer_files(str(name_or_path))
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for unreadable JSON
            raise DataError(f"{file}: not a tokenizer.json that `tokenizers` can read ({e})") from None
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file and config_file.is_file() else {}
        keep = ("bos_token", "eos_token", "unk_token", "pad_token", "chat_template", "model_max_length")
        return cls(tok, config.get("nanoforge_kind", "pretrained"), {k: config[k] for k in keep if k in config})

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0].tolist()

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """One int64 array of ids per text (what prepare() writes to disk)."""
        if self.kind == "char":
            codes = [np.frombuffer(t.encode("utf-32-le"), dtype=np.uint32) for t in texts]
            ids = [self._lut[np.minimum(c, len(self._lut) - 1)] for c in codes]
            return [i[i >= 0] for i in ids]
        return [np.array(e.ids, dtype=np.int64) for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        ids = ids.tolist() if isinstance(ids, np.ndarray) else [int(i) for i in ids]
        return self.tok.decode(ids, skip_special_tokens=False)

    def save(self, out_dir: str | os.PathLike) -> None:
        """tokenizer.json + tokenizer_config.json (so AutoTokenizer.from_pretrained(out_dir) works), atomic."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = {**self.config, "tokenizer_class": "PreTrainedTokenizerFast", "nanoforge_kind": self.kind,
                  "clean_up_tokenization_spaces": False}  # decode exactly, as tokenizers does
        if self.eos_token:
            config["eos_token"] = self.eos_token
        _write_atomic(out / "tokenizer.json", self.tok.to_str(pretty=True))
        _write_atomic(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False))


def _hub_tokenizer_files(repo_id: str) -> tuple[Path, Path | None]:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    if " " in repo_id or repo_id.count("/") > 1:
        raise DataError(f"tokenizer '{repo_id}': no such folder, and not a Hub id; use char, bpe, a folder "
                        "with tokenizer.json or a Hub id such as gpt2")
    # offline or unreachable: the local Hub cache only, at once, instead of ~25 s of retries
    local_only = constants.HF_HUB_OFFLINE or not _hub_reachable()
    try:
        file = Path(hf_hub_download(repo_id, "tokenizer.json", local_files_only=local_only))
    except Exception as e:  # not found, gated, offline...: all mean "cannot use this id"
        where = "not in the local Hub cache and the Hub is unreachable" if local_only else str(e).splitlines()[0]
        raise DataError(f"tokenizer '{repo_id}': {where}; check the name, your connection, "
                        "or give a folder with tokenizer.json") from None
    try:
        config = Path(hf_hub_download(repo_id, "tokenizer_config.json", local_files_only=local_only))
    except (EntryNotFoundError, OSError):  # optional file; OSError covers "not cached" when offline
        config = None
    return file, config


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# preparing token files (cached)

@dataclass
class Prepared:
    tokenizer: Tokenizer
    train: np.memmap
    val: np.memmap
    test: np.memmap | None   # only with a three-way split
    stats: dict              # documents, characters, distinct_characters, tokens, vocab_size, chars_per_token,
                             # train_tokens, val_tokens, test_tokens
    cache_path: Path         # folder with tokens.bin, tokenizer.json, tokenizer_config.json, meta.json


def parse_split(split: str | Sequence[float]) -> tuple[float, ...]:
    """"0.9,0.1" or (0.9, 0.1) -> (0.9, 0.1): two or three positive fractions summing to 1."""
    try:
        parts = tuple(float(x) for x in (split.split(",") if isinstance(split, str) else split))
    except (TypeError, ValueError):
        parts = ()
    if len(parts) not in (2, 3) or min(parts) <= 0 or abs(sum(parts) - 1) > 1e-6:
        raise DataError(f"split '{split}': give 2 or 3 positive fractions that sum to 1, e.g. 0.9,0.1 "
                        "(train, val) or 0.8,0.1,0.1 (train, val, test)")
    return parts


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or os.environ.get("NANOFORGE_CACHE") or Path.home() / ".cache" / "nanoforge" / "data")


def _tokenizer_setting(tokenizer: str | Tokenizer, vocab_size: int) -> tuple[dict, Tokenizer | None]:
    """The tokenizer's part of the cache key, and the pretrained tokenizer when there is one."""
    if isinstance(tokenizer, Tokenizer):
        pretrained = tokenizer
    elif tokenizer in ("char", "bpe"):
        return {"kind": tokenizer, "vocab_size": vocab_size if tokenizer == "bpe" else None}, None
    else:
        pretrained = Tokenizer.load(tokenizer)
    digest = hashlib.sha256(pretrained.tok.to_str().encode()).hexdigest()
    return {"kind": pretrained.kind, "tokenizer_json": digest}, pretrained


def load_tokens(inputs, *, tokenizer: str | Tokenizer = "char", vocab_size: int = 4096, text_column: str = "text",
                hf_dataset: str = "", hf_split: str = "train", cache_dir=None,
                log: Callable[[str], None] = print) -> tuple[Tokenizer, np.memmap, dict, Path]:
    """The whole corpus as one memory-mapped token stream: (tokenizer, tokens, stats, cache folder).
    Built once per content + tokenizer setting, then read from the cache."""
    corpus = _Corpus(inputs, text_column, hf_dataset, hf_split)
    setting, pretrained = _tokenizer_setting(tokenizer, vocab_size)
    key = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "tokenizer": setting, **corpus.fingerprint()},
                                    sort_keys=True).encode()).hexdigest()[:20]
    root = cache_root(cache_dir)
    folder = root / key
    if not (folder / "meta.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".*.tmp*"):  # left behind by a preparation that was killed
            if time.time() - stale.stat().st_mtime > 24 * 3600:
                shutil.rmtree(stale, ignore_errors=True)
        log(f"data: tokenising {corpus.describe()} with the {setting['kind']} tokenizer into {folder}")
        t0 = time.time()
        tmp = root / f".{key}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            _build(corpus, setting, pretrained, tmp)
            try:
                os.rename(tmp, folder)  # atomic: a folder with meta.json is always complete
            except OSError:  # another process (a DDP rank) finished the same folder first: use theirs
                shutil.rmtree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"data: prepared in {time.time() - t0:.1f}s")
    else:
        log(f"data: using cached tokens in {folder} (preparation skipped)")
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    tokens = np.memmap(folder / "tokens.bin", dtype=meta["dtype"], mode="r")
    return Tokenizer.load(folder), tokens, meta["stats"], folder


def _build(corpus: _Corpus, setting: dict, pretrained: Tokenizer | None, out: Path) -> None:
    """Train or load the tokenizer, then stream the corpus through it into out/tokens.bin."""
    if pretrained is not None:  # a saved tokenizer of any kind (a run's char vocabulary too) is used as is
        tok = pretrained
    elif setting["kind"] == "char":
        chars, documents, last = set(), 0, None
        for source, piece in corpus.pieces():
            chars.update(piece)
            documents += source != last
            last = source
        if not chars:
            raise _empty(corpus)
        if documents > 1:  # documents are joined with a blank line
            chars.add("\n")
        tok = Tokenizer.char(chars)
    else:
        tok = Tokenizer.train_bpe(_bpe_sample(corpus), setting["vocab_size"])
    # documents are joined with the end-of-text id, or with the ids of a blank line
    separator = np.array([tok.eos_id] if tok.eos_id is not None else tok.encode(DOC_SEPARATOR), dtype=np.int64)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    documents = characters = tokens = 0
    distinct = set()
    with open(out / "tokens.bin", "wb") as f:
        for batch in _batches(corpus):
            for (new_document, piece), ids in zip(batch, tok.encode_batch([piece for _, piece in batch])):
                if new_document and documents:
                    f.write(separator.astype(dtype).tobytes())
                    tokens += len(separator)
                documents += new_document
                characters += len(piece)
                distinct.update(piece)
                f.write(ids.astype(dtype).tobytes())
                tokens += len(ids)
    if characters == 0:
        raise _empty(corpus)
    stats = {"documents": documents, "characters": characters, "distinct_characters": len(distinct),
             "tokens": tokens, "vocab_size": tok.vocab_size, "chars_per_token": round(characters / tokens, 3),
             "tokenizer": tok.kind}
    tok.save(out)
    _write_atomic(out / "meta.json", json.dumps({"dtype": np.dtype(dtype).name, "stats": stats}, indent=2))


def _bpe_sample(corpus: _Corpus) -> Iterator[str]:
    """Whole pieces spread evenly over the corpus, up to BPE_TRAIN_BYTES of text. The BPE trainer's memory
    grows with the distinct words it sees: fine for English, but in Chinese or Japanese every run of
    characters between punctuation is a new "word" (20 MB of Chinese takes 1.4 GB to train on)."""
    keep = min(1.0, BPE_TRAIN_BYTES / max(corpus.size_bytes(), 1))
    seen = taken = 0
    for _, piece in corpus.pieces():
        size = len(piece.encode())
        seen += size
        if taken < keep * seen:
            taken += size
            # the trainer buffers 256 texts at a time: hand it ~16K-character runs of whole lines
            start = 0
            while start < len(piece):
                end = piece.rfind("\n", start, start + 16384) + 1 or start + 16384
                yield piece[start:end]
                start = end


def _batches(corpus: _Corpus) -> Iterator[list[tuple[bool, str]]]:
    """Lists of (starts a new document, piece), encoded together: a piece per core (up to 8) for
    tokenizers' parallel encode_batch, while memory stays a few hundred MB."""
    batch, size, last = [], 0, None
    for source, piece in corpus.pieces():
        batch.append((source != last, piece))
        last, size = source, size + len(piece)
        if size >= PIECE_BYTES * min(8, os.cpu_count() or 1):
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _empty(corpus: _Corpus) -> DataError:
    return DataError(f"{corpus.describe()}: no text found (empty files or empty '{corpus.text_column}' values); "
                     "add text or pick other inputs")


def prepare(inputs, *, tokenizer: str | Tokenizer = "char", vocab_size: int = 4096, text_column: str = "text",
            hf_dataset: str = "", hf_split: str = "train", split: str | Sequence[float] = (0.9, 0.1),
            block_size: int = 256, cache_dir=None, log: Callable[[str], None] = print) -> Prepared:
    """Tokenise the inputs once (cached) and split the token stream by position: the first 90% is train and
    the last 10% val by default, as nanoGPT does; a third fraction makes the tail a test split.
    Every split must hold more than block_size tokens (one training window plus its shifted target)."""
    fractions = parse_split(split)
    tok, tokens, stats, folder = load_tokens(inputs, tokenizer=tokenizer, vocab_size=vocab_size,
                                             text_column=text_column, hf_dataset=hf_dataset, hf_split=hf_split,
                                             cache_dir=cache_dir, log=log)
    n = len(tokens)
    n_train = int(n * fractions[0])
    n_val = int(n * fractions[1]) if len(fractions) == 3 else n - n_train
    parts = {"train": tokens[:n_train], "val": tokens[n_train:n_train + n_val],
             "test": tokens[n_train + n_val:] if len(fractions) == 3 else None}
    for name, part in parts.items():
        if part is not None and len(part) <= block_size:
            share = fractions[("train", "val", "test").index(name)]
            need = math.ceil((block_size + 1) / share) + 1  # tokens for this split to exceed block_size
            raise DataError(
                f"not enough data: the {name} split has {len(part):,} tokens but block_size {block_size} needs "
                f"at least {block_size + 1:,}; the corpus has {n:,} tokens ({stats['characters']:,} characters) "
                f"and needs about {need:,} tokens (~{math.ceil(need * stats['chars_per_token']):,} characters) "
                f"with split {','.join(f'{x:g}' for x in fractions)}: add text or lower block_size")
    stats = {**stats, **{f"{name}_tokens": (len(part) if part is not None else 0) for name, part in parts.items()}}
    log(f"data: {stats['documents']:,} document{'s' * (stats['documents'] != 1)}, {stats['characters']:,} characters "
        f"({stats['distinct_characters']:,} distinct), {stats['tokens']:,} tokens, vocab {stats['vocab_size']:,} "
        f"({tok.kind}), {stats['chars_per_token']:.2f} characters/token")
    log("data: " + ", ".join(f"{name} {len(part):,} tokens" for name, part in parts.items() if part is not None))
    return Prepared(tok, parts["train"], parts["val"], parts["test"], stats, folder)


# -----------------------------------------------------------------------------
# before training: what the UI shows for the chosen inputs and tokenizer

def corpus_stats(inputs, *, tokenizer: str | Tokenizer = "char", vocab_size: int = 4096, text_column: str = "text",
                 hf_dataset: str = "", hf_split: str = "train", cache_dir=None) -> dict:
    """documents, characters, distinct_characters, tokens, vocab_size, chars_per_token (and tokenizer kind).
    Tokenises into the same cache prepare() uses, so training on these inputs afterwards starts at once."""
    return load_tokens(inputs, tokenizer=tokenizer, vocab_size=vocab_size, text_column=text_column,
                       hf_dataset=hf_dataset, hf_split=hf_split, cache_dir=cache_dir, log=lambda _: None)[2]


def token_preview(inputs, *, tokenizer: str | Tokenizer = "char", vocab_size: int = 4096, text_column: str = "text",
                  hf_dataset: str = "", hf_split: str = "train", n_tokens: int = 100,
                  cache_dir=None) -> list[tuple[str, int]]:
    """The first n_tokens of the corpus as (text, id) pairs, the text being the characters each token covers
    (a character split over several byte-level tokens shows on each of them)."""
    tok = load_tokens(inputs, tokenizer=tokenizer, vocab_size=vocab_size, text_column=text_column,
                      hf_dataset=hf_dataset, hf_split=hf_split, cache_dir=cache_dir, log=lambda _: None)[0]
    # the start of the corpus as text, documents joined as in the token stream; 16 chars/token is plenty
    separator = tok.eos_token or DOC_SEPARATOR
    text, last = "", None
    for source, piece in read_documents(inputs, text_column, hf_dataset, hf_split):
        text += (separator if last not in (None, source) else "") + piece[:16 * n_tokens]
        last = source
        if len(text) >= 16 * n_tokens:
            break
    encoding = tok.tok.encode(text, add_special_tokens=False)
    return [(text[start:end], token_id) for token_id, (start, end) in zip(encoding.ids, encoding.offsets)][:n_tokens]


# -----------------------------------------------------------------------------
# command line: prepare and print the stats

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Tokenise a corpus into cached token files and print its stats.")
    parser.add_argument("--data", nargs="*", default=None,
                        help=f"files, folders or globs ({' '.join(EXTENSIONS)}); default: {DEFAULT_DATA.name}")
    parser.add_argument("--tokenizer", default="char", help="char | bpe | folder with tokenizer.json | Hub id")
    parser.add_argument("--vocab_size", type=int, default=4096, help="bpe vocabulary size (ids)")
    parser.add_argument("--text_column", default="text", help="column holding the text in .csv/.jsonl/.json/.parquet")
    parser.add_argument("--hf_dataset", default="", help="Hub dataset name (needs internet or the local cache)")
    parser.add_argument("--hf_split", default="train", help="split of the Hub dataset")
    parser.add_argument("--split", default="0.9,0.1", help="train,val[,test] fractions, taken by position")
    parser.add_argument("--block_size", type=int, default=256, help="context length (tokens) training will use")
    parser.add_argument("--cache_dir", default=None, help="default: $NANOFORGE_CACHE or ~/.cache/nanoforge/data")
    parser.add_argument("--preview", type=int, default=0, metavar="N", help="also print the first N tokens")
    args = parser.parse_args(argv)
    inputs = args.data if args.data is not None else ([] if args.hf_dataset else [str(DEFAULT_DATA)])
    settings = dict(tokenizer=args.tokenizer, vocab_size=args.vocab_size, text_column=args.text_column,
                    hf_dataset=args.hf_dataset, hf_split=args.hf_split, cache_dir=args.cache_dir)
    try:
        prepared = prepare(inputs, split=args.split, block_size=args.block_size, **settings)
        if args.preview:
            print(" ".join(f"{text!r}:{i}" for text, i in token_preview(inputs, n_tokens=args.preview, **settings)))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps({**prepared.stats, "cache_path": str(prepared.cache_path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
