"""One domain's item catalogue, as the recommender holds it: what every other part asks about the items.

[`MissrecItemCatalog`] is an `nn.Module` owned by `MissrecForSequentialRecommendation` (`model.catalog`): the
frozen feature table of each modality (`[num_items + 1, F_m]`, row 0 padding), which modalities each item has,
and the raw item ids. The tables are buffers, so `save_pretrained` writes them with the weights; the raw ids
travel as `item_ids.json` beside them (written by the model's `save_pretrained`, so `push_to_hub` ships them).

The one missing-modality rule lives here: an item lacks a modality when its feature row is all zeros (unless
the caller says otherwise), and `config.mask_missing_modalities=False` treats every real item as having all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .atomic import write_atomically
from .configuration_missrec import MissrecConfig

ITEM_IDS_FILE = "item_ids.json"


def rows_present(features: Mapping[str, torch.Tensor], modalities: Sequence[str]) -> torch.Tensor:
    """`[M, ...]` bool: True where a feature row (`features[m]` `[..., F_m]`) is not all zeros."""
    return torch.stack([features[m].ne(0).any(-1) for m in modalities])


def apply_missing_rule(present: torch.Tensor, config: MissrecConfig, real: torch.Tensor | None = None) -> torch.Tensor:
    """The one missing-modality rule: the mask the model scores with, `[M, ...]` bool.

    `present` itself when `config.mask_missing_modalities`; otherwise every modality counts as present (the
    original scored a missing image's zero row like any other): at every real slot (`real`, `[...]`, broadcast
    over the modalities; padding stays False), or everywhere when `real` is not given."""
    if config.mask_missing_modalities:
        return present.bool()
    if real is None:
        return torch.ones_like(present, dtype=torch.bool)
    return real.bool().expand_as(present)


def read_raw_item_ids(folder: str | os.PathLike) -> list[str] | None:
    """The raw ids saved beside a model (entry i is item id i + 1), or None when the folder has none."""
    path = Path(folder) / ITEM_IDS_FILE
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))["raw_item_ids"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f'{path}: expected {{"raw_item_ids": [...]}} ({error})') from error
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        raise ValueError(f"{path}: raw_item_ids must be a list of strings")
    return raw


def write_raw_item_ids(folder: str | os.PathLike, raw_item_ids: Sequence[str]) -> None:
    """The one writer of `item_ids.json` (atomically: a reader never sees half a map)."""
    text = json.dumps({"raw_item_ids": list(raw_item_ids)}, ensure_ascii=False)
    write_atomically(Path(folder) / ITEM_IDS_FILE, text)


def _as_tensor(values: torch.Tensor | np.ndarray) -> torch.Tensor:
    return values if torch.is_tensor(values) else torch.from_numpy(np.array(values))


class MissrecItemCatalog(nn.Module):
    """Feature tables, modality-present masks and raw ids of one domain's items (ids 1..num_items)."""

    def __init__(self, config: MissrecConfig):
        super().__init__()
        self.config = config
        self.modalities = list(config.modalities)
        for m in self.modalities:
            self.register_buffer(f"{m}_features", torch.zeros(config.num_items + 1, config.feature_size(m)))
        self.register_buffer(
            "modality_present", torch.zeros(len(self.modalities), config.num_items + 1, dtype=torch.bool)
        )
        self.raw_item_ids: list[str] | None = None

    @property
    def num_items(self) -> int:
        return self.modality_present.shape[1] - 1

    def buffer_names(self) -> list[str]:
        return [f"{m}_features" for m in self.modalities]

    @property
    def features(self) -> dict[str, torch.Tensor]:
        """`{modality: [num_items + 1, F_m]}` frozen features, row 0 = padding."""
        return {m: getattr(self, f"{m}_features") for m in self.modalities}

    def present(self) -> torch.Tensor:
        """`[M, num_items + 1]` the mask the model scores with (the missing rule applied; padding False)."""
        real_items = torch.arange(self.num_items + 1, device=self.modality_present.device) > 0
        return apply_missing_rule(self.modality_present, self.config, real_items)

    def reset_parameters(self) -> None:
        for name in self.buffer_names():
            getattr(self, name).zero_()
        self.modality_present.zero_()

    # ----------------------------------------------------------------------------------------- filling
    def _checked_table(self, features: Mapping, m: str, rows: int, what: str) -> torch.Tensor:
        if m not in features:
            raise ValueError(f"{what}: no features for modality {m!r}; got {sorted(features)}.")
        table = _as_tensor(features[m])
        expected = (rows, self.config.feature_size(m))
        if tuple(table.shape) != expected:
            raise ValueError(
                f"{what}: features[{m!r}] has shape {tuple(table.shape)}, expected {expected} "
                f"(items x {m}_feature_size)."
            )
        if not torch.isfinite(table).all():
            row = int((~torch.isfinite(table)).any(1).nonzero()[0, 0])
            raise ValueError(f"{what}: features[{m!r}] row {row} holds NaN or inf.")
        return table

    def _checked_mask(self, modality_present: Mapping | None, m: str, table: torch.Tensor, what: str):
        if modality_present is None or m not in modality_present:
            return table.ne(0).any(1)
        mask = _as_tensor(modality_present[m]).bool().reshape(-1)
        if mask.shape[0] != table.shape[0]:
            raise ValueError(f"{what}: modality_present[{m!r}] has {mask.shape[0]} rows, expected {table.shape[0]}.")
        return mask

    @torch.no_grad()
    def load(
        self,
        features: Mapping[str, torch.Tensor | np.ndarray],
        modality_present: Mapping[str, torch.Tensor | np.ndarray] | None = None,
        raw_item_ids: Sequence[str] | None = None,
    ) -> None:
        """Fill the catalogue. `features[m]` has one row per item, `[num_items, F_m]` (row i = item id i + 1);
        an all-zero row lacks the modality unless `modality_present[m]` says otherwise."""
        n = self.num_items
        if raw_item_ids is not None and len(raw_item_ids) != n:
            raise ValueError(f"load_item_features: {len(raw_item_ids)} raw item ids for {n} items.")
        for index, m in enumerate(self.modalities):
            table = self._checked_table(features, m, n, "load_item_features")
            buffer = getattr(self, f"{m}_features")
            buffer[0] = 0
            buffer[1:] = table.to(buffer.device, buffer.dtype)
            mask = self._checked_mask(modality_present, m, buffer[1:], "load_item_features")
            self.modality_present[index, 0] = False
            self.modality_present[index, 1:] = mask.to(self.modality_present.device)
        if raw_item_ids is not None:
            self.raw_item_ids = list(raw_item_ids)

    @torch.no_grad()
    def append(
        self, features: Mapping[str, torch.Tensor | np.ndarray], raw_item_ids: Sequence[str] | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Grow the catalogue by `n` items known by their features (`{modality: [n, F_m]}`, an all-zero row =
        missing). Returns the new rows (float32, on the catalogue's device) and their scoring mask `[M, n]`;
        the caller (`MissrecForSequentialRecommendation.add_items`) grows what depends on the catalogue (interests,
        counts)."""
        sizes = {m: len(features[m]) for m in self.modalities if m in features}
        if set(sizes) != set(self.modalities) or len(set(sizes.values())) != 1:
            raise ValueError(f"add_items needs one [n, F] table per modality {self.modalities}; got sizes {sizes}")
        count = next(iter(sizes.values()))
        if raw_item_ids is not None and len(raw_item_ids) != count:
            raise ValueError(f"raw_item_ids has {len(raw_item_ids)} entries for {count} new items")
        if (raw_item_ids is None) != (self.raw_item_ids is None):
            raise ValueError("give raw_item_ids exactly when the recommender has a raw id map")
        if raw_item_ids is not None:
            seen = set(self.raw_item_ids)
            for raw in raw_item_ids:  # checked before anything grows, so a refused call changes nothing
                if raw in seen:
                    raise ValueError(f"add_items: raw id {raw!r} is already in the catalogue")
                seen.add(raw)
        device = self.modality_present.device
        new = {}
        for m in self.modalities:
            table = torch.as_tensor(np.asarray(features[m]), dtype=torch.float32, device=device)
            if table.shape != (count, self.config.feature_size(m)) or not torch.isfinite(table).all():
                raise ValueError(
                    f"add_items: features[{m!r}] must be finite with shape {(count, self.config.feature_size(m))}, "
                    f"got {tuple(table.shape)}"
                )
            new[m] = table
        has = rows_present(new, self.modalities)
        for m in self.modalities:
            buffer = getattr(self, f"{m}_features")
            setattr(self, f"{m}_features", torch.cat([buffer, new[m].to(buffer.dtype)]))
        self.modality_present = torch.cat([self.modality_present, has], dim=1)
        if raw_item_ids is not None:
            self.raw_item_ids.extend(raw_item_ids)
        return new, apply_missing_rule(has, self.config)
