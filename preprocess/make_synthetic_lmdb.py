"""Write a small synthetic lmdb of rendered words, for trying the flow without a real test set.

Words are drawn in dark grey on light, slightly noisy backgrounds with Pillow's built-in
scalable font (``ImageFont.load_default(size)``, Pillow >= 10.1), in the IIIT5K lmdb layout
(``num-samples``, ``image-%09d`` PNG, ``label-%09d``). Accuracy measured on it says nothing
about real scene text: every figure produced from it is synthetic.

Example:
    python -m preprocess.make_synthetic_lmdb work/synthetic_lmdb --samples 200
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from pathlib import Path

import lmdb
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from common.cli import make_parser, run_main
from common.errors import ToolchainError
from preprocess.lmdb_reader import SYNTHETIC_KEY

WORDS = ("PARKING PRIVATE EXIT open Coffee HOTEL street 2024 sale Police bank London Taxi "
         "station MARKET city welcome STOP road 42 Garden house PHARMACY north school Bus "
         "museum Pizza theatre CAFE office station7 river BOOKS Music shop west").split()


def render_word(text: str, rng: random.Random) -> Image.Image:
    """An RGB word image about 32-48 px high with margins proportional to its size."""
    size = rng.randint(24, 40)
    font = ImageFont.load_default(size=size)
    left, top, right, bottom = font.getbbox(text)
    width, height = right - left + size, bottom - top + size // 2
    background = rng.randint(180, 250)
    noise = np.random.default_rng(rng.randint(0, 1 << 30)).normal(0, 6, (height, width, 3))
    canvas = np.clip(background + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(canvas, "RGB")
    ink = tuple(rng.randint(0, 70) for _ in range(3))
    ImageDraw.Draw(image).text((size // 2 - left, size // 4 - top), text, fill=ink, font=font)
    return image


def write_synthetic_lmdb(path: Path, samples: int, seed: int = 0) -> Path:
    """Write ``samples`` rendered words into a new lmdb folder at ``path``.

    Raises:
        ToolchainError: ``path`` already holds an lmdb, or ``samples < 1``.
    """
    if samples < 1:
        raise ToolchainError(f"--samples must be >= 1, got {samples}")
    if (path / "data.mdb").exists():
        raise ToolchainError(f"{path} already holds an lmdb; remove it or choose another path")
    rng = random.Random(seed)
    path.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=1 << 30)
    with env.begin(write=True) as txn:
        for index in range(1, samples + 1):
            word = rng.choice(WORDS)
            buffer = io.BytesIO()
            render_word(word, rng).save(buffer, format="PNG")
            txn.put(b"image-%09d" % index, buffer.getvalue())
            txn.put(b"label-%09d" % index, word.encode("utf-8"))
        txn.put(b"num-samples", str(samples).encode())
        txn.put(SYNTHETIC_KEY, b"preprocess.make_synthetic_lmdb")
    env.close()
    return path


def _parser():
    parser = make_parser(__doc__)
    parser.add_argument("output", type=Path, help="lmdb folder to create")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _run(args) -> int:
    write_synthetic_lmdb(args.output, args.samples, args.seed)
    print(f"wrote {args.samples} SYNTHETIC rendered words to {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    return run_main(_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
