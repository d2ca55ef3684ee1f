"""Configuration of MISSRec (multi-modal interest-aware sequence representation for recommendation).

Every hyperparameter of the original code (reference table §11) has a self-explaining field here, with the
original's default. Fields that exist only to reproduce a known flaw of the original say so; our defaults are
the corrected behaviour (see ARCHITECTURE.md, "Decisions").
"""

from __future__ import annotations

import math

from transformers import PreTrainedConfig

KNOWN_MODALITIES = ("text", "image")
ITEM_FUSION_MODES = ("dynamic_shared", "dynamic_instance", "static")
SEQUENCE_FUSION_MODES = ("add",)
KMEANS_INITS = ("k-means++", "batched-k-means++", "random")
ACTIVATIONS = ("gelu", "relu", "gelu_new", "silu")
REGULARIZER_REDUCTIONS = ("sum", "mean")
REGULARIZER_POOLINGS = ("mean", "original", "batch_share")
INTEREST_SET_WIDTHS = ("longest", "static")
LOSS_TYPES = ("full", "sampled")
NEGATIVE_SAMPLERS = ("uniform", "popularity")


class MissrecConfig(PreTrainedConfig):
    r"""Configuration for [`MissrecModel`], [`MissrecForSequentialRecommendation`] and the pre-training model.

    Architecture
        hidden_size (`int`, 300): width of item tokens, interest centroids and transformer states.
        num_encoder_layers (`int`, 1): post-LN layers of the interest encoder (the set of interest tokens).
        num_decoder_layers (`int`, 1): post-LN layers of the interest-aware decoder (the item tokens).
        num_attention_heads (`int`, 4): heads of every attention block; must divide `hidden_size`.
        intermediate_size (`int`, 256): width of the feed-forward block.
        hidden_dropout_prob (`float`, 0.5): dropout on the decoder input and after every sub-layer.
        attention_dropout_prob (`float`, 0.5): dropout on attention weights. The original declared a separate
            value but used `hidden_dropout_prob` everywhere; 0.5 for both reproduces it.
        hidden_act (`str`, "gelu"): activation of the feed-forward block (exact erf GELU by default).
        layer_norm_eps (`float`, 1e-12): epsilon of every LayerNorm.
        initializer_range (`float`, 0.02): std of the normal init of Linear and Embedding weights.
        max_seq_length (`int`, 50): rows of the position table; longer histories keep their most recent items.

    Items
        modalities (`list[str]`, ["text", "image"]): the content modalities used, any non-empty subset of
            "text" and "image".
        text_feature_size / image_feature_size (`int`, 512): width of the frozen input features per modality
            (CLIP ViT-B/32 gives 512 for both; a MiniLM text model gives 384).
        num_items (`int`, 0): real items of the catalogue; ids are 1..num_items, 0 is padding.
        use_item_ids (`bool`, True): transductive mode (an ID table of `num_items + 1` rows added to the item
            tokens and scored with weight `id_score_weight`); False is the inductive, content-only mode.
        mask_missing_modalities (`bool`, True): an item whose feature row is all zeros lacks that modality: it is
            left out of the decoder input, the interest clustering and the fusion. False reproduces the
            original, where the adaptor bias stands in for the missing feature (and K counts those tokens too).
            Measured only inside all four original settings together (scientific_mm has no missing modality): on
            scientific_full, transductive, 3 seeds, test NDCG@10 0.0857 +- 0.0002 against 0.0856 +- 0.0011 here
            (paired +0.0001, 95% interval [-0.0031, +0.0034]): no difference shown; masking keeps a text-only
            item's score a text cosine rather than a cosine with the bias.

    Interests
        interest_ratio (`float`, 0.5): number of interests K = ceil(ratio x number of item tokens), at least 1
            (0.5 for fine-tuning, 0.02 for pre-training in the paper; 0.3 for the Office transductive runs).
        num_interests (`int`, 0): K of the current interest state, set by the interest refresh (0 = not yet
            clustered); stored so that a saved model rebuilds buffers of the right shape.
        kmeans_init (`str`, "k-means++"), kmeans_max_iterations (`int`, 10), kmeans_tolerance (`float`, 1e-4):
            the clustering. The original made one random-init Lloyd step (its error test was always 0);
            measured on scientific_mm (transductive, 3 seeds; bench/results/quality.md) that setting gives test
            NDCG@10 0.0834 +- 0.0019 against 0.0820 +- 0.0018 here (valid 0.0897 vs 0.0898): no difference shown;
            inductive with the history prior, 0.1077 +- 0.0020 against 0.1070 +- 0.0006 (paired +0.0007, 95%
            interval [-0.0028, +0.0043]; on valid +0.0017 [+0.0001, +0.0034], the one edge of the ablation),
            not confirmed on scientific_full (inductive, 3 seeds: valid -0.0006 [-0.0029, +0.0016], test 0.0843
            +- 0.0007 against 0.0847 +- 0.0010), so the converged k-means stays the default.
            "batched-k-means++" draws the seeds in 16 rounds (about one Lloyd pass: for a cold start on
            millions of tokens); "random" takes random tokens.
        kmeans_warm_start (`bool`, True): start each refresh from the previous centroids when K is unchanged
            (k-means++ seeding is sequential in K and dominates the cost of a per-epoch refresh).
        interest_reg_weight (`float`, 1e-4): gamma, weight of the interest regulariser.
        interest_reg_reduction (`str`, "sum"): the original sums the regulariser over the batch; "mean" divides
            it by the batch size (independent of how a batch is split over processes).
        interest_reg_pooling (`str`, "mean"): pooling of a sequence's encoded interests in the regulariser:
            their mean; "original", exactly the original's (n_b / Q) x the sum over every slot of the padded
            set, padding slots included (grows like n_b^2 and with the batch mates); "batch_share", the
            original's weighting over the real slots only. On scientific_mm (transductive, 3 seeds) "original"
            gives test NDCG@10 0.0824 +- 0.0004 against 0.0820 +- 0.0018 for "mean" (paired difference +0.0004,
            95% interval [-0.0051, +0.0058]): no difference shown; inductive with the history prior, +0.0004
            [-0.0072, +0.0079].
        interest_set_width (`str`, "longest"): slots of a batch's interest sets. "longest": the batch's largest
            set (the fewest slots, but its size is read back from the device at every forward: a host sync);
            "static": M x L slots (every slot a history's items could fill), no sync, and with histories padded
            to a few lengths (`pad_to_multiple_of`) shapes repeat, as `torch.compile` and a GPU want. The extra
            slots are masked: the same values up to float rounding (tested).
        bucket_by_length (`bool`, False): compute a batch's histories in groups of similar length (1, 2, 3-4,
            5-8, ... items), each cut to its longest history, instead of padding every row to the batch's
            longest: the same values up to float rounding (tested), at the cost of the real positions. For
            batches that mix lengths (random batches, `group_by_length=False`); a few host syncs per forward, so
            not with "static" interest sets.

    Scoring
        item_fusion (`str`, "dynamic_shared"): how per-modality cosine scores are mixed: softmax over modalities
            of `fusion_factor x score` with one learned scalar ("dynamic_shared") or one per item
            ("dynamic_instance", fine-tuning only), or the plain mean ("static").
        sequence_fusion (`str`, "add"): item tokens of the modalities are summed per position.
        fusion_factor_init (`float`, 0.0): initial fusion scale (0 = plain average at the start).
        id_score_weight (`float`, 1/3): weight of the ID score; the content score gets the rest.
        temperature (`float`, 0.07): logits are scores / temperature. The original's value, set without the
            history prior. With the prior, 0.1 is better on scientific_mm's valid NDCG@10 (transductive, 5 seeds:
            +0.0016, 95% interval [+0.0005, +0.0026]; test +0.0026 [-0.0007, +0.0059]) and on the paper's
            split (scientific_full, 3 seeds: +0.0025 [+0.0015, +0.0034]; test 0.0869 against 0.0856, +0.0013
            [-0.0015, +0.0041]). So `run_finetune.py` (`ModelArguments.temperature`) uses 0.1 from scratch,
            transductive, with the prior. Inductive, 0.1 is better on scientific_mm's valid (+0.0016 [+0.0014,
            +0.0019]) but not on the paper's split (3 seeds: valid +0.0004 [-0.0011, +0.0018], test -0.0009
            [-0.0035, +0.0018]), so the paper's 0.07 stays there; a bare config keeps 0.07, as does a
            pre-trained model (README, "Levers past the paper").
        history_prior (`bool`, False): add to every candidate's score a learned mix of three terms that need no
            representation learning (see `MissrecHistoryPrior`): the cosine of its frozen features with the
            last history item's, per modality; whether it is in the history; log(1 + its count as a training
            target). Not in the original. On Scientific a ranking by the first and third terms alone, with no
            training, beats the trained original model (`bench/zero_shot_baselines.py`); with the prior, test
            NDCG@10 on scientific_mm (transductive, 3 seeds) goes from 0.0820 to 0.1075 (paired +0.0255, 95%
            interval [+0.0200, +0.0309]), inductive 0.0738 to 0.1048 (paired +0.0309); on scientific_full
            (3 seeds) 0.0856 ± 0.0011 against 0.0623 (1 seed). Cost at 4,385 items: a training step 1.06x, an
            evaluation pass 1.17x (`bench/history_prior_cost.py`). Off here, so that a bare config is the
            paper's model; `run_finetune.py` (`ModelArguments.history_prior`) turns it on by default.
        last_position_only (`bool`, True): the last decoder layer computes only each history's last position,
            all the heads use (the same values up to float rounding; tested); False computes every position, as
            the original did (the reference).
        history_prior_init (`dict`, None): the prior's starting weights in score units, by term
            (`"<modality>_cosine"`, `"in_history"`, `"log_count"`; absent terms start at 0): what a pre-trained
            model calibrated on its own domains hands to a new one (zero-shot uses them as they are).

    Fine-tuning loss
        loss_type (`str`, "full"): "full", cross-entropy over the whole catalogue (the original); "sampled",
            over the batch's targets and `num_negatives` items drawn once per step and shared by the batch,
            with the logQ correction and accidental hits masked; only the step's items are adapted, so a step
            no longer grows with the catalogue (evaluation still ranks every item).
        num_negatives (`int`, 4096): sampled negatives per step.
        negative_sampling (`str`, "uniform"): draw them uniformly over the items or by target popularity.

    Pre-training
        seq_seq_loss_weight (`float`, 1e-3): lambda, weight of the sequence-to-augmented-sequence loss.
        item_drop_ratio (`float`, 0.2), item_drop_prob (`float`, 0.9): augmentation (drop each item with the
            ratio, in a batch chosen with the probability; word drop otherwise).
        mask_duplicate_targets (`bool`, True): targets repeated in a batch are not each other's negatives
            (the original did not mask them).
    """

    model_type = "missrec"

    hidden_size: int = 300
    num_encoder_layers: int = 1
    num_decoder_layers: int = 1
    num_attention_heads: int = 4
    intermediate_size: int = 256
    hidden_dropout_prob: float = 0.5
    attention_dropout_prob: float = 0.5
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    max_seq_length: int = 50
    modalities: list[str] | tuple[str, ...] = ("text", "image")
    text_feature_size: int = 512
    image_feature_size: int = 512
    num_items: int = 0
    use_item_ids: bool = True
    mask_missing_modalities: bool = True
    interest_ratio: float = 0.5
    num_interests: int = 0
    kmeans_init: str = "k-means++"
    kmeans_max_iterations: int = 10
    kmeans_tolerance: float = 1e-4
    kmeans_warm_start: bool = True
    interest_reg_weight: float = 1e-4
    interest_reg_reduction: str = "sum"
    interest_reg_pooling: str = "mean"
    interest_set_width: str = "longest"
    bucket_by_length: bool = False
    item_fusion: str = "dynamic_shared"
    sequence_fusion: str = "add"
    fusion_factor_init: float = 0.0
    id_score_weight: float = 1.0 / 3.0
    temperature: float = 0.07
    history_prior: bool = False
    history_prior_init: dict | None = None
    last_position_only: bool = True
    seq_seq_loss_weight: float = 1e-3
    item_drop_ratio: float = 0.2
    item_drop_prob: float = 0.9
    mask_duplicate_targets: bool = True
    loss_type: str = "full"
    num_negatives: int = 4096
    negative_sampling: str = "uniform"

    def __post_init__(self, **kwargs):
        self.modalities = list(self.modalities)
        super().__post_init__(**kwargs)
        self.check_values()

    def feature_size(self, modality: str) -> int:
        """Width of the frozen input feature of `modality`."""
        return {"text": self.text_feature_size, "image": self.image_feature_size}[modality]

    def check_values(self) -> None:
        """Raise `ValueError` naming the field, its value and what is allowed, for every invalid value."""
        positive_ints = (
            "hidden_size",
            "num_encoder_layers",
            "num_decoder_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_seq_length",
            "text_feature_size",
            "image_feature_size",
            "kmeans_max_iterations",
        )
        for name in positive_ints:
            _require(name, getattr(self, name), lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
        for name in ("num_items", "num_interests"):
            _require(name, getattr(self, name), lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"MissrecConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}; allowed: a multiple of the number of heads."
            )
        for name in ("hidden_dropout_prob", "attention_dropout_prob", "item_drop_ratio"):
            _require(name, getattr(self, name), lambda v: 0.0 <= v < 1.0, "a float in [0, 1)")
        for name in ("item_drop_prob", "id_score_weight"):
            _require(name, getattr(self, name), lambda v: 0.0 <= v <= 1.0, "a float in [0, 1]")
        _require("interest_ratio", self.interest_ratio, lambda v: 0.0 < v <= 1.0, "a float in (0, 1]")
        for name in ("temperature", "layer_norm_eps", "initializer_range"):
            _require(name, getattr(self, name), lambda v: v > 0 and math.isfinite(v), "a finite float > 0")
        for name in ("interest_reg_weight", "seq_seq_loss_weight", "kmeans_tolerance"):
            _require(name, getattr(self, name), lambda v: v >= 0 and math.isfinite(v), "a finite float >= 0")
        _require(
            "modalities",
            self.modalities,
            lambda v: len(v) >= 1 and len(set(v)) == len(v) and all(m in KNOWN_MODALITIES for m in v),
            f"a non-empty list of distinct names from {list(KNOWN_MODALITIES)}",
        )
        _require_choice("item_fusion", self.item_fusion, ITEM_FUSION_MODES)
        _require_choice("sequence_fusion", self.sequence_fusion, SEQUENCE_FUSION_MODES)
        _require_choice("kmeans_init", self.kmeans_init, KMEANS_INITS)
        _require_choice("hidden_act", self.hidden_act, ACTIVATIONS)
        _require_choice("interest_reg_reduction", self.interest_reg_reduction, REGULARIZER_REDUCTIONS)
        _require_choice("interest_reg_pooling", self.interest_reg_pooling, REGULARIZER_POOLINGS)
        _require_choice("loss_type", self.loss_type, LOSS_TYPES)
        _require_choice("interest_set_width", self.interest_set_width, INTEREST_SET_WIDTHS)
        _require_choice("negative_sampling", self.negative_sampling, NEGATIVE_SAMPLERS)
        if self.bucket_by_length and self.interest_set_width == "static":
            raise ValueError(
                'bucket_by_length=True reads lengths on the host, which interest_set_width="static" avoids; '
                "choose one (bucketing for mixed-length batches on a CPU, static shapes for a GPU)"
            )
        _require("num_negatives", self.num_negatives, lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
        terms = {f"{m}_cosine" for m in KNOWN_MODALITIES} | {"in_history", "log_count"}
        _require(
            "history_prior_init",
            self.history_prior_init,
            lambda v: (
                v is None
                or (isinstance(v, dict) and set(v) <= terms and all(math.isfinite(float(x)) for x in v.values()))
            ),
            f"None or a dict of finite weights with keys from {sorted(terms)}",
        )


def check_setting(name: str, value, is_valid, allowed: str) -> None:
    """Raise `ValueError` naming the setting, its value and what is allowed, unless `is_valid(value)` (a
    `TypeError` in the test counts as invalid). Shared by the config and the run arguments."""
    try:
        ok = bool(is_valid(value))
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid; allowed: {allowed}.")


def _require(name: str, value, is_valid, allowed: str) -> None:
    check_setting(f"MissrecConfig.{name}", value, is_valid, allowed)


def _require_choice(name: str, value, choices: tuple[str, ...]) -> None:
    _require(name, value, lambda v: v in choices, f"one of {list(choices)}")


__all__ = ["MissrecConfig"]
