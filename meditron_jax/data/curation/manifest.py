"""The curation output's manifest: which shard files form the corpus, and how many documents each split has.

The curation writes ``manifest.json`` last, next to ``stats.json``; training reads exactly the files it
lists. Shards that an earlier run left behind (another ``--num_shards``) are then never read, and a split
that kept no documents is an error at the start of training instead of an empty iterator later.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

from meditron_jax import fs

MANIFEST_FILE = "manifest.json"
FORMAT = "meditron_jax curated corpus"


def build_manifest(shards: Mapping[tuple[str, str], Iterable[str]], stats: Mapping) -> dict:
    """``shards``: (source, split) -> shard paths relative to the output folder; ``stats``: stats.json."""
    out: dict = {"format": FORMAT, "version": 1, "stats": "stats.json", "shards": {}}
    for (source, split), files in sorted(shards.items()):
        docs = stats.get("sources", {}).get(source, {}).get("output", {}).get(split, {}).get("docs", 0)
        out["shards"].setdefault(source, {})[split] = {"files": sorted(files), "docs": int(docs)}
    return out


def read_manifest(root: str | os.PathLike) -> dict | None:
    """The manifest of a curated folder, or None when it has none (shards made by hand)."""
    path = fs.join(root, MANIFEST_FILE)  # root may be gs://... (meditron_jax.fs)
    if not fs.exists(path) or fs.isdir(path):
        return None
    try:
        manifest = json.loads(fs.read_text(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable manifest ({e})") from e
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or not isinstance(manifest.get("shards"), dict)
    ):
        raise ValueError(f"{path}: not a {FORMAT} manifest")
    return manifest


def manifest_shards(root: str | os.PathLike, source: str, split: str) -> list[str] | None:
    """Paths of one source's split as the manifest lists them; None without a manifest. Errors name the
    manifest when the split is absent, holds no documents, or a listed file is gone."""
    manifest = read_manifest(root)
    if manifest is None:
        return None
    path = os.path.join(os.fspath(root), MANIFEST_FILE)
    entry = manifest["shards"].get(source, {}).get(split)
    if not isinstance(entry, dict) or not isinstance(entry.get("files"), list):
        raise FileNotFoundError(f"{path} lists no {split!r} shards for {source!r}")
    if not entry.get("docs"):
        raise ValueError(
            f"{path}: the curation kept no {split!r} documents of {source!r} (its stats.json says why); "
            "nothing to train on"
        )
    files = [fs.join(root, f) for f in entry["files"]]
    missing = [f for f in files if not fs.exists(f)]
    if missing:
        raise FileNotFoundError(f"{path} lists {missing[0]}, which does not exist (an incomplete copy?)")
    return files
