"""Omniglot reader and character split for few-shot experiments (no torchmeta).

Expected layout
---------------
``root`` must hold the two image sets of the Omniglot release, each either as
a folder or as the official zip file (the folder wins when both exist)::

    root/images_background/<alphabet>/<character>/<drawing>.png   (or root/images_background.zip)
    root/images_evaluation/<alphabet>/<character>/<drawing>.png   (or root/images_evaluation.zip)

Zips are read in place (members ``images_background/<alphabet>/...``; members
without the leading set folder are accepted too).  Nothing is ever downloaded.

Images
------
Drawings are decoded with PIL, converted to 8-bit grayscale and resized to
``image_size`` x ``image_size`` (28 by default) with ``PIL.Image.LANCZOS``
(``resample="box"`` selects ``PIL.Image.BOX``).  The raw files have black
strokes on a white background; by default (``invert=True``) the float images
are inverted, ``x = (255 - pixel) / 255``, so strokes are 1 and background is 0.
Tensors are float32 in [0, 1] with one channel: ``(n, 1, 28, 28)``.

The resized arrays are kept in memory as uint8 (about 25 MB for the full
dataset) and shared between loads of the same root; with ``cache_file=True``
they are also stored in ``root/omniglot_cache_<size>px_<resample>.npz`` and
reused as long as the list of source files (names and sizes) is unchanged.

Character order and split
-------------------------
Characters are ordered by the key ``(image set, alphabet name, character
folder name)`` where ``images_background`` comes before ``images_evaluation``
and names compare as plain strings (character folders are zero-padded,
``character01`` ... ``character55``).  With the full data this gives 964
background characters followed by 659 evaluation characters (1623 in all).
The split takes consecutive blocks of this order: the first 1028 characters
are ``train`` (all 964 background characters plus the first 64 evaluation
characters), the next 172 are ``val`` and the last 423 are ``test``, so val
and test consist only of evaluation-set characters.  These are the sizes of
the common Vinyals et al. split used by torchmeta; the membership follows
the deterministic order above, not torchmeta's own JSON lists.

Each character gives one class per rotation by a multiple of 90 degrees
(counter-clockwise, ``numpy.rot90``), so the default split has 4112 / 688 /
1692 classes and all rotations of a character stay in one split.  Class ``c``
of a split is the split's character ``c // 4`` rotated by ``c % 4`` quarter
turns.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from inf.fileio import atomic_write

__all__ = [
    "SET_NAMES",
    "SPLIT_NAMES",
    "DEFAULT_SPLIT_SIZES",
    "OmniglotError",
    "OmniglotNotFoundError",
    "OmniglotCorruptError",
    "OmniglotSplitError",
    "CharacterKey",
    "OmniglotImages",
    "OmniglotSplit",
    "load_omniglot",
    "proportional_split_sizes",
    "resolve_split_sizes",
    "split_characters",
    "omniglot_splits",
    "clear_memory_cache",
]

SET_NAMES = ("images_background", "images_evaluation")
SPLIT_NAMES = ("train", "val", "test")
#: Characters in (train, val, test) for the full 1623-character dataset.
DEFAULT_SPLIT_SIZES = (1028, 172, 423)

_RESAMPLE = {"lanczos": Image.LANCZOS, "box": Image.BOX}
_CACHE_VERSION = 1


class OmniglotError(Exception):
    """Base class of the errors raised by this module."""


class OmniglotNotFoundError(OmniglotError, FileNotFoundError):
    """The Omniglot files are missing or not in the expected layout."""


class OmniglotCorruptError(OmniglotError, ValueError):
    """A zip archive or PNG file could not be read."""


class OmniglotSplitError(OmniglotError, ValueError):
    """The requested split needs more characters than the data holds."""


@dataclass(frozen=True, order=True)
class CharacterKey:
    """Identity of one Omniglot character; the field order is the sort order."""

    set_index: int  # position of set_name in SET_NAMES (background first)
    set_name: str
    alphabet: str
    character: str

    def __str__(self) -> str:
        return f"{self.set_name}/{self.alphabet}/{self.character}"


_LAYOUT_HELP = (
    "Expected layout: {root}/images_background/<alphabet>/<character>/*.png and "
    "{root}/images_evaluation/<alphabet>/<character>/*.png, or the official zip files "
    "{root}/images_background.zip and {root}/images_evaluation.zip. Nothing is downloaded "
    "automatically: fetch the two zips of the Omniglot release by hand (they are in the "
    "python/ folder of the brendenlake/omniglot repository) and place them in that folder."
)


# --------------------------------------------------------------------------- sources


class _DirSource:
    """One image set stored as a folder tree."""

    def __init__(self, path: Path, set_name: str):
        self.path = path
        self.set_name = set_name
        self.location = str(path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def listing(self) -> tuple[dict[tuple[str, str], list[str]], list[str]]:
        """Map (alphabet, character) -> sorted drawing paths; plus fingerprint lines."""
        chars: dict[tuple[str, str], list[str]] = {}
        lines: list[str] = []
        self.empty_characters = []  # character folders without a single PNG
        for alpha in sorted(_visible_dirs(self.path)):
            for char in sorted(_visible_dirs(self.path / alpha)):
                folder = self.path / alpha / char
                pngs = sorted(
                    e.name
                    for e in os.scandir(folder)
                    if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(".png")
                )
                if not pngs:
                    self.empty_characters.append(str(folder))
                    continue
                chars[(alpha, char)] = [str(folder / f) for f in pngs]
                for f in pngs:
                    lines.append(f"{self.set_name}/{alpha}/{char}/{f}\t{(folder / f).stat().st_size}")
        return chars, lines

    def read(self, member: str) -> bytes:
        try:
            return Path(member).read_bytes()
        except OSError as e:
            raise OmniglotCorruptError(f"Could not read Omniglot image file {member}: {e}") from e


class _ZipSource:
    """One image set stored as a zip archive, read in place."""

    def __init__(self, path: Path, set_name: str):
        self.path = path
        self.set_name = set_name
        self.location = str(path)
        self._zf: zipfile.ZipFile | None = None

    def __enter__(self):
        try:
            self._zf = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise OmniglotCorruptError(f"{self.path} is not a readable zip archive: {e}") from e
        return self

    def __exit__(self, *exc):
        if self._zf is not None:
            self._zf.close()
            self._zf = None
        return False

    def listing(self):
        assert self._zf is not None
        chars: dict[tuple[str, str], list[str]] = {}
        lines: list[str] = []
        seen: dict[tuple[str, str], str] = {}  # every character folder, with or without PNGs
        for info in sorted(self._zf.infolist(), key=lambda i: i.filename):
            parts = [p for p in info.filename.split("/") if p]
            if not parts or parts[0] == "__MACOSX" or parts[-1].startswith("."):
                continue
            prefixed = parts[0] == self.set_name
            folder = parts[:3] if prefixed else parts[:2]
            if len(folder) == (3 if prefixed else 2) and (info.is_dir() or len(parts) > len(folder)):
                seen.setdefault(tuple(folder[-2:]), "/".join(folder))
            if info.is_dir():
                continue
            if not parts[-1].lower().endswith(".png"):
                continue
            if len(parts) == 4 and parts[0] == self.set_name:
                alpha, char = parts[1], parts[2]
            elif len(parts) == 3:
                alpha, char = parts[0], parts[1]
            else:
                continue
            chars.setdefault((alpha, char), []).append(info.filename)
            lines.append(f"{self.set_name}/{alpha}/{char}/{parts[-1]}\t{info.file_size}\t{info.CRC}")
        for members in chars.values():
            members.sort()
        self.empty_characters = [
            f"{self.path}:{name}/" for key, name in sorted(seen.items()) if key not in chars
        ]
        return chars, lines

    def read(self, member: str) -> bytes:
        assert self._zf is not None
        try:
            return self._zf.read(member)
        except Exception as e:  # BadZipFile (CRC), zlib.error, EOFError, ...
            raise OmniglotCorruptError(
                f"Could not read member {member!r} of zip archive {self.path}: {e}"
            ) from e


def _visible_dirs(path: Path) -> list[str]:
    return [e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith(".")]


def _find_sources(root: Path, sets: Sequence[str]):
    if not root.is_dir():
        raise OmniglotNotFoundError(
            f"Omniglot root folder {root} does not exist (or is not a folder). "
            + _LAYOUT_HELP.format(root=root)
        )
    sources = []
    for set_name in sets:
        folder, archive = root / set_name, root / f"{set_name}.zip"
        if folder.is_dir():
            sources.append(_DirSource(folder, set_name))
        elif archive.is_file():
            sources.append(_ZipSource(archive, set_name))
        else:
            raise OmniglotNotFoundError(
                f"Omniglot image set {set_name!r} not found: looked for the folder {folder} "
                f"and the zip file {archive}. " + _LAYOUT_HELP.format(root=root)
            )
    return sources


# --------------------------------------------------------------------------- decoding


def _decode(data: bytes, name: str, size: int, resample) -> np.ndarray:
    """PNG bytes -> uint8 array (size, size), raw gray levels (white background)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            gray = im.convert("L")
    except Exception as e:  # UnidentifiedImageError, truncated/broken PNG, ...
        raise OmniglotCorruptError(f"Could not decode Omniglot image {name}: {e}") from e
    if gray.size != (size, size):
        gray = gray.resize((size, size), resample=resample)
    return np.asarray(gray, dtype=np.uint8)


# --------------------------------------------------------------------------- dataset


class OmniglotImages:
    """All characters of an Omniglot root, resized, as one uint8 array in memory.

    Attributes:
        root: the data folder.
        characters: list of :class:`CharacterKey`, in the split order.
        images: uint8 array ``(total_drawings, S, S)`` of raw gray levels
            (255 = white background), read-only; character ``i`` owns rows
            ``offsets[i] : offsets[i] + counts[i]``.
        offsets, counts: int64 arrays ``(num_characters,)``.
        set_counts: number of characters found in each image set.
        invert: whether :meth:`to_float` maps strokes to 1 (background 0).
    """

    def __init__(
        self, root, characters, images, offsets, counts, set_counts, image_size, resample, invert, locations
    ):
        self.root = Path(root)
        self.characters: list[CharacterKey] = characters
        self.images: np.ndarray = images
        self.offsets: np.ndarray = offsets
        self.counts: np.ndarray = counts
        self.set_counts: dict[str, int] = set_counts
        self.image_size: int = image_size
        self.resample: str = resample
        self.invert: bool = invert
        self.locations: list[str] = locations

    def __len__(self) -> int:
        return len(self.characters)

    @property
    def num_characters(self) -> int:
        return len(self.characters)

    def describe_location(self) -> str:
        """Human-readable 'where': sources and how many characters each held."""
        parts = [
            f"{loc} ({self.set_counts[s]} characters)" for loc, s in zip(self.locations, self.set_counts)
        ]
        return ", ".join(parts)

    def to_float(self, raw: np.ndarray) -> torch.Tensor:
        """uint8 gray levels ``(..., S, S)`` -> float32 tensor ``(..., 1, S, S)`` in [0, 1]."""
        raw = np.asarray(raw, dtype=np.uint8)
        x = (255 - raw if self.invert else raw).astype(np.float32)  # numpy: no thread overhead
        x /= np.float32(255.0)
        return torch.from_numpy(x).unsqueeze(-3)

    def character_images(self, index: int) -> torch.Tensor:
        """All drawings of character ``index`` as a float tensor ``(count, 1, S, S)``."""
        o, n = int(self.offsets[index]), int(self.counts[index])
        return self.to_float(self.images[o : o + n])

    def __repr__(self) -> str:
        return (
            f"OmniglotImages(root={str(self.root)!r}, characters={len(self)}, "
            f"drawings={len(self.images)}, size={self.image_size}, invert={self.invert})"
        )


# Loaded arrays shared between load_omniglot calls: key -> (fingerprint, payload).
_MEMORY_CACHE: dict[tuple, tuple[str, dict]] = {}


def clear_memory_cache() -> None:
    """Forget all images kept in memory by :func:`load_omniglot`."""
    _MEMORY_CACHE.clear()


def _default_cache_path(root: Path, image_size: int, resample: str) -> Path:
    return root / f"omniglot_cache_{image_size}px_{resample}.npz"


def _read_cache_file(path: Path, fingerprint: str, image_size: int, resample: str):
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if (
                int(z["version"]) != _CACHE_VERSION
                or str(z["fingerprint"]) != fingerprint
                or int(z["image_size"]) != image_size
                or str(z["resample"]) != resample
            ):
                return None
            return {
                "keys": [tuple(row) for row in z["keys"].tolist()],
                "images": z["images"],
                "counts": z["counts"].astype(np.int64),
            }
    except Exception as e:
        warnings.warn(f"Ignoring unreadable Omniglot cache file {path} ({e}); rebuilding it.")
        return None


def _write_cache_file(path: Path, payload: dict, fingerprint: str, image_size: int, resample: str):
    arrays = dict(
        version=np.int64(_CACHE_VERSION),
        fingerprint=np.str_(fingerprint),
        image_size=np.int64(image_size),
        resample=np.str_(resample),
        keys=np.array(payload["keys"], dtype=np.str_).reshape(-1, 3),
        images=payload["images"],
        counts=payload["counts"],
    )
    try:
        atomic_write(path, lambda fh: np.savez(fh, **arrays))
    except OSError as e:
        warnings.warn(f"Could not write Omniglot cache file {path}: {e}")


def load_omniglot(
    root,
    image_size: int = 28,
    resample: str = "lanczos",
    invert: bool = True,
    sets: Sequence[str] = SET_NAMES,
    cache_file: bool | str | os.PathLike = False,
    memory_cache: bool = True,
) -> OmniglotImages:
    """Read every drawing under ``root`` (folders or zips), resized to ``image_size``.

    Args:
        root: folder holding ``images_background`` / ``images_evaluation``
            (folders or ``.zip`` files), see the module docstring.
        image_size: side of the square output images.
        resample: ``"lanczos"`` (default) or ``"box"`` PIL filter for resizing.
        invert: map strokes to 1 and background to 0 (default) instead of the
            raw black-on-white.
        sets: which image sets to read, in order (both by default).
        cache_file: ``True`` to keep the resized arrays in
            ``root/omniglot_cache_<size>px_<resample>.npz``, or a path for that
            file; ``False`` (default) for no file.
        memory_cache: reuse arrays already read by this process for the same
            root, size, filter and unchanged file list.

    Raises:
        OmniglotNotFoundError: root or one of the sets is missing, or a set
            holds no ``<alphabet>/<character>/*.png`` files.
        OmniglotCorruptError: a zip archive or PNG file cannot be read, or a
            character folder holds no PNG (it would drop the character and change
            the standard split); the message names the file or folder.
    """
    if resample not in _RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    root = Path(root).expanduser()
    sources = _find_sources(root, sets)
    for s in sources:  # open every source first, so a broken zip fails early
        s.__enter__()
    try:
        listings = []
        for s in sources:
            chars, lines = s.listing()
            if not chars:
                raise OmniglotNotFoundError(
                    f"No drawings found in {s.location}: expected PNG files at "
                    f"<alphabet>/<character>/*.png inside it. " + _LAYOUT_HELP.format(root=root)
                )
            if s.empty_characters:
                # refusing, rather than dropping the character, keeps the character order and
                # the standard (1028, 172, 423) split of --split-sizes auto from changing silently
                raise OmniglotCorruptError(
                    f"Omniglot character folder {s.empty_characters[0]} holds no PNG drawings"
                    + (f" ({len(s.empty_characters)} such folders)" if len(s.empty_characters) > 1 else "")
                    + ": the data looks incompletely extracted. Re-extract the official zips, or "
                    "delete the empty folders to use the remaining characters (the split then "
                    "differs from the standard one)."
                )
            listings.append((s, chars, lines))
        digest = hashlib.sha1()
        for _, _, lines in listings:
            digest.update("\n".join(lines).encode())
            digest.update(b"\n--\n")
        fingerprint = digest.hexdigest()

        mem_key = (str(root.resolve()), tuple(sets), image_size, resample)
        payload = None
        if memory_cache and mem_key in _MEMORY_CACHE and _MEMORY_CACHE[mem_key][0] == fingerprint:
            payload = _MEMORY_CACHE[mem_key][1]
        cache_path = None
        if cache_file:
            cache_path = (
                _default_cache_path(root, image_size, resample) if cache_file is True else Path(cache_file)
            )
            if payload is None:
                payload = _read_cache_file(cache_path, fingerprint, image_size, resample)
            elif not cache_path.is_file():  # found in memory, but the file was asked for too
                _write_cache_file(cache_path, payload, fingerprint, image_size, resample)
        if payload is None:
            payload = _decode_all(listings, image_size, _RESAMPLE[resample])
            if cache_path is not None:
                _write_cache_file(cache_path, payload, fingerprint, image_size, resample)
        payload["images"].setflags(write=False)
        if memory_cache:
            _MEMORY_CACHE[mem_key] = (fingerprint, payload)
    finally:
        for s in sources:
            s.__exit__(None, None, None)

    set_index = {name: i for i, name in enumerate(sets)}
    characters = [CharacterKey(set_index[k[0]], k[0], k[1], k[2]) for k in payload["keys"]]
    counts = payload["counts"]
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    set_counts = {name: sum(1 for c in characters if c.set_name == name) for name in sets}
    return OmniglotImages(
        root,
        characters,
        payload["images"],
        offsets,
        counts,
        set_counts,
        image_size,
        resample,
        invert,
        [s.location for s in sources],
    )


def _decode_all(listings, image_size: int, resample) -> dict:
    keys, counts, arrays = [], [], []
    for source, chars, _ in listings:  # sources are already in set order
        for alpha, char in sorted(chars):
            members = chars[(alpha, char)]
            keys.append((source.set_name, alpha, char))
            counts.append(len(members))
            for m in members:
                name = m if isinstance(source, _DirSource) else f"{source.location}:{m}"
                arrays.append(_decode(source.read(m), name, image_size, resample))
    return {
        "keys": keys,
        "images": np.stack(arrays).astype(np.uint8, copy=False),
        "counts": np.asarray(counts, dtype=np.int64),
    }


# --------------------------------------------------------------------------- split


def proportional_split_sizes(
    n_characters: int, reference: Sequence[int] = DEFAULT_SPLIT_SIZES
) -> tuple[int, int, int]:
    """Scale ``reference`` (train, val, test) sizes to ``n_characters`` in total.

    Uses largest-remainder rounding so the sizes sum to ``n_characters``, and
    gives every split at least one character when ``n_characters >= 3``.
    """
    if n_characters < len(reference):
        raise ValueError(
            f"need at least {len(reference)} characters for a proportional split, got {n_characters}"
        )
    total = sum(reference)
    exact = [n_characters * r / total for r in reference]
    sizes = [int(np.floor(e)) for e in exact]
    order = sorted(range(len(reference)), key=lambda i: exact[i] - sizes[i], reverse=True)
    for i in order[: n_characters - sum(sizes)]:
        sizes[i] += 1
    for i in range(len(sizes)):  # no empty split: borrow from the largest
        if sizes[i] == 0:
            j = int(np.argmax(sizes))
            sizes[j] -= 1
            sizes[i] += 1
    return tuple(sizes)  # type: ignore[return-value]


def resolve_split_sizes(n_characters: int, split_sizes, where: str = "") -> tuple[int, int, int]:
    """Turn ``split_sizes`` (3 counts, or ``"proportional"``) into checked counts.

    Raises :class:`OmniglotSplitError` (a ValueError) when the counts ask
    for more characters than were found; ``where`` is appended to the
    message to say where the data was read.
    """
    if isinstance(split_sizes, str):
        if split_sizes != "proportional":
            raise ValueError(f"split_sizes must be three counts or 'proportional', got {split_sizes!r}")
        return proportional_split_sizes(n_characters)
    sizes = tuple(int(s) for s in split_sizes)
    if len(sizes) != 3 or min(sizes) < 0:
        raise ValueError(
            f"split_sizes must be three non-negative counts (train, val, test), got {split_sizes!r}"
        )
    if sum(sizes) > n_characters:
        raise OmniglotSplitError(
            f"The Omniglot split asks for {sum(sizes)} characters ({sizes[0]} train + {sizes[1]} val + "
            f"{sizes[2]} test) but only {n_characters} characters were found"
            + (f" in {where}" if where else "")
            + ". Pass split_sizes='proportional' or explicit counts that fit."
        )
    return sizes  # type: ignore[return-value]


def split_characters(n_characters: int, split_sizes=DEFAULT_SPLIT_SIZES, where: str = "") -> dict[str, range]:
    """Indices (into the sorted character list) of each split: consecutive blocks.

    ``train`` is the first block, ``val`` the next and ``test`` the one after;
    characters beyond ``sum(split_sizes)`` are left unused.
    """
    sizes = resolve_split_sizes(n_characters, split_sizes, where)
    out, start = {}, 0
    for name, n in zip(SPLIT_NAMES, sizes):
        out[name] = range(start, start + n)
        start += n
    return out


class OmniglotSplit:
    """The classes of one split: its characters times the allowed rotations.

    Class ``c`` is split character ``c // R`` rotated counter-clockwise by
    ``rotations[c % R]`` quarter turns, where ``R = len(rotations)``.
    """

    def __init__(
        self,
        data: OmniglotImages,
        split: str = "train",
        split_sizes=DEFAULT_SPLIT_SIZES,
        rotations: Sequence[int] = (0, 1, 2, 3),
    ):
        if split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
        rotations = tuple(int(r) % 4 for r in rotations)
        if not rotations or len(set(rotations)) != len(rotations):
            raise ValueError(f"rotations must be distinct quarter-turn counts, got {rotations!r}")
        self.data = data
        self.name = split
        idx = split_characters(len(data), split_sizes, data.describe_location())[split]
        if len(idx) == 0:
            raise ValueError(f"the {split!r} split is empty (split_sizes={split_sizes!r})")
        self.char_indices = np.arange(idx.start, idx.stop, dtype=np.int64)
        self.rotations = rotations
        self._rot_array = np.asarray(rotations, dtype=np.int64)
        self.class_counts = np.repeat(data.counts[self.char_indices], len(rotations))

    @property
    def num_characters(self) -> int:
        return len(self.char_indices)

    @property
    def num_classes(self) -> int:
        return len(self.char_indices) * len(self.rotations)

    @property
    def characters(self) -> list[CharacterKey]:
        return [self.data.characters[i] for i in self.char_indices]

    def class_character(self, classes) -> np.ndarray:
        """Global character index (into ``data.characters``) of each class."""
        return self.char_indices[np.asarray(classes) // len(self.rotations)]

    def class_rotation(self, classes) -> np.ndarray:
        """Quarter turns (counter-clockwise) applied to each class."""
        return self._rot_array[np.asarray(classes) % len(self.rotations)]

    def gather(self, classes, drawings) -> np.ndarray:
        """Raw uint8 images: ``classes`` of shape ``X``, ``drawings`` of shape ``X + (M,)``.

        Returns ``X + (M, S, S)``; ``drawings[..., m]`` indexes the drawings of
        the class's character (``0 <= d < class_counts[c]``).
        """
        classes = np.asarray(classes, dtype=np.int64)
        drawings = np.asarray(drawings, dtype=np.int64)
        chars = self.class_character(classes)
        rows = self.data.offsets[chars][..., None] + drawings
        x = self.data.images[rows]
        rots = self.class_rotation(classes)
        for k in np.unique(rots):
            if k:
                mask = rots == k
                x[mask] = np.rot90(x[mask], int(k), axes=(-2, -1))
        return x

    def class_images(self, c: int) -> torch.Tensor:
        """All drawings of class ``c`` as a float tensor ``(count, 1, S, S)``."""
        n = int(self.class_counts[c])
        return self.data.to_float(self.gather(np.int64(c), np.arange(n)))

    def __repr__(self) -> str:
        return f"OmniglotSplit({self.name!r}, characters={self.num_characters}, classes={self.num_classes})"


def omniglot_splits(
    root, split_sizes=DEFAULT_SPLIT_SIZES, rotations: Sequence[int] = (0, 1, 2, 3), **load_kwargs
) -> dict[str, OmniglotSplit]:
    """Load ``root`` once and return ``{"train": ..., "val": ..., "test": ...}``.

    ``load_kwargs`` go to :func:`load_omniglot`.  A split given zero
    characters in ``split_sizes`` is left out of the dict.
    """
    data = load_omniglot(root, **load_kwargs)
    blocks = split_characters(len(data), split_sizes, data.describe_location())
    return {
        name: OmniglotSplit(data, name, split_sizes, rotations)
        for name in SPLIT_NAMES
        if len(blocks[name]) > 0
    }
