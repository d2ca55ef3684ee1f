"""Building the model a run trains: from scratch, or from a saved MISSRec whose backbone is transferred.

What transfers is the backbone (adaptors of the same width, position table, encoder, decoder, input
LayerNorm, fusion head, history-prior weights); what belongs to one catalogue (features, modality masks,
interest state, item counts, and the ID table unless it is this very catalogue) is rebuilt for the new one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch

from .atomic import complete_interrupted_commit
from .data import ItemCatalog, PretrainingCorpus
from .hub import resolve_model_folder
from .modeling_missrec import MissrecForPreTraining, MissrecForSequentialRecommendation
from .training_args import ModelArguments, PretrainModelArguments, expand_path, parse_overrides

logger = logging.getLogger(__name__)


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build_model(model_args: ModelArguments, catalog: ItemCatalog) -> MissrecForSequentialRecommendation:
    """A recommender for `catalog`: from scratch, or from a saved MISSRec (its matching weights are kept;
    anything whose shape depends on the catalogue, such as the ID table, is rebuilt for this one)."""
    from .configuration_missrec import MissrecConfig

    settings = {
        "num_items": catalog.num_items,
        "use_item_ids": model_args.mode == "transductive",
        "modalities": list(catalog.features),
        "interest_ratio": model_args.interest_ratio,
        **{f"{m}_feature_size": catalog.feature_size(m) for m in catalog.features},
        **({} if model_args.history_prior is None else {"history_prior": model_args.history_prior}),
        **parse_overrides(model_args.config_overrides),
    }
    if model_args.model_name_or_path is None:
        model = MissrecForSequentialRecommendation(MissrecConfig(**settings))
    else:
        folder = resolve_model_folder(model_args.model_name_or_path, model_args.model_revision, model_args.token)
        source = MissrecConfig.from_pretrained(folder)
        model = MissrecForSequentialRecommendation(_transfer_config(source, settings))
        _load_matching_weights(model, folder, catalog.raw_item_ids)
    model.load_item_features(catalog.features, catalog.present)
    if model_args.finetune_method == "frozen":
        model.freeze_backbone_for_transfer()
    elif model_args.finetune_method == "prior":
        model.train_only_history_prior()
    elif model_args.finetune_method == "lora":
        model = wrap_with_lora(model, model_args)
    return model


def _transfer_config(source, settings: Mapping):
    """The source's architecture with this catalogue's settings; what described the source model alone
    (its interest state, class names, remote-code map) does not carry over."""
    from .configuration_missrec import MissrecConfig

    carried = {k: v for k, v in source.to_diff_dict().items() if k not in ("architectures", "auto_map")}
    return MissrecConfig(**{**carried, **settings, "num_interests": 0})


def zero_shot_recommender(
    source: MissrecForPreTraining, catalog: ItemCatalog, interest_ratio: float = 0.5, seed: int = 0
) -> MissrecForSequentialRecommendation:
    """An inductive recommender for `catalog` with `source`'s backbone as it is (in memory, nothing trained),
    its interests clustered over the catalogue: what `run_finetune.py --do_train false` evaluates."""
    settings = {
        "num_items": catalog.num_items,
        "use_item_ids": False,
        "modalities": list(catalog.features),
        "interest_ratio": interest_ratio,
        **{f"{m}_feature_size": catalog.feature_size(m) for m in catalog.features},
    }
    model = MissrecForSequentialRecommendation(_transfer_config(source.config, settings))
    load_matching_state(model, source.state_dict(), "the pre-training model", quiet=True)
    model.to(next(source.parameters()).device)
    model.load_item_features(catalog.features, catalog.present)
    model.refresh_interests(seed=seed)
    return model


def wrap_with_lora(model: MissrecForSequentialRecommendation, model_args: ModelArguments):
    """A peft `PeftModel`: LoRA on the attention projections, the domain-specific parts trained in full."""
    from peft import LoraConfig, get_peft_model

    modules_to_save = [f"adaptors.{m}" for m in model.config.modalities] + ["input_layer_norm", "fusion"]
    if model.config.use_item_ids:
        modules_to_save.append("item_embeddings")
    if model.history_prior is not None:
        modules_to_save.append("history_prior")
    config = LoraConfig(
        r=model_args.lora_rank,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=LORA_TARGETS,
        modules_to_save=modules_to_save,
    )
    return get_peft_model(model, config)


CATALOGUE_SPECIFIC = ("_features", "item_modality_present", "interest_tokenizer.", "history_prior.item_log_count")


BACKBONE_CORE = ("missrec.position_embeddings.", "missrec.encoder.", "missrec.decoder.", "missrec.input_layer_norm.")


def _load_matching_weights(model, directory: str, raw_item_ids: list[str] | None = None) -> None:
    """Load what transfers from a saved MISSRec (recommender, pre-training model or bare backbone).

    The transformer, position table and input LayerNorm must all match (else the "frozen" recipe would freeze
    random weights): a mismatch is an error. Adaptors of another feature width start fresh. The ID table is
    kept only when the saved model's `item_ids.json` lists this very catalogue."""
    from safetensors.torch import load_file

    complete_interrupted_commit(directory)
    path = Path(directory) / "model.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"model_name_or_path: {path} not found (a save_pretrained folder or Hub snapshot)")
    saved = load_file(str(path))
    ids_file = Path(directory) / "item_ids.json"
    same_catalogue = (
        raw_item_ids is not None
        and ids_file.exists()
        and json.loads(ids_file.read_text()).get("raw_item_ids") == list(raw_item_ids)
    )
    load_matching_state(model, saved, directory, same_catalogue)


def load_matching_state(
    model, saved: Mapping[str, torch.Tensor], source: str, same_catalogue: bool = False, quiet: bool = False
) -> None:
    """The rules of `_load_matching_weights` for a state dict in memory (`source` names it in messages;
    `quiet` logs what was loaded at DEBUG, for a transfer repeated every epoch)."""
    directory = source
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
            f"{directory}: the transformer does not match this configuration ({detail}). Use the saved model's "
            "hidden_size, layers, heads, intermediate_size and max_seq_length."
        )
    model.load_state_dict({name: tensor.to(own[name].device) for name, tensor in kept.items()}, strict=False)
    fresh = sorted(set(own) - set(kept) - {n for n in own if any(t in n for t in CATALOGUE_SPECIFIC)})
    unexpected = sorted(set(saved) - set(own))
    logger.log(
        logging.DEBUG if quiet else logging.INFO,
        "loaded %d tensors from %s; new for this catalogue: %s", len(kept), directory, fresh or "none",
    )  # fmt: skip
    if mismatched or unexpected:
        logger.warning("not loaded from %s: %s", directory, mismatched + [f"{n} (no such tensor)" for n in unexpected])


def build_pretraining_model(model_args: PretrainModelArguments, corpus: PretrainingCorpus) -> MissrecForPreTraining:
    from .configuration_missrec import MissrecConfig

    settings = {
        "num_items": corpus.num_items,
        "use_item_ids": False,
        "modalities": list(corpus.features),
        "interest_ratio": model_args.interest_ratio,
        **{f"{m}_feature_size": corpus.feature_size(m) for m in corpus.features},
        **parse_overrides(model_args.config_overrides),
    }
    if model_args.model_name_or_path is None:
        return MissrecForPreTraining(MissrecConfig(**settings))
    path = resolve_model_folder(
        expand_path(model_args.model_name_or_path, "model_name_or_path"), model_args.model_revision, model_args.token
    )
    source = MissrecConfig.from_pretrained(path)
    model = MissrecForPreTraining(_transfer_config(source, settings))
    _load_matching_weights(model, path)
    return model
