"""MISSRec: multi-modal interest-aware sequence representation (ACM MM 2023), as HuggingFace models.

The backbone [`MissrecModel`] turns a history of item ids into one L2-normalised vector:
item tokens (per-modality adaptors + optional ID + position) go through a decoder that cross-attends to the
encoded *set* of interests the history touches (interests = k-means centroids of all item tokens).
[`MissrecForSequentialRecommendation`] adds one domain's item catalogue, the dynamic fusion head that scores
every item, and the full-softmax loss.

Where this file departs from the original code, on purpose, the docstring says "Fix:"; where it reproduces a
quirk for comparability, it says "As the original".
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithCrossAttentions
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging

from .atomic import complete_interrupted_commit
from .configuration_missrec import MissrecConfig
from .distributed import gather_no_grad, gather_sizes, gather_with_grad, rank_and_world_size
from .interests import assign_to_centroids, interest_sets, kmeans, num_interests
from .item_catalog import (
    ITEM_IDS_FILE,
    MissrecItemCatalog,
    apply_missing_rule,
    read_raw_item_ids,
    rows_present,
    write_raw_item_ids,
)
from .losses import augmented_view_loss, in_batch_contrastive_loss, sampled_softmax_loss
from .ranking import ids_in_block, streaming_topk
from .weight_transfer import FROZEN_IN_TRANSFER, load_matching_weights, transfer_config

logger = logging.get_logger(__name__)

# Large finite negative used instead of -inf inside softmaxes so that all-masked rows give zeros, not NaN.
_MASKED_LOGIT = -1.0e4


@dataclass
class MissrecModelOutput(ModelOutput):
    """Output of the backbone.

    sequence_embedding: `[B, H]` L2-normalised decoder state at each history's last real position.
    last_hidden_state: `[B, L, H]` decoder states at every position (`[B, 1, H]`, the last position, with
        `last_position_only=True`).
    interest_hidden_states: `[B, Q, H]` encoded interest tokens; `interest_ids` `[B, Q]` their ids (0 = padding).
    interest_regularization: scalar interest regulariser R of the batch (before its weight gamma).
    encoder_hidden_states / decoder_hidden_states (`output_hidden_states`): each layer's input and the last
        layer's output, before the final LayerNorm (the decoder's last with `last_position_only`: that row).
    encoder_attentions / decoder_attentions / cross_attentions (`output_attentions`): each layer's weights
        `[B, heads, queries, keys]` over the interest set, the history, and the history to the interests.
    """

    sequence_embedding: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    interest_hidden_states: torch.FloatTensor | None = None
    interest_ids: torch.LongTensor | None = None
    interest_regularization: torch.FloatTensor | None = None
    encoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    encoder_attentions: tuple[torch.FloatTensor, ...] | None = None
    decoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    decoder_attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class MissrecTopKOutput(ModelOutput):
    """Output of [`MissrecForSequentialRecommendation.recommend`].

    item_ids: `[B, k]` the best item ids per history, best first (ties to the lower id); 0 where a row has fewer
        than k rankable items. scores: `[B, k]` their scores before the temperature (-inf where the id is 0).
    """

    item_ids: torch.LongTensor | None = None
    scores: torch.FloatTensor | None = None


@dataclass
class MissrecSequentialRecommendationOutput(ModelOutput):
    """Output of [`MissrecForSequentialRecommendation`].

    loss: cross-entropy over the whole catalogue plus gamma x interest regulariser (when `labels` are given).
    logits: `[B, num_items + 1]` scores / temperature; column 0 (padding) is -inf. In training with
        `loss_type="sampled"`, `[B, B + num_negatives]` over the step's candidates (the batch's targets, then
        the sampled negatives), logQ-corrected and with accidental hits at -inf.
    sequence_embedding: `[B, H]` the normalised user representation.
    interest_regularization: the unweighted regulariser.
    encoder_hidden_states, encoder_attentions, decoder_hidden_states, decoder_attentions, cross_attentions: the
        backbone's, with `output_hidden_states` / `output_attentions` (see `MissrecModelOutput`).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    sequence_embedding: torch.FloatTensor | None = None
    interest_regularization: torch.FloatTensor | None = None
    encoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    encoder_attentions: tuple[torch.FloatTensor, ...] | None = None
    decoder_hidden_states: tuple[torch.FloatTensor, ...] | None = None
    decoder_attentions: tuple[torch.FloatTensor, ...] | None = None
    cross_attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ItemTokens:
    """Candidate-side item representations, ready for scoring a contiguous range of item ids.

    modality_tokens: `[M, C, H]` L2-normalised per-modality tokens.
    present: `[M, C]` bool, whether the item has that modality (masked modalities do not take part).
    id_tokens: `[C, H]` L2-normalised ID embeddings, or None (inductive, or folded into the modality token).
    first_item_id: item id of column 0 (to index per-item fusion factors).
    item_ids: `[C]` the item id of each column, when the columns are not a contiguous range (see `take`).
    """

    modality_tokens: torch.Tensor
    present: torch.Tensor
    id_tokens: torch.Tensor | None
    first_item_id: int = 0
    item_ids: torch.Tensor | None = None

    def take(self, item_ids: torch.Tensor) -> ItemTokens:
        """The representations of the item ids `item_ids` `[C]`, in that order (a candidate set to re-rank)."""
        columns = item_ids - self.first_item_id
        ids = None if self.id_tokens is None else self.id_tokens[columns]
        return ItemTokens(self.modality_tokens[:, columns], self.present[:, columns], ids, 0, item_ids)

    def slice(self, start: int, end: int) -> ItemTokens:
        """The representations of item ids `start..end-1` (ids, not column numbers)."""
        lo, hi = start - self.first_item_id, end - self.first_item_id
        ids = None if self.id_tokens is None else self.id_tokens[lo:hi]
        return ItemTokens(self.modality_tokens[:, lo:hi], self.present[:, lo:hi], ids, start)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference attention, written out: softmax(q k^T x scaling, masked) v, and the weights
    (`output_attentions`). `attention_mask` is boolean `[B, 1, 1, S]`, True at keys that may be attended to (as
    SDPA takes it). Returns the output `[B, Q, heads, head_dim]` and the weights `[B, heads, Q, S]`."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
    weights = F.dropout(F.softmax(weights, dim=-1), p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class MissrecAttention(nn.Module):
    """Multi-head attention with separate q/k/v/o projections (LoRA targets), through transformers' attention
    interface: `config._attn_implementation` "sdpa" (the default) or "eager" (`eager_attention_forward`), or any
    function registered with `transformers.AttentionInterface` that takes a boolean key mask."""

    is_causal = False  # every position sees every other (the decoder is not causal, the encoder reads a set)

    def __init__(self, config: MissrecConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = 1.0 / math.sqrt(self.head_dim)  # SDPA's default scale, exactly
        self.dropout = config.attention_dropout_prob
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)
        # `_init_weights` reads this: modules are initialised one by one, and only those owning parameters.
        for projection in (self.q_proj, self.k_proj, self.v_proj):
            projection._missrec_fused_in_projection = True

    def _split_heads(self, states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = states.shape
        return states.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        vocabulary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`key_padding_mask` `[B, S]` is True at keys that may be attended to. `vocabulary` `(rows [V, H], ids
        [B, S])` says that `hidden_states` is `rows[ids]` (self-attention over tokens of a fixed vocabulary):
        each row is then projected once and the projections gathered, the same values up to float rounding and
        fewer products when V < B x S. Returns the output and, with `output_attentions` (computed by the eager
        function, the only one that forms them), the weights."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if vocabulary is not None and self.training and any(type(p) is not nn.Linear for p in projections):
            vocabulary = None  # an adapter (peft's LoRA) may drop its input per slot in training: keep that
        if vocabulary is not None:
            if key_value_states is not None:
                raise ValueError("vocabulary is for self-attention (no key_value_states)")
            rows, ids = vocabulary
            # F.embedding, not rows[ids]: the backward of advanced indexing accumulates in a varying order on the
            # CPU, so a resumed run would not repeat an uninterrupted one bit for bit.
            query, key, value = (self._split_heads(F.embedding(ids, projection(rows))) for projection in projections)
        else:
            source = hidden_states if key_value_states is None else key_value_states
            query, key, value = (
                self._split_heads(projection(states))
                for projection, states in zip(projections, (hidden_states, source, source), strict=True)
            )
        attn_mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        implementation = "eager" if output_attentions else self.config._attn_implementation or "sdpa"
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        dropout = self.dropout if self.training else 0.0
        attended, weights = attend(self, query, key, value, attn_mask, dropout=dropout, scaling=self.scaling)
        batch, length = attended.shape[:2]
        return self.o_proj(attended.reshape(batch, length, -1)), weights


class MissrecMLP(nn.Module):
    def __init__(self, config: MissrecConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.act(self.fc1(hidden_states))))


class MissrecEncoderLayer(GradientCheckpointingLayer):
    """Post-LN self-attention layer over the interest tokens (a set: no positions)."""

    def __init__(self, config: MissrecConfig):
        super().__init__()
        self.self_attn = MissrecAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MissrecMLP(config)
        self.mlp_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        padding_mask: torch.Tensor,
        output_attentions: bool = False,
        vocabulary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`vocabulary`: `(rows, ids)` with `hidden_states == rows[ids]` (see `MissrecAttention`), or None."""
        attended, weights = self.self_attn(
            hidden_states, key_padding_mask=padding_mask, output_attentions=output_attentions, vocabulary=vocabulary
        )
        hidden_states = self.self_attn_layer_norm(hidden_states + self.dropout(attended))
        return self.mlp_layer_norm(hidden_states + self.dropout(self.mlp(hidden_states))), weights


class MissrecDecoderLayer(GradientCheckpointingLayer):
    """Post-LN layer over the item tokens: non-causal self-attention, cross-attention to interests, MLP."""

    def __init__(self, config: MissrecConfig):
        super().__init__()
        self.self_attn = MissrecAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.cross_attn = MissrecAttention(config)
        self.cross_attn_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MissrecMLP(config)
        self.mlp_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        padding_mask: torch.Tensor,
        interest_states: torch.Tensor,
        interest_mask: torch.Tensor,
        query_states: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Outputs at the rows `query_states` `[B, Q, H]` (by default every position of `hidden_states`); keys and
        values always come from every position, so a row's output does not depend on which rows are computed.
        Returns the states, the self-attention and the cross-attention weights (None unless asked)."""
        queries = hidden_states if query_states is None else query_states
        attended, self_weights = self.self_attn(
            queries, hidden_states, key_padding_mask=padding_mask, output_attentions=output_attentions
        )
        hidden_states = self.self_attn_layer_norm(queries + self.dropout(attended))
        crossed, cross_weights = self.cross_attn(
            hidden_states, interest_states, key_padding_mask=interest_mask, output_attentions=output_attentions
        )
        hidden_states = self.cross_attn_layer_norm(hidden_states + self.dropout(crossed))
        return self.mlp_layer_norm(hidden_states + self.dropout(self.mlp(hidden_states))), self_weights, cross_weights


class MissrecEncoder(nn.Module):
    """The interest encoder: layers plus a final LayerNorm (as `torch.nn.Transformer` in the original)."""

    def __init__(self, config: MissrecConfig):
        super().__init__()
        self.layers = nn.ModuleList(MissrecEncoderLayer(config) for _ in range(config.num_encoder_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        padding_mask: torch.Tensor,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        vocabulary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> BaseModelOutput:
        """`last_hidden_state` after the final LayerNorm; `hidden_states` the input of every layer and the last
        output (before the norm), `attentions` every layer's weights, when asked. `vocabulary` `(rows, ids)`:
        the input is `rows[ids]`, so the first layer projects each row once (`MissrecAttention`)."""
        states, weights = (), ()
        for index, layer in enumerate(self.layers):
            states += (hidden_states,) if output_hidden_states else ()
            first = vocabulary if index == 0 else None
            hidden_states, attention = layer(hidden_states, padding_mask, output_attentions, first)
            weights += (attention,) if output_attentions else ()
        states += (hidden_states,) if output_hidden_states else ()
        return BaseModelOutput(
            last_hidden_state=self.norm(hidden_states),
            hidden_states=states or None,
            attentions=weights or None,
        )


class MissrecDecoder(nn.Module):
    """The interest-aware decoder: layers plus a final LayerNorm."""

    def __init__(self, config: MissrecConfig):
        super().__init__()
        self.layers = nn.ModuleList(MissrecDecoderLayer(config) for _ in range(config.num_decoder_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        padding_mask: torch.Tensor,
        interest_states: torch.Tensor,
        interest_mask: torch.Tensor,
        output_positions: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> BaseModelOutputWithCrossAttentions:
        """States `[B, L, H]`, or `[B, 1, H]` at `output_positions` `[B]` only: the last layer then computes
        that one row per sequence (its self-attention is not causal, so the row still sees every position); its
        hidden state and attention weights are then that row's."""
        states, self_weights, cross_weights = (), (), ()
        for index, layer in enumerate(self.layers):
            queries = None
            if output_positions is not None and index == len(self.layers) - 1:
                rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
                queries = hidden_states[rows, output_positions].unsqueeze(1)
            states += (hidden_states,) if output_hidden_states else ()
            hidden_states, attention, crossed = layer(
                hidden_states, padding_mask, interest_states, interest_mask, queries, output_attentions
            )
            self_weights += (attention,) if output_attentions else ()
            cross_weights += (crossed,) if output_attentions else ()
        states += (hidden_states,) if output_hidden_states else ()
        return BaseModelOutputWithCrossAttentions(
            last_hidden_state=self.norm(hidden_states),
            hidden_states=states or None,
            attentions=self_weights or None,
            cross_attentions=cross_weights or None,
        )


class MissrecItemAdaptor(nn.Linear):
    """Linear map from a frozen modality feature to a token. Its own class so that `_init_weights` can keep
    PyTorch's default (Kaiming-uniform) initialisation for it, as the original did."""


class MissrecInterestTokenizer(nn.Module):
    """The interest vocabulary: centroids `[K + 1, H]` (row 0 = padding, zeros) and, per modality, every item's
    interest id `[M, num_items + 1]` (0 = padding or a masked missing modality). Both are buffers, refreshed by
    k-means and saved with the model."""

    def __init__(self, config: MissrecConfig):
        super().__init__()
        num_modalities = len(config.modalities)
        self.register_buffer("centroids", torch.zeros(config.num_interests + 1, config.hidden_size))
        self.register_buffer("item_interest_ids", torch.zeros(num_modalities, config.num_items + 1, dtype=torch.long))
        self.config = config

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Interest ids `[B, Q]` of each history's interest set, their centroid vectors and their mask."""
        static_width = self.config.interest_set_width == "static"
        ids = interest_sets(input_ids, list(self.item_interest_ids), static_width)
        mask = ids != 0
        # A history none of whose items has an interest (before the first refresh) would leave attention with
        # no key at all; let it attend to one zero token instead of producing NaN.
        mask[:, 0] |= ~mask.any(dim=1)
        return ids, self.centroids[ids], mask

    def vocabulary(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`(centroids, ids)` for the encoder's first layer when projecting every centroid once costs less than
        projecting every slot of the sets `ids` (a small vocabulary, a large batch), else None."""
        return (self.centroids, ids) if self.centroids.shape[0] < ids.numel() else None

    @torch.no_grad()
    def append_items(self, tokens: torch.Tensor, present: torch.Tensor) -> None:
        """Give `n` new items (adapted tokens `[M, n, H]`, scoring mask `[M, n]`) their interest ids without
        re-clustering: per modality the nearest centroid, 0 where the modality is missing or before the
        first refresh."""
        new_ids = torch.zeros(present.shape, dtype=torch.long, device=self.item_interest_ids.device)
        if self.centroids.shape[0] > 1:
            for index in range(present.shape[0]):
                nearest = assign_to_centroids(tokens[index].float(), self.centroids[1:].float()) + 1
                new_ids[index] = torch.where(present[index], nearest, torch.zeros_like(nearest))
        self.item_interest_ids = torch.cat([self.item_interest_ids, new_ids], dim=1)

    @torch.no_grad()
    def resize(self, num_interests: int) -> None:
        """Zero centroids `[num_interests + 1, H]`: the shape of a saved or broadcast interest state (K varies
        from one refresh to the next), to be loaded into."""
        self.centroids = self.centroids.new_zeros(num_interests + 1, self.centroids.shape[1])

    @torch.no_grad()
    def set_state(self, centroids: torch.Tensor, item_interest_ids: torch.Tensor) -> None:
        padded = torch.zeros(centroids.shape[0] + 1, centroids.shape[1], device=centroids.device)
        padded[1:] = centroids
        self.centroids = padded.to(self.centroids.dtype)
        self.item_interest_ids = item_interest_ids.to(self.item_interest_ids.device)


def _config_mismatch(cls, path, config=None) -> str:
    """One line for a `config.json` that disagrees with `model.safetensors`: the first tensor whose shape
    differs and the config fields whose value is the dimension that differs."""
    from safetensors import safe_open

    config = config or cls.config_class.from_pretrained(path)
    with torch.device("meta"):
        expected = cls(config).state_dict()
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as handle:
        for key in handle.keys():
            saved = tuple(handle.get_slice(key).get_shape())
            if key in expected and tuple(expected[key].shape) != saved:
                wanted = tuple(expected[key].shape)
                dims = {w for w, s in zip(wanted, saved) if w != s} if len(wanted) == len(saved) else set(wanted)
                fields = [f"{n}={v}" for n, v in config.to_dict().items() if isinstance(v, int) and v in dims]
                fields = [f for f in fields if not f.startswith(("return_dict", "use_"))]
                return (
                    f"{path}: config.json disagrees with model.safetensors ({', '.join(fields) or 'a size field'}): "
                    f"{key} is {list(saved)} in the file, {list(wanted)} for config.json's settings."
                )
    return f"{path}: config.json disagrees with model.safetensors (a tensor shape differs)."


class MissrecPreTrainedModel(PreTrainedModel):
    config_class = MissrecConfig
    base_model_prefix = "missrec"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`, but a broken folder is an error, not a model:

        - a local folder whose last save was killed after all its files were staged is completed first (see
          `atomic.commit_files`), so the model loaded is one whole save;
        - weights missing from the file (which would start random) are an error naming them, unless
          `ignore_mismatched_sizes=True`;
        - a `config.json` that disagrees with the weights is one line naming the field and a tensor;
        - a NaN or infinite weight or buffer is an error naming the tensor."""
        path = pretrained_model_name_or_path
        local = isinstance(path, (str, os.PathLike)) and os.path.isdir(path)
        if local:
            complete_interrupted_commit(path)
        wants_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
        except RuntimeError as error:
            if local and "ignore_mismatched_sizes" in str(error):
                raise ValueError(_config_mismatch(cls, path, kwargs.get("config"))) from error
            raise
        if info["missing_keys"] and not kwargs.get("ignore_mismatched_sizes"):
            missing = sorted(info["missing_keys"])
            raise ValueError(
                f"{path}: the weights file lacks {len(missing)} tensor(s) of this configuration ({missing[:5]}); "
                "they would start random. The file is incomplete or from another model."
            )
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"{path}: tensor {name} holds NaN or infinite values; the model is broken.")
        return (model, info) if wants_info else model

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """As the original: Linear and Embedding N(0, initializer_range) with zero bias, LayerNorm (1, 0); the
        q/k/v projections keep the Xavier-uniform of the original's fused in-projection; adaptors keep
        PyTorch's default. Uses `transformers.initialization` so that loaded weights are never overwritten."""
        std = self.config.initializer_range
        if isinstance(module, MissrecItemAdaptor):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            bound = 1.0 / math.sqrt(module.in_features)
            init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.Linear) and getattr(module, "_missrec_fused_in_projection", False):
            # The original's q/k/v lived in one [3H, H] Xavier-uniform matrix: same bound, per projection.
            bound = math.sqrt(6.0 / (4 * module.in_features))
            init.uniform_(module.weight, -bound, bound)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, MissrecInterestTokenizer):
            init.zeros_(module.centroids)
            init.zeros_(module.item_interest_ids)
        elif isinstance(module, MissrecFusionHead):
            init.constant_(module.fusion_factor, self.config.fusion_factor_init)
        elif isinstance(module, MissrecHistoryPrior):
            init.copy_(module.weight, module.initial_weight(self.config))
            init.zeros_(module.item_log_count)
        elif isinstance(module, MissrecItemCatalog):
            for name in module.buffer_names():
                init.zeros_(getattr(module, name))
            init.zeros_(module.modality_present)


def _as_float_tensor(values: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    if not torch.is_tensor(values):
        values = torch.from_numpy(np.array(values, dtype=np.float32))
    return values.to(device=device, dtype=torch.float32)


@dataclass
class RegularizerTerms:
    """The per-sequence pieces of the interest regulariser (see `MissrecModel.interest_regularization`): the sum
    of each history's real encoded interests `summed` `[B, H]`, their count `[B, 1]`, the set's size in the
    original's padded sets `set_size` `[B, 1]` and the encoder output of its padding slot `[B, H]` (the last
    two for `interest_reg_pooling="original"` only). Kept apart from the batch step, which needs the batch's
    largest set, so that histories computed in several groups give the regulariser of the whole batch."""

    summed: torch.Tensor
    count: torch.Tensor
    set_size: torch.Tensor | None = None
    padding_state: torch.Tensor | None = None

    @classmethod
    def cat(cls, parts: Sequence[RegularizerTerms]) -> RegularizerTerms:
        def joined(name):
            values = [getattr(part, name) for part in parts]
            return None if values[0] is None else torch.cat(values)

        return cls(joined("summed"), joined("count"), joined("set_size"), joined("padding_state"))


def length_groups(attention_mask: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """Rows of a batch grouped by ceil(log2(history length)) (1, 2, 3-4, 5-8, ...), shortest first: each
    group's row indices and its longest history. A group pads each row to less than twice its length, so a
    random batch costs about what its real positions cost. Reads the lengths on the host (one sync)."""
    lengths = attention_mask.sum(1).cpu()
    buckets = torch.ceil(torch.log2(lengths.clamp_min(1).double())).long()
    groups = []
    for bucket in buckets.unique().tolist():
        rows = (buckets == bucket).nonzero().squeeze(1)
        width = max(1, int(lengths[rows].max()))  # an empty row (unchecked input) keeps one slot, as the block
        groups.append((rows.to(attention_mask.device, non_blocking=True), width))
    return groups


def regularizer_terms(
    interest_states: torch.Tensor,
    interest_ids: torch.Tensor,
    zero_in_set: torch.Tensor | None = None,
    padding_state: torch.Tensor | None = None,
) -> RegularizerTerms:
    """The regulariser's per-sequence terms of encoded interest sets `[B, Q, H]` with ids `[B, Q]` (0 = a
    padded slot); for the original's pooling, whether each set held id 0 (`zero_in_set` `[B]`) and its padding
    slot's encoder output `[B, H]`."""
    real = (interest_ids != 0).to(interest_states.dtype)
    count = real.sum(1, keepdim=True)
    summed = (interest_states * real.unsqueeze(-1)).sum(1)
    set_size = None if zero_in_set is None else count + zero_in_set.unsqueeze(1).to(count.dtype)
    return RegularizerTerms(summed, count, set_size, padding_state)


class MissrecModel(MissrecPreTrainedModel):
    """The transferable backbone: item tokenizer, interest tokenizer, interest encoder, decoder, read-out.

    The backbone does not own an item catalogue: callers pass each position's modality features (or already
    adapted tokens) with `input_ids`. [`MissrecForSequentialRecommendation`] looks them up in its catalogue.
    """

    def __init__(self, config: MissrecConfig):
        super().__init__(config)
        self.modalities = list(config.modalities)
        self.adaptors = nn.ModuleDict(
            {m: MissrecItemAdaptor(config.feature_size(m), config.hidden_size) for m in self.modalities}
        )
        self.item_embeddings = (
            nn.Embedding(config.num_items + 1, config.hidden_size, padding_idx=0) if config.use_item_ids else None
        )
        self.position_embeddings = nn.Embedding(config.max_seq_length, config.hidden_size)
        self.input_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.input_dropout = nn.Dropout(config.hidden_dropout_prob)
        self.interest_tokenizer = MissrecInterestTokenizer(config)
        self.encoder = MissrecEncoder(config)
        self.decoder = MissrecDecoder(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module | None:
        return self.item_embeddings

    def adapt(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-modality tokens `[M, ..., H]` from frozen features `{modality: [..., F_m]}`."""
        return torch.stack([self.adaptors[m](features[m]) for m in self.modalities])

    @torch.no_grad()
    def catalog_tokens(self, item_features: Mapping[str, torch.Tensor | np.ndarray], chunk_rows: int = 65536):
        """Adapted tokens `[M, N, H]` of a whole feature table, computed in chunks so that a memory-mapped
        table of a large pre-training catalogue is read piece by piece, never copied whole."""
        device = self.position_embeddings.weight.device
        num_rows = len(item_features[self.modalities[0]])
        chunks = []
        for start in range(0, num_rows, chunk_rows):
            piece = {
                m: _as_float_tensor(item_features[m][start : start + chunk_rows], device).to(
                    self.adaptors[m].weight.dtype
                )
                for m in self.modalities
            }
            chunks.append(self.adapt(piece))
        return torch.cat(chunks, dim=1)

    def forward(
        self,
        input_ids: torch.LongTensor,
        item_features: Mapping[str, torch.Tensor] | None = None,
        modality_mask: torch.Tensor | None = None,
        item_tokens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        last_position_only: bool = False,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> MissrecModelOutput | tuple:
        """Encode histories.

        input_ids: `[B, L]` item ids, 0 = padding, oldest first (right-padded, as the collator writes them).
        item_features: `{modality: [B, L, F_m]}` frozen features of each position, or
        item_tokens: `[M, B, L, H]` already adapted tokens (what the recommender passes; saves recomputing).
        modality_mask: `[M, B, L]` bool, True where the item has the modality; by default an all-zero feature
            row is missing. Ignored (all present) when `config.mask_missing_modalities` is False.
        attention_mask: `[B, L]` 1 at real positions; by default `input_ids != 0`.
        last_position_only: the last decoder layer computes only each history's last real position (all the
            heads need: the user representation); `last_hidden_state` is then `[B, 1, H]`. The same values as
            the full computation up to float rounding (tested); the original computed every position and kept
            the last. The heads pass `config.last_position_only` (True; False runs the reference).
        output_attentions / output_hidden_states: also return every encoder and decoder layer's attention
            weights (computed by the eager function) / input states (default: the config's).

        Long for its arguments and outputs; the steps are the masks, `encode_interests`, `embed_items` and the
        decoder.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        outputs = {"output_attentions": output_attentions, "output_hidden_states": output_hidden_states}
        if attention_mask is None:
            attention_mask = input_ids != 0
        attention_mask = attention_mask.bool()
        if item_tokens is None:
            if item_features is None:
                raise ValueError("MissrecModel.forward needs `item_features` or `item_tokens`; got neither.")
            item_tokens = self.adapt(item_features)
            if modality_mask is None:
                modality_mask = rows_present(item_features, self.modalities)
        if modality_mask is None:
            modality_mask = attention_mask.expand(len(self.modalities), *attention_mask.shape)
        modality_mask = apply_missing_rule(modality_mask, self.config, attention_mask)

        inputs = (input_ids, item_tokens, modality_mask, attention_mask, last_position_only)
        if self.config.bucket_by_length and not (output_attentions or output_hidden_states):
            output, terms = self._forward_in_length_groups(*inputs)
        else:
            output, terms = self._forward_block(*inputs, outputs)
        output.interest_regularization = self.interest_regularization(terms)
        return output if return_dict else output.to_tuple()

    def _forward_block(
        self, input_ids, item_tokens, modality_mask, attention_mask, last_position_only, outputs=None
    ) -> tuple[MissrecModelOutput, RegularizerTerms]:
        """The computation over one padded block of histories, and its regulariser terms."""
        outputs = outputs or {"output_attentions": False, "output_hidden_states": False}
        interest_ids, interest_mask, encoded, terms = self.encode_interests(input_ids, attention_mask, outputs)
        interest_states = encoded.last_hidden_state
        decoder_input = self.embed_items(input_ids, item_tokens, modality_mask)
        last_position = (attention_mask * torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device)).argmax(1)
        positions = last_position if last_position_only else None
        decoded = self.decoder(decoder_input, attention_mask, interest_states, interest_mask, positions, **outputs)
        hidden = decoded.last_hidden_state
        if last_position_only:
            sequence_embedding = F.normalize(hidden[:, 0])
        else:
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            sequence_embedding = F.normalize(hidden[rows, last_position])
        output = MissrecModelOutput(
            sequence_embedding=sequence_embedding,
            last_hidden_state=hidden,
            interest_hidden_states=interest_states,
            interest_ids=interest_ids,
            encoder_hidden_states=encoded.hidden_states,
            encoder_attentions=encoded.attentions,
            decoder_hidden_states=decoded.hidden_states,
            decoder_attentions=decoded.attentions,
            cross_attentions=decoded.cross_attentions,
        )
        return output, terms

    def _forward_in_length_groups(
        self, input_ids, item_tokens, modality_mask, attention_mask, last_position_only
    ) -> tuple[MissrecModelOutput, RegularizerTerms]:
        """`_forward_block` on each `length_groups` group, cut to its longest history, and the rows put back in
        the batch's order (`config.bucket_by_length`): every row sees only its own history and interest set, so
        the outputs are the block's up to float rounding, at the cost of the real positions rather than of the
        longest history's. Interest states and ids are padded to the batch's largest set."""
        parts, terms, rows = [], [], []
        # Interest sets come from the ids, so a group keeps every nonzero id even where the mask is 0.
        for group, width in length_groups(attention_mask | (input_ids != 0)):
            output, group_terms = self._forward_block(
                input_ids[group, :width],
                item_tokens[:, group, :width],
                modality_mask[:, group, :width],
                attention_mask[group, :width],
                last_position_only,
            )
            parts.append(output)
            terms.append(group_terms)
            rows.append(group)
        order = torch.argsort(torch.cat(rows))  # position of each batch row among the groups' rows

        def joined(name: str, width: int | None = None) -> torch.Tensor:
            """The groups' `name` in batch order, dimension 1 zero-padded to `width` (default: the widest)."""
            tensors = [getattr(part, name) for part in parts]
            width = max(t.shape[1] for t in tensors) if width is None else width
            pads = [(0, 0) * (t.dim() - 2) + (0, width - t.shape[1]) for t in tensors]
            return torch.cat([F.pad(t, pad) for t, pad in zip(tensors, pads)])[order]

        output = MissrecModelOutput(
            sequence_embedding=torch.cat([part.sequence_embedding for part in parts])[order],
            last_hidden_state=joined("last_hidden_state", 1 if last_position_only else input_ids.shape[1]),
            interest_hidden_states=joined("interest_hidden_states"),
            interest_ids=joined("interest_ids"),
        )
        return output, RegularizerTerms.cat(terms)

    def encode_interests(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, outputs: dict[str, bool]
    ) -> tuple[torch.Tensor, torch.Tensor, BaseModelOutput, RegularizerTerms]:
        """The interest side: each history's interest set `[B, Q]` (ids and key mask), its encoder output
        (`last_hidden_state` `[B, Q, H]`, with the layers' states / attentions as `outputs` asks) and the
        interest regulariser's per-sequence terms."""
        interest_ids, interest_vectors, interest_mask = self.interest_tokenizer(input_ids)
        if self.config.interest_reg_pooling != "original":
            vocabulary = self.interest_tokenizer.vocabulary(interest_ids)
            encoded = self.encoder(interest_vectors, interest_mask, **outputs, vocabulary=vocabulary)
            return interest_ids, interest_mask, encoded, regularizer_terms(encoded.last_hidden_state, interest_ids)
        # The original's sets kept a padding slot (id 0, a zero input, masked as a key) whose encoder output its
        # regulariser summed: one appended zero slot (centroid row 0 is zeros) gives that output exactly.
        interest_vectors = F.pad(interest_vectors, (0, 0, 0, 1))
        vocabulary = self.interest_tokenizer.vocabulary(F.pad(interest_ids, (0, 1)))
        encoded = self.encoder(interest_vectors, F.pad(interest_mask, (0, 1)), **outputs, vocabulary=vocabulary)
        padding_state, interest_states = encoded.last_hidden_state[:, -1], encoded.last_hidden_state[:, :-1]
        # Id 0 was in a set when the history was shorter than max_seq_length (its padding) or one of its items
        # lacks a modality (masked out here, an id-0 token there).
        per_position = self.interest_tokenizer.item_interest_ids[:, input_ids]  # [M, B, L]
        missing = ((per_position == 0) & attention_mask.unsqueeze(0)).any(0).any(1)
        zero_in_set = (attention_mask.sum(1) < self.config.max_seq_length) | missing
        terms = regularizer_terms(interest_states, interest_ids, zero_in_set, padding_state)
        encoded.last_hidden_state = interest_states
        return interest_ids, interest_mask, encoded, terms

    def embed_items(
        self, input_ids: torch.Tensor, item_tokens: torch.Tensor, modality_mask: torch.Tensor
    ) -> torch.Tensor:
        """Decoder input: LN(sum of present modality tokens + position [+ ID]), then dropout."""
        tokens = (item_tokens * modality_mask.unsqueeze(-1).to(item_tokens.dtype)).sum(0)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        tokens = tokens + self.position_embeddings(positions)
        if self.item_embeddings is not None:
            tokens = tokens + self.item_embeddings(input_ids)
        return self.input_dropout(self.input_layer_norm(tokens))

    def interest_regularization(self, terms: RegularizerTerms) -> torch.Tensor:
        """R = reduce_b ||p_b||^2 / H over the batch, p_b a pooling of sequence b's encoded interests (n_b real;
        `terms` from `regularizer_terms`).

        `interest_reg_pooling`:
        - "mean" (default): p_b = the mean of the n_b real interest states; independent of the batch mates.
        - "original": exactly the original's p_b = (n_b / Q) x (sum over all Q slots of its padded set). The
          original padded every history to `max_seq_length`, so each shorter history's set also held id 0
          (padding), as did one with an item lacking a modality (`zero_in_set` [B]); Q is the batch's largest
          such set, and the padded slots' encoder output (`padding_state`, from a zero input) is summed too.
          The penalty grows like n_b^2 and depends on the batch mates: at gamma = 1e-4 it is 15-80x the
          "mean" one on scientific_mm batches.
        - "batch_share": the original's weighting n_b / Q over the real slots only (no padded slots).
        As the original, the batch is summed (`interest_reg_reduction="sum"`)."""
        summed, count = terms.summed, terms.count
        pooling = self.config.interest_reg_pooling
        if pooling == "mean":
            pooled = summed / count.clamp_min(1.0)
        elif pooling == "batch_share":
            # Q = the batch's largest set (not the tensor's width, which interest_set_width="static" pads)
            pooled = summed * (count / count.max().clamp_min(1.0))
        else:
            if terms.padding_state is None or terms.set_size is None:
                raise ValueError('interest_reg_pooling="original" needs the padding slot state and zero_in_set')
            width = terms.set_size.max()
            pooled = (summed + (width - count) * terms.padding_state) * (count / width)
        per_sequence = pooled.pow(2).sum(-1) / summed.shape[-1]
        return per_sequence.sum() if self.config.interest_reg_reduction == "sum" else per_sequence.mean()

    @torch.no_grad()
    def refresh_interests(
        self, item_features: Mapping[str, torch.Tensor], modality_present: torch.Tensor, seed: int = 0
    ) -> int:
        """Re-cluster the interest vocabulary from the catalogue (no gradients) and store it in the buffers.

        item_features: `{modality: [num_items + 1, F_m]}` (row 0 padding); modality_present: `[M, num_items + 1]`.
        Every present item token of every modality goes into one pool; K = ceil(interest_ratio x pool size).
        Fix: missing-modality tokens are left out of the pool (with `mask_missing_modalities`), and k-means runs
        to convergence with k-means++ (the original made one random-init step on |x|); later refreshes start
        from the previous centroids (`kmeans_warm_start`). Returns K.
        """
        was_training = self.training
        self.eval()
        tokens = self.catalog_tokens(item_features)[:, 1:].float()  # [M, N, H]
        present = apply_missing_rule(_as_float_tensor(modality_present, tokens.device)[:, 1:], self.config)
        pool = tokens[present]
        if pool.shape[0] == 0:
            raise ValueError("refresh_interests: no item has any modality present; nothing to cluster.")
        k = num_interests(pool.shape[0], self.config.interest_ratio)
        previous = self.interest_tokenizer.centroids[1:]
        warm = self.config.kmeans_warm_start and previous.shape[0] == k and bool(previous.any())
        result = kmeans(
            pool,
            k,
            max_iterations=self.config.kmeans_max_iterations,
            tolerance=self.config.kmeans_tolerance,
            init=self.config.kmeans_init,
            seed=seed,
            initial_centroids=previous.float() if warm else None,
        )
        item_interest_ids = torch.zeros(present.shape[0], present.shape[1] + 1, dtype=torch.long, device=pool.device)
        item_interest_ids[:, 1:][present] = result.labels + 1
        self.interest_tokenizer.set_state(result.centroids, item_interest_ids)
        self.config.num_interests = k
        self.train(was_training)
        return k


class MissrecFusionHead(nn.Module):
    """Scores candidates: per-modality cosine similarity mixed by softmax(fusion_factor x score) over the
    modalities the candidate has (`dynamic_*`), or their mean (`static`); with IDs,
    `id_weight x id_score + (1 - id_weight) x fused` (the original's `(id + 2 fused) / 3`)."""

    def __init__(self, config: MissrecConfig):
        super().__init__()
        self.mode = config.item_fusion
        self.id_score_weight = config.id_score_weight
        shape = (config.num_items + 1,) if self.mode == "dynamic_instance" else ()
        # Static fusion never reads the factor: a trainable parameter without gradient breaks DDP.
        self.fusion_factor = nn.Parameter(
            torch.full(shape, float(config.fusion_factor_init)), requires_grad=self.mode != "static"
        )

    def forward(self, sequence_embedding: torch.Tensor, items: ItemTokens) -> torch.Tensor:
        """Scores `[B, C]` of the B sequences against the C candidates in `items` (not yet / temperature)."""
        cosines = torch.matmul(sequence_embedding.unsqueeze(0), items.modality_tokens.transpose(1, 2))  # [M,B,C]
        factor = self.fusion_factor
        if self.mode == "dynamic_instance" and items.item_ids is not None:
            factor = factor[items.item_ids]
        elif self.mode == "dynamic_instance":
            factor = factor[items.first_item_id : items.first_item_id + items.modality_tokens.shape[1]]
        id_scores = None if items.id_tokens is None else sequence_embedding @ items.id_tokens.T
        return self._combine(cosines, items.present.unsqueeze(1), factor, id_scores)

    def _combine(
        self, cosines: torch.Tensor, present: torch.Tensor, factor: torch.Tensor, id_scores: torch.Tensor | None
    ) -> torch.Tensor:
        present = present.bool()
        if self.mode == "static":
            weights = present.to(cosines.dtype)
            fused = (cosines * weights).sum(0) / weights.sum(0).clamp_min(1.0)
        else:
            # An additive bias on the small [M, 1, C] mask instead of a where() over [M, B, C]: an absent
            # modality's weight underflows to exactly 0 (exp(-1e4)), so only candidates with no modality at
            # all need the final mask. Fewer passes over the largest tensors of the step.
            bias = torch.where(present, 0.0, _MASKED_LOGIT).to(cosines.dtype)
            weights = torch.softmax(factor * cosines + bias, dim=0)
            fused = (weights * cosines).sum(0) * present.any(0).to(cosines.dtype)
        if id_scores is None:
            return fused
        return torch.lerp(fused, id_scores.to(fused.dtype), self.id_score_weight)


class MissrecHistoryPrior(nn.Module):
    """Score terms that need no learned representation, mixed by learned weights and added to the fused score
    of every candidate (`config.history_prior`; not in the original):

    - per modality, the cosine between the candidate's frozen feature row and the last history item's: on
      Amazon catalogues the next item is often a near twin of the last one (a variant, a refill, an accessory
      named after it), which the adaptor and transformer blur;
    - whether the candidate is already in the history (next items rarely repeat: 0.6% of Scientific's test
      targets), which a cosine with the last item would otherwise favour;
    - log(1 + the candidate's count as a training target): the fused score is a cosine and has no room for
      a per-item popularity (nor has an inductive model anywhere else).

    The weights start at 0 (or at `config.history_prior_init`), so a new head scores as the model without the
    prior, and are trained with the rest.
    They are stored divided by `WEIGHT_SCALE`: Adam moves a parameter by about the learning rate per step, and
    at lr 1e-3 a fine-tuning run of a few hundred steps would otherwise never reach the weights of order 1 (in
    cosine units) that the blend search of `bench/hybrid_scores.py` picks."""

    WEIGHT_SCALE = 10.0
    # Up to this size (all modalities together) the item x item cosines of the frozen feature rows are kept, so
    # that a history's cosines are one row lookup rather than a product with every candidate's feature row
    # (2 GiB: about 23k items with one modality, 16k with two; larger catalogues keep the products).
    cosine_table_max_bytes = 2**31

    def __init__(self, config: MissrecConfig):
        super().__init__()
        self.modalities = list(config.modalities)
        self.weight = nn.Parameter(torch.zeros(len(self.modalities) + 2))  # [cosine per modality, history, log count]
        self.register_buffer("item_log_count", torch.zeros(config.num_items + 1))
        self._cosine_tables: dict[str, tuple[weakref.ref, int, torch.Tensor]] = {}

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_cosine_tables": {}}  # a weak reference does not pickle

    def term_names(self) -> list[str]:
        return [f"{m}_cosine" for m in self.modalities] + ["in_history", "log_count"]

    def weights(self) -> dict[str, float]:
        """The learned weights in score units, by term (the form of `config.history_prior_init`)."""
        return dict(zip(self.term_names(), (self.weight.detach() * self.WEIGHT_SCALE).tolist()))

    def initial_weight(self, config: MissrecConfig) -> torch.Tensor:
        """The stored (scaled-down) starting weights from `config.history_prior_init`; 0 for absent terms."""
        start = config.history_prior_init or {}
        return torch.tensor([float(start.get(n, 0.0)) / self.WEIGHT_SCALE for n in self.term_names()])

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        features: Mapping[str, torch.Tensor],
        item_ids: torch.Tensor | range,
    ) -> torch.Tensor:
        """Prior scores `[B, C]` of the candidates `item_ids` (a `[C]` tensor, or a `range` of ids: a catalogue
        block, read by slicing) for the histories `input_ids` `[B, L]`."""
        weight = self.weight * self.WEIGHT_SCALE
        last = last_item_ids(input_ids, attention_mask)
        if isinstance(item_ids, range):
            block = slice(item_ids.start, item_ids.stop)
            seen = ids_in_block(input_ids, item_ids.start, len(item_ids))
        else:
            block = item_ids
            seen = _in_history(input_ids, item_ids, self.item_log_count.shape[0])
        scores = weight[-2] * seen.to(weight.dtype) + weight[-1] * self.item_log_count[block].unsqueeze(0)
        for index, m in enumerate(self.modalities):
            scores = scores + weight[index] * self._cosines(m, features[m], last, item_ids)
        return scores

    def _cosines(
        self, modality: str, rows: torch.Tensor, last: torch.Tensor, item_ids: torch.Tensor | range
    ) -> torch.Tensor:
        """`[B, C]` cosine of each history's last item's feature row with each candidate's (an all-zero, missing
        row has cosine 0 with everything): from the item x item table when it fits, else by a product."""
        # Catalogue blocks (evaluation, the full softmax, exact top-k) build the table, which they repay at once;
        # candidate lists (retrieval re-ranking, sampled negatives) only read one that is already kept.
        table = self._cosine_table(modality, rows, build=isinstance(item_ids, range))
        if table is None:
            block = slice(item_ids.start, item_ids.stop) if isinstance(item_ids, range) else item_ids
            return F.normalize(rows[last], dim=-1) @ F.normalize(rows[block], dim=-1).T
        if isinstance(item_ids, range):
            found = table[:, item_ids.start : item_ids.stop].index_select(0, last)
        else:
            found = table[last.unsqueeze(1), item_ids.unsqueeze(0)]
        return found.to(rows.dtype)  # as the product would be

    def _cosine_table(self, modality: str, rows: torch.Tensor, build: bool = True) -> torch.Tensor | None:
        """`[N + 1, N + 1]` float32 cosines between the feature rows `rows`, kept while `rows` is the same tensor
        at the same version (every write through torch bumps it; one through `.data` or numpy does not, so
        such a writer must call `release_cosine_tables`); None when the tables would not fit
        `cosine_table_max_bytes` (set it on an instance to 0 to turn the table off) or, with `build=False`,
        when none is kept."""
        if len(self.modalities) * rows.shape[0] ** 2 * 4 > self.cosine_table_max_bytes:
            self._cosine_tables.pop(modality, None)
            return None
        try:
            version = rows._version
        except RuntimeError:  # an inference-mode tensor counts no versions: nothing to check a kept table by
            self._cosine_tables.pop(modality, None)
            return None
        kept = self._cosine_tables.pop(modality, None)  # released before a rebuild: never two tables at once
        if kept is None or kept[0]() is not rows or kept[1] != version:
            if not build:
                return None
            # float32 whatever autocast is on: a table built inside a bf16 training step is also the one the
            # fp32 evaluation reads, and cosines of near twins must not round together.
            with torch.no_grad(), torch.autocast(rows.device.type, enabled=False):
                unit = F.normalize(rows.float(), dim=-1)
                kept = (weakref.ref(rows), version, unit @ unit.T)
        self._cosine_tables[modality] = kept
        return kept[2]

    def release_cosine_tables(self) -> None:
        """Drop the kept item x item tables (memory; or after writing the features behind torch's back)."""
        self._cosine_tables.clear()


def _catalog_renamed_state(folder) -> dict[str, torch.Tensor] | None:
    """The weights of a local folder saved before the catalogue was its own module (its buffers were at the
    top level: `text_features`, `item_modality_present`), renamed to today's keys; None for any other."""
    path = Path(str(folder)) / "model.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as weights:
        if "item_modality_present" not in weights.keys():
            return None
        state = {name: weights.get_tensor(name) for name in weights.keys()}
    state["catalog.modality_present"] = state.pop("item_modality_present")
    for name in [n for n in state if "." not in n and n.endswith("_features")]:
        state[f"catalog.{name}"] = state.pop(name)
    return state


def _hub_raw_item_ids(repo_id: str, kwargs: Mapping) -> list[str] | None:
    """`item_ids.json` of a Hub snapshot (offline: the local cache), or None when the repository has none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    options = {k: kwargs[k] for k in ("revision", "token", "cache_dir") if kwargs.get(k) is not None}
    try:
        path = hf_hub_download(repo_id, ITEM_IDS_FILE, **options)
    except (EntryNotFoundError, LocalEntryNotFoundError, OSError):
        return None
    return read_raw_item_ids(Path(path).parent)


def last_item_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`[B]` the last real item of each history (right- or left-padded)."""
    real = input_ids != 0 if attention_mask is None else attention_mask.bool()
    positions = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device)
    return input_ids.gather(1, (real * positions).argmax(1, keepdim=True)).squeeze(1)


def _in_history(input_ids: torch.Tensor, item_ids: torch.Tensor, id_bound: int) -> torch.Tensor:
    """`[B, C]` bool: whether each candidate id (any ids, e.g. sampled ones) is among each row's history ids, by a
    sorted search over (row, id) keys: `O((B L + B C) log(B L))`, with no `[B, num_items]` table."""
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1) * id_bound
    keys = (rows + input_ids).reshape(-1).sort().values
    queries = (rows + item_ids.unsqueeze(0)).reshape(-1)
    found = torch.searchsorted(keys, queries).clamp_(max=keys.numel() - 1)
    return (keys[found] == queries).view(input_ids.shape[0], -1)


class MissrecForSequentialRecommendation(MissrecPreTrainedModel):
    """MISSRec for next-item recommendation over one domain's catalogue, trained with full-softmax CE.

    The catalogue ([`MissrecItemCatalog`], `model.catalog`: frozen features `[num_items + 1, F_m]` per
    modality, row 0 padding, the modality-present mask and the raw item ids) is part of the model, so a saved
    model carries everything it needs to recommend. Fill it with [`load_item_features`], then call
    [`refresh_interests`] (the trainer does this before every epoch).
    """

    def __init__(self, config: MissrecConfig):
        super().__init__(config)
        self.missrec = MissrecModel(config)
        self.fusion = MissrecFusionHead(config)
        self.history_prior = MissrecHistoryPrior(config) if config.history_prior else None
        self.catalog = MissrecItemCatalog(config)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As `PreTrainedModel.from_pretrained`, with the raw item ids of `item_ids.json` (when the folder has
        one) in `model.catalog.raw_item_ids`. A pre-training checkpoint is refused: its catalogue is the
        pre-training corpus, not a domain's. Build the domain model with `transfer.build_model` instead."""
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)) and os.path.isdir(
            pretrained_model_name_or_path
        ):
            complete_interrupted_commit(pretrained_model_name_or_path)  # read the config of one whole save
        config = kwargs.get("config")
        if config is None:
            try:
                config = MissrecConfig.from_pretrained(pretrained_model_name_or_path)
            except OSError:
                config = None
        if config is not None and "MissrecForPreTraining" in (config.architectures or []):
            raise ValueError(
                f"{pretrained_model_name_or_path} is a MissrecForPreTraining checkpoint (its catalogue is the "
                "pre-training corpus). Transfer it to a domain with run_finetune.py --model_name_or_path, or "
                "modeling_missrec.transfer.build_model(ModelArguments(model_name_or_path=...), catalog)."
            )
        renamed = (
            None if kwargs.get("state_dict") is not None else _catalog_renamed_state(pretrained_model_name_or_path)
        )
        if renamed is not None:  # an older save: its weights, renamed, with its config
            kwargs["config"] = config or MissrecConfig.from_pretrained(pretrained_model_name_or_path)
            loaded = super().from_pretrained(None, *args, state_dict=renamed, **kwargs)
        else:
            loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        folder = Path(str(pretrained_model_name_or_path))
        if folder.is_dir():
            model.catalog.raw_item_ids = read_raw_item_ids(folder)
        elif not os.path.isabs(str(pretrained_model_name_or_path)):  # a Hub id: the snapshot holds the map
            model.catalog.raw_item_ids = _hub_raw_item_ids(pretrained_model_name_or_path, kwargs)
        return loaded

    @classmethod
    def from_backbone(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        item_features: Mapping[str, torch.Tensor | np.ndarray],
        modality_present: Mapping[str, torch.Tensor | np.ndarray] | None = None,
        raw_item_ids: Sequence[str] | None = None,
        *,
        use_item_ids: bool = False,
        revision: str | None = None,
        token: str | bool | None = None,
        **config_overrides,
    ) -> MissrecForSequentialRecommendation:
        """A recommender for a new catalogue with the backbone of a saved MISSRec: a folder or a Hub id
        (`revision`, `token`; offline, the local cache) holding a pre-training model, a recommender or a bare
        backbone. `item_features` `{modality: [num_items, F_m]}` (row i = item id i + 1) and the optional
        `modality_present` / `raw_item_ids` fill the catalogue; its modalities and widths set the config's.

        What carries over and what is rebuilt: `weight_transfer`. Adaptors of another width and a new
        modality's adaptor start fresh; the ID table (`use_item_ids=True`, transductive) is kept only when
        the saved raw ids are `raw_item_ids`. `config_overrides` are other config fields (`interest_ratio`,
        `history_prior`, dropouts, ...). Call `refresh_interests` (the trainer does) before training or
        ranking; for the paper's frozen recipe, `freeze_backbone_for_transfer()` afterwards."""
        from .hub import resolve_model_folder

        folder = resolve_model_folder(pretrained_model_name_or_path, revision, token)
        sizes = {m: tuple(np.shape(table)) for m, table in item_features.items()}
        if not sizes or len({shape[0] for shape in sizes.values()}) != 1:
            raise ValueError(f"from_backbone: item_features needs one [num_items, F] table per modality; got {sizes}")
        settings = {
            "num_items": next(iter(sizes.values()))[0],
            "use_item_ids": use_item_ids,
            "modalities": list(item_features),
            **{f"{m}_feature_size": shape[1] for m, shape in sizes.items()},
            **config_overrides,
        }
        model = cls(transfer_config(MissrecConfig.from_pretrained(folder), settings))
        load_matching_weights(model, folder, raw_item_ids)
        model.load_item_features(item_features, modality_present, raw_item_ids)
        return model

    def save_pretrained(self, save_directory, *args, **kwargs) -> None:
        """As `PreTrainedModel.save_pretrained`, with the catalogue's raw ids as `item_ids.json` when it has
        them (so `push_to_hub`, which saves through here, ships them too)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.catalog.raw_item_ids is not None and (kwargs.get("is_main_process", True)):
            write_raw_item_ids(save_directory, self.catalog.raw_item_ids)

    # ----------------------------------------------------------------------------------------- catalogue
    @property
    def item_features(self) -> dict[str, torch.Tensor]:
        """`{modality: [num_items + 1, F_m]}` frozen features, row 0 = padding (`self.catalog.features`)."""
        return self.catalog.features

    @property
    def item_modality_present(self) -> torch.Tensor:
        """`[M, num_items + 1]` True where an item has the modality (`self.catalog.modality_present`)."""
        return self.catalog.modality_present

    def load_item_features(
        self,
        features: Mapping[str, torch.Tensor | np.ndarray],
        modality_present: Mapping[str, torch.Tensor | np.ndarray] | None = None,
        raw_item_ids: Sequence[str] | None = None,
    ) -> None:
        """Fill the catalogue (see [`MissrecItemCatalog.load`]). `features[m]` has one row per item,
        `[num_items, F_m]` (row i = item id i + 1). A modality is missing for an item when its row is all
        zeros, unless `modality_present` says otherwise. `raw_item_ids` (one per item) are saved with the model.
        """
        self.catalog.load(features, modality_present, raw_item_ids)

    def set_raw_item_ids(self, raw_item_ids: Sequence[str]) -> None:
        """The raw id of each item (entry i = item id i + 1), saved with the model as `item_ids.json`."""
        if len(raw_item_ids) != self.config.num_items:
            raise ValueError(
                f"raw_item_ids has {len(raw_item_ids)} entries, expected one per item ({self.config.num_items})"
            )
        self.catalog.raw_item_ids = list(raw_item_ids)

    @torch.no_grad()
    def add_items(
        self, features: Mapping[str, torch.Tensor | np.ndarray], raw_item_ids: Sequence[str] | None = None
    ) -> list[int]:
        """Add items known only by their features to an inductive model's catalogue, without retraining.

        `features[m]` is `[n, F_m]` for every modality (an all-zero row = missing modality); `raw_item_ids`
        exactly when the catalogue has raw ids. Each new item's interest id is its nearest centroid per
        modality, and its training-target count (history prior) is 0. Returns the new item ids."""
        if self.config.use_item_ids:
            raise ValueError(
                "add_items needs an inductive model (use_item_ids=False): a transductive model has no trained ID "
                "embedding for new items"
            )
        if self.config.item_fusion == "dynamic_instance":
            raise ValueError("add_items: item_fusion='dynamic_instance' has no fusion factor for new items")
        new, present = self.catalog.append(features, raw_item_ids)
        weight_dtype = next(self.missrec.adaptors.parameters()).dtype
        tokens = self.missrec.adapt({m: t.to(weight_dtype) for m, t in new.items()})  # [M, n, H]
        self.missrec.interest_tokenizer.append_items(tokens, present)
        if self.history_prior is not None:  # a new item has never been a training target
            counts = self.history_prior.item_log_count
            self.history_prior.item_log_count = torch.cat([counts, counts.new_zeros(present.shape[1])])
        first = self.config.num_items + 1
        self.config.num_items += present.shape[1]
        return list(range(first, first + present.shape[1]))

    def freeze_backbone_for_transfer(self) -> int:
        """The paper's parameter-efficient transfer: freeze the position embedding, the encoder and the decoder;
        the adaptors, the input LayerNorm, the fusion factor and (transductive) the ID table stay trainable.
        Returns the number of trainable parameters."""
        for name in FROZEN_IN_TRANSFER:
            getattr(self.missrec, name).requires_grad_(False)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def train_only_history_prior(self) -> int:
        """Freeze everything but the history prior's weights (calibrating a pre-trained model on a domain).
        Returns the number of trainable parameters."""
        if self.history_prior is None:
            raise ValueError("finetune_method='prior' needs a model with a history prior (config history_prior=true)")
        self.requires_grad_(False)
        self.history_prior.weight.requires_grad_(True)
        return self.history_prior.weight.numel()

    def refresh_interests(self, seed: int = 0) -> int:
        """Re-cluster the interests over this catalogue (see [`MissrecModel.refresh_interests`]). Returns K."""
        return self.missrec.refresh_interests(self.item_features, self.item_modality_present, seed=seed)

    def _catalog_raw_tokens(self) -> torch.Tensor:
        return self.missrec.adapt(self.item_features)  # [M, N + 1, H]

    def _present(self) -> torch.Tensor:
        return self.catalog.present()

    def item_tokens(self, raw_tokens: torch.Tensor | None = None) -> ItemTokens:
        """Candidate representations of the whole catalogue (ids 0..num_items).

        With one modality the token and the ID embedding are summed before normalising, as the original did;
        with several, each modality is normalised on its own and the ID gets its own score."""
        raw = self._catalog_raw_tokens() if raw_tokens is None else raw_tokens
        ids = self.missrec.item_embeddings.weight if self.missrec.item_embeddings is not None else None
        return self._candidate_tokens(raw, self._present(), ids)

    @staticmethod
    def _candidate_tokens(raw: torch.Tensor, present: torch.Tensor, ids: torch.Tensor | None, item_ids=None):
        """ItemTokens from raw tokens `[M, C, H]`, their present mask `[M, C]` and ID rows `[C, H]` (or None)."""
        if raw.shape[0] == 1 and ids is not None:
            combined = raw[0] * present[0].unsqueeze(-1).to(raw.dtype) + ids
            return ItemTokens(F.normalize(combined).unsqueeze(0), torch.ones_like(present), None, 0, item_ids)
        id_tokens = None if ids is None else F.normalize(ids)
        return ItemTokens(F.normalize(raw, dim=-1), present, id_tokens, 0, item_ids)

    # ------------------------------------------------------------------------------------------ forward
    def _check_input_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length]; got shape {tuple(input_ids.shape)}.")
        if input_ids.shape[1] > self.config.max_seq_length:
            raise ValueError(
                f"input_ids has length {input_ids.shape[1]}, expected at most max_seq_length="
                f"{self.config.max_seq_length} (keep the most recent items)."
            )
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high > self.config.num_items:
            bad = low if low < 0 else high
            raise ValueError(f"input_ids holds item id {bad}, expected ids in 0..{self.config.num_items}.")
        real = input_ids != 0 if attention_mask is None else attention_mask.bool()
        empty = (~real.any(1)).nonzero()
        if empty.numel():
            raise ValueError(f"input_ids row {int(empty[0, 0])} is an empty history; expected at least one item.")
        # Positions count from the first slot: a left-padded row would give its items the wrong positions.
        gap = (real[:, 1:] & ~real[:, :-1]).any(1).nonzero()
        if gap.numel():
            raise ValueError(
                f"input_ids row {int(gap[0, 0])} has padding before an item (left-padded?); histories are "
                "right-padded: oldest item first, padding (0) after the last."
            )

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        raw_tokens: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        check_inputs: bool = True,
    ) -> MissrecModelOutput:
        """Backbone output for histories `input_ids` `[B, L]`, item tokens looked up in the catalogue; its
        `last_hidden_state` is `[B, 1, H]` (the last position) unless `config.last_position_only` is False.
        `check_inputs=False` skips the validation of `input_ids` (a host-device sync), for data already
        checked, as the trainer's loaders are."""
        if check_inputs:
            self._check_input_ids(input_ids, attention_mask)
        raw = self._catalog_raw_tokens() if raw_tokens is None else raw_tokens
        return self.missrec(
            input_ids,
            item_tokens=raw[:, input_ids],
            modality_mask=self._present()[:, input_ids],
            attention_mask=attention_mask,
            last_position_only=self.config.last_position_only,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        check_inputs: bool = True,
        regularizer_scale: float | None = None,
    ) -> MissrecSequentialRecommendationOutput | tuple:
        """Logits over the whole catalogue for histories `input_ids`; with `labels` `[B]` (target item ids) the
        loss. As the original, the full softmax runs over all items; fix: the padding column is excluded.
        `output_attentions` / `output_hidden_states`: the backbone's layer weights / states (see
        `MissrecModelOutput`; not with the sampled softmax's training step). `check_inputs=False` skips the
        validation of ids and labels (for checked data); `regularizer_scale`: see `_regularizer_scale`."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if labels is not None and check_inputs:
            if int(labels.min()) < 1 or int(labels.max()) > self.config.num_items:
                raise ValueError(f"labels must be item ids in 1..{self.config.num_items}.")
        if labels is not None and self.training and self.config.loss_type == "sampled":
            return self._sampled_softmax_forward(
                input_ids, attention_mask, labels, return_dict, check_inputs, regularizer_scale
            )
        raw = self._catalog_raw_tokens()
        backbone = self.encode(
            input_ids, attention_mask, raw, output_attentions, output_hidden_states, check_inputs=check_inputs
        )
        scores = self.fusion(backbone.sequence_embedding, self.item_tokens(raw))
        if self.history_prior is not None:
            ids = range(self.config.num_items + 1)
            scores = scores + self.history_prior(input_ids, attention_mask, self.item_features, ids)
        logits = scores / self.config.temperature
        logits = torch.cat([torch.full_like(logits[:, :1], float("-inf")), logits[:, 1:]], dim=1)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels)
            scale = _regularizer_scale(self.config, regularizer_scale)
            loss = loss + self.config.interest_reg_weight * scale * backbone.interest_regularization
        output = MissrecSequentialRecommendationOutput(
            loss=loss,
            logits=logits,
            sequence_embedding=backbone.sequence_embedding,
            interest_regularization=backbone.interest_regularization,
            encoder_hidden_states=backbone.encoder_hidden_states,
            encoder_attentions=backbone.encoder_attentions,
            decoder_hidden_states=backbone.decoder_hidden_states,
            decoder_attentions=backbone.decoder_attentions,
            cross_attentions=backbone.cross_attentions,
        )
        return output if return_dict else output.to_tuple()

    # ----------------------------------------------------------------------------------- sampled softmax
    def set_target_frequencies(self, counts: torch.Tensor | np.ndarray) -> None:
        """How often each item id (0..num_items) is a training target: the in-batch candidates' sampling
        probabilities, for the logQ correction of the sampled softmax (and the popularity sampler). One is
        added to every count, so that an item never seen as a target keeps a finite correction."""
        counts = self._checked_counts(counts, "target frequencies")
        smoothed = counts + 1.0
        smoothed[0] = 0.0
        probability = (smoothed / smoothed.sum()).float().to(self.catalog.modality_present.device)
        self.register_buffer("target_probability", probability, persistent=False)  # moves with the model

    def _checked_counts(self, counts: torch.Tensor | np.ndarray, what: str) -> torch.Tensor:
        """Per-item-id counts as float64 on the CPU, checked: one per id 0..num_items, none negative."""
        counts = torch.as_tensor(counts).detach().to("cpu", torch.float64).reshape(-1)
        if counts.shape[0] != self.config.num_items + 1 or (counts < 0).any():
            raise ValueError(f"{what} must be {self.config.num_items + 1} counts >= 0 (ids 0..num_items)")
        return counts

    @torch.no_grad()
    def set_item_popularity(self, counts: torch.Tensor | np.ndarray) -> None:
        """The history prior's popularity term: `counts` `[num_items + 1]`, how often each item id is a training
        target in this catalogue (stored as log(1 + count), saved with the model)."""
        if self.history_prior is None:
            raise ValueError("set_item_popularity: this model has no history prior (config.history_prior=False)")
        counts = self._checked_counts(counts, "item counts")
        counts[0] = 0.0
        buffer = self.history_prior.item_log_count
        buffer.copy_(torch.log1p(counts).to(buffer.device, buffer.dtype))

    def sample_negatives(self, count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | float]:
        """`count` item ids drawn with replacement (uniformly over 1..N, or by target popularity) and the
        probability of drawing each id once (`[N + 1]`, or one float for the uniform sampler)."""
        if self.config.negative_sampling == "popularity":
            probability = self._target_probability_or_raise()
            return torch.multinomial(probability, count, replacement=True), probability
        n = self.config.num_items
        return torch.randint(1, n + 1, (count,), device=device), 1.0 / n

    def _target_probability_or_raise(self) -> torch.Tensor:
        probability = getattr(self, "target_probability", None)
        if probability is None:
            raise ValueError(
                "loss_type='sampled' needs the training targets' frequencies: call "
                "model.set_target_frequencies(counts) (the trainer does this from the training split)"
            )
        return probability

    def _sampled_softmax_forward(self, input_ids, attention_mask, labels, return_dict, check_inputs, regularizer_scale):
        """Cross-entropy over the batch's targets and `num_negatives` shared sampled items instead of the whole
        catalogue. Only the items the step needs are adapted; each candidate's logit is corrected by the log
        of its expected count among the candidates (logQ: in-batch targets by popularity, negatives by the
        sampler), and a candidate equal to a row's target in another column is masked (accidental hit)."""
        config, device = self.config, input_ids.device
        negatives, negative_probability = self.sample_negatives(config.num_negatives, device)
        candidates = torch.cat([labels, negatives])  # [B + S]; row b's target is column b
        needed, inverse = torch.unique(torch.cat([input_ids.reshape(-1), candidates]), return_inverse=True)
        history_columns = inverse[: input_ids.numel()].view_as(input_ids)
        candidate_columns = inverse[input_ids.numel() :]
        features = {m: table[needed] for m, table in self.item_features.items()}
        raw = self.missrec.adapt(features)  # [M, U, H]: the step's items only
        present = self._present()[:, needed]
        if check_inputs:
            self._check_input_ids(input_ids, attention_mask)
        backbone = self.missrec(
            input_ids,
            item_tokens=raw[:, history_columns],
            modality_mask=present[:, history_columns],
            attention_mask=attention_mask,
            last_position_only=config.last_position_only,
        )
        embeddings = self.missrec.item_embeddings
        ids = None if embeddings is None else embeddings(candidates)
        items = self._candidate_tokens(raw[:, candidate_columns], present[:, candidate_columns], ids, candidates)
        scores = self.fusion(backbone.sequence_embedding, items)
        if self.history_prior is not None:
            scores = scores + self.history_prior(input_ids, attention_mask, self.item_features, candidates)
        logits = scores / config.temperature
        # Only the candidates' entries: nothing in the step is as long as the catalogue.
        drawn = negative_probability[candidates] if torch.is_tensor(negative_probability) else negative_probability
        expected = len(labels) * self._target_probability_or_raise()[candidates] + len(negatives) * drawn
        loss, logits = sampled_softmax_loss(logits, candidates, labels, expected)
        scale = _regularizer_scale(config, regularizer_scale)
        loss = loss + config.interest_reg_weight * scale * backbone.interest_regularization
        if not return_dict:
            return (loss, logits, backbone.sequence_embedding, backbone.interest_regularization)
        return MissrecSequentialRecommendationOutput(
            loss=loss,
            logits=logits,
            sequence_embedding=backbone.sequence_embedding,
            interest_regularization=backbone.interest_regularization,
        )

    @torch.no_grad()
    def score_items(
        self,
        sequence_embedding: torch.Tensor,
        items: ItemTokens,
        start: int,
        end: int,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores (before temperature) of item ids `start..end-1`: the block function of the streaming
        full-ranking evaluator, so evaluation and recommendation use exactly the training scores. A model with
        a history prior needs the histories (`input_ids`, `attention_mask`) the sequences were encoded from."""
        scores = self.fusion(sequence_embedding, items.slice(start, end))
        if self.history_prior is None:
            return scores
        if input_ids is None:
            raise ValueError("this model has a history prior (config.history_prior): pass the histories' input_ids")
        return scores + self.history_prior(input_ids, attention_mask, self.item_features, range(start, end))

    @torch.no_grad()
    def recommend(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        k: int = 10,
        exclude_history: bool = False,
        block_size: int = 8192,
    ) -> MissrecTopKOutput:
        """The `k` best items for each history `input_ids` `[B, L]` (right-padded with 0), best first: the
        streaming top-k over item blocks of `block_size`, so no `[B, num_items]` matrix is held. The scores are
        the evaluator's (the same block function); `exclude_history` leaves each history's items out. Item ids
        are 1..num_items; `MissrecRecommender` maps them to raw ids and serves large catalogues from lists. Call it
        in eval mode (`model.eval()`), as any inference."""
        sequence = self.encode(input_ids, attention_mask).sequence_embedding
        items = self.item_tokens()
        scores, item_ids = streaming_topk(
            lambda start, end: self.score_items(sequence, items, start, end, input_ids, attention_mask),
            self.config.num_items,
            k,
            block_size,
            input_ids if exclude_history else None,
        )
        return MissrecTopKOutput(item_ids=item_ids, scores=scores)


@dataclass
class MissrecPreTrainingOutput(ModelOutput):
    """Output of [`MissrecForPreTraining`].

    loss: `L_si + seq_seq_loss_weight x L_ss + interest_reg_weight x (R + R_aug)`.
    sequence_item_loss: in-batch sequence-to-next-item contrastive loss (negatives from every process).
    sequence_sequence_loss: sequence-to-augmented-sequence contrastive loss (None without an augmented view).
    interest_regularization: R (+ R_aug), unweighted. sequence_embedding: `[B, H]`.
    """

    loss: torch.FloatTensor | None = None
    sequence_item_loss: torch.FloatTensor | None = None
    sequence_sequence_loss: torch.FloatTensor | None = None
    interest_regularization: torch.FloatTensor | None = None
    sequence_embedding: torch.FloatTensor | None = None


def _regularizer_scale(config: MissrecConfig, scale: float | None) -> float:
    """Factor that keeps a batch-*summed* regulariser equal to one process on the whole optimiser batch:
    process groups average gradients over processes and Accelerate divides the loss by the accumulation
    steps, which would shrink gamma by both. The trainer passes `regularizer_scale` (processes x
    accumulation steps) to `forward`; by default it is the number of processes. A mean-reduced regulariser
    needs no factor."""
    if config.interest_reg_reduction != "sum":
        return 1.0
    return float(scale) if scale is not None else float(rank_and_world_size()[1])


class MissrecForPreTraining(MissrecPreTrainedModel):
    """MISSRec pre-training over several domains (content only): the backbone, the fusion head and the
    contrastive objectives. Batches carry their own features (the merged catalogue stays outside the model).

    Fix: with several processes the candidate items and augmented sequences of every process are gathered with
    a differentiable all-gather, so the negatives are the global batch (the original never synchronised).
    Fix: a target that recurs in the batch is not a negative of its own duplicates (`mask_duplicate_targets`).
    """

    def __init__(self, config: MissrecConfig):
        super().__init__(config)
        if config.use_item_ids:
            raise ValueError("MissrecForPreTraining is content-only: set use_item_ids=False (got True).")
        if config.item_fusion == "dynamic_instance":
            raise ValueError(
                "item_fusion='dynamic_instance' needs the full catalogue as candidates; use "
                "'dynamic_shared' or 'static' for pre-training."
            )
        self.missrec = MissrecModel(config)
        self.fusion = MissrecFusionHead(config)
        self.post_init()

    def refresh_interests(
        self, item_features: Mapping[str, torch.Tensor | np.ndarray], modality_present, seed: int = 0
    ) -> int:
        """Cluster the merged catalogue (`{modality: [N + 1, F]}`, may be memory-mapped). Returns K."""
        return self.missrec.refresh_interests(item_features, modality_present, seed=seed)

    def _modality_mask(self, features: Mapping[str, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        return apply_missing_rule(rows_present(features, self.config.modalities) if mask is None else mask, self.config)

    def _sequence_item_loss(
        self,
        sequence: torch.Tensor,
        target_features: Mapping[str, torch.Tensor],
        target_modality_mask: torch.Tensor | None,
        target_ids: torch.Tensor | None,
        sizes: list[int],
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """Each history against the next items of the global batch (gathered from every process)."""
        tokens = F.normalize(self.missrec.adapt(target_features), dim=-1)  # [M, B, H]
        present = self._modality_mask(target_features, target_modality_mask)
        candidates = ItemTokens(gather_with_grad(tokens, sizes, 1), gather_no_grad(present, sizes, 1), None, 0)
        logits = self.fusion(sequence, candidates) / self.config.temperature  # [B, global batch]
        if self.config.mask_duplicate_targets and target_ids is not None:
            return in_batch_contrastive_loss(logits, labels, target_ids, gather_no_grad(target_ids, sizes))
        return in_batch_contrastive_loss(logits, labels)

    def _total_loss(
        self,
        sequence_item_loss: torch.Tensor,
        sequence_sequence_loss: torch.Tensor | None,
        regularization: torch.Tensor,
        share: float,
        regularizer_scale: float | None,
    ) -> torch.Tensor:
        config = self.config
        # A batch-summed regulariser must count the global batch, as one process on the whole batch would.
        scale = _regularizer_scale(config, regularizer_scale) if config.interest_reg_reduction == "sum" else share
        loss = sequence_item_loss + config.interest_reg_weight * scale * regularization
        if sequence_sequence_loss is not None:
            loss = loss + config.seq_seq_loss_weight * sequence_sequence_loss
        return loss

    def forward(
        self,
        input_ids: torch.LongTensor,
        item_features: Mapping[str, torch.Tensor],
        target_features: Mapping[str, torch.Tensor],
        target_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        modality_mask: torch.Tensor | None = None,
        target_modality_mask: torch.Tensor | None = None,
        augmented_input_ids: torch.LongTensor | None = None,
        augmented_item_features: Mapping[str, torch.Tensor] | None = None,
        augmented_attention_mask: torch.Tensor | None = None,
        augmented_modality_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
        regularizer_scale: float | None = None,
    ) -> MissrecPreTrainingOutput | tuple:
        """Histories `input_ids` `[B, L]` with their features `{m: [B, L, F_m]}`, next items `target_features`
        `{m: [B, F_m]}` (and their global ids for duplicate masking), optionally an augmented view.
        `regularizer_scale`: see `_regularizer_scale`. Long for its two views' arguments; the objectives are
        `_sequence_item_loss`, `augmented_view_loss` and `_total_loss`."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        rank, world = rank_and_world_size()
        config = self.config
        backbone = self.missrec(
            input_ids,
            item_features=item_features,
            modality_mask=self._modality_mask(item_features, modality_mask),
            attention_mask=attention_mask,
            last_position_only=config.last_position_only,
        )
        sequence = backbone.sequence_embedding
        batch = sequence.shape[0]
        sizes = gather_sizes(batch, sequence.device)
        labels = torch.arange(batch, device=sequence.device) + sum(sizes[:rank])

        sequence_item_loss = self._sequence_item_loss(
            sequence, target_features, target_modality_mask, target_ids, sizes, labels
        )
        regularization = backbone.interest_regularization
        sequence_sequence_loss = None
        if augmented_input_ids is not None:
            augmented = self.missrec(
                augmented_input_ids,
                item_features=augmented_item_features,
                modality_mask=self._modality_mask(augmented_item_features, augmented_modality_mask),
                attention_mask=augmented_attention_mask,
                last_position_only=config.last_position_only,
            )
            all_augmented = gather_with_grad(augmented.sequence_embedding, sizes)
            sequence_sequence_loss = augmented_view_loss(sequence, all_augmented, labels, config.temperature)
            regularization = regularization + augmented.interest_regularization
        # The process group averages gradients: weight each process's losses by its share of the global batch
        # so that the step equals one process on the whole batch (also when the last batches differ in size).
        share = len(sizes) * batch / sum(sizes)
        sequence_item_loss = sequence_item_loss * share
        if sequence_sequence_loss is not None:
            sequence_sequence_loss = sequence_sequence_loss * share
        loss = self._total_loss(sequence_item_loss, sequence_sequence_loss, regularization, share, regularizer_scale)
        if not return_dict:
            return (loss, sequence_item_loss, sequence_sequence_loss, regularization, sequence)
        return MissrecPreTrainingOutput(
            loss=loss,
            sequence_item_loss=sequence_item_loss,
            sequence_sequence_loss=sequence_sequence_loss,
            interest_regularization=regularization,
            sequence_embedding=sequence,
        )


MissrecConfig.register_for_auto_class()
MissrecForSequentialRecommendation.register_for_auto_class("AutoModel")
MissrecForPreTraining.register_for_auto_class("AutoModelForPreTraining")

__all__ = [
    "ItemTokens",
    "MissrecForPreTraining",
    "MissrecPreTrainingOutput",
    "MissrecForSequentialRecommendation",
    "MissrecModel",
    "MissrecModelOutput",
    "MissrecPreTrainedModel",
    "MissrecSequentialRecommendationOutput",
]
