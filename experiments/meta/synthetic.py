"""Tiny synthetic Omniglot-like datasets for tests.

:func:`write_synthetic_omniglot` writes PNG files in exactly the layout of the
real Omniglot release (``images_background`` / ``images_evaluation``, each
``alphabet/character/NNNN_DD.png``), either as plain folders or as the two zip
files ``images_background.zip`` / ``images_evaluation.zip``.  Like the real
data, images are 1-bit PNGs with black strokes on a white background.

Every character gets its own random "prototype" made of a few poly-line
strokes; each drawing of that character is the prototype with its vertices
jittered, so the classes are genuinely distinguishable (a small meta-learner
can make progress on them) and rotated copies of a character differ from it.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SET_NAMES", "write_synthetic_omniglot", "synthetic_num_characters"]

#: The two image sets of the Omniglot release, in the order used everywhere.
SET_NAMES = ("images_background", "images_evaluation")

_SET_TAGS = {"images_background": "bg", "images_evaluation": "ev"}


def synthetic_num_characters(n_alphabets: int, n_chars_per_alphabet: int) -> int:
    """Total number of characters that :func:`write_synthetic_omniglot` writes."""
    return len(SET_NAMES) * n_alphabets * n_chars_per_alphabet


def _prototype(rng: np.random.Generator) -> list[np.ndarray]:
    """Random strokes of one character, vertex coordinates in [0, 1]."""
    n_strokes = int(rng.integers(2, 5))
    strokes = []
    for _ in range(n_strokes):
        n_points = int(rng.integers(2, 5))
        strokes.append(rng.uniform(0.15, 0.85, size=(n_points, 2)))
    return strokes


def _render(strokes: list[np.ndarray], size: int, rng: np.random.Generator) -> Image.Image:
    """Draw one jittered instance of a character as a 1-bit image."""
    img = Image.new("L", (size, size), color=255)
    draw = ImageDraw.Draw(img)
    width = max(1, int(round(size / 35)))
    for stroke in strokes:
        pts = stroke + rng.normal(0.0, 0.03, size=stroke.shape)
        pts = np.clip(pts, 0.02, 0.98) * (size - 1)
        draw.line([tuple(p) for p in pts.tolist()], fill=0, width=width)
    return img.convert("1")


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_synthetic_omniglot(
    root,
    n_alphabets: int,
    n_chars_per_alphabet: int,
    n_drawings: int,
    size: int = 105,
    as_zip: bool = False,
    seed: int = 0,
) -> Path:
    """Write a small Omniglot-layout dataset under ``root`` and return ``root``.

    Each of the two sets (``images_background`` and ``images_evaluation``)
    gets ``n_alphabets`` alphabets of ``n_chars_per_alphabet`` characters with
    ``n_drawings`` PNG drawings each, so the dataset holds
    ``2 * n_alphabets * n_chars_per_alphabet`` characters in total (see
    :func:`synthetic_num_characters`).  Alphabet names differ between the two
    sets (``Synthetic_bg_00``, ``Synthetic_ev_00``, ...), characters are named
    ``character01``, ``character02``, ... and files ``NNNN_DD.png`` where
    ``NNNN`` numbers characters within the set and ``DD`` numbers drawings,
    following the naming of the real release.

    With ``as_zip=False`` the sets are folders ``root/images_background/...``;
    with ``as_zip=True`` only the zip files ``root/images_background.zip`` and
    ``root/images_evaluation.zip`` are written, whose members carry the set
    name as top-level folder, as in the official zips.  The output depends only
    on the arguments (``seed`` drives all randomness).
    """
    if min(n_alphabets, n_chars_per_alphabet, n_drawings, size) < 1:
        raise ValueError("n_alphabets, n_chars_per_alphabet, n_drawings and size must all be >= 1")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for set_name in SET_NAMES:
        files: list[tuple[str, bytes]] = []
        char_id = 0
        for a in range(n_alphabets):
            alphabet = f"Synthetic_{_SET_TAGS[set_name]}_{a:02d}"
            for c in range(n_chars_per_alphabet):
                char_id += 1
                strokes = _prototype(rng)
                for d in range(n_drawings):
                    rel = f"{set_name}/{alphabet}/character{c + 1:02d}/{char_id:04d}_{d + 1:02d}.png"
                    files.append((rel, _png_bytes(_render(strokes, size, rng))))
        if as_zip:
            with zipfile.ZipFile(root / f"{set_name}.zip", "w", compression=zipfile.ZIP_STORED) as zf:
                for rel, data in files:
                    zf.writestr(rel, data)
        else:
            for rel, data in files:
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
    return root
