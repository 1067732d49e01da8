"""Finding, locking and removing entries under a cache root."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import FeatcacheError
from .durable import exclusive_lock, make_dir
from .format import ENTRY_MARKER, LOCKS_DIR, MANIFEST, looks_like_key
from .reader import FeatureCache


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$FEATCACHE_DIR``, else ``~/.cache/featcache``; refuses a non-directory."""
    if cache_dir:
        root, origin = Path(cache_dir).expanduser(), "--cache-dir"
    elif os.environ.get("FEATCACHE_DIR"):
        root, origin = Path(os.environ["FEATCACHE_DIR"]).expanduser(), "$FEATCACHE_DIR"
    else:
        root, origin = Path.home() / ".cache" / "featcache", "the default cache root"
    if root.exists() and not root.is_dir():
        raise FeatcacheError(f"{origin} {root} is not a directory")
    return root


@contextlib.contextmanager
def entry_lock(root: Path, key: str) -> Iterator[None]:
    """Exclusive lock on one key: a second writer of the same key waits here, then reuses."""
    lock_dir = Path(root) / LOCKS_DIR
    make_dir(lock_dir)
    with exclusive_lock(lock_dir / f"{key}.lock"):
        yield


KEY_PREFIX_MIN = 4


def is_entry_dir(path: Path) -> bool:
    """A directory this project wrote as an entry: it holds the entry marker, or a manifest that
    names it (``key`` equal to the folder name), or any ``manifest.json`` in a folder named like a key."""
    if not path.is_dir():
        return False
    if (path / ENTRY_MARKER).is_file():
        return True
    manifest = path / MANIFEST
    if not manifest.is_file():
        return False
    if looks_like_key(path.name):
        return True
    try:
        meta = json.loads(manifest.read_text())
    except (ValueError, UnicodeDecodeError, OSError):
        return False
    return isinstance(meta, dict) and meta.get("key") == path.name and "format_version" in meta


def _entry_dirs(root: Path) -> list[Path]:
    """The entry directories under ``root``, each real entry once: a link to an entry that is itself
    under ``root`` is left out (the entry is listed under its own name); a link to an entry outside
    ``root`` is listed, once, under the link's name (two links to one entry: the first by name)."""
    if not root.is_dir():
        return []
    found = [child for child in sorted(root.iterdir()) if not child.name.startswith(".") and is_entry_dir(child)]
    out, seen = [], set()
    for child in sorted(found, key=lambda c: (c.is_symlink(), c.name)):  # real directories first
        try:
            real = child.resolve()
        except (OSError, RuntimeError):  # a link loop
            continue
        if real not in seen:
            seen.add(real)
            out.append(child)
    return sorted(out)


def _manifest_field(entry: Path, field_name: str):
    """A field of ``entry``'s manifest read leniently (a damaged manifest: None), for finding entries."""
    try:
        meta = json.loads((entry / MANIFEST).read_text())
    except (ValueError, UnicodeDecodeError, OSError):
        return None
    return meta.get(field_name) if isinstance(meta, dict) else None


def list_entries(root: Path) -> list[FeatureCache]:
    """Complete, readable entries under ``root`` (incomplete and damaged ones are skipped), oldest first."""
    entries = []
    for child in _entry_dirs(root):
        with contextlib.suppress(FeatcacheError):
            entries.append(FeatureCache.open(child))
    return sorted(entries, key=lambda e: e.meta.get("created", ""))


@dataclass
class EntryStatus:
    """One entry directory as ``featcache ls`` shows it: ``ok``, ``incomplete`` or ``damaged: reason``."""

    path: Path
    status: str
    cache: FeatureCache | None = None


def scan_entries(root: Path) -> list[EntryStatus]:
    """Every entry directory under ``root`` with a quick status (manifest, files present, sizes)."""
    out = []
    for child in _entry_dirs(root):
        if not (child / MANIFEST).is_file():
            out.append(EntryStatus(child, "incomplete"))
            continue
        try:
            cache = FeatureCache.open(child)
        except FeatcacheError as exc:
            out.append(EntryStatus(child, f"damaged: {_reason(exc, child)}"))
            continue
        problem = cache.quick_check()
        out.append(EntryStatus(child, f"damaged: {_reason(problem, child)}" if problem else "ok", cache))
    return sorted(out, key=lambda e: (e.cache.meta.get("created", "") if e.cache else "", e.path.name))


def _reason(problem, entry: Path) -> str:
    return str(problem).replace(f"{entry}/", "")


def resolve_entry(ref: str, root: Path) -> Path:
    """An entry given as a key, a unique key prefix (>= 4 characters), an entry name, or a path to an
    entry directory. The cache root is searched first, then the working directory."""
    text = str(ref)
    if not text.strip() or Path(text) in (Path("."), Path("..")):
        raise FeatcacheError(f"{text!r} does not name a cache entry (give a key, a name or an entry path)")
    if "/" not in text and not text.startswith((".", "~")):
        if is_entry_dir(root / text):
            return root / text
        dirs = _entry_dirs(root)  # damaged and incomplete entries too: `rm` / `info` / `verify` reach them
        matches = ([d for d in dirs if _manifest_field(d, "name") == text]
                   or [d for d in dirs if len(text) >= KEY_PREFIX_MIN and _entry_key(d).startswith(text)])
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise FeatcacheError(f"entry {text!r} is ambiguous under {root}: {', '.join(m.name for m in matches)}")
    as_path = Path(text).expanduser()
    if is_entry_dir(as_path):
        return as_path
    if as_path.exists():
        raise FeatcacheError(f"{as_path} is not a cache entry (no {MANIFEST} or {ENTRY_MARKER} in it)")
    raise FeatcacheError(f"no cache entry {text!r} (not a key, key prefix or name under {root}, nor an entry directory)")


def _entry_key(entry: Path) -> str:
    """The key of an entry directory: its name when key-like, else (a link's name) its manifest's key."""
    if looks_like_key(entry.name):
        return entry.name
    key = _manifest_field(entry, "key")
    return key if isinstance(key, str) else entry.name


def entry_name_problem(root: Path, name, key: str) -> str | None:
    """Why ``name`` cannot name entry ``key`` under ``root`` (or None): it must be a plain word that
    ``resolve_entry`` finds as this entry and nothing else: not empty, ``.``, ``..``, a path or
    something that reads as one (``/``, a leading ``.`` or ``~``), not key-like, not another
    entry's name, key or key prefix."""
    if not isinstance(name, str) or not name.strip():
        return "a name is a non-empty word"
    if name != name.strip() or any(not c.isprintable() for c in name):
        return "a name has no leading or trailing spaces and no control characters"
    if "/" in name or "\\" in name or name.startswith((".", "~")):
        return "a name is a word without '/' or '\\' that does not start with '.' or '~' (those read as paths)"
    if looks_like_key(name):
        return "it reads as a cache key"
    for other in _entry_dirs(root):
        other_key = _manifest_field(other, "key")
        keys = {other.name, other_key} - {None}
        if key in keys:
            continue
        if _manifest_field(other, "name") == name:
            return f"it already names entry {other.name}"
        if any(isinstance(k, str) and (k == name or (len(name) >= KEY_PREFIX_MIN and k.startswith(name)))
               for k in keys):
            return f"it is (a prefix of) the key of entry {other.name}, which it would hide"
    return None


def remove_entry(path: Path) -> None:
    """Delete one entry directory; refuses links and anything that is not an entry."""
    path = Path(path)
    if path.is_symlink():
        raise FeatcacheError(f"{path} is a symbolic link; `featcache rm` does not follow links "
                             "(remove the link, or rm the entry it points to)")
    if not is_entry_dir(path):
        raise FeatcacheError(f"{path} is not a cache entry (no {MANIFEST} or {ENTRY_MARKER} in it); nothing removed")
    root, key = path.parent, path.name
    lock = entry_lock(root, key) if (root / LOCKS_DIR).is_dir() else contextlib.nullcontext()
    try:
        with lock:
            shutil.rmtree(path)
    except OSError as exc:
        raise FeatcacheError(f"cannot remove {path}: {exc.strerror or exc}") from None
