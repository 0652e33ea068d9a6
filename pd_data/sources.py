"""Sources: one interface over the shapes users' data come in.

A source lists cheap `Item`s up front, in a deterministic order (so shard s always holds the same
items and a rerun can skip finished shards without reading them), and `load`s one item on demand.
`load` may raise: ingestion turns any exception into a reject and carries on. What a source's own
listing files hold and cannot be used (a bad captions line, a file listed but absent) is listed as
an item too, whose `load` raises that `Reject`: it lands in its shard's rejects like any record.
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import numpy as np
import pyarrow.parquet as pq

from pd_data import procedural
from pd_data.config import DataConfig, check_parquet_views
from pd_data.normalize import Reject, decode_utf8
from pd_data.shards import image_bytes

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


@dataclass(frozen=True)
class Item:
    image_id: str
    group_id: str
    ref: tuple  # where to find it: a path, (file, row, column), (group, layout, k), ...
    # Images of one layout are edited twins of one picture (an InstructPix2Pix seed's pair); "" is the image alone.
    layout_id: str = ""

    @property
    def layout(self) -> str:
        return self.layout_id or self.image_id


@dataclass
class RawRecord:
    image: bytes | np.ndarray
    caption: str | bytes | None
    provenance: dict[str, Any] = field(default_factory=dict)


class Source(Protocol):
    name: str

    def items(self) -> list[Item]: ...

    def load(self, item: Item) -> RawRecord: ...

    def fingerprint(self) -> str: ...


def _listing_hash(paths: list[Path]) -> str:
    """Changes when a file is added, removed, resized or rewritten: part of the ingest stage's key."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


class ProceduralSource:
    """Seeded scenes in groups of layouts and their edited twins; the scene goes into the provenance
    for exact maps."""

    name = "procedural"

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self._group_cache: tuple[int, list] | None = None

    def items(self) -> list[Item]:
        c = self.cfg
        return [Item(f"g{g:06d}-{l}-{k}", f"g{g:06d}", (g, l, k), f"g{g:06d}-{l}")
                for g in range(c.n_groups) for l in range(c.layouts_per_group) for k in range(c.images_per_layout)]

    def load(self, item: Item) -> RawRecord:
        g, l, k = item.ref
        seed = self.cfg.seed * 1_000_003 + g
        if self._group_cache is None or self._group_cache[0] != g:
            self._group_cache = (g, procedural.make_group(seed, self.cfg.layouts_per_group, self.cfg.images_per_layout))
        scene, text = self._group_cache[1][l][k]
        img = procedural.render(scene, self.cfg.resolution, texture_seed=seed)["image"]
        return RawRecord(img, text, {"scene": scene, "texture_seed": seed})

    def fingerprint(self) -> str:
        return "procedural"  # fully determined by the data config


FILE_COLUMNS = ("file", "image", "file_name")
Problem = tuple[str, str]  # (reason, detail) of a captions-file line that cannot be used


def _lines(path: Path) -> list[tuple[str, bool]]:
    """The file's lines (ends kept, a UTF-8 BOM dropped) and whether each had to be repaired to decode."""
    return [decode_utf8(raw) for raw in path.read_bytes().removeprefix(codecs.BOM_UTF8).splitlines(keepends=True)]


def _jsonl_rows(lines: list[tuple[str, bool]]) -> Iterator[tuple[int, dict | str, bool]]:
    for n, (text, repaired) in enumerate(lines, 1):
        if text.strip():
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                yield n, f"not valid JSON ({e.msg} at column {e.colno})", repaired
                continue
            yield n, row if isinstance(row, dict) else f"a JSON {type(row).__name__}, not an object", repaired


def _csv_rows(lines: list[tuple[str, bool]], path: Path) -> Iterator[tuple[int, dict | str, bool]]:
    reader = csv.DictReader(text for text, _ in lines)
    if not set(FILE_COLUMNS) & set(reader.fieldnames or ()):
        raise ValueError(f"data.captions_file {path} has no file column ({', '.join(FILE_COLUMNS)}); its header "
                         f"is {reader.fieldnames}")
    end = reader.line_num
    for row in reader:  # a row's number is its last line (a quoted caption may span several)
        start, end = end + 1, reader.line_num
        yield end, row, any(rep for _, rep in lines[start - 1:end])


def _read_side_captions(path: Path) -> tuple[dict[str, dict], dict[int, Problem]]:
    """JSONL or CSV with a file column (`file`, `image` or `file_name`) and `caption`/`text`, optional
    `group` and `layout`: ({file: row with its line number and `repaired`}, {line number: problem}).

    The first row of a file wins; a later one is a `duplicate-id` problem, a line that is not a JSON
    object or names no file a `bad-caption-line` one. A line that is not UTF-8 is decoded with U+FFFD
    replacements and its row marked repaired.
    """
    if path.suffix not in (".jsonl", ".csv"):
        raise ValueError(f"data.captions_file {path} must be .jsonl or .csv")
    if not path.is_file():
        raise FileNotFoundError(f"data.captions_file {path} does not exist; point it at your JSONL or CSV captions, "
                                "or unset it to read the .txt beside each image")
    rows, problems = {}, {}
    lines = _lines(path)
    for n, r, repaired in _jsonl_rows(lines) if path.suffix == ".jsonl" else _csv_rows(lines, path):
        if isinstance(r, str):
            problems[n] = ("bad-caption-line", f"{path}:{n}: {r}")
            continue
        key = str(next((r[c] for c in FILE_COLUMNS if r.get(c)), ""))
        if not key:
            problems[n] = ("bad-caption-line", f"{path}:{n}: names no file (no {', '.join(FILE_COLUMNS)} value)")
        elif key in rows:
            problems[n] = ("duplicate-id", f"{path}:{n}: a second caption row for {key!r}; the first (line "
                                           f"{rows[key]['line']}) wins")
        else:
            rows[key] = {"caption": r.get("caption", r.get("text")), "group": r.get("group"), "layout": r.get("layout"),
                         "line": n, "repaired": repaired}
    return rows, problems


class FolderSource:
    """Images under a folder; captions from a JSONL/CSV side file or a `.txt` beside each image.

    Groups: the side file's `group` column if given, else the image's sub-folder (images directly
    in the root form one group each). Layouts: the side file's `layout` column (edited twins of one
    picture share one), else each image is its own. Prompts pair images of one group (`data.pairing`).
    A side-file row names an image by its path under the root or by its file name.
    """

    name = "folder"

    def __init__(self, root: str | Path, captions_file: str | Path | None = None):
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"folder source {self.root} does not exist; set data.source_path to your image folder")
        self.captions_file = Path(captions_file).expanduser() if captions_file else None
        self._side, self._problems = _read_side_captions(self.captions_file) if self.captions_file else ({}, {})

    def _files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)

    def _side_of(self, rel: str) -> dict | None:
        return self._side.get(rel) or self._side.get(PurePosixPath(rel).name)

    def _item(self, rel: str) -> Item:
        side, parent = self._side_of(rel) or {}, PurePosixPath(rel).parent.as_posix()
        return Item(rel, str(side.get("group") or (rel if parent == "." else parent)), (rel,), str(side.get("layout") or ""))

    def items(self) -> list[Item]:
        """The images on disk, then, in line order, the side file's rows that cannot be used: a file that
        is not on disk (its `load` rejects `missing-file`) and each line with a problem."""
        rels = [p.relative_to(self.root).as_posix() for p in self._files()]
        found = set(rels) | {PurePosixPath(r).name for r in rels}
        cf = self.captions_file
        tail = [(row["line"], self._item(key)) for key, row in self._side.items() if key not in found]
        tail += [(n, Item(f"{cf.name}:{n}", cf.name, (str(cf), n))) for n in self._problems]
        return [self._item(r) for r in rels] + [it for _, it in sorted(tail, key=lambda t: t[0])]

    def load(self, item: Item) -> RawRecord:
        if len(item.ref) == 2:  # a side-file line with a problem
            raise Reject(*self._problems[item.ref[1]])
        path, side = self.root / item.ref[0], self._side_of(item.ref[0])
        if not path.is_file():
            listed = f" (listed at {self.captions_file}:{side['line']})" if side else ""
            raise Reject("missing-file", f"{path} is not on disk{listed}")
        if side is not None:
            caption, repaired = side.get("caption"), side["repaired"]
        else:
            txt = path.with_suffix(".txt")
            caption, repaired = txt.read_bytes() if txt.exists() else None, False  # bytes: marked when decoded
        return RawRecord(path.read_bytes(), caption, {"path": str(path), **({"caption_repaired": True} if repaired else {})})

    def fingerprint(self) -> str:
        files = self._files() + ([self.captions_file] if self.captions_file else [])
        return _listing_hash(files)


def _read_prompt(path: Path) -> tuple[dict, bool]:
    """An InstructPix2Pix prompt.json and whether it had to be repaired to decode; rejects when it is missing
    or not a JSON object (every image of its folder then carries that reason)."""
    if not path.is_file():
        raise Reject("missing-prompt-json", f"{path} not found; every prompt folder in seeds.json needs one")
    text, repaired = decode_utf8(path.read_bytes())
    try:
        prompt = json.loads(text)
    except json.JSONDecodeError as e:
        raise Reject("bad-prompt-json", f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(prompt, dict):
        raise Reject("bad-prompt-json", f"{path}: a JSON {type(prompt).__name__}, not an object with input/output/edit")
    return prompt, repaired


class InstructPix2PixSource:
    """The original layout: `seeds.json` = [[prompt_dir, [seed, ...]], ...]; both images of every seed.
    A prompt folder is a group and a seed a layout (its `_0` / `_1` images are edited twins)."""

    name = "instructpix2pix"

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        seeds = self.root / "seeds.json"
        if not seeds.is_file():
            raise FileNotFoundError(f"{seeds} not found; data.source_path must be the InstructPix2Pix folder holding seeds.json")
        self.seeds = json.loads(seeds.read_text())
        self._prompt: tuple[str, tuple[dict, bool]] | None = None  # the last folder's: items come folder by folder

    def items(self) -> list[Item]:
        return [Item(f"{d}/{s}_{k}", str(d), (str(d), int(s), k), f"{d}/{s}")
                for d, seeds in self.seeds for s in seeds for k in (0, 1)]

    def load(self, item: Item) -> RawRecord:
        d, seed, k = item.ref
        if self._prompt is None or self._prompt[0] != d:  # a reject is not kept: each image re-reads and rejects
            self._prompt = (d, _read_prompt(self.root / d / "prompt.json"))
        prompt, repaired = self._prompt[1]
        path = self.root / d / f"{seed}_{k}.jpg"
        if not path.is_file():
            raise Reject("missing-file", f"{path} (listed in {self.root / 'seeds.json'}) is not on disk")
        caption = prompt.get("input") if k == 0 else prompt.get("output")
        prov = {"path": str(path), "edit": prompt.get("edit"), **({"caption_repaired": True} if repaired else {})}
        return RawRecord(path.read_bytes(), caption, prov)

    def fingerprint(self) -> str:
        return _listing_hash([self.root / "seeds.json", *sorted(self.root.glob("*/prompt.json"))])


PARQUET_PRESETS: dict[str, list[dict[str, str]]] = {
    # The Hugging Face export of InstructPix2Pix: each row is a before/after pair, one group.
    "instructpix2pix-hf": [{"image": "original_image", "caption": "original_prompt"},
                           {"image": "edited_image", "caption": "edited_prompt"}],
}


class ParquetSource:
    """Parquet files with image bytes and captions, columns mapped by name.

    `columns` is a list of {"image": col, "caption": col} views of a row: each view becomes one
    image, and the images of one row form a layout (a before/after pair are twins). Groups: with a
    "group": col in the views, the rows sharing that column's value (across files too); else, or
    where the value is null, each row alone. Image cells may be raw bytes or Hugging Face's
    {"bytes": ..., "path": ...} struct.
    """

    name = "parquet"

    def __init__(self, path: str | Path, columns: list[dict[str, str]] | None = None, preset: str | None = None):
        p = Path(path).expanduser()
        self.files = sorted(p.glob("*.parquet")) if p.is_dir() else [p]
        if not self.files or not all(f.is_file() for f in self.files):
            raise FileNotFoundError(f"no Parquet files at {p}; set data.source_path to a .parquet file or a folder of them")
        if preset:
            if preset not in PARQUET_PRESETS:
                raise ValueError(f"unknown parquet preset {preset!r}; known: {sorted(PARQUET_PRESETS)}")
            if columns:
                raise ValueError(f"data.parquet_columns={columns} cannot apply with data.parquet_preset={preset!r}, "
                                 f"which maps the columns itself; set one of them")
            columns = PARQUET_PRESETS[preset]
        self.views = columns or [{"image": "image", "caption": "caption"}]
        check_parquet_views(self.views)
        self.group_column = self.views[0].get("group")
        self._cache: tuple[tuple[str, int], Any] | None = None

    def items(self) -> list[Item]:
        items = []
        for f in self.files:
            try:
                md = pq.ParquetFile(f).metadata
            except Exception:  # noqa: BLE001 - an unreadable file becomes one reject, not a crash
                items.append(Item(f"{f.stem}/unreadable", f.stem, (str(f), -1, -1, -1, -1)))
                continue
            groups = self._groups(f)
            row = 0  # the file's row names the item; the ref also holds the row within its row group
            for rg in range(md.num_row_groups):
                for local in range(md.row_group(rg).num_rows):
                    group = f"{f.stem}/{row}" if groups is None or groups[row] is None else str(groups[row])
                    for v in range(len(self.views)):
                        items.append(Item(f"{f.stem}/{row}/{v}", group, (str(f), rg, local, row, v), f"{f.stem}/{row}"))
                    row += 1
        return items

    def _groups(self, f: Path) -> list | None:
        """The group column of file `f`, one value per row (read up front: groups are part of the listing)."""
        if self.group_column is None:
            return None
        names = pq.ParquetFile(f).schema_arrow.names
        if self.group_column not in names:
            raise ValueError(f"group column {self.group_column!r} (data.parquet_columns) is not in {f}, whose columns are "
                             f"{names}; map an existing column or drop the group key")
        return pq.read_table(f, columns=[self.group_column]).column(0).to_pylist()

    def _row_group(self, f: str, rg: int):
        if self._cache is None or self._cache[0] != (f, rg):
            self._cache = ((f, rg), pq.ParquetFile(f).read_row_group(rg))
        return self._cache[1]

    def load(self, item: Item) -> RawRecord:
        f, rg, local, row, v = item.ref
        if rg < 0:
            raise ValueError(f"{f} is not a readable Parquet file")
        table = self._row_group(f, rg)
        view = self.views[v]
        missing = [view[k] for k in ("image", "caption") if view[k] not in table.column_names]
        if missing:
            raise ValueError(f"column(s) {missing} not in {f}; map them with data.parquet_columns")
        image = image_bytes(table.column(view["image"])[local].as_py())
        caption = table.column(view["caption"])[local].as_py()
        return RawRecord(image or b"", caption, {"path": f, "row": row, "column": view["image"]})

    def fingerprint(self) -> str:
        return _listing_hash(self.files) + json.dumps(self.views, sort_keys=True)


def make_source(cfg: DataConfig) -> Source:
    if cfg.source == "procedural":
        return ProceduralSource(cfg)
    if not cfg.source_path:
        raise ValueError(f"data.source={cfg.source!r} needs data.source_path")
    if cfg.source == "folder":
        return FolderSource(cfg.source_path, cfg.captions_file)
    if cfg.source == "instructpix2pix":
        return InstructPix2PixSource(cfg.source_path)
    return ParquetSource(cfg.source_path, cfg.parquet_columns, cfg.parquet_preset)
