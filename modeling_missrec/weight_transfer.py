"""What of a saved MISSRec carries over to a new catalogue, and what is rebuilt for it.

Carried: the backbone (adaptors of the same feature width, position table, input LayerNorm, encoder,
decoder), the fusion head and the history prior's weights. Rebuilt: everything that describes one catalogue
(its features and modality masks, interest state, item counts) and the ID table, unless the saved model's raw
item ids are this very catalogue's. The transformer core must match: the paper's "frozen" recipe would
otherwise freeze random weights. Used by `MissrecForSequentialRecommendation.from_backbone` and the
pre-training model's warm start; the frozen recipe freezes `FROZEN_IN_TRANSFER`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from .atomic import complete_interrupted_commit
from .configuration_missrec import MissrecConfig
from .item_catalog import read_raw_item_ids

logger = logging.getLogger(__name__)

# The backbone modules the paper's transfer recipe freezes (the adaptors, input LayerNorm, fusion factor and
# ID table stay trainable); with the input LayerNorm they are the core a saved model must match.
FROZEN_IN_TRANSFER = ("position_embeddings", "encoder", "decoder")
BACKBONE_CORE = tuple(f"missrec.{name}." for name in (*FROZEN_IN_TRANSFER, "input_layer_norm"))

# What one catalogue's model holds about its items (the last two names: models saved before `catalog.`).
CATALOGUE_SPECIFIC = (
    "catalog.",
    "interest_tokenizer.",
    "history_prior.item_log_count",
    "_features",
    "item_modality_present",
)


def transfer_config(source: MissrecConfig, settings: Mapping) -> MissrecConfig:
    """The source's architecture with this catalogue's settings; what described the source model alone
    (its interest state, class names, remote-code map) does not carry over."""
    carried = {k: v for k, v in source.to_diff_dict().items() if k not in ("architectures", "auto_map")}
    return MissrecConfig(**{**carried, **settings, "num_interests": 0})


def load_matching_weights(model: torch.nn.Module, directory: str | os.PathLike, raw_item_ids=None) -> None:
    """Load what transfers from the saved MISSRec in `directory` (recommender, pre-training model or bare
    backbone) into `model`. The ID table is kept only when the saved raw item ids equal `raw_item_ids`."""
    from safetensors.torch import load_file

    complete_interrupted_commit(directory)
    path = Path(directory) / "model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"model_name_or_path: {path} not found (a save_pretrained folder or Hub snapshot)")
    saved = load_file(str(path))
    same_catalogue = raw_item_ids is not None and read_raw_item_ids(directory) == list(raw_item_ids)
    load_matching_state(model, saved, str(directory), same_catalogue)


def load_matching_state(
    model: torch.nn.Module,
    saved: Mapping[str, torch.Tensor],
    source: str,
    same_catalogue: bool = False,
    quiet: bool = False,
) -> None:
    """The rules of `load_matching_weights` for a state dict in memory (`source` names it in messages;
    `quiet` logs what was loaded at DEBUG, for a transfer repeated every epoch)."""
    if not any(name.startswith("missrec.") for name in saved):  # a bare MissrecModel
        saved = {f"missrec.{name}": tensor for name, tensor in saved.items()}
    own = model.state_dict()
    kept, mismatched = {}, []
    for name, tensor in saved.items():
        if name not in own or any(t in name for t in CATALOGUE_SPECIFIC):
            continue
        if name.startswith("missrec.item_embeddings.") and not same_catalogue:
            continue
        if own[name].shape == tensor.shape:
            kept[name] = tensor
        else:
            mismatched.append(f"{name}: saved {tuple(tensor.shape)}, here {tuple(own[name].shape)}")
    core_missing = [n for n in own if n.startswith(BACKBONE_CORE) and n not in kept]
    if core_missing:
        detail = "; ".join(mismatched[:5]) or f"missing {core_missing[:5]}"
        raise ValueError(
            f"{source}: the transformer does not match this configuration ({detail}). Use the saved model's "
            "hidden_size, layers, heads, intermediate_size and max_seq_length."
        )
    model.load_state_dict({name: tensor.to(own[name].device) for name, tensor in kept.items()}, strict=False)
    fresh = sorted(set(own) - set(kept) - {n for n in own if any(t in n for t in CATALOGUE_SPECIFIC)})
    unexpected = sorted(set(saved) - set(own))
    logger.log(
        logging.DEBUG if quiet else logging.INFO,
        "loaded %d tensors from %s; new for this catalogue: %s", len(kept), source, fresh or "none",
    )  # fmt: skip
    if mismatched or unexpected:
        logger.warning("not loaded from %s: %s", source, mismatched + [f"{n} (no such tensor)" for n in unexpected])
