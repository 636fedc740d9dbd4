"""Reading a corpus: Alice's (Bob decodes the data; outside f).

A corpus is read as exact bytes (a file, a directory or glob of files in sorted order, a named
dataset, or the bundled tinyshakespeare); the coded data is their concatenation, so a decoded
stream gives those bytes back, not the file names. Only regular files are read (a device such as
/dev/zero never ends), and only as many bytes as the memory limit lets training hold.
"""

import glob
import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from prequel.alice.difficulty import difficulty_labels
from prequel.checks.memory import corpus_limit_text, format_bytes, max_corpus_bytes
from prequel.checks.settings import regular_file_size
from prequel.files import write_atomic
from prequel.resources import BUNDLED_CORPUS
from prequel.training.curriculum import chunk_spans
from prequel.training.data import DataError

BUNDLED_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
IGNORE = -100  # target id of padding positions

# Named corpora for `data.path: dataset:NAME`: fetched once, checked, cached. Pinned to commits
# so the bytes (and the sha256) never change; provenance in ../shared/corpora/README.md.
_CANTERBURY = "https://raw.githubusercontent.com/pfalcon/canterbury-corpus/c380ef9dc1dc62691757fdfeebdc2f85710e1e46"
DATASETS = {
    "tinyshakespeare": (
        "https://raw.githubusercontent.com/karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/"
        "data/tinyshakespeare/input.txt",
        BUNDLED_SHA256,
    ),
    "alice29": (
        f"{_CANTERBURY}/canterbury/alice29.txt",
        "7467306ee0feed4971260f3c87421154a05be571d944e9cb021a5713700c38f0",
    ),
    "asyoulik": (
        f"{_CANTERBURY}/canterbury/asyoulik.txt",
        "eaa3526fe53859f34ecdf255712f9ecf0b2c903451d4755b2edaa2e2599cb0fc",
    ),
    "lcet10": (
        f"{_CANTERBURY}/canterbury/lcet10.txt",
        "5314ba1dbb03f471df88bec6cd120a938ef60d0fd3511c5c1dce61bf7463245f",
    ),
    "plrabn12": (
        f"{_CANTERBURY}/canterbury/plrabn12.txt",
        "07e2e0b461af78c7c647cb53dab39de560198e16f799b4516eccf0fbd69f764c",
    ),
    "book1": (f"{_CANTERBURY}/calgary/book1", "9ffa47cd93bccd732f20e0c304203cfbc1b8a91bedac536e2d8f6051003d9951"),
    "bible": (f"{_CANTERBURY}/large/bible.txt", "4e0a7e8dff7d9c82dbded57305c0ca3cdd3c4ca014db27121782fe9710f4723f"),
    "world192": (
        f"{_CANTERBURY}/large/world192.txt",
        "1aebdc97d29904b25791da9aa32be90b69d7da6dc0ac9b95512ed27ed40d2112",
    ),
    # The Large Text Compression Benchmark's files (Hutter Prize: enwik8; NNCP, cmix: enwik9), 10**8
    # and 10**9 bytes of Wikipedia XML, from the zip they are published in; the sha256 is the file's.
    "enwik8": (
        "http://mattmahoney.net/dc/enwik8.zip",
        "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8",
        "enwik8",
    ),
    "enwik9": (
        "http://mattmahoney.net/dc/enwik9.zip",
        "159b85351e5f76e60cbe32e04c677847a9ecba3adc79addab6f4c6c7aa3744bc",
        "enwik9",
    ),
}
DATASET_PREFIX = "dataset:"


@dataclass(frozen=True)
class Document:
    name: str  # path as given (relative to the directory for a directory corpus)
    data: bytes


def cache_dir() -> Path:
    """Where named datasets are kept: $PREQUEL_CACHE, else $XDG_CACHE_HOME/prequel or ~/.cache/prequel."""
    if os.environ.get("PREQUEL_CACHE"):
        return Path(os.environ["PREQUEL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prequel"


def fetch_dataset(name: str) -> Path:
    """The cached file of a named dataset, downloaded (to disk, a block at a time; out of its
    zip when it comes in one) and sha256-checked on first use."""
    if name not in DATASETS:
        raise DataError(f"data.path: unknown dataset {name!r} (known: {', '.join(sorted(DATASETS))})")
    url, sha256, *member = DATASETS[name]
    path = cache_dir() / name
    if path.is_file() and file_sha256(path) == sha256:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{name}-download-") as tmp:
        download = Path(tmp) / "download"
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(download, "wb") as f:
                shutil.copyfileobj(response, f, 1 << 22)
        except (urllib.error.URLError, OSError) as e:
            raise DataError(
                f"data.path: cannot download dataset {name!r} from {url} ({getattr(e, 'reason', e)}); "
                f"are you offline? Fetch it elsewhere and pass data.path FILE, or put it at {path}"
            ) from None
        if member:
            try:
                with zipfile.ZipFile(download) as archive, archive.open(member[0]) as inside:
                    write_atomic(Path(tmp) / "file", iter(lambda: inside.read(1 << 22), b""))
            except (zipfile.BadZipFile, KeyError, OSError) as e:
                raise DataError(
                    f"data.path: dataset {name!r} from {url} is not a zip holding {member[0]}: {e}"
                ) from None
            download = Path(tmp) / "file"
        if file_sha256(download) != sha256:
            raise DataError(f"data.path: dataset {name!r} from {url} does not match its sha256 {sha256}; not using it")
        os.replace(download, path)  # a reader, or another process fetching it too, never sees half a file
    return path


def file_sha256(path: Path, block: int = 1 << 24) -> str:
    """sha256 of a file, read a block at a time (any size, little memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _read_file(path: Path) -> bytes:
    """A regular file's bytes, checked before reading (`regular_file_size`): at most `max_corpus_bytes`."""
    limit = max_corpus_bytes()
    regular_file_size(path, "data.path", limit, corpus_limit_text(), error=DataError)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"data.path: cannot read {path}: {e.strerror}") from None
    if len(data) > limit:  # it grew between the check and the read
        raise DataError(
            f"data.path: {path} grew to {format_bytes(len(data))} while being read, more than the "
            f"{format_bytes(limit)} allowed ({corpus_limit_text()})"
        )
    return data


def corpus_files(path: str | None) -> tuple[list[str], list[Path]]:
    """The files of a corpus, by name and path, in their fixed order: a file; every file under a
    directory (recursive, hidden ones skipped) or matching a glob, sorted by path; `dataset:NAME`;
    or null = bundled. Each a regular file; nothing is read."""
    if path is None:
        return [BUNDLED_CORPUS.name], [BUNDLED_CORPUS]
    if path.startswith(DATASET_PREFIX):
        return [path], [fetch_dataset(path[len(DATASET_PREFIX) :])]
    if glob.has_magic(path):
        files = [Path(p) for p in sorted(glob.glob(os.path.expanduser(path), recursive=True)) if Path(p).is_file()]
        if not files:
            raise DataError(f"data.path: the glob {path!r} matches no files")
        return [str(f) for f in files], files
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data.path: file not found: {p}")
    if not p.is_dir():
        return [str(p)], [p]
    files = sorted(
        (f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)),
        key=lambda f: f.relative_to(p).as_posix(),
    )
    if not files:
        raise DataError(f"data.path: directory {p} has no files")
    return [f.relative_to(p).as_posix() for f in files], files


def read_documents(path: str | None) -> list[Document]:
    """The corpus as documents (`corpus_files`), each the exact bytes of one file (no newline or
    encoding conversion), held in memory: at most `max_corpus_bytes` in all."""
    names, files = corpus_files(path)
    if path is None:
        data = BUNDLED_CORPUS.read_bytes()
        if hashlib.sha256(data).hexdigest() != BUNDLED_SHA256:
            raise DataError(f"bundled corpus {BUNDLED_CORPUS} does not match its sha256; reinstall prequel")
        return [Document(BUNDLED_CORPUS.name, data)]
    limit = max_corpus_bytes()
    total = sum(
        regular_file_size(f, "data.path", limit, corpus_limit_text(), error=DataError) for f in files
    )  # before reading
    if total > limit:
        raise DataError(
            f"data.path: the {len(files):,} files of {path} are {format_bytes(total)} in all, more than "
            f"the {format_bytes(limit)} allowed ({corpus_limit_text()})"
        )
    return [Document(name, _read_file(f)) for name, f in zip(names, files)]


def read_corpus(path: str | None) -> bytes:
    """All documents concatenated in order: the exact bytes that are coded and decoded."""
    data = b"".join(d.data for d in read_documents(path))
    if not data:
        raise DataError(f"data.path: {path} is empty (no bytes to train on)")
    return data


def order_labels(data, seq_len: int, tokenizer, tokens) -> torch.Tensor | None:
    """The encoder's content-dependent part of the order (None if the order is free): for
    `difficulty`, each chunk's level, which the stream header transmits to the decoder."""
    if data.curriculum != "difficulty":
        return None
    chunks = (tokenizer.decode(tokens[s : s + n]) for s, n in chunk_spans(len(tokens), seq_len).tolist())
    return difficulty_labels(chunks, data.difficulty_score, data.difficulty_levels)
