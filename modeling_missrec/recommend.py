"""Recommendations from a trained MISSRec, new items from their features alone, and sharing on the Hub.

    from modeling_missrec.recommend import MissrecRecommender

    recommender = MissrecRecommender.from_pretrained("outputs/scientific_mm")
    recommender.recommend([["B00O47ILVA", "B00CJ5EO2E"]], k=10)   # raw ids (ASINs) or model item ids
    MissrecRecommender.from_pretrained(folder, index="faiss-flat")     # large catalogues: certified lists

Scores are exactly those of training and evaluation (`MissrecForSequentialRecommendation.score_items`). With
`index="exact"` (the default) the top-k is kept as a running state over item blocks of the whole catalogue, so
a large catalogue never builds a `[B, N]` matrix; with a list index (`modeling_missrec.retrieval`) only the
union of each representation's top-C is re-ranked, and the answer is certified equal to the full scan's
("faiss-flat", "torch") or approximate ("faiss-ivf", "faiss-hnsw").
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import write_atomically
from .hub import resolve_model_folder
from .item_catalog import ITEM_IDS_FILE
from .modeling_missrec import MissrecForSequentialRecommendation
from .retrieval import BUILD_OPTIONS, LIST_KINDS, FusedScoreRetriever, catalog_fingerprint

logger = logging.getLogger(__name__)

INDEX_DIR = "retrieval_index"
INDEX_KINDS = ("exact", *LIST_KINDS)


@dataclass
class Recommendation:
    item_id: int  # model item id (file index + 1)
    raw_item_id: str | None  # e.g. the ASIN, when the id map is known
    score: float  # fused score before the temperature, as in training


class MissrecRecommender:
    """Top-k recommendation for histories given as raw item ids or model item ids."""

    def __init__(
        self,
        model: MissrecForSequentialRecommendation,
        raw_item_ids: Sequence[str] | None = None,
        block_size: int = 8192,
        index: str = "exact",
        index_dir: str | os.PathLike | None = None,
        **index_options,
    ):
        """`index`: "exact" scans every item; "torch" / "faiss-flat" (exact lists, certified), "faiss-ivf" /
        "faiss-hnsw" (approximate lists) search per-representation lists (`modeling_missrec.retrieval`), with
        `index_options` such as `initial_candidates`, `nlist`, `nprobe`, `hnsw_m`, `ef_search`. Lists saved
        in `index_dir` for this catalogue are reused; otherwise they are built."""
        if index not in INDEX_KINDS:
            raise ValueError(f"index must be one of {INDEX_KINDS}, got {index!r}")
        self.model = model.eval()
        self.block_size = block_size
        if raw_item_ids is not None:  # else the ids the model was saved with, if any
            self.model.set_raw_item_ids(raw_item_ids)
        self._index = {raw: i + 1 for i, raw in enumerate(self.raw_item_ids or [])}
        self.index_kind, self.index_options = index, index_options
        self.retriever = None if index == "exact" else self._build_retriever(index_dir)

    @property
    def raw_item_ids(self) -> list[str] | None:
        """Raw id of each model item id (entry i is item id i + 1), kept in the model's catalogue."""
        return self.model.catalog.raw_item_ids

    def _fingerprint(self, items) -> str:
        """The catalogue the saved lists were built for: the candidate tokens and, with a history prior, the
        raw rows and counts its lists hold."""
        prior = self.model.history_prior
        extra = [] if prior is None else [*self.model.item_features.values(), prior.item_log_count]
        return catalog_fingerprint(items, extra)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        index: str = "exact",
        index_options: Mapping | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        **kwargs,
    ) -> MissrecRecommender:
        """Load a saved recommender: a folder or a Hub id (`revision`, `token`; offline, from the local cache),
        with its raw item ids when it has them, and the lists of `index` saved beside it when they match the
        catalogue (otherwise they are rebuilt)."""
        path = resolve_model_folder(path, revision, token, argument="path")
        model = MissrecForSequentialRecommendation.from_pretrained(path, **kwargs)
        return cls(model, index=index, index_dir=Path(path) / INDEX_DIR, **(index_options or {}))

    def _build_retriever(self, index_dir: str | os.PathLike | None) -> FusedScoreRetriever:
        with torch.no_grad():
            items = self.model.item_tokens()
        options = dict(self.index_options)
        initial = options.pop("initial_candidates", 128)
        lists = None
        if index_dir is not None:
            lists = FusedScoreRetriever.load_lists(
                Path(index_dir), self.index_kind, self._fingerprint(items), **options
            )
            if lists is None:
                logger.info("no saved %s lists for this catalogue in %s: building them", self.index_kind, index_dir)
        prior = self.model.history_prior
        features = None if prior is None else self.model.item_features
        kind, fusion = self.index_kind, self.model.fusion
        return FusedScoreRetriever(items, fusion, kind, initial, lists, prior, features, **options)

    # ----------------------------------------------------------------------------------------- histories
    def item_ids(self, history: Sequence[str | int]) -> list[int]:
        """Model item ids of one history; strings are raw ids, integers model ids (1..num_items)."""
        ids = []
        for position, item in enumerate(history):
            if isinstance(item, str):
                if item not in self._index:
                    known = "no raw id map was loaded" if not self._index else f"{len(self._index)} known raw ids"
                    raise KeyError(f"history position {position}: unknown item {item!r} ({known})")
                ids.append(self._index[item])
            else:
                item = int(item)
                if not 1 <= item <= self.model.config.num_items:
                    raise ValueError(
                        f"history position {position}: item id {item} outside 1..{self.model.config.num_items}"
                    )
                ids.append(item)
        if not ids:
            raise ValueError("an empty history cannot be scored; give at least one item")
        return ids

    def pad(self, histories: Sequence[Sequence[str | int]]) -> torch.Tensor:
        """Right-padded `[B, W]` ids, the most recent `max_seq_length` items of each history."""
        limit = self.model.config.max_seq_length
        rows = [self.item_ids(history)[-limit:] for history in histories]
        width = max(map(len, rows))
        padded = torch.zeros(len(rows), width, dtype=torch.long)
        for row, ids in enumerate(rows):  # building the request, not the model path: a short loop is fine
            padded[row, : len(ids)] = torch.tensor(ids)
        return padded.to(self.model.device)

    # ------------------------------------------------------------------------------------------ scoring
    @torch.no_grad()
    def scores(self, histories: Sequence[Sequence[str | int]]) -> torch.Tensor:
        """Scores `[B, num_items + 1]` of every item (column 0, padding, is -inf); small catalogues only."""
        input_ids = self.pad(histories)
        sequence = self.model.encode(input_ids).sequence_embedding
        items = self.model.item_tokens()
        scores = self.model.score_items(sequence, items, 1, self.model.config.num_items + 1, input_ids)
        return torch.cat([torch.full_like(scores[:, :1], float("-inf")), scores], dim=1)

    @torch.no_grad()
    def recommend(
        self,
        histories: Sequence[Sequence[str | int]],
        k: int = 10,
        exclude_history: bool = False,
        batch_size: int = 256,
    ) -> list[list[Recommendation]]:
        """The `k` best items for each history, best first."""
        results: list[list[Recommendation]] = []
        for start in range(0, len(histories), batch_size):
            input_ids = self.pad(histories[start : start + batch_size])
            if self.retriever is not None:
                sequence = self.model.encode(input_ids).sequence_embedding
                exclude = input_ids if exclude_history else None
                found = self.retriever.search(sequence, k, exclude, input_ids=input_ids)
            else:  # the full scan: the model's own streaming top-k
                found = self.model.recommend(
                    input_ids, k=k, exclude_history=exclude_history, block_size=self.block_size
                )
            top_scores, top_items = found.scores, found.item_ids
            for scores_row, items_row in zip(top_scores.tolist(), top_items.tolist()):
                results.append(
                    [
                        Recommendation(item, self.raw_item_ids[item - 1] if self.raw_item_ids else None, score)
                        for score, item in zip(scores_row, items_row)
                        if item != 0
                    ]
                )
        return results

    # ---------------------------------------------------------------------------------------- new items
    @torch.no_grad()
    def add_items(
        self,
        features: Mapping[str, np.ndarray | torch.Tensor],
        raw_item_ids: Sequence[str] | None = None,
    ) -> list[int]:
        """Add items known only by their features to an inductive model's catalogue, without retraining.

        `features[m]` is `[n, F_m]` for every modality of the model (an all-zero row = missing modality).
        Each new item's interest id is its nearest centroid per modality. Returns the new model item ids."""
        new_ids = self.model.add_items(features, raw_item_ids)
        first = new_ids[0] if new_ids else self.model.config.num_items + 1
        for offset, raw in enumerate(raw_item_ids or []):
            self._index[raw] = first + offset
        if self.retriever is not None:
            self.retriever.add_items(self.model.item_tokens(), first, self.model.item_features)
        return new_ids

    def save_pretrained(self, path: str | os.PathLike, **kwargs) -> None:
        """The model and its raw id map, loadable with `from_pretrained`; with a list index, the lists too
        (`retrieval_index/`, reused by `from_pretrained(path, index=<the same kind>)`)."""
        self.model.save_pretrained(path, **kwargs)  # with the raw ids (`item_ids.json`)
        if self.retriever is not None:
            build = {k: v for k, v in self.index_options.items() if k in BUILD_OPTIONS}
            self.retriever.save(Path(path) / INDEX_DIR, self._fingerprint(self.retriever.items), build)


# -------------------------------------------------------------------------------------------- the Hub
def model_card(metrics: Mapping | None, dataset: str, mode: str, repo_id: str | None = None) -> str:
    """A README.md for a fine-tuned recommender: data, protocol, metrics, usage."""
    lines = [
        "---",
        "library_name: transformers",
        "tags: [recommendation, sequential-recommendation, missrec, multimodal]",
        "---",
        "",
        f"# MISSRec recommender{f' ({repo_id})' if repo_id else ''}",
        "",
        "MISSRec (Wang et al., ACM MM 2023): multi-modal interest-aware sequence representation for sequential",
        "recommendation, trained with the `missrec` library.",
        "",
        f"- Dataset: {dataset}",
        f"- Mode: {mode} ({'item IDs + content' if mode == 'transductive' else 'content only'})",
        "- Protocol: leave-one-out, full ranking over every item (padding excluded), history not excluded, ties",
        "  count against the target; HR@K and NDCG@K at the standard cut-off K (the original code reported",
        "  @K+1, shown separately).",
        "",
    ]
    if metrics:
        columns = ["hr@10", "ndcg@10", "hr@50", "ndcg@50", "mrr"]
        lines += ["| split | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for split in ("valid", "test", "test_at_k_plus_1"):
            if split in metrics:
                values = " | ".join(f"{metrics[split].get(c, float('nan')):.4f}" for c in columns)
                lines.append(f"| {split.replace('_at_k_plus_1', ' (@K+1)')} | {values} |")
        lines += ["", f"Best epoch {metrics.get('best_epoch')} of {metrics.get('epochs_run')}.", ""]
    name = repo_id or "<this folder>"
    lines += [
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModel",
        f'model = AutoModel.from_pretrained("{name}", trust_remote_code=True).eval()',
        "logits = model(input_ids).logits   # input_ids: [B, L] item ids (1-based), right-padded with 0",
        "```",
        "",
        f"`{ITEM_IDS_FILE}` maps model item ids to raw item ids (entry i is item id i + 1).",
        "",
    ]
    return "\n".join(lines)


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    api=None,
    dataset: str = "unknown",
    mode: str | None = None,
    commit_message: str = "Upload MISSRec recommender",
) -> str:
    """Upload a saved recommender folder (safetensors weights, config with `auto_map`, the model code, the item
    id map) with a generated model card. `api` defaults to `huggingface_hub.HfApi()`; tests pass a mock."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    for required in ("config.json", "model.safetensors", "modeling_missrec.py"):
        if not (folder / required).exists():
            raise FileNotFoundError(f"push_to_hub: {folder / required} is missing; save the model there first")
    metrics_file = folder / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else None
    config = json.loads((folder / "config.json").read_text())
    mode = mode or ("transductive" if config.get("use_item_ids") else "inductive")
    write_atomically(folder / "README.md", model_card(metrics, dataset, mode, repo_id))
    api = api or HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    ignore = ["checkpoint/*", "best_model/*", ".*", "*.tmp", "training_state.pt", "runs/*", "missrec_finetune/*"]
    api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="model",
        commit_message=commit_message,
        ignore_patterns=ignore,
    )
    return repo_id


__all__ = ["MissrecRecommender", "Recommendation", "model_card", "push_to_hub"]
