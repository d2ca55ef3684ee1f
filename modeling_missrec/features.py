"""Frozen per-item feature tables for MISSRec: text and image embeddings, one row per item in `.item2index` order.

Text rows come from the CLIP text tower (projected embeddings, not normalised, as in the MISSRec feature files)
or from a sentence-transformers folder, run by `sentence-transformers` itself (the `features` extra), e.g.
all-MiniLM-L6-v2: its own pooling, and L2-normalised when its modules.json lists a Normalize module. Image rows
come from the CLIP vision tower (projected embeddings); an item whose image is missing or unreadable gets an
all-zero row (a "missing modality"), counted and logged.

Models load from a local folder or a Hub id (`revision`, `token`; read from the local Hub cache once downloaded,
and only from it offline). Large catalogues are extracted chunk by chunk into
`<output>.partial/`, so that a rerun after a kill skips the finished chunks; the table is then assembled and
moved into place atomically (`.npy`, and optionally the raw float32 `.feat*` layout).

    python -m modeling_missrec.features text --data_dir D --dataset_name X --model_path M --output D/X.text.npy
    python -m modeling_missrec.features image --data_dir D --dataset_name X --model_path M --output D/X.img.npy
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .atomic import atomic_path, write_atomically
from .data import find_dataset_name, read_image_file, read_index_file, read_text_file
from .hub import resolve_model_folder

logger = logging.getLogger(__name__)

TEXT_KINDS = ("auto", "clip", "sentence-transformers")
CLIP_MODEL_TYPES = ("clip", "clip_text_model", "clip_vision_model")
SENTENCE_TRANSFORMERS_MARKERS = ("modules.json", "sentence_bert_config.json")
DEFAULT_SENTENCE_MAX_LENGTH = 256
LOGGED_PROBLEMS = 5


# --------------------------------------------------------------------------------------------- helpers
def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as a torch.device; None means cuda when available, else cpu."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _model_dir(model_path: str | os.PathLike, revision: str | None = None, token: str | bool | None = None) -> Path:
    """The encoder's folder: a local one, or a Hub id's snapshot at `revision` (offline: the local Hub cache only)."""
    return resolve_model_folder(model_path, revision, token, argument="model").resolve()


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def _model_config(folder: Path) -> dict:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder}: no config.json, so this is not a saved Hugging Face model folder")
    return _read_json(config_path)


def _is_clip_config(config: dict) -> bool:
    architectures = config.get("architectures") or []
    return config.get("model_type") in CLIP_MODEL_TYPES or any(str(a).startswith("CLIP") for a in architectures)


def detect_text_model_kind(model_path: str | os.PathLike) -> str:
    """'clip' or 'sentence-transformers', from the folder's config.json and sentence-transformers files."""
    folder = _model_dir(model_path)
    config_path = folder / "config.json"
    config = _read_json(config_path) if config_path.is_file() else {}
    if _is_clip_config(config):
        return "clip"
    if any((folder / marker).is_file() for marker in SENTENCE_TRANSFORMERS_MARKERS):
        return "sentence-transformers"
    raise ValueError(
        f"cannot tell what kind of text model {folder} holds: config.json has model_type "
        f"{config.get('model_type')!r} and architectures {config.get('architectures')}, which is not CLIP, and there "
        f"is no {' / '.join(SENTENCE_TRANSFORMERS_MARKERS)}; pass kind='clip' or kind='sentence-transformers'"
    )


def _drop_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in record.getMessage()


def _from_pretrained(model_class, folder: Path, config=None):
    """Load float32 weights from a local folder; refuse a model whose weights were partly left at random
    (missing or of another shape). Keys of other parts (the vision tower when loading the text tower of a
    CLIPModel checkpoint) are expected, so transformers' load report is silenced and checked here instead."""
    extra = {"config": config} if config is not None else {}
    report_logger = logging.getLogger("transformers.modeling_utils")
    report_logger.addFilter(_drop_load_report)  # (raising the logger's level instead makes transformers log more)
    try:
        model, info = model_class.from_pretrained(
            folder, local_files_only=True, dtype=torch.float32, output_loading_info=True, **extra
        )
    finally:
        report_logger.removeFilter(_drop_load_report)
    missing = sorted(info.get("missing_keys", ()))
    mismatched = sorted(
        str(entry[0]) if isinstance(entry, tuple) else str(entry) for entry in info.get("mismatched_keys", ())
    )
    if missing or mismatched:
        raise ValueError(
            f"{folder}: the checkpoint does not fit {model_class.__name__}: {len(missing)} weights missing "
            f"{missing[:LOGGED_PROBLEMS]}, {len(mismatched)} of another shape {mismatched[:LOGGED_PROBLEMS]}; "
            "the features would come from random weights"
        )
    return model.eval()


def _clip_tower_config(folder: Path, part: str):
    """The text or vision config of a CLIP folder, with the projection width of the full model: a CLIPModel
    checkpoint keeps `projection_dim` at the top level, which the tower's own config does not inherit."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if config.model_type == "clip":
        tower = config.text_config if part == "text" else config.vision_config
        tower.projection_dim = config.projection_dim
        return tower
    expected = f"clip_{part}_model"
    if config.model_type != expected:
        raise ValueError(
            f"{folder}: a CLIP {part} tower needs model_type 'clip' or {expected!r}, got {config.model_type!r}"
        )
    return config


def _embedding(output: Any, *names: str) -> torch.Tensor:
    """The tensor in a model output, whether the model returned a tensor or an output object."""
    if isinstance(output, torch.Tensor):
        return output
    for name in names:
        value = getattr(output, name, None)
        if value is not None:
            return value
    raise TypeError(f"model output {type(output).__name__} has none of {names}")


def _forward_arguments(model: torch.nn.Module, encoded: dict, device: torch.device) -> dict:
    """The tokenizer outputs that the model's forward accepts (e.g. no token_type_ids for CLIP), on `device`."""
    accepted = inspect.signature(model.forward).parameters
    return {key: value.to(device) for key, value in encoded.items() if key in accepted}


def _progress_bar(total: int, desc: str, show: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="item", disable=not show, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------- text
def _sentence_transformer(folder: Path, device: torch.device, normalize: bool | None):
    """The folder's sentence-transformers pipeline, run by `sentence_transformers` itself (the `features`
    extra). `normalize=False` drops a Normalize module; True adds one where the folder has none."""
    try:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Normalize
    except ImportError as error:
        raise ImportError(
            f"{folder} is a sentence-transformers folder: pip install 'missrec[features]' (sentence-transformers)"
        ) from error
    model = SentenceTransformer(str(folder), device=str(device), local_files_only=True)
    modules = list(model)
    has_normalize = any(isinstance(module, Normalize) for module in modules)
    if normalize is False and has_normalize:
        modules = [module for module in modules if not isinstance(module, Normalize)]
    elif normalize and not has_normalize:
        modules.append(Normalize())
    if len(modules) != len(model):
        model = SentenceTransformer(modules=modules, device=str(device))
    return model


class TextEncoder:
    """A text model loaded once from a local folder or a Hub id (`revision`, `token`); `encode(texts)` gives float32
    rows `[len(texts), dim]`."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        kind: str = "auto",
        device: str | torch.device | None = None,
        normalize: bool | None = None,
        max_length: int | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
    ):
        if kind not in TEXT_KINDS:
            raise ValueError(f"kind must be one of {TEXT_KINDS}, got {kind!r}")
        folder = _model_dir(model_path, revision, token)
        self.kind = detect_text_model_kind(folder) if kind == "auto" else kind
        self.device = resolve_device(device)
        self.dim: int | None = None
        if self.kind == "clip":
            self._load_clip(folder, normalize, max_length)
        else:
            self._load_sentence_transformer(folder, normalize, max_length)

    def _load_clip(self, folder: Path, normalize: bool | None, max_length: int | None) -> None:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        config = _model_config(folder)
        if not _is_clip_config(config):
            raise ValueError(f"{folder}: kind='clip' but config.json has model_type {config.get('model_type')!r}")
        # The text tower and its projection only: the same weights and outputs as CLIPModel.get_text_features.
        self.model = _from_pretrained(CLIPTextModelWithProjection, folder, _clip_tower_config(folder, "text"))
        text_config = self.model.config
        limit = text_config.max_position_embeddings
        self.max_length = min(max_length, limit) if max_length else limit
        self.normalize = bool(normalize)  # the MISSRec feature files hold unnormalised CLIP rows
        # Since transformers PR #24773 CLIP pools at the first end-of-text token; eos id 2 marks the legacy
        # (argmax) checkpoints. Either way the tokenizer must end every row with that token.
        self.clip_eos_id = None if text_config.eos_token_id == 2 else text_config.eos_token_id
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"{folder}: the tokenizer has neither a padding nor an end-of-text token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.clip_eos_id is not None and self.tokenizer.eos_token_id not in (None, self.clip_eos_id):
            raise ValueError(
                f"{folder}: the tokenizer's end-of-text id {self.tokenizer.eos_token_id} differs from the model's "
                f"eos_token_id {self.clip_eos_id}; CLIP pools the text at that token"
            )
        self.model.to(self.device)

    def _load_sentence_transformer(self, folder: Path, normalize: bool | None, max_length: int | None) -> None:
        self.model = _sentence_transformer(folder, self.device, normalize)
        limit = max_length or self.model.max_seq_length or DEFAULT_SENTENCE_MAX_LENGTH
        positions = getattr(self.model[0].auto_model.config, "max_position_embeddings", None)
        self.model.max_seq_length = self.max_length = min(limit, positions) if positions else limit

    @torch.inference_mode()
    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        if self.kind != "clip":
            rows = self.model.encode(texts, batch_size=len(texts), convert_to_tensor=True, show_progress_bar=False)
            return rows.float().cpu()
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        if self.clip_eos_id is not None and not (encoded["input_ids"] == self.clip_eos_id).any(dim=1).all():
            raise ValueError(
                f"the tokenizer left out the end-of-text token (id {self.clip_eos_id}) in some rows; CLIP pools there"
            )
        arguments = _forward_arguments(self.model, encoded, self.device)
        features = _embedding(self.model(**arguments), "text_embeds", "pooler_output")
        if self.normalize:
            features = torch.nn.functional.normalize(features.float(), dim=-1)
        return features.float().cpu()

    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: tqdm | None = None) -> np.ndarray:
        """Rows for `texts`, in order. Batches hold texts of similar length (less padding); rows do not depend
        on the batch they were computed in beyond float rounding."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        texts = ["" if text is None else str(text) for text in texts]
        order = np.argsort([-len(text) for text in texts], kind="stable")
        rows: list[torch.Tensor] = []
        for start in range(0, len(texts), batch_size):
            batch = [texts[i] for i in order[start : start + batch_size]]
            rows.append(self._encode_batch(batch))
            if progress is not None:
                progress.update(len(batch))
        if not rows:
            return np.zeros((0, self.dim or 0), dtype=np.float32)
        sorted_rows = torch.cat(rows).numpy()
        features = np.empty_like(sorted_rows)
        features[order] = sorted_rows
        self.dim = features.shape[1]
        return np.ascontiguousarray(features, dtype=np.float32)


def extract_text_features(
    texts: Sequence[str],
    model_path: str | os.PathLike,
    *,
    kind: str = "auto",
    batch_size: int = 64,
    device: str | torch.device | None = None,
    normalize: bool | None = None,
    max_length: int | None = None,
    show_progress: bool = True,
    revision: str | None = None,
    token: str | bool | None = None,
) -> np.ndarray:
    """Float32 `[len(texts), dim]` text features from a CLIP or sentence-transformers folder or Hub id.

    CLIP: the projected text embeddings (`CLIPModel.get_text_features`), not normalised unless `normalize`.
    sentence-transformers: `SentenceTransformer.encode` of the folder's own pipeline (masked mean pooling for
    all-MiniLM-L6-v2), L2-normalised when its modules.json lists a Normalize module unless `normalize` says
    otherwise, truncated to `max_length` or else the folder's `max_seq_length`.
    """
    encoder = TextEncoder(
        model_path, kind=kind, device=device, normalize=normalize, max_length=max_length, revision=revision, token=token
    )
    with _progress_bar(len(texts), f"text features ({encoder.kind})", show_progress) as bar:
        return encoder.encode(texts, batch_size=batch_size, progress=bar)


# --------------------------------------------------------------------------------------------- images


def _load_image(path: str | os.PathLike | None):
    """(RGB PIL image, None) or (None, reason) for a missing or unreadable file."""
    from PIL import Image

    if path is None or str(path) == "":
        return None, "no path"
    if not os.path.isfile(path):
        return None, "no such file"
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB"), None
    except Exception as error:  # any decoding failure is a missing modality, not a crash of a long run
        return None, f"unreadable ({type(error).__name__}: {error})"


class ImageEncoder:
    """The CLIP vision tower loaded once from a local folder; `encode(paths)` gives (features, present)."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        normalize: bool = False,
        image_backend: str = "pil",
        revision: str | None = None,
        token: str | bool | None = None,
    ):
        from transformers import AutoImageProcessor, CLIPVisionModelWithProjection

        folder = _model_dir(model_path, revision, token)
        config = _model_config(folder)
        if not _is_clip_config(config):
            raise ValueError(
                f"{folder}: image features need a CLIP model, but config.json has model_type "
                f"{config.get('model_type')!r}"
            )
        self.device = resolve_device(device)
        self.model = _from_pretrained(CLIPVisionModelWithProjection, folder, _clip_tower_config(folder, "vision")).to(
            self.device
        )
        # The PIL backend by default: the same preprocessing whether or not torchvision is installed, and the
        # one closest to the original CLIP preprocessing.
        self.processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True, backend=image_backend)
        self.normalize = normalize
        self.dim = int(self.model.config.projection_dim)
        self.problems: list[tuple[str, str]] = []

    @torch.inference_mode()
    def _encode_images(self, images: list) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        features = _embedding(self.model(pixel_values=pixels), "image_embeds", "pooler_output").float()
        if self.normalize:
            features = torch.nn.functional.normalize(features, dim=-1)
        return features.cpu()

    def encode(
        self,
        image_paths: Sequence[str | os.PathLike | None],
        batch_size: int = 32,
        num_workers: int = 0,
        progress: tqdm | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """`(features [N, dim] float32, present [N] bool)`; a missing or unreadable image is a zero row, not
        present, and is recorded in `self.problems` as (path, reason)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        paths = list(image_paths)
        features = np.zeros((len(paths), self.dim), dtype=np.float32)
        present = np.zeros(len(paths), dtype=bool)
        starts = list(range(0, len(paths), batch_size))
        pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None

        def decode(start: int):
            batch = paths[start : start + batch_size]
            return list(pool.map(_load_image, batch)) if pool is not None else [_load_image(p) for p in batch]

        problems_before = len(self.problems)
        try:
            pending = pool.submit(decode, starts[0]) if pool is not None and starts else None
            for number, start in enumerate(starts):
                if pool is not None:
                    loaded = pending.result()
                    if number + 1 < len(starts):  # decode the next batch while the model runs on this one
                        pending = pool.submit(decode, starts[number + 1])
                else:
                    loaded = decode(start)
                good = [start + offset for offset, (image, _) in enumerate(loaded) if image is not None]
                for offset, (_, reason) in enumerate(loaded):
                    if reason is not None:
                        self.problems.append((str(paths[start + offset]), reason))
                if good:
                    features[good] = self._encode_images([image for image, _ in loaded if image is not None]).numpy()
                    present[good] = True
                if progress is not None:
                    progress.update(len(loaded))
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        new_problems = self.problems[problems_before:]
        if new_problems:
            logger.warning(
                "%d of %d images are missing or unreadable; their rows are zero. First: %s",
                len(new_problems),
                len(paths),
                "; ".join(f"{p} ({reason})" for p, reason in new_problems[:LOGGED_PROBLEMS]),
            )
        return features, present


def extract_image_features(
    image_paths: Sequence[str | os.PathLike | None],
    model_path: str | os.PathLike,
    *,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    normalize: bool = False,
    num_workers: int = 0,
    image_backend: str = "pil",
    show_progress: bool = True,
    revision: str | None = None,
    token: str | bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`(features, present)`: float32 `[N, dim]` projected CLIP image embeddings (`get_image_features`) and a
    bool `[N]` mask. A None path, a missing file or an unreadable image gives a zero row and present False."""
    encoder = ImageEncoder(
        model_path, device=device, normalize=normalize, image_backend=image_backend, revision=revision, token=token
    )
    with _progress_bar(len(image_paths), "image features", show_progress) as bar:
        return encoder.encode(image_paths, batch_size=batch_size, num_workers=num_workers, progress=bar)


# --------------------------------------------------------------------------------------------- resumable files
@dataclass
class ExtractionResult:
    output_path: Path
    raw_output_path: Path | None
    num_rows: int
    dim: int
    missing_rows: int  # all-zero rows (missing modality)
    chunks_computed: int
    chunks_reused: int
    seconds: float


def _atomic_save(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_atomically(path, buffer.getvalue(), fsync=True)


def _load_chunk(path: Path, rows: int) -> np.ndarray | None:
    """A finished chunk, or None when it is absent or not a float32 `[rows, dim]` table."""
    if not path.is_file():
        return None
    try:
        chunk = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        logger.warning("%s: unreadable chunk (%s); recomputing it", path, error)
        return None
    if chunk.ndim != 2 or chunk.shape[0] != rows or chunk.dtype != np.float32:
        logger.warning(
            "%s: shape %s %s, expected %d float32 rows; recomputing it", path, chunk.shape, chunk.dtype, rows
        )
        return None
    return chunk


def _fingerprint(modality: str, inputs: Sequence, settings: dict) -> dict:
    digest = hashlib.sha256()
    for value in inputs:
        digest.update(("" if value is None else str(value)).encode("utf-8", "surrogatepass"))
        digest.update(b"\0")
    return {"modality": modality, "num_rows": len(inputs), "inputs_sha256": digest.hexdigest(), **settings}


def extract_to_file(
    inputs: Sequence,
    output_path: str | os.PathLike,
    *,
    modality: str,
    model_path: str | os.PathLike,
    chunk_rows: int = 50_000,
    raw_output_path: str | os.PathLike | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    kind: str = "auto",
    normalize: bool | None = None,
    max_length: int | None = None,
    num_workers: int = 0,
    image_backend: str = "pil",
    show_progress: bool = True,
    keep_partial: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
) -> ExtractionResult:
    """Extract features for `inputs` (texts for modality 'text', image paths for 'image') into `output_path`
    (`.npy`, float32 `[len(inputs), dim]`) and, if given, `raw_output_path` (raw float32, row-major, no header).

    Chunks of `chunk_rows` rows are saved to `<output>.partial/chunk-00000.npy` ...; a rerun with the same
    inputs and settings reuses the finished chunks (and loads no model if all are done). Both outputs are
    moved into place whole (`atomic`), then the partial folder is removed (unless `keep_partial`). Long for its
    seventeen arguments, passed on to the encoders; the work is in `_compute_chunks` and `_assemble_table`."""
    if modality not in ("text", "image"):
        raise ValueError(f"modality must be 'text' or 'image', got {modality!r}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    if not len(inputs):
        raise ValueError("no inputs to extract features for")
    began = time.perf_counter()
    folder = _model_dir(model_path, revision, token)
    output_path = Path(output_path)
    raw_output_path = Path(raw_output_path) if raw_output_path is not None else None
    output_path.parent.mkdir(parents=True, exist_ok=True)
    partial = output_path.with_name(output_path.name + ".partial")
    settings = {"model_path": str(folder), "chunk_rows": chunk_rows}
    if modality == "text":
        settings.update(kind=kind, normalize=normalize, max_length=max_length)
        batch_size = batch_size or 64
    else:
        settings.update(normalize=bool(normalize), image_backend=image_backend)
        batch_size = batch_size or 32
    _prepare_partial(partial, _fingerprint(modality, inputs, settings))
    starts = list(range(0, len(inputs), chunk_rows))
    chunk_paths = [partial / f"chunk-{number:05d}.npy" for number in range(len(starts))]

    def make_encoder() -> TextEncoder | ImageEncoder:
        if modality == "text":
            return TextEncoder(folder, kind=kind, device=device, normalize=normalize, max_length=max_length)
        return ImageEncoder(folder, device=device, normalize=bool(normalize), image_backend=image_backend)

    def encode(encoder, chunk_inputs: list, bar: tqdm) -> np.ndarray:
        if modality == "text":
            return encoder.encode(chunk_inputs, batch_size=batch_size, progress=bar)
        return encoder.encode(chunk_inputs, batch_size=batch_size, num_workers=num_workers, progress=bar)[0]

    with _progress_bar(len(inputs), f"{modality} features", show_progress) as bar:
        computed, reused = _compute_chunks(inputs, starts, chunk_paths, chunk_rows, make_encoder, encode, bar)
    if reused:
        logger.info("%s: reused %d finished chunk(s), computed %d", partial, reused, computed)
    chunks = [_load_chunk(path, min(chunk_rows, len(inputs) - start)) for start, path in zip(starts, chunk_paths)]
    dim, missing = _assemble_table(chunks, partial, output_path, raw_output_path)
    del chunks
    if not keep_partial:
        shutil.rmtree(partial, ignore_errors=True)
    if missing:
        logger.warning("%s: %d of %d rows are all zero (missing %s)", output_path, missing, len(inputs), modality)
    return ExtractionResult(
        output_path, raw_output_path, len(inputs), dim, missing, computed, reused, time.perf_counter() - began
    )


def _prepare_partial(partial: Path, meta: dict) -> None:
    """Keep `partial`'s chunks only if they were computed from the same inputs and settings (`meta.json`)."""
    meta_path = partial / "meta.json"
    if partial.is_dir() and (not meta_path.is_file() or _read_json(meta_path) != meta):
        logger.warning("%s holds chunks of other inputs or settings; discarding them", partial)
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    if not meta_path.is_file():
        write_atomically(meta_path, json.dumps(meta, indent=1))


def _compute_chunks(inputs, starts, chunk_paths, chunk_rows, make_encoder, encode, bar: tqdm) -> tuple[int, int]:
    """Encode and save every chunk not already saved; the model loads only if one is missing."""
    encoder = None
    computed = reused = 0
    for start, chunk_path in zip(starts, chunk_paths):
        rows = min(chunk_rows, len(inputs) - start)
        if _load_chunk(chunk_path, rows) is not None:
            reused += 1
            bar.update(rows)
            continue
        encoder = encoder or make_encoder()
        _atomic_save(chunk_path, encode(encoder, list(inputs[start : start + rows]), bar))
        computed += 1
    return computed, reused


def _assemble_table(
    chunks: list[np.ndarray], partial: Path, output_path: Path, raw_output_path: Path | None
) -> tuple[int, int]:
    """Write the chunks as one `.npy` table (and the raw float32 file), each moved into place whole.
    Returns the width and the number of all-zero (missing) rows."""
    dims = {chunk.shape[1] for chunk in chunks}
    if len(dims) != 1:
        raise ValueError(f"{partial}: chunks of different widths {sorted(dims)}; delete the folder and rerun")
    dim = dims.pop()
    rows = sum(len(chunk) for chunk in chunks)
    missing, start = 0, 0
    with atomic_path(output_path) as temporary:  # memory-mapped: the table is never whole in memory
        table = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float32, shape=(rows, dim))
        for chunk in chunks:
            table[start : start + len(chunk)] = chunk
            start += len(chunk)
            missing += int((~np.any(chunk != 0, axis=1)).sum())
        table.flush()
        del table
    if raw_output_path is not None:
        raw_output_path.parent.mkdir(parents=True, exist_ok=True)
        raw_rows = (np.ascontiguousarray(chunk, dtype=np.float32).tobytes() for chunk in chunks)
        write_atomically(raw_output_path, raw_rows, fsync=True)
    return dim, missing


# --------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_missrec.features",
        description="Extract frozen per-item text or image feature tables (one row per item, .item2index order) "
        "from a CLIP or sentence-transformers model folder or Hub id.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("text", "text features of X.text (CLIP text tower or a sentence-transformers model)"),
        ("image", "image features of the files listed in X.images (CLIP vision tower); missing -> zero row"),
    ):
        command = commands.add_parser(name, help=help_text, description=help_text)
        command.add_argument("--data_dir", required=True, help="folder of the atomic files")
        command.add_argument("--dataset_name", help="the X of X.item2index (default: from the single X.train.inter)")
        command.add_argument("--model_path", required=True, help="encoder folder or Hub id (offline: cache)")
        command.add_argument("--revision", help="branch, tag or commit of a Hub id (default: main)")
        command.add_argument("--token", help="Hub token for a private repository (default: the stored login)")
        command.add_argument("--output", required=True, help="the .npy table to write")
        command.add_argument("--raw_output", help="also write the raw float32 layout (e.g. D/X.feat1CLS)")
        command.add_argument("--batch_size", type=int, default=64 if name == "text" else 32)
        command.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
        command.add_argument("--chunk_rows", type=int, default=50_000, help="rows per resumable chunk")
        command.add_argument("--keep_partial", action="store_true", help="keep <output>.partial/ afterwards")
        command.add_argument("--no_progress", action="store_true", help="no progress bar")
        if name == "text":
            command.add_argument("--kind", choices=TEXT_KINDS, default="auto")
            command.add_argument("--max_length", type=int, help="token limit (default: the model's)")
            command.add_argument(
                "--normalize",
                action=argparse.BooleanOptionalAction,
                default=None,
                help="L2-normalise rows (default: no for CLIP, the folder's setting for sentence-transformers)",
            )
        else:
            command.add_argument("--images_file", help="the image list (default: D/X.images)")
            command.add_argument("--num_workers", type=int, default=4, help="threads decoding images")
            command.add_argument("--image_backend", choices=("pil", "torchvision"), default="pil")
            command.add_argument("--normalize", action="store_true", help="L2-normalise rows (default: no)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    data_dir = Path(args.data_dir)
    name = args.dataset_name or find_dataset_name(data_dir)
    raw_ids = read_index_file(data_dir / f"{name}.item2index")
    common = dict(
        model_path=args.model_path,
        revision=args.revision,
        token=args.token,
        chunk_rows=args.chunk_rows,
        raw_output_path=args.raw_output,
        batch_size=args.batch_size,
        device=args.device,
        normalize=args.normalize,
        show_progress=not args.no_progress,
        keep_partial=args.keep_partial,
    )
    if args.command == "text":
        inputs = read_text_file(data_dir / f"{name}.text", raw_ids)
        result = extract_to_file(
            inputs, args.output, modality="text", kind=args.kind, max_length=args.max_length, **common
        )
    else:
        inputs = read_image_file(Path(args.images_file) if args.images_file else data_dir / f"{name}.images", raw_ids)
        result = extract_to_file(
            inputs,
            args.output,
            modality="image",
            num_workers=args.num_workers,
            image_backend=args.image_backend,
            **common,
        )
    written = str(result.output_path) + (f" and {result.raw_output_path}" if result.raw_output_path else "")
    print(
        f"{args.command} features [{result.num_rows}, {result.dim}] float32 -> {written}; "
        f"{result.missing_rows} all-zero rows; {result.chunks_computed} chunk(s) computed, "
        f"{result.chunks_reused} reused; {result.seconds:.1f}s"
    )
    return 0


if __name__ == "__main__":
    from .cli import run_command

    run_command(main)
