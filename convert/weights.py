"""Fetch pretrained CRNN weights into a local cache (never committed).

``fetch nano-ocr`` downloads the ``nano-ocr==0.1.0`` wheel (MIT) with
``pip download --no-deps`` (installing it would pull torchvision), extracts
``nano_ocr/model/nano_ocr_ftr.pth`` into the cache and checks its sha256. A cached file
with the right digest is reused. ``path nano-ocr`` prints where the file is (or would be).

The cache is ``$CRNN_WEIGHTS_DIR``, else ``.cache/weights`` in the repository.

Example:
    python -m convert.weights fetch nano-ocr
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from convert.cli import make_parser, run_main
from convert.errors import ToolchainError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class WeightSource:
    """A checkpoint shipped inside a PyPI wheel."""

    arch: str
    package: str
    version: str
    member: str
    sha256: str
    license: str


SOURCES: dict[str, WeightSource] = {
    "nano-ocr": WeightSource(
        arch="nano-ocr",
        package="nano-ocr",
        version="0.1.0",
        member="nano_ocr/model/nano_ocr_ftr.pth",
        sha256="2d105c6901b4afe816fe8f85aa32ef85a6336f2e4d96c04692bb08b7de9758ba",
        license="MIT",
    ),
}


def cache_dir() -> Path:
    """The weights cache folder (``$CRNN_WEIGHTS_DIR`` or ``<repo>/.cache/weights``)."""
    return Path(os.environ.get("CRNN_WEIGHTS_DIR", REPO_ROOT / ".cache" / "weights"))


def _source(name: str) -> WeightSource:
    try:
        return SOURCES[name]
    except KeyError:
        raise ToolchainError(f"no weights named {name!r}; known: {', '.join(SOURCES)}") from None


def weights_path(name: str) -> Path:
    """Where the checkpoint ``name`` lives in the cache (whether or not fetched yet)."""
    return cache_dir() / Path(_source(name).member).name


def sha256_of(path: Path) -> str:
    """Hex sha256 digest of a file."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(name: str) -> Path:
    """Download (if needed) and verify the checkpoint ``name``; return its cached path.

    Raises:
        ToolchainError: pip fails, the wheel lacks the file, or the digest differs.
    """
    source = _source(name)
    target = weights_path(name)
    if target.is_file() and sha256_of(target) == source.sha256:
        log.info("cached: %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        spec = f"{source.package}=={source.version}"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, spec]
        log.info("running: %s", " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            tail = proc.stderr.strip().splitlines()[-3:]
            raise ToolchainError(f"pip download {spec} failed ({proc.returncode}): {' | '.join(tail)}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ToolchainError(f"pip download {spec} produced no wheel in {tmp}")
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if source.member not in wheel.namelist():
                raise ToolchainError(f"{wheels[0].name} has no {source.member}")
            partial.write_bytes(wheel.read(source.member))
    digest = sha256_of(partial)
    if digest != source.sha256:
        partial.unlink()
        raise ToolchainError(
            f"{source.member} from {spec} has sha256 {digest}, expected {source.sha256}"
        )
    partial.replace(target)
    log.info("fetched %s (%s, %s licence) -> %s", source.member, spec, source.license, target)
    return target


def _parser():
    parser = make_parser(__doc__)
    parser.add_argument("action", choices=("fetch", "path"))
    parser.add_argument("name", choices=sorted(SOURCES))
    return parser


def _run(args) -> int:
    print(fetch(args.name) if args.action == "fetch" else weights_path(args.name))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    return run_main(_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
