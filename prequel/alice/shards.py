"""From corpus files to token shards, once: Alice's (Bob decodes his shards; training/tokens.py).

A `Corpus` reads its files (prequel/alice/corpus.py `corpus_files`) as one byte stream, a block at
a time, so nothing holds the whole corpus: its sha256, BPE's word counts and the tokenisation all
stream. Blocks are cut only where BPE's word splitter (training/bpe.py `_WORDS`) cuts anyway, so
tokenising block by block gives exactly the ids of tokenising the whole. `token_shards` writes the
ids once into shard files under the cache, keyed by the corpus's sha256 and the tokenizer, with a
manifest of each shard's sha256; a later run on the same data opens them at once, and a damaged
or partial cache is rebuilt, never used.
"""

import contextlib
import fcntl
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prequel.alice.corpus import BUNDLED_SHA256, cache_dir, corpus_files, file_sha256
from prequel.checks.memory import format_bytes
from prequel.checks.settings import regular_file_size
from prequel.files import TEMP_SUFFIX, write_atomic
from prequel.resources import BUNDLED_CORPUS
from prequel.training.data import DataError
from prequel.training.tokens import SHARD_TOKENS, TokenShards, dtype_for, shard_names

FORMAT = "prequel-shards 1"  # bump when the layout or the cut rule changes
MANIFEST = "manifest.json"
BLOCK_BYTES = 1 << 22  # corpus bytes tokenised at a time

# Byte classes of BPE's word splitter: a cut between bytes a|b is one the splitter makes anyway
# when a is not whitespace and b is of another class (a's word ends at a; b's starts at b).
_CLASS = np.full(256, 4, dtype=np.uint8)  # punctuation and other bytes
_CLASS[[*range(ord("A"), ord("Z") + 1), *range(ord("a"), ord("z") + 1), *range(0x80, 0x100)]] = 1
_CLASS[ord("0") : ord("9") + 1] = 2
_CLASS[list(b" \t\n\r\x0b\x0c")] = 3


def safe_cut(data: bytes) -> int:
    """The last position in `data` (0 if none) where BPE's words split regardless of context."""
    c = _CLASS[np.frombuffer(data, dtype=np.uint8)]
    cuts = np.flatnonzero((c[:-1] != 3) & (c[:-1] != c[1:]))
    return int(cuts[-1]) + 1 if len(cuts) else 0


@dataclass
class Corpus:
    """A corpus's files as one byte stream, never held whole."""

    path: str | None
    files: list[Path]
    size: int
    _sha256: str | None = field(default=None, repr=False)

    def blocks(self, size: int = BLOCK_BYTES):
        """The bytes in order, `size` at a time (a block never spans two reads of one file)."""
        for path in self.files:
            try:
                with open(path, "rb") as f:
                    while block := f.read(size):
                        yield block
            except OSError as e:
                raise DataError(f"data.path: cannot read {path}: {e.strerror}") from None

    def pieces(self, size: int = BLOCK_BYTES):
        """The bytes in order as pieces cut where BPE cuts anyway (`safe_cut`): tokenising the
        pieces one by one gives the ids of tokenising the whole."""
        carry = b""
        for block in self.blocks(size):
            data = carry + block
            cut = safe_cut(data) if len(data) > 1 else 0
            if cut:
                yield data[:cut]
            carry = data[cut:]
        if carry:
            yield carry

    def sha256(self) -> str:
        if self._sha256 is None:
            digest = hashlib.sha256()
            for block in self.blocks(1 << 24):
                digest.update(block)
            self._sha256 = digest.hexdigest()
        return self._sha256


def open_corpus(path: str | None) -> Corpus:
    """The corpus at `path` (prequel/alice/corpus.py `corpus_files`), checked: regular files, not
    empty. It may be larger than memory."""
    _, files = corpus_files(path)
    size = sum(regular_file_size(f, "data.path", 1 << 62, "", error=DataError) for f in files)
    if not size:
        raise DataError(f"data.path: {path} is empty (no bytes to train on)")
    corpus = Corpus(path, files, size)
    if path is None and corpus.sha256() != BUNDLED_SHA256:
        raise DataError(f"bundled corpus {BUNDLED_CORPUS} does not match its sha256; reinstall prequel")
    return corpus


def progress_bar(total_bytes: int, what: str):
    """A bytes bar with its rate and ETA (tqdm: hidden when stderr is not a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc=what, disable=None, leave=False)


@contextlib.contextmanager
def _locked(directory: Path):
    """One process builds a cache directory; the others (DDP ranks, a second run) wait, then use it."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def cache_key(corpus: Corpus, tokenizer) -> str:
    identity = {
        "format": FORMAT,
        "corpus_sha256": corpus.sha256(),
        "tokenizer": tokenizer.name,
        "tokenizer_sha256": hashlib.sha256(tokenizer.serialize()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def token_shards(corpus: Corpus, tokenizer, shard_tokens: int = SHARD_TOKENS) -> TokenShards:
    """The corpus's ids as shards in the cache: opened if a whole, checked copy is there, else
    tokenised into it now (a damaged or partial one is rebuilt with a one-line notice)."""
    directory = cache_dir() / "tokens" / cache_key(corpus, tokenizer)
    with _locked(directory):
        manifest, problem = _checked_manifest(directory)
        if manifest is None:
            if problem:
                print(f"prequel: token cache {directory}: {problem}; tokenising again", file=sys.stderr)
            manifest = _build(corpus, tokenizer, directory, shard_tokens)
    return TokenShards.open(directory, manifest["tokens"], np.dtype(manifest["dtype"]), manifest["shard_tokens"])


def _checked_manifest(directory: Path) -> tuple[dict | None, str | None]:
    """The cache's manifest if every shard it lists is there, whole and with its sha256; else
    (None, what is wrong), or (None, None) for no cache at all."""
    path = directory / MANIFEST
    if not path.exists():
        return None, ("it has no manifest (a build was interrupted)" if any(directory.iterdir()) else None)
    try:
        manifest = json.loads(path.read_text())
        if manifest["format"] != FORMAT:
            return None, f"it has format {manifest['format']!r}, not {FORMAT!r}"
        itemsize = np.dtype(manifest["dtype"]).itemsize
        shards = manifest["shards"]
        expected = shard_names(manifest["tokens"], manifest["shard_tokens"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"its manifest is damaged ({type(e).__name__})"
    if [s["name"] for s in shards] != expected:
        return None, "its manifest lists other shards than its token count needs"
    for shard in shards:
        file = directory / shard["name"]
        if not file.is_file() or file.stat().st_size != shard["tokens"] * itemsize:
            return None, f"shard {shard['name']} is missing or truncated"
        if file_sha256(file) != shard["sha256"]:
            return None, f"shard {shard['name']} does not match its sha256 (damaged)"
    return manifest, None


def _build(corpus: Corpus, tokenizer, directory: Path, shard_tokens: int) -> dict:
    for stale in directory.iterdir():  # (under the lock: nobody else is reading or writing it)
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    dtype = dtype_for(tokenizer.vocab_size)
    free = shutil.disk_usage(directory).free
    if corpus.size * dtype.itemsize > free:
        raise DataError(
            f"data.path: tokenising {format_bytes(corpus.size)} may need up to "
            f"{format_bytes(corpus.size * dtype.itemsize)} in {directory}, which has {format_bytes(free)} free; "
            "free some space or point PREQUEL_CACHE elsewhere"
        )
    print(f"prequel: tokenising {format_bytes(corpus.size)} ({tokenizer.name}) into {directory}", file=sys.stderr)
    started, tokens, shards = time.perf_counter(), 0, []
    writer = _ShardWriter(directory, dtype, shard_tokens, shards)
    with progress_bar(corpus.size, "tokenising") as bar:
        for piece in corpus.pieces():
            ids = tokenizer.encode(piece).numpy()
            writer.write(ids)
            tokens += len(ids)
            bar.update(len(piece))
            bar.set_postfix_str(f"{tokens / max(time.perf_counter() - started, 1e-9):,.0f} tok/s", refresh=False)
    writer.close()
    seconds = time.perf_counter() - started
    manifest = {
        "format": FORMAT,
        "corpus": str(corpus.path),
        "corpus_sha256": corpus.sha256(),
        "tokenizer": tokenizer.name,
        "dtype": dtype.str,
        "tokens": tokens,
        "shard_tokens": shard_tokens,
        "shards": shards,
    }
    write_atomic(directory / MANIFEST, json.dumps(manifest, indent=1).encode())  # last: the cache is now whole
    print(
        f"prequel: {tokens:,} tokens in {len(shards)} shard(s), {seconds:.1f} s "
        f"({corpus.size / 1e6 / max(seconds, 1e-9):.1f} MB/s)",
        file=sys.stderr,
    )
    return manifest


class _ShardWriter:
    """Appends ids to shard files of `shard_tokens` each, hashing as it goes; a shard is renamed
    into place only when whole."""

    def __init__(self, directory: Path, dtype, shard_tokens: int, shards: list):
        self.directory, self.dtype, self.shard_tokens, self.shards = directory, dtype, shard_tokens, shards
        self.file = None

    def _open(self) -> None:
        self.name = f"{len(self.shards):05d}.bin"
        self.tmp = self.directory / f".{self.name}{TEMP_SUFFIX}"
        self.file, self.count, self.digest = open(self.tmp, "wb"), 0, hashlib.sha256()

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype)
        while len(ids):
            if self.file is None:
                self._open()
            take = ids[: self.shard_tokens - self.count]
            data = take.tobytes()
            self.file.write(data)
            self.digest.update(data)
            self.count += len(take)
            ids = ids[len(take) :]
            if self.count == self.shard_tokens:
                self._seal()

    def _seal(self) -> None:
        self.file.close()
        self.tmp.rename(self.directory / self.name)
        self.shards.append({"name": self.name, "tokens": self.count, "sha256": self.digest.hexdigest()})
        self.file = None

    def close(self) -> None:
        """Seal the last, partial shard (or the one empty shard of no tokens)."""
        if self.file is None and not self.shards:
            self._open()
        if self.file is not None:
            self._seal()
