"""Hugging Face hub ids where a model folder is expected: ``load("epfl-llm/meditron-7b")``, ``--checkpoint``,
``--model_dir``, ``TrainConfig.init_from``. An existing path always wins; anything else shaped like
``owner/name`` (optionally ``@revision``) comes from huggingface_hub's cache, downloaded first when online.
With ``HF_HUB_OFFLINE=1`` only the cache is read. ``model_dir`` calls :func:`resolve_model_path`; nothing else
should need to.
"""

from __future__ import annotations

import os
import re

# owner/name as the hub spells them (letters, digits, '-', '_', '.'), and an optional @branch/tag/commit.
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*)(?:@(?P<rev>[\w.\-/]+))?$")

# What a Llama folder needs besides its weights; Meta's repos also keep original/*.pth, never fetched.
_MODEL_FILES = ("*.json", "tokenizer.model")

_resolved: dict[str, str] = {}  # one look-up per id and process (model_dir resolves the same id several times)


def looks_like_hub_id(text: str) -> bool:
    """``owner/name`` or ``owner/name@revision``, by its shape alone."""
    m = _HUB_ID.match(text)
    return m is not None and not m["repo"].endswith((".", "-")) and ".." not in m["repo"]


def parse_hub_id(path: str | os.PathLike) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``path`` is not an existing path and reads as a hub id, else None."""
    text = os.fspath(path)
    if os.path.exists(text) or text.startswith((".", "~")) or os.path.isabs(text) or not looks_like_hub_id(text):
        return None
    m = _HUB_ID.match(text)
    assert m is not None
    return m["repo"], m["rev"]


def offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as the environment says now."""
    from huggingface_hub import constants

    now = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or now.strip().upper() in {"1", "ON", "YES", "TRUE"}


def cache_dir() -> str:
    """The hub cache this process uses (HF_HUB_CACHE as set now, else huggingface_hub's default)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def resolve_model_path(path: str | os.PathLike) -> str:
    """A local folder for ``path``: itself when it exists or is not a hub id, else the hub snapshot."""
    text = os.fspath(path)
    parsed = parse_hub_id(text)
    if parsed is None:
        return text
    key = f"{text}|{cache_dir()}|{offline()}"
    if key not in _resolved:
        _resolved[key] = _snapshot(*parsed, shown=text)
    return _resolved[key]


def _fetch_hint(repo_id: str, revision: str | None) -> str:
    rev = f" --revision {revision}" if revision else ""
    return (
        f"fetch it while online with `hf download {repo_id}{rev}` (or call meditron_jax.load({repo_id!r}) once "
        "without HF_HUB_OFFLINE), or pass a local folder"
    )


def _snapshot(repo_id: str, revision: str | None, *, shown: str) -> str:
    import httpx2  # huggingface_hub's HTTP client: its connection errors are not OSErrors
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = cache_dir()
    not_dir = f"{shown} is not a directory"
    if offline():
        try:
            return snapshot_download(repo_id, revision=revision, cache_dir=where, local_files_only=True)
        except LocalEntryNotFoundError:
            raise FileNotFoundError(
                f"{not_dir}, and the Hugging Face hub model {repo_id}"
                f"{'@' + revision if revision else ''} is not in the cache {where} (HF_HUB_OFFLINE is set); "
                + _fetch_hint(repo_id, revision)
            ) from None
    try:
        # Only one copy of the weights: safetensors when the repo has them, else the PyTorch .bin files.
        files = HfApi().list_repo_files(repo_id, revision=revision)
        weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"
        return snapshot_download(repo_id, revision=revision, cache_dir=where, allow_patterns=[*_MODEL_FILES, weights])
    except GatedRepoError:
        raise PermissionError(
            f"{repo_id} is gated on the Hugging Face hub: accept its license at https://huggingface.co/{repo_id} "
            "and log in (`hf auth login` or HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{not_dir}, nor a model on the Hugging Face hub (no repository {repo_id}, or it is private: log in "
            "with `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{repo_id} on the Hugging Face hub has no revision {revision!r}") from None
    except (HfHubHTTPError, OSError, httpx2.HTTPError) as e:
        try:
            return snapshot_download(repo_id, revision=revision, cache_dir=where, local_files_only=True)
        except LocalEntryNotFoundError:
            raise FileNotFoundError(
                f"{not_dir}, and the Hugging Face hub could not be reached for {repo_id} "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}) nor is it in the cache {where}; "
                + _fetch_hint(repo_id, revision)
            ) from None


# Files of a local export that stay local: the writer's marker records absolute paths of this machine.
_NOT_UPLOADED = [".meditron_jax_output.json", ".*", "*.tmp"]


def check_push_target(repo_id: str) -> None:
    """Refuse a bad --push_to_hub before any slow work."""
    if "@" in repo_id or not looks_like_hub_id(repo_id):
        raise ValueError(f"--push_to_hub {repo_id!r} is not a hub repository id (OWNER/NAME)")
    if offline():
        raise ValueError(f"--push_to_hub {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded")


def push_model_dir(folder: str, repo_id: str, *, private: bool = False) -> str:
    """Create ``repo_id`` (a model repository; kept if it exists) and upload ``folder`` as one commit; returns
    the repository's URL. The token is huggingface_hub's (``hf auth login`` or HF_TOKEN)."""
    from huggingface_hub import HfApi

    check_push_target(repo_id)
    api = HfApi()
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=folder,
        commit_message="Upload model exported by meditron_jax",
        ignore_patterns=_NOT_UPLOADED,
    )
    return str(url)
