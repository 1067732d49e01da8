"""The on-disk feature cache (spec: docs/cache-format.md). The only package that imports h5py.

An entry is a directory ``<root>/<key>/`` holding ``manifest.json``, an optional ``classifier.h5``
and one folder of HDF5 shards per split. The manifest is written last, by atomic replace: a split
the manifest does not list is incomplete and is never read as data.

One job a module: ``format`` (constants, keys, manifest validation), ``durable`` (atomic writes and
the lock), ``checksum`` (SHA-256, Fletcher-32), ``reader`` (:class:`FeatureCache`), ``writer`` (the
write transaction :func:`writing`), ``entries`` (finding, locking, removing entries)."""
from .checksum import fletcher32, sha256_file, stored_fletcher_matches
from .durable import atomic_output, atomic_write_json, atomic_write_text, exclusive_lock
from .entries import (KEY_PREFIX_MIN, EntryStatus, cache_root, entry_lock, is_entry_dir, list_entries,
                      remove_entry, resolve_entry, scan_entries)
from .format import (CLASSIFIER_FILE, COMPRESSIONS, DTYPES, ENTRY_MARKER, FORMAT_VERSION, KEY_FORMAT_VERSION,
                     MANIFEST, SUPPORTED_FORMAT_VERSIONS, content_key)
from .reader import FeatureCache, Split
from .writer import EntryWriter, SplitWriter, cast_overflow, writing

__all__ = [
    "CLASSIFIER_FILE", "COMPRESSIONS", "DTYPES", "ENTRY_MARKER", "FORMAT_VERSION", "KEY_FORMAT_VERSION",
    "KEY_PREFIX_MIN", "MANIFEST", "SUPPORTED_FORMAT_VERSIONS", "EntryStatus", "EntryWriter", "FeatureCache",
    "Split", "SplitWriter", "atomic_output", "atomic_write_json", "atomic_write_text", "cache_root",
    "cast_overflow", "content_key", "entry_lock", "exclusive_lock", "fletcher32", "is_entry_dir", "list_entries",
    "remove_entry", "resolve_entry", "scan_entries", "sha256_file", "stored_fletcher_matches", "writing",
]
