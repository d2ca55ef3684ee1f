"""Where a saved model lives: a local folder, or a Hugging Face Hub id resolved to its snapshot folder.

Every place that takes a saved model (transfer's `model_name_or_path`, `MissrecRecommender.from_pretrained`,
the feature extractors' encoder) goes through `resolve_model_folder`, so a Hub id works wherever a folder does:
`revision` and `token` are passed through, and offline (`HF_HUB_OFFLINE=1`) the snapshot comes from the local
cache alone (`HF_HUB_CACHE`, by default `~/.cache/huggingface/hub`), as `transformers` does.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

_NOT_FOUND = (
    EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled,
    RepositoryNotFoundError, RevisionNotFoundError,
)  # fmt: skip


def _is_repo_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not name.startswith((".", "/", "~"))


def resolve_model_folder(
    name_or_path: str | os.PathLike,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    argument: str = "model_name_or_path",
) -> Path:
    """The local folder of `name_or_path`: itself when it is a folder, else the snapshot of the Hub repository
    of that id at `revision` (downloaded once, then read from the cache; only the cache when offline).

    A name that is neither gives `FileNotFoundError` naming `argument`, the value and where it was looked for."""
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        return path
    name = str(name_or_path)
    if not _is_repo_id(name):
        raise FileNotFoundError(f"{argument}={name!r}: the folder does not exist, and it is no Hub id ('user/repo')")
    offline = constants.is_offline_mode()
    try:
        folder = snapshot_download(name, revision=revision, token=token, cache_dir=cache_dir, local_files_only=offline)
    except _NOT_FOUND as error:
        where = "the local Hub cache (offline: HF_HUB_OFFLINE=1)" if offline else "the Hub"
        at = f" at revision {revision!r}" if revision else ""
        raise FileNotFoundError(
            f"{argument}={name!r}: the folder does not exist, nor a Hub repository of that id{at} in {where} "
            f"({type(error).__name__})"
        ) from error
    return Path(folder)
