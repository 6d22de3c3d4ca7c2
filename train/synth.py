"""Render text from a corpus into a word-crop lmdb of our format, for training.

Each sample is a text drawn from the corpus, rendered with one of the fonts in random colours
(text and background at least ``MIN_CONTRAST`` grey levels apart, so every sample can be read),
then put through the degradations scene text shows (the SynthText / MJSynth recipe, kept
small): padding, a perspective warp, Gaussian blur, sensor noise and JPEG compression.
Everything is drawn from ``numpy.random.default_rng([seed, index])``, so a sample depends
only on the seed and its index: the same command writes the same lmdb, and two commands with
different seeds give disjoint draws (use one for training and one for validation).

Corpora (``--corpus``, repeatable): a text file, one entry per line (a ``TAB`` and what follows
are dropped, as in THUOCL's ``phrase<TAB>frequency``), or an lmdb folder, whose labels are
the entries (for English, the words of the training sets: ``../shared/data/IC15_train_words``
and ``../shared/data/IIIT5K_train_500``). Entries with characters the font cannot draw are
skipped and counted.

Fonts: ``--font`` files, else the DejaVu fonts (Debian: ``apt-get install fonts-dejavu-core``,
Latin). For Chinese give a CJK font: ``apt-get install fonts-wqy-microhei`` (Apache-2.0)
installs ``/usr/share/fonts/truetype/wqy/wqy-microhei.ttc``.

Keys (``preprocess.lmdb_reader``): ``num-samples``, ``image-%09d`` (PNG or JPEG bytes),
``label-%09d`` (UTF-8), indices 1..N, and ``synthetic`` (so reports say the data is rendered).

Examples:
    python -m train.synth work/synth_en --samples 20000 \\
        --corpus ../shared/data/IC15_train_words --corpus ../shared/data/IIIT5K_train_500
    python -m train.synth work/synth_zh --samples 20000 --corpus \\
        ../shared/data/corpora/THUOCL_poem.txt --font /usr/share/fonts/truetype/wqy/wqy-microhei.ttc
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm import tqdm

from common.cli import make_parser, positive, run_main
from common.errors import ToolchainError
from common.outputs import check_output_file
from preprocess.lmdb_reader import SYNTHETIC_KEY, open_lmdb
from preprocess.lmdb_writer import write_word_lmdb

log = logging.getLogger(__name__)

DEFAULT_FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
# The least grey-level difference between text and background (ITU-R BT.601 luma, as
# Pillow's convert("L"), which is what the recognisers see). Drawing each RGB channel's offset
# on its own, as this module first did, left 7 % of renderings under 10 levels: invisible.
MIN_CONTRAST = 48
FONT_HINT = ("install fonts-dejavu-core (Latin) or fonts-wqy-microhei (Chinese) with apt-get, "
             "or give --font FILE")


def read_corpus(path: Path) -> list[str]:
    """The entries of a corpus: an lmdb folder's labels, or a text file's lines.

    Raises:
        ToolchainError: a missing path, a file that is not UTF-8, or no entries.
    """
    if path.is_dir():
        env = open_lmdb(path)
        with env.begin() as txn:
            entries = [value.decode("utf-8", "replace")
                       for key, value in txn.cursor() if key.startswith(b"label-")]
        env.close()
    elif path.is_file():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise ToolchainError(f"{path}: not UTF-8 text ({exc.reason} at byte "
                                 f"{exc.start})") from None
        entries = [line.split("\t", 1)[0] for line in lines]
    else:
        raise ToolchainError(f"{path}: no such corpus (a text file or an lmdb folder)")
    entries = [e.strip() for e in entries if e.strip()]
    if not entries:
        raise ToolchainError(f"{path}: the corpus has no entries")
    return entries


def find_fonts(paths: Sequence[Path]) -> list[Path]:
    """The font files to draw with: ``paths``, else the DejaVu Sans and Serif fonts.

    Raises:
        ToolchainError: a given font is missing, or no font is found.
    """
    if paths:
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ToolchainError(f"no such font file: {', '.join(missing)}")
        return list(paths)
    fonts = sorted(p for p in DEFAULT_FONT_DIR.glob("DejaVu*.ttf")
                   if not any(skip in p.name for skip in ("Mono", "ExtraLight", "Math")))
    if not fonts:
        raise ToolchainError(f"no fonts in {DEFAULT_FONT_DIR}: {FONT_HINT}")
    return fonts


@dataclass
class Font:
    """A font file at one size, and what it cannot draw."""

    path: Path
    font: ImageFont.FreeTypeFont
    _notdef: bytes
    _glyphs: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, size: int) -> Font:
        try:
            font = ImageFont.truetype(str(path), size)
        except OSError as exc:
            raise ToolchainError(f"{path}: not a font Pillow can read ({exc})") from None
        return cls(path, font, bytes(font.getmask("\ue000")))  # a private-use code point

    def covers(self, text: str) -> bool:
        """Whether every character has a glyph (its mask differs from the missing glyph's)."""
        return all(self._has(ch) for ch in text)

    def _has(self, char: str) -> bool:
        known = self._glyphs.get(char)
        if known is None:
            known = self._glyphs[char] = (char.isspace()
                                          or bytes(self.font.getmask(char)) != self._notdef)
        return known


def _perspective(image: Image.Image, rng: np.random.Generator, strength: float,
                 fill: tuple[int, ...]) -> Image.Image:
    """Move each corner by up to ``strength`` of the height, inwards or outwards; uncovered
    pixels get ``fill``."""
    w, h = image.size
    shift = rng.uniform(-strength, strength, (4, 2)) * h
    source = np.array([[0, 0], [w, 0], [w, h], [0, h]], float) + shift
    target = np.array([[0, 0], [w, 0], [w, h], [0, h]], float)
    # The 8 coefficients of PIL's PERSPECTIVE transform, mapping output to input pixels.
    rows, rhs = [], []
    for (x, y), (u, v) in zip(target, source):
        rows += [[x, y, 1, 0, 0, 0, -u * x, -u * y], [0, 0, 0, x, y, 1, -v * x, -v * y]]
        rhs += [u, v]
    coefficients = np.linalg.solve(np.array(rows), np.array(rhs))
    return image.transform((w, h), Image.Transform.PERSPECTIVE, tuple(coefficients),
                           Image.Resampling.BILINEAR, fillcolor=fill)


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def text_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A background and a text colour (RGB, int64 0..255, shape (3,)) whose grey levels differ
    by at least ``MIN_CONTRAST``: the text is darker or lighter, whichever has room, and tinted
    at random around its grey level."""
    background = rng.integers(0, 256, 3)
    level = _luma(background)
    sides = [side for side in (-1, 1) if 0 <= level + side * MIN_CONTRAST <= 255]
    side = sides[int(rng.integers(len(sides)))]
    near, far = level + side * MIN_CONTRAST, (0.0 if side < 0 else 255.0)
    target = float(rng.uniform(min(near, far), max(near, far)))
    tint = rng.normal(0.0, 40.0, 3)
    foreground = np.clip(np.rint(target + tint - _luma(tint)), 0, 255).astype(np.int64)
    if abs(_luma(foreground) - level) < MIN_CONTRAST:  # the tint was clipped away: plain grey
        foreground = np.full(3, round(target), np.int64)
    return background, foreground


def render(text: str, font: Font, rng: np.random.Generator, augment: bool = True) -> bytes:
    """One rendered sample: encoded PNG or JPEG bytes of ``text`` drawn with ``font``."""
    background, foreground = text_colours(rng)
    box = font.font.getbbox(text)
    size = font.font.size
    pad = rng.integers(1, max(2, size // 3), 4) if augment else np.full(4, size // 8 + 1)
    width = box[2] - box[0] + pad[0] + pad[2]
    height = box[3] - box[1] + pad[1] + pad[3]
    fill = tuple(int(c) for c in background)
    image = Image.new("RGB", (int(width), int(height)), fill)
    ImageDraw.Draw(image).text((int(pad[0] - box[0]), int(pad[1] - box[1])), text,
                               font=font.font, fill=tuple(int(c) for c in foreground))
    if augment:
        image = _perspective(image, rng, 0.12, fill)
        if rng.random() < 0.7:
            image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.2, 1.4))))
        pixels = np.asarray(image, np.float32)
        pixels += rng.normal(0.0, rng.uniform(0, 10), pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        if rng.random() < 0.3:  # low resolution, as small scene words are
            scale = rng.uniform(0.4, 0.8)
            small = (max(1, int(image.width * scale)), max(1, int(image.height * scale)))
            image = image.resize(small, Image.Resampling.BILINEAR)
    out = io.BytesIO()
    if augment and rng.random() < 0.5:
        image.save(out, "JPEG", quality=int(rng.integers(30, 95)))
    else:
        image.save(out, "PNG")
    return out.getvalue()


def synthesise(output: Path, corpus: Sequence[str], fonts: Sequence[Path], samples: int,
               seed: int = 0, height: int = 32, augment: bool = True,
               progress: bool = True) -> dict[str, int]:
    """Write ``samples`` rendered entries of ``corpus`` to the lmdb folder ``output``.

    Args:
        output: a new folder (written aside and renamed: it appears whole or not at all).
        corpus: the texts to draw from (uniformly).
        fonts: font files, drawn uniformly per sample.
        samples: how many samples (>= 1).
        seed: the draw; sample ``i`` depends only on ``(seed, i)``.
        height: the font size in pixels (the crop is a little taller).
        augment: degrade the renderings (see the module docstring); off: clean text.

    Returns:
        ``{"samples", "skipped"}``: entries skipped because no font draws all their characters
        are not written (a draw picks another entry instead), and counted.

    Raises:
        ToolchainError: no entry of the corpus can be drawn with any font.
    """
    loaded = [Font.load(path, height) for path in fonts]
    drawable: dict[str, list[int]] = {}
    skipped = 0
    for text in dict.fromkeys(corpus):
        usable = [k for k, font in enumerate(loaded) if font.covers(text)]
        if usable:
            drawable[text] = usable
        else:
            skipped += 1
    if not drawable:
        raise ToolchainError(f"no corpus entry can be drawn with the {len(fonts)} fonts "
                             f"({fonts[0].name}, ...): {FONT_HINT}")
    if skipped:
        log.warning("%d of %d distinct corpus entries have characters no font draws; they are "
                    "skipped", skipped, skipped + len(drawable))
    texts = list(drawable)

    def entries():
        for index in tqdm(range(1, samples + 1), unit="img", desc="render",
                          disable=None if progress else True):
            rng = np.random.default_rng([seed, index])
            text = texts[int(rng.integers(len(texts)))]
            font = loaded[drawable[text][int(rng.integers(len(drawable[text])))]]
            yield render(text, font, rng, augment), text

    write_word_lmdb(output, entries(), max(1 << 26, samples * 64 * 1024),
                    (SYNTHETIC_KEY, b"train.synth"))
    return {"samples": samples, "skipped": skipped}


def _parser():
    parser = make_parser(__doc__)
    parser.add_argument("output", type=Path, help="the lmdb folder to write (must not exist)")
    parser.add_argument("--corpus", type=Path, action="append", required=True,
                        help="text file (one entry per line) or lmdb folder (its labels)")
    parser.add_argument("--font", type=Path, action="append", default=[],
                        help="font file (repeatable; default: the DejaVu fonts)")
    parser.add_argument("--samples", type=positive(int), default=10000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=positive(int), default=32, help="font size in pixels")
    parser.add_argument("--max-chars", type=positive(int),
                        help="drop corpus entries longer than this (lines of a long corpus)")
    parser.add_argument("--no-augment", action="store_true", help="clean renderings")
    return parser


def _run(args) -> int:
    if args.output.exists():
        raise ToolchainError(f"{args.output}: exists; train.synth writes a new folder only")
    check_output_file(args.output, "the output")  # its folder can be written (one line if not)
    corpus = [entry for path in args.corpus for entry in read_corpus(path)]
    if args.max_chars:
        corpus = [e for e in corpus if len(e) <= args.max_chars]
        if not corpus:
            raise ToolchainError(f"no corpus entry has at most {args.max_chars} characters")
    fonts = find_fonts(args.font)
    result = synthesise(args.output, corpus, fonts, args.samples, args.seed, args.height,
                        not args.no_augment)
    print(f"wrote {result['samples']} SYNTHETIC samples to {args.output} from "
          f"{len(set(corpus))} corpus entries and {len(fonts)} fonts (seed {args.seed}); "
          f"{result['skipped']} entries skipped (characters no font draws)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code."""
    return run_main(_parser(), _run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
