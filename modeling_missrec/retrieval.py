"""Certified top-k over the fused score, without scanning the whole catalogue.

The fused score of an item is not one inner product: it mixes one cosine per modality (a convex combination of
the modalities the item has, `MissrecFusionHead`) and, transductive, an ID score:
`score = w * id + (1 - w) * fused` with `fused <= max over present modalities of cosine`. So one inner-product
list per representation (each modality's tokens over the items that have it, the ID tokens) bounds it: an item
in none of the lists' top-C scores at most `w * id_C + (1 - w) * max_m cos_m,C`, with `x_C` the C-th score of
list x. Re-rank the union of the top-C lists with the exact fused score; when the k-th re-ranked score reaches
that bound, no item outside the union can enter the top-k, and the answer is the full scan's (a threshold-
algorithm certificate). Otherwise C doubles, for the queries that are not yet certified.

A model with a history prior (`config.history_prior`) adds to that score `a_m * cos(raw_m(last), raw_m(i))` per
modality, `h * [i in history]` and `p * log(1 + count_i)`. Each is bounded the same way: one more inner-product
list per modality over the normalised raw feature rows (queried with the last item's row, negated where
`a_m < 0`), one list of the items by `sign(p) * log count`, and the history's items re-ranked exactly (outside
the history the term is 0). The bound of an item outside every list's top-C is the sum of the terms' bounds.

With exact lists (`faiss-flat`, or the `torch` flat lists) the certificate is a proof and the result equals the
full scan by construction. With approximate lists (`faiss-ivf`, `faiss-hnsw`) the lists themselves may miss
items, so the same test only says the bound was met: measure recall against the exact scan
(`bench/serve.py`).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import recover_directory, replace_directory, write_atomically
from .modeling_missrec import ItemTokens, MissrecFusionHead, MissrecHistoryPrior, last_item_ids
from .ranking import streaming_topk

LIST_KINDS = ("torch", "faiss-flat", "faiss-ivf", "faiss-hnsw")
EXACT_KINDS = ("torch", "faiss-flat")
# Re-ranked and listed scores come from different matrix products (float32 on the CPU); a bound is only
# trusted with this slack. A bf16 model's scores round far coarser: give it float32 tokens for serving.
BOUND_SLACK = 1e-5
BUILD_OPTIONS = ("nlist", "hnsw_m")  # what the saved lists were built with (search options may change)


def _faiss():
    try:
        import faiss
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("faiss lists need faiss-cpu: pip install 'missrec[serve]'") from error
    return faiss


class InnerProductList:
    """One representation's vectors (`[n, H]`, for item ids `ids`), searchable for the top-C by inner product.

    kind: "torch" (an exact blocked matrix product), "faiss-flat" (exact), "faiss-ivf" (`nlist` cells, `nprobe`
    visited) or "faiss-hnsw" (`hnsw_m` links, `ef_search`)."""

    def __init__(
        self,
        vectors: torch.Tensor,
        ids: torch.Tensor,
        kind: str = "faiss-flat",
        nlist: int | None = None,
        nprobe: int = 16,
        hnsw_m: int = 32,
        ef_search: int = 128,
    ):
        if kind not in LIST_KINDS:
            raise ValueError(f"kind must be one of {LIST_KINDS}, got {kind!r}")
        if vectors.shape[0] != ids.shape[0]:
            raise ValueError(f"{vectors.shape[0]} vectors for {ids.shape[0]} ids")
        self.kind, self.nprobe, self.ef_search = kind, nprobe, ef_search
        self.dim = vectors.shape[1]
        self.ids = ids.long().cpu()
        self.vectors = vectors.detach().float().cpu().contiguous()
        self.index = None
        if kind != "torch":
            self.index = self._build(kind, nlist, hnsw_m)
            self._add_to_index(self.vectors, self.ids)

    def __len__(self) -> int:
        return int(self.ids.numel())

    def _build(self, kind: str, nlist: int | None, hnsw_m: int):
        faiss = _faiss()
        if kind == "faiss-flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        if kind == "faiss-hnsw":
            index = faiss.IndexHNSWFlat(self.dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = self.ef_search
            return faiss.IndexIDMap2(index)
        cells = nlist or max(1, int(4 * len(self) ** 0.5))
        cells = min(cells, max(1, len(self)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, cells, faiss.METRIC_INNER_PRODUCT)
        index.train(self.vectors.numpy())
        index.nprobe = self.nprobe
        return index

    def _add_to_index(self, vectors: torch.Tensor, ids: torch.Tensor) -> None:
        if len(ids):
            self.index.add_with_ids(vectors.numpy(), ids.numpy().astype(np.int64))

    def add(self, vectors: torch.Tensor, ids: torch.Tensor) -> None:
        """Append items (an IVF list keeps its trained cells)."""
        vectors = vectors.detach().float().cpu().contiguous()
        self.vectors = torch.cat([self.vectors, vectors])
        self.ids = torch.cat([self.ids, ids.long().cpu()])
        if self.index is not None:
            self._add_to_index(vectors, ids.long().cpu())

    def search(self, queries: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, c]` scores and item ids, best first; past the list's end, (-inf, 0)."""
        c_real = min(c, len(self))
        queries = queries.detach().float().cpu().contiguous()
        if c_real == 0:
            scores, ids = torch.empty(len(queries), 0), torch.empty(len(queries), 0, dtype=torch.long)
        elif self.index is None:
            scores, positions = self._torch_topk(queries, c_real)
            ids = self.ids[positions]
        else:
            raw_scores, raw_ids = self.index.search(queries.numpy(), c_real)
            scores, ids = torch.from_numpy(raw_scores), torch.from_numpy(raw_ids)
            missing = ids < 0  # an approximate list may return fewer than asked
            scores, ids = scores.masked_fill(missing, float("-inf")), ids.masked_fill(missing, 0)
        pad = c - scores.shape[1]
        if pad:
            scores = torch.cat([scores, torch.full((len(queries), pad), float("-inf"))], dim=1)
            ids = torch.cat([ids, torch.zeros(len(queries), pad, dtype=torch.long)], dim=1)
        return scores, ids

    def _torch_topk(self, queries: torch.Tensor, c: int, block: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
        """The evaluator's streaming top-k over the list's rows (positions 1..n), as 0-based positions."""
        scores, positions = streaming_topk(
            lambda s, e: queries @ self.vectors[s - 1 : e - 1].T, len(self), c, min(block, len(self))
        )
        return scores, positions - 1

    # ------------------------------------------------------------------------------------------ files
    def save(self, path: Path) -> None:
        """The vectors and ids (`.pt`) and, for faiss kinds, the index (`.faiss`), each written atomically."""
        buffer = _tensor_bytes({"vectors": self.vectors, "ids": self.ids})
        write_atomically(path.with_suffix(".pt"), buffer)
        if self.index is not None:
            write_atomically(path.with_suffix(".faiss"), _faiss().serialize_index(self.index).tobytes())

    @classmethod
    def load(cls, path: Path, kind: str, nprobe: int = 16, ef_search: int = 128) -> InnerProductList:
        state = torch.load(path.with_suffix(".pt"), weights_only=True)
        self = cls.__new__(cls)
        self.kind, self.nprobe, self.ef_search = kind, nprobe, ef_search
        self.vectors, self.ids = state["vectors"], state["ids"]
        self.dim = self.vectors.shape[1]
        self.index = None
        if kind != "torch":
            raw = np.frombuffer(path.with_suffix(".faiss").read_bytes(), dtype=np.uint8)
            self.index = _faiss().deserialize_index(raw)
            _set_search_parameters(self.index, nprobe, ef_search)
        return self


def _set_search_parameters(index, nprobe: int, ef_search: int) -> None:
    faiss = _faiss()
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap2) else index
    if hasattr(inner, "nprobe"):
        inner.nprobe = nprobe
    if hasattr(inner, "hnsw"):
        inner.hnsw.efSearch = ef_search


def _tensor_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


@dataclass
class CertifiedTopK:
    """Result of `FusedScoreRetriever.search`: best first; `certified[b]` says the k-th score of row b reached
    the bound of every item outside the re-ranked union (with exact lists: the full scan's answer);
    `candidates` is the number of items C taken from each list for that row."""

    scores: torch.Tensor  # [B, k] fused scores (before the temperature); -inf past the rankable items
    item_ids: torch.Tensor  # [B, k] model item ids; 0 past the rankable items
    certified: torch.Tensor  # [B] bool
    candidates: torch.Tensor  # [B] the final C of each row


class FusedScoreRetriever:
    """Top-k of the fused score through one inner-product list per item representation (module docstring).

    Built from the catalogue's `ItemTokens` (ids 0..N, column 0 padding) and the model's fusion head; the lists
    hold item ids 1..N, each modality's list only the items that have that modality."""

    def __init__(
        self,
        items: ItemTokens,
        fusion: MissrecFusionHead,
        kind: str = "faiss-flat",
        initial_candidates: int = 128,
        lists: dict[str, InnerProductList] | None = None,
        history_prior: MissrecHistoryPrior | None = None,
        item_features: dict[str, torch.Tensor] | None = None,
        **list_options,
    ):
        """`history_prior` and `item_features` (the model's raw feature buffers): for a model with the prior."""
        if (history_prior is None) != (item_features is None):
            raise ValueError("give history_prior and item_features together (a model with a history prior)")
        self.items, self.fusion, self.kind = items, fusion, kind
        self.prior, self.features = history_prior, item_features
        self.initial_candidates = initial_candidates
        self.num_items = items.modality_tokens.shape[1] - 1
        self.id_weight = float(fusion.id_score_weight) if items.id_tokens is not None else 0.0
        if lists is None:
            lists = self._build_lists(items, kind, list_options)
            lists.update(self._build_prior_lists(1, kind, list_options))
        self.lists = lists
        self._find_unlisted()

    def _find_unlisted(self) -> None:
        """The items with no modality (their fused score is 0), and those no list holds (no ID list either),
        lowest id first; None when there are none."""
        empty = ~self.items.present[:, 1:].bool().any(0).cpu()
        self.some_item_has_no_modality = bool(empty.any())
        has_id_list = self.items.id_tokens is not None
        self.unlisted_ids = (
            None if has_id_list or not self.some_item_has_no_modality else empty.nonzero().squeeze(1) + 1
        )

    @staticmethod
    def representations(items: ItemTokens, start: int = 1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(vectors, item ids) of each list over item ids `start..N`: one per modality slot (`modality_<m>`)
        over the items that have it, and `id` when the ID score is separate."""
        found = {}
        ids = torch.arange(start, items.modality_tokens.shape[1])
        for slot in range(items.modality_tokens.shape[0]):
            present = items.present[slot, start:].bool().cpu()
            found[f"modality_{slot}"] = (
                items.modality_tokens[slot, start:][present.to(items.present.device)],
                ids[present],
            )
        if items.id_tokens is not None:
            found["id"] = (items.id_tokens[start:], ids)
        return found

    @classmethod
    def _build_lists(cls, items: ItemTokens, kind: str, options: dict) -> dict[str, InnerProductList]:
        return {
            name: InnerProductList(vectors, ids, kind, **options)
            for name, (vectors, ids) in cls.representations(items).items()
        }

    def prior_representations(self, start: int = 1) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(vectors, item ids) of the prior's lists over item ids `start..N`: `prior_<m>`, the normalised raw
        rows of the items that have modality m; `prior_count`, each item's log count as a 1-d vector."""
        if self.prior is None:
            return {}
        found = {}
        for m in self.prior.modalities:
            rows = self.features[m][start:].float()
            has = rows.ne(0).any(1).cpu()
            found[f"prior_{m}"] = (
                torch.nn.functional.normalize(rows, dim=-1)[has.to(rows.device)],
                (has.nonzero().squeeze(1) + start),
            )
        counts = self.prior.item_log_count[start:].float().unsqueeze(1)
        found["prior_count"] = (counts, torch.arange(start, start + len(counts)))
        return found

    def _build_prior_lists(self, start: int, kind: str, options: dict) -> dict[str, InnerProductList]:
        lists = {}
        for name, (vectors, ids) in self.prior_representations(start).items():
            # One number per item: an exact sorted list is as fast as any index and never approximate.
            lists[name] = InnerProductList(vectors, ids, "torch" if name == "prior_count" else kind, **options)
        return lists

    def add_items(self, items: ItemTokens, first_new_id: int, item_features: dict[str, torch.Tensor] | None = None):
        """Extend the lists with the items `first_new_id..N` of the grown catalogue `items` (and, with a history
        prior, of the grown raw feature buffers `item_features`)."""
        if self.prior is not None:
            if item_features is None:
                raise ValueError("add_items: a retriever with a history prior needs the grown item_features")
            self.features = item_features
        representations = {**self.representations(items, first_new_id), **self.prior_representations(first_new_id)}
        for name, (vectors, ids) in representations.items():
            self.lists[name].add(vectors, ids)
        self.items = items
        self.num_items = items.modality_tokens.shape[1] - 1
        self._find_unlisted()

    # ---------------------------------------------------------------------------------------- search
    def bound(self, cutoffs: dict[str, torch.Tensor]) -> torch.Tensor:
        """`[B]` the highest score an item outside every list's top-C can have, from each list's C-th score
        (the prior's lists' scores already carry the sign of their weight)."""
        total = self.fused_bound(cutoffs)
        if self.prior is None:
            return total
        # A list's C-th score bounds its term for the items it holds past the top C (-inf: it has none left); an
        # item it does not hold (no row of that modality) has the term exactly 0. The in-history term is 0 off
        # the history, whose items are always re-ranked exactly.
        for name, weight in self.prior_list_weights().items():
            if weight == 0:
                continue
            term = abs(weight) * cutoffs[name]
            if len(self.lists[name]) < self.num_items:
                term = term.clamp_min(0.0)
            total = total + term
        return total

    def prior_list_weights(self) -> dict[str, float]:
        """The weight (score units) of the term each prior list bounds."""
        weights = self.prior.weights()
        found = {f"prior_{m}": weights[f"{m}_cosine"] for m in self.prior.modalities}
        return {**found, "prior_count": weights["log_count"]}

    def prior_queries(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each prior list's queries for the histories `input_ids`: the last item's normalised row (the count
        list: a 1-d one), times the sign of the term's weight, so that a list's best are the term's best."""
        last = last_item_ids(input_ids)
        queries = {}
        for name, weight in self.prior_list_weights().items():
            sign = -1.0 if weight < 0 else 1.0
            if name == "prior_count":
                queries[name] = torch.full((len(input_ids), 1), sign)
            else:
                rows = self.features[name.removeprefix("prior_")][
                    last.to(self.features[name.removeprefix("prior_")].device)
                ]
                queries[name] = sign * torch.nn.functional.normalize(rows.float(), dim=-1)
        return queries

    def fused_bound(self, cutoffs: dict[str, torch.Tensor]) -> torch.Tensor:
        """`[B]` the highest fused score an item outside every fused list's top-C can have. An item with no
        modality has fused score 0, so 0 joins the modality maximum when one exists."""
        modality = [v for name, v in cutoffs.items() if name.startswith("modality_")]
        best = torch.stack(modality).amax(0)
        if self.some_item_has_no_modality:
            best = best.clamp_min(0.0)
        if "id" not in cutoffs:
            return best
        # An exhausted side bounds nothing: lerp(-inf, x) would be NaN, and NaN never passes the test.
        either_exhausted = (best == float("-inf")) | (cutoffs["id"] == float("-inf"))
        return torch.lerp(best, cutoffs["id"], self.id_weight).masked_fill(either_exhausted, float("-inf"))

    @torch.no_grad()
    def search(
        self,
        sequence_embedding: torch.Tensor,
        k: int,
        exclude_items: torch.Tensor | None = None,
        query_batch: int = 32,
        input_ids: torch.Tensor | None = None,
    ) -> CertifiedTopK:
        """The k best items of each row of `sequence_embedding` `[B, H]`; `exclude_items` `[B, L]` (0 = padding)
        are never returned. C starts at `initial_candidates` (at least k) and doubles for uncertified rows
        until the bound is met or every list is exhausted. Rows go `query_batch` at a time: their union of
        candidates is re-ranked as one `[query_batch, union]` block. With a history prior, `input_ids` `[B, L]`
        are the histories the rows were encoded from."""
        if self.prior is not None and input_ids is None:
            raise ValueError("this retriever scores a history prior: pass the histories' input_ids")

        def rows(tensor, s):
            return None if tensor is None else tensor[s : s + query_batch]

        parts = [
            self._search_rows(sequence_embedding[s : s + query_batch], k, rows(exclude_items, s), rows(input_ids, s))
            for s in range(0, len(sequence_embedding), query_batch)
        ]
        return CertifiedTopK(
            *(torch.cat([getattr(p, f) for p in parts]) for f in ("scores", "item_ids", "certified", "candidates"))
        )

    def _search_rows(
        self,
        sequence_embedding: torch.Tensor,
        k: int,
        exclude_items: torch.Tensor | None,
        input_ids: torch.Tensor | None,
    ):
        rows = len(sequence_embedding)
        out_scores = torch.full((rows, k), float("-inf"))
        out_ids = torch.zeros(rows, k, dtype=torch.long)
        certified = torch.zeros(rows, dtype=torch.bool)
        final_c = torch.zeros(rows, dtype=torch.long)
        pending = torch.arange(rows)
        c = max(self.initial_candidates, k)
        longest = max(len(v) for v in self.lists.values())
        while len(pending):
            exhausted = c >= longest
            scores, ids, met, short = self._round(
                sequence_embedding[pending],
                c,
                k,
                None if exclude_items is None else exclude_items[pending],
                None if input_ids is None else input_ids[pending],
            )
            # A list that returned fewer than it holds (an approximate one) gives no bound, and more C won't help.
            done = met | exhausted | short
            out_scores[pending[done]], out_ids[pending[done]] = scores[done], ids[done]
            certified[pending[done]] = (met[done] | exhausted) & ~short[done]
            final_c[pending[done]] = c
            pending = pending[~done]
            c *= 2
        return CertifiedTopK(out_scores, out_ids, certified, final_c)

    def _round(
        self, queries: torch.Tensor, c: int, k: int, exclude: torch.Tensor | None, input_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-C of every list, the union re-ranked with the exact score, and the bound test: scores and ids
        `[B, k]`, whether the bound was met `[B]`, and whether a list came back short `[B]`."""
        device = self.items.modality_tokens.device
        cutoffs, found = {}, []
        short = torch.zeros(len(queries), dtype=torch.bool)
        prior_queries = {} if self.prior is None else self.prior_queries(input_ids)
        for name, listed in self.lists.items():
            scores, ids = listed.search(prior_queries.get(name, queries), c)
            expected = min(c, len(listed))
            short |= (ids[:, :expected] == 0).any(1)
            cutoffs[name] = scores[:, -1] if len(listed) > c else torch.full((len(queries),), float("-inf"))
            found.append(ids)
        if self.unlisted_ids is not None:  # items in no list (inductive, no modality): all score exactly 0
            excluded = 0 if exclude is None else exclude.shape[1]
            found.append(self.unlisted_ids[: k + excluded])  # enough of them to fill k after any exclusion
        if input_ids is not None:  # the in-history term is known only there: score the history exactly
            found.append(input_ids.cpu())
        union = torch.cat([ids.reshape(-1) for ids in found]).unique()  # sorted: ties below go to the lower id
        union = union[union > 0]
        on_device = union.to(device)
        fused = self.fusion(queries.to(device), self.items.take(on_device))
        if self.prior is not None:
            fused = fused + self.prior(input_ids.to(device), None, self.features, on_device)
        fused = fused.float().cpu()
        if exclude is not None:
            fused = fused.masked_fill((union.view(1, 1, -1) == exclude.cpu().unsqueeze(-1)).any(1), float("-inf"))
        order = fused.sort(dim=1, descending=True, stable=True)  # the full scan's tie rule: lower id first
        take = min(k, fused.shape[1])
        scores = torch.full((len(queries), k), float("-inf"))
        ids = torch.zeros(len(queries), k, dtype=torch.long)
        scores[:, :take] = order.values[:, :take]
        ids[:, :take] = union[order.indices[:, :take]]
        ids = ids.masked_fill(scores == float("-inf"), 0)
        met = scores[:, -1] >= self.bound(cutoffs) + BOUND_SLACK
        return scores, ids, met, short

    # ------------------------------------------------------------------------------------------ files
    def save(self, folder: Path, fingerprint: str, build_options: dict | None = None) -> None:
        """Every list and `index.json` (kind, build options, lists, the catalogue fingerprint), written into a
        sibling folder and swapped in whole: a reader sees the old set or the new one."""
        temporary = folder.with_name(f".{folder.name}.tmp")
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir(parents=True)
        for name, listed in self.lists.items():
            listed.save(temporary / name)
        meta = {
            "kind": self.kind, "build_options": build_options or {}, "lists": sorted(self.lists),
            "fingerprint": fingerprint, "num_items": self.num_items,
        }  # fmt: skip
        write_atomically(temporary / "index.json", json.dumps(meta, indent=2))
        replace_directory(temporary, folder)

    @staticmethod
    def load_lists(folder: Path, kind: str, fingerprint: str, **options) -> dict[str, InnerProductList] | None:
        """The saved lists when `folder` holds whole lists of this kind, built with these options, for this
        catalogue; else None (the caller rebuilds them)."""
        recover_directory(folder, folder.with_name(f".{folder.name}.tmp"), "index.json")  # a save killed mid-swap
        try:
            meta = json.loads((folder / "index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        build = {k: v for k, v in options.items() if k in BUILD_OPTIONS}
        same = meta.get("kind") == kind and meta.get("fingerprint") == fingerprint
        if not same or meta.get("build_options", {}) != build:
            return None
        search_options = {k: v for k, v in options.items() if k in ("nprobe", "ef_search")}
        try:
            return {name: InnerProductList.load(folder / name, kind, **search_options) for name in meta["lists"]}
        except (OSError, RuntimeError, KeyError):
            return None


def catalog_fingerprint(items: ItemTokens, extra: list[torch.Tensor] | tuple = ()) -> str:
    """A hash of the candidate representations and any `extra` tensors the lists hold (as float32, whatever
    their device or dtype): saved lists are reused only for the same catalogue."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in (items.modality_tokens, items.present, items.id_tokens, *extra):
        if tensor is not None:
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
