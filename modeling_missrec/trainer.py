"""The one Accelerate training loop behind `run_finetune.py` (CPU, one GPU, several GPUs).

Per epoch: refresh the interests (k-means on the main process, broadcast to the others), train with
full-softmax cross-entropy plus the interest regulariser, evaluate on valid by streaming full ranking, keep the
best model (early stopping on NDCG@10, ties count as improvement as in the original), checkpoint atomically.
At the end the best model is evaluated once on test and written with `save_pretrained`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast, broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .atomic import (
    commit_files,
    complete_interrupted_commit,
    hold_lock,
    recover_directory,
    replace_directory,
    staging_dir,
    write_atomically,
)
from .data import (
    HistoryDataset,
    ItemCatalog,
    LengthGroupedBatchSampler,
    PretrainingCollator,
    PretrainingCorpus,
    find_dataset_name,
    identity_collate,
    load_atomic_dataset,
    load_item_catalog,
)
from .metrics import metrics_from_ranks, streaming_ranks
from .modeling_missrec import MissrecForPreTraining, MissrecForSequentialRecommendation

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "adamw")
PRECISIONS = ("no", "fp16", "bf16", "auto")
TRACKERS = ("auto", "none", "tensorboard")
LR_SCHEDULERS = ("constant", "linear", "cosine", "constant_with_warmup")
CHECKPOINT_DIR = "checkpoint"
BEST_DIR = "best_model"
STATE_FILE = "trainer_state.json"


def _check(name: str, value, is_valid, allowed: str) -> None:
    """Raise `ValueError` naming the argument, its value and what is allowed, unless `is_valid(value)`."""
    try:
        ok = bool(is_valid(value))
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid; allowed: {allowed}.")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_loop_arguments(args) -> None:
    """The checks the fine-tuning and pre-training arguments share (both loops read these fields)."""
    for name in ("num_train_epochs", "train_batch_size", "gradient_accumulation_steps", "length_group_batches"):
        _check(name, getattr(args, name), lambda v: _is_int(v) and v >= 1, "an integer >= 1")
    _check("learning_rate", args.learning_rate, lambda v: 0 < v < math.inf, "a float > 0")
    _check("weight_decay", args.weight_decay, lambda v: 0 <= v < math.inf, "a float >= 0")
    _check("mixed_precision", args.mixed_precision, PRECISIONS.__contains__, f"one of {list(PRECISIONS)}")
    _check("report_to", args.report_to, TRACKERS.__contains__, f"one of {list(TRACKERS)}")
    _check("dataloader_num_workers", args.dataloader_num_workers, lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    _check("num_threads", args.num_threads, lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1")
    _check(
        "max_steps_per_epoch", args.max_steps_per_epoch, lambda v: v is None or (_is_int(v) and v >= 0),
        "an integer >= 0",
    )  # fmt: skip


@dataclass
class TrainingArguments:
    """How to train and evaluate. Defaults are the original's fine-tuning settings (reference §5, §11)."""

    output_dir: str = field(
        default="outputs/missrec", metadata={"help": "Where the model, metrics and checkpoints go."}
    )
    num_train_epochs: int = field(
        default=300, metadata={"help": "Maximum epochs (early stopping usually ends sooner)."}
    )
    do_train: bool = field(
        default=True,
        metadata={
            "help": "False: no training step at all; the interests are clustered over this catalogue and the model "
            "as loaded is evaluated on valid and test (zero-shot ranking with a pre-trained inductive model: "
            "--model_name_or_path DIR --mode inductive --do_train false, with only the modalities it was "
            "pre-trained on, since a new modality's adaptor would start random)."
        },
    )
    train_batch_size: int = field(default=512, metadata={"help": "Training batch size per step, over all processes."})
    eval_batch_size: int = field(default=1024, metadata={"help": "Users per evaluation batch, over all processes."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate."})
    weight_decay: float = field(
        default=0.0, metadata={"help": "Weight decay: L2 in the gradient with adam, decoupled with adamw."}
    )
    optimizer: str = field(default="adam", metadata={"help": "adam (the original's) or adamw (decoupled decay)."})
    lr_scheduler_type: str = field(
        default="constant",
        metadata={
            "help": "Learning-rate schedule over num_train_epochs (transformers' get_scheduler): constant (the "
            "original's), linear, cosine or constant_with_warmup."
        },
    )
    warmup_ratio: float = field(default=0.0, metadata={"help": "Share of the scheduled steps spent warming up."})
    seed: int = field(default=2020, metadata={"help": "Seeds python, numpy, torch, batch order and k-means."})
    early_stopping_patience: int = field(
        default=10, metadata={"help": "Stop after this many evaluations without reaching the best (ties improve)."}
    )
    metric_for_best_model: str = field(default="ndcg@10", metadata={"help": "Validation metric for early stopping."})
    eval_ks: list[int] = field(default_factory=lambda: [10, 50], metadata={"help": "Cut-offs K of HR/NDCG@K."})
    metric_cutoff_offset: int = field(
        default=0,
        metadata={"help": "0 = standard @K. 1 = the original code's @K+1 numbers (its early stopping used it too)."},
    )
    exclude_history: bool = field(default=False, metadata={"help": "Remove the user's history items from the ranking."})
    eval_block_size: int = field(default=8192, metadata={"help": "Items scored at once by the streaming evaluator."})
    eval_min_fill: float = field(
        default=0.7,
        metadata={
            "help": "An evaluation batch ends before a history shorter than this fraction of its longest, so "
            "little of it is padding (0 = batches of exactly eval_batch_size / processes). One process only: "
            "with several the batches stay of equal size."
        },
    )
    mixed_precision: str = field(
        default="no",
        metadata={"help": "no, fp16 or bf16 (autocast on the accelerator), or auto: bf16 where the hardware has it."},
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    group_by_length: bool = field(
        default=True, metadata={"help": "Batch similar history lengths together (less padding, faster epochs)."}
    )
    length_group_batches: int = field(
        default=50,
        metadata={
            "help": "With group_by_length: each epoch's random order is cut into pools of this many batches, "
            "each pool sorted by length and cut into batches, and the batches shuffled. Fewer batches per pool "
            "mix more users and lengths into a batch (1 = random batches); more pad less. On scientific_mm "
            "(transductive, 3 seeds) pools of 4 and random batches gave the test NDCG@10 of 50 (0.0820, 0.0829 "
            "on 2 seeds, 0.0820; no difference shown) at about 0.7x and 0.25x its training samples/s (timed while "
            "other jobs shared the cores)."
        },
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or 'latest' for <output_dir>/checkpoint."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over in an output_dir that holds another run (its checkpoints are removed)."},
    )
    report_to: str = field(default="auto", metadata={"help": "Tracker: tensorboard, none, or auto (if installed)."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide progress bars."})
    max_steps_per_epoch: int | None = field(default=None, metadata={"help": "Cut epochs short (smoke tests)."})
    num_threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads of a single-process run (default: every available core; `accelerate launch` "
            "would otherwise pin one process to OMP_NUM_THREADS=1)."
        },
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the final model to the Hub at the end."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository, e.g. 'user/missrec-office'."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})

    def __post_init__(self):
        _check_loop_arguments(self)
        _check("eval_batch_size", self.eval_batch_size, lambda v: _is_int(v) and v >= 1, "an integer >= 1")
        _check("eval_block_size", self.eval_block_size, lambda v: _is_int(v) and v >= 1, "an integer >= 1")
        _check("early_stopping_patience", self.early_stopping_patience, lambda v: _is_int(v) and v >= 0,
               "an integer >= 0 (evaluations without improvement before stopping)")  # fmt: skip
        _check("metric_cutoff_offset", self.metric_cutoff_offset, (0, 1).__contains__,
               "0 (standard @K) or 1 (the original code's @K+1)")  # fmt: skip
        _check(
            "eval_ks", self.eval_ks,
            lambda v: isinstance(v, list) and v and all(_is_int(k) and k >= 1 for k in v) and len(set(v)) == len(v),
            "a list of distinct integers >= 1, e.g. [10, 50]",
        )  # fmt: skip
        self.metric_for_best_model = self.metric_for_best_model.lower()
        allowed = [f"{name}@{k}" for k in self.eval_ks for name in ("hr", "recall", "ndcg")] + ["mrr"]
        if self.metric_for_best_model not in allowed:
            raise ValueError(f"metric_for_best_model={self.metric_for_best_model!r} is invalid; allowed: {allowed}")
        if not 0.0 <= self.eval_min_fill <= 1.0:
            raise ValueError(f"eval_min_fill={self.eval_min_fill} is invalid; allowed: a float in [0, 1].")
        if not isinstance(self.length_group_batches, int) or self.length_group_batches < 1:
            raise ValueError(f"length_group_batches={self.length_group_batches!r} is invalid; allowed: an int >= 1.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={self.optimizer!r} is invalid; allowed: {list(OPTIMIZERS)}.")
        if self.lr_scheduler_type not in LR_SCHEDULERS:
            raise ValueError(
                f"lr_scheduler_type={self.lr_scheduler_type!r} is invalid; allowed: {list(LR_SCHEDULERS)}."
            )
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio={self.warmup_ratio!r} is invalid; allowed: a float in [0, 1).")
        if self.warmup_ratio and self.lr_scheduler_type == "constant":
            raise ValueError(
                f"warmup_ratio={self.warmup_ratio} with lr_scheduler_type='constant' would not warm up; allowed: "
                "lr_scheduler_type constant_with_warmup, linear or cosine, or warmup_ratio 0."
            )

    @property
    def group_factor(self) -> int:
        """Batches per length-sorted pool of the training sampler (1 = random batches)."""
        return self.length_group_batches if self.group_by_length else 1


FINETUNE_METHODS = ("full", "frozen", "lora", "prior")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _expand_path(path: str, name: str) -> str:
    resolved = os.path.expandvars(os.path.expanduser(path))
    if "$" in resolved:
        raise ValueError(f"{name}={path!r}: an environment variable in it is not set")
    return resolved


@dataclass
class DataArguments:
    """Which atomic files to read (reference §2.1). Paths may use environment variables, e.g.
    `${MISSREC_DATA_ROOT}/Scientific_mm_full`."""

    data_dir: str = field(default="data/scientific_mm", metadata={"help": "Folder with the X.*.inter files."})
    dataset_name: str | None = field(default=None, metadata={"help": "X in X.train.inter (found if only one)."})
    text_features: str | None = field(
        default="Scientific.feat1CLS", metadata={"help": "Text feature file in data_dir (.feat* raw float32 or .npy)."}
    )
    image_features: str | None = field(
        default="Scientific.feat3CLS", metadata={"help": "Image feature file in data_dir; empty to use no image."}
    )
    # File names may say {name} for the dataset prefix, e.g. "{name}.feat1CLS".
    text_feature_size: int | None = field(
        default=512, metadata={"help": "Width of a raw text feature file (.npy files carry their own)."}
    )
    image_feature_size: int | None = field(
        default=512, metadata={"help": "Width of a raw image feature file (.npy files carry their own)."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where the parsed splits are cached."})
    train_users_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Train on the rows of this share of the users, drawn with the seed (valid and test keep every "
            "user): the low-data regime, e.g. 0.1."
        },
    )

    def __post_init__(self):
        if not 0.0 < self.train_users_fraction <= 1.0:
            raise ValueError(f"train_users_fraction={self.train_users_fraction!r} is invalid; allowed: (0, 1].")

    def feature_files(self) -> dict[str, str]:
        files = {"text": self.text_features, "image": self.image_features}
        return {m: f for m, f in files.items() if f}

    def feature_sizes(self) -> dict[str, int]:
        sizes = {"text": self.text_feature_size, "image": self.image_feature_size}
        return {
            m: size for m, size in sizes.items() if size and not str(self.feature_files().get(m, "")).endswith(".npy")
        }

    def resolved_data_dir(self) -> str:
        return _expand_path(self.data_dir, "data_dir")


@dataclass
class ModelArguments:
    """Which model to train. The modalities follow the feature files given in the data arguments."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A saved MISSRec folder to start from (None = from scratch)."}
    )
    mode: str = field(
        default="transductive", metadata={"help": "transductive (item ID table + content) or inductive (content only)."}
    )
    finetune_method: str = field(
        default="full",
        metadata={
            "help": "full: train everything. frozen: the paper's transfer recipe (position embedding, encoder and "
            "decoder frozen; adaptors, input LayerNorm, fusion factor and ID table trained). lora: LoRA (peft) on "
            "every attention q/k/v/o projection, with the adaptors, input LayerNorm, fusion head and ID table "
            "trained in full. prior: only the history prior's weights (config history_prior=true; a handful of "
            "numbers: calibrating a pre-trained model on a domain)."
        },
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha (the update is scaled by alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    interest_ratio: float = field(default=0.5, metadata={"help": "K = ceil(ratio x item tokens) interests."})
    history_prior: bool | None = field(
        default=None,
        metadata={
            "help": "Add the learned history prior to every score: the cosine of the candidate's features with the "
            "last history item's, whether it is in the history, log(1 + its training count). Not in the "
            "original. Default: the pre-trained model's setting (the shipped one has it, calibrated), else off."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Other MissrecConfig fields, 'name=value,name=value' (e.g. 'hidden_dropout_prob=0.3')."},
    )

    def __post_init__(self):
        if self.mode not in ("transductive", "inductive"):
            raise ValueError(f"mode={self.mode!r} is invalid; allowed: 'transductive' or 'inductive'.")
        if self.finetune_method not in FINETUNE_METHODS:
            raise ValueError(f"finetune_method={self.finetune_method!r} is invalid; allowed: {list(FINETUNE_METHODS)}.")
        if self.finetune_method != "full" and self.model_name_or_path is None:
            raise ValueError(
                f"finetune_method={self.finetune_method!r} needs model_name_or_path (a pre-trained MISSRec): "
                "without one it would freeze or adapt a random backbone; allowed without it: 'full'."
            )
        if self.finetune_method == "prior" and self.mode != "inductive":
            raise ValueError(
                "finetune_method='prior' trains the history prior alone; a transductive model's new ID table would "
                "stay random: use --mode inductive, or finetune_method 'frozen' / 'full'."
            )
        _check("lora_rank", self.lora_rank, lambda v: _is_int(v) and v >= 1, "an integer >= 1")
        _check("lora_alpha", self.lora_alpha, lambda v: v > 0, "a number > 0")
        _check("lora_dropout", self.lora_dropout, lambda v: 0 <= v < 1, "a float in [0, 1)")
        _check("interest_ratio", self.interest_ratio, lambda v: 0 < v <= 1, "a float in (0, 1]")
        check_config_overrides(parse_overrides(self.config_overrides))
        if self.model_name_or_path is not None:
            self.model_name_or_path = _expand_path(self.model_name_or_path, "model_name_or_path")


def parse_config_and_flags(dataclass_types: tuple, argv: list[str], default_config: Path | None) -> tuple:
    """Parse `dataclass_types` from a YAML file (`--config`, else `default_config`) under command-line flags
    (the flags win). Returns the dataclass instances and the YAML path used."""
    import yaml
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types)
    parser.add_argument(
        "--config",
        default=None,
        help=f"YAML file of settings; flags on the command line override it (default: {default_config}).",
    )
    config_path = parser.parse_known_args(argv)[0].config
    if config_path is None and default_config is not None and Path(default_config).exists():
        config_path = str(default_config)
    if config_path:
        with open(config_path, encoding="utf-8") as handle:
            settings = yaml.safe_load(handle) or {}
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"{config_path}: unknown settings {unknown}; see --help for the valid names")
        _check_setting_types(settings, dataclass_types, config_path)
        parser.set_defaults(**settings)
    *parsed, _ = parser.parse_args_into_dataclasses(argv)
    return (*parsed, config_path)


def _parses(value, kind) -> bool:
    if not isinstance(value, str):
        return False
    try:
        kind(value)
    except ValueError:
        return False
    return True


def _check_setting_types(settings: Mapping, dataclass_types: tuple, source: str) -> None:
    """Each YAML value has its field's type (`eval_ks: 10` where a list belongs fails here, naming the file and
    the setting, not deep inside the run)."""
    import types
    import typing

    hints = {}
    for klass in dataclass_types:
        hints.update(typing.get_type_hints(klass))

    def matches(value, hint) -> bool:
        origin = typing.get_origin(hint)
        if origin in (typing.Union, types.UnionType):
            return any(matches(value, option) for option in typing.get_args(hint))
        if hint is type(None):
            return value is None
        if origin is list:
            (item,) = typing.get_args(hint) or (typing.Any,)
            return isinstance(value, list) and all(matches(v, item) for v in value)
        if hint is float:  # PyYAML reads 1e-4 (no dot) as a string; argparse converts it
            return (isinstance(value, (int, float)) and not isinstance(value, bool)) or _parses(value, float)
        if hint is int:
            return _is_int(value) or _parses(value, int)
        return hint is typing.Any or isinstance(value, hint)

    for name, value in settings.items():
        if name in hints and not matches(value, hints[name]):
            expected = str(hints[name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
            raise ValueError(f"{source}: setting {name}: {value!r} is not of the expected type {expected}")


def configure_logging(disable_progress: bool = False) -> None:
    """Readable logs for the command-line entry points; transformers' save/load bars off when asked."""
    import transformers

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if disable_progress:
        transformers.utils.logging.disable_progress_bar()


def check_config_overrides(overrides: Mapping) -> None:
    """Refuse a `config_overrides` name that is no MissrecConfig field (a typo would be stored and ignored)."""
    from .configuration_missrec import MissrecConfig

    known = {name for klass in MissrecConfig.__mro__ for name in getattr(klass, "__annotations__", {})}
    unknown = sorted(set(overrides) - known - {"num_items", "modalities"})
    if unknown:
        fields = sorted(n for n in MissrecConfig.__annotations__)
        raise ValueError(f"config_overrides: unknown MissrecConfig field(s) {unknown}; allowed: {fields}")


def parse_overrides(text: str | None) -> dict:
    """'a=1,b=0.5,c=text' -> {'a': 1, 'b': 0.5, 'c': 'text'} (values parsed as JSON when they can be)."""
    overrides = {}
    for part in filter(None, (text or "").split(",")):
        if "=" not in part:
            raise ValueError(f"config_overrides: {part!r} is not 'name=value'")
        name, value = (x.strip() for x in part.split("=", 1))
        try:
            overrides[name] = json.loads(value)
        except json.JSONDecodeError:
            overrides[name] = value
    return overrides


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
        source = MissrecConfig.from_pretrained(model_args.model_name_or_path)
        model = MissrecForSequentialRecommendation(_transfer_config(source, settings))
        _load_matching_weights(model, model_args.model_name_or_path, catalog.raw_item_ids)
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
        raise FileNotFoundError(f"model_name_or_path: {path} not found (a local save_pretrained folder is needed)")
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


@dataclass
class TrainerState:
    """What a resumed run needs besides the weights and the optimiser: saved as JSON in every checkpoint."""

    epoch: int = 0
    best_metric: float = -math.inf
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    num_interests: int = 0
    history: list[dict] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # what a resume must not change (RESUME_SETTINGS)
    train_seconds: float = 0.0


def refresh_interests(accelerator: Accelerator, model, seed: int, refresh=None) -> int:
    """k-means once on the main process; every other process receives the same centroids and interest ids.

    `refresh(model, seed)` runs the clustering (default: `model.refresh_interests(seed=seed)`)."""
    refresh = refresh or (lambda m, s: m.refresh_interests(seed=s))
    if accelerator.num_processes == 1:
        return refresh(model, seed)
    tokenizer = model.missrec.interest_tokenizer
    k: list = [0]
    if accelerator.is_main_process:
        try:
            k = [refresh(model, seed)]
        except Exception as error:  # the other processes must not wait forever for a result
            k = [f"{type(error).__name__}: {error}"]
    broadcast_object_list(k)
    if isinstance(k[0], str):
        raise RuntimeError(f"interest refresh failed on the main process: {k[0]}")
    if not accelerator.is_main_process:
        tokenizer.centroids = torch.zeros(k[0] + 1, model.config.hidden_size, device=tokenizer.centroids.device)
        model.config.num_interests = k[0]
    tokenizer.centroids = broadcast(tokenizer.centroids.contiguous())
    tokenizer.item_interest_ids = broadcast(tokenizer.item_interest_ids.contiguous())
    return k[0]


def _min_fill(loader) -> float:
    """The `min_fill` of the loader's LengthGroupedBatchSampler, under any wrappers (Accelerate's shards)."""
    sampler = getattr(loader, "batch_sampler", None)
    while sampler is not None and not hasattr(sampler, "min_fill"):
        sampler = getattr(sampler, "batch_sampler", None)
    return getattr(sampler, "min_fill", 0.0)


@torch.no_grad()
def evaluate_ranking(
    model: MissrecForSequentialRecommendation,
    loader: DataLoader,
    accelerator: Accelerator | None = None,
    ks: tuple[int, ...] = (10, 50),
    exclude_history: bool = False,
    block_size: int = 8192,
    show_progress: bool = False,
    description: str = "eval",
) -> tuple[dict[str, float], dict[str, float], torch.Tensor]:
    """Full ranking of every user's target among all items, streaming over item blocks.

    Returns the standard @K metrics, the @K+1 metrics of the original code, and the ranks (all processes)."""
    if accelerator is not None and accelerator.num_processes > 1 and _min_fill(loader):
        raise ValueError(
            "evaluate_ranking with several processes needs batches of equal size; build the loader with "
            "min_fill=0 (unequal batches would be trimmed or duplicated by gather_for_metrics)."
        )
    was_training = model.training
    model.eval()
    raw = model._catalog_raw_tokens()
    items = model.item_tokens(raw)
    all_ranks = []
    for batch in tqdm(loader, desc=description, disable=not show_progress, leave=False):
        input_ids, labels = batch["input_ids"], batch["labels"]
        sequence = model.encode(input_ids, batch["attention_mask"], raw_tokens=raw).sequence_embedding
        # The target's score is read from its own block: the same arithmetic as its competitors, so ties
        # between items with identical features count against the target as they should.
        result = streaming_ranks(
            lambda start, end, s=sequence, i=input_ids, m=batch["attention_mask"]: model.score_items(
                s, items, start, end, i, m
            ),
            labels,
            model.config.num_items,
            block_size=block_size,
            exclude_items=input_ids if exclude_history else None,
        )
        ranks = result.ranks
        # gather_for_metrics cuts the last batch to len(dataset) % batch size, assuming equal batches; with one
        # process there is nothing to gather, and the batches may differ in size (`eval_min_fill`).
        if accelerator is not None and accelerator.num_processes > 1:
            ranks = accelerator.gather_for_metrics(ranks)
        all_ranks.append(ranks.cpu())
    model.train(was_training)
    ranks = torch.cat(all_ranks)
    return metrics_from_ranks(ranks, ks, 0), metrics_from_ranks(ranks, ks, 1), ranks


def build_loader(
    split,
    max_seq_length: int,
    batch_size: int,
    shuffle: bool,
    seed: int,
    group_factor: int,
    num_workers: int,
    min_fill: float = 0.0,
) -> DataLoader:
    dataset = HistoryDataset(split, max_seq_length)
    sampler = LengthGroupedBatchSampler(
        dataset.lengths,
        batch_size,
        shuffle=shuffle,
        seed=seed,
        group_factor=group_factor,
        min_fill=min_fill,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=identity_collate,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


def resolve_mixed_precision(mixed_precision: str) -> str:
    """`auto` is bf16 where the device computes it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or
    AMX), else no: on an AVX2-only CPU bf16 is emulated, and MiniLM ran 6x slower under it than in fp32."""
    if mixed_precision != "auto":
        return mixed_precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_native_bf16() else "no"


def cpu_has_native_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _make_accelerator(args: TrainingArguments) -> Accelerator:
    log_with = None
    if args.report_to in ("auto", "tensorboard"):
        try:
            import tensorboard  # noqa: F401

            log_with = "tensorboard"
        except ImportError:
            if args.report_to == "tensorboard":
                raise
    # Buffers (catalogue features, interest state) are identical on every process and the interest refresh
    # broadcasts its result: re-broadcasting them at every forward would move ~100 MB per step on Office.
    return Accelerator(
        mixed_precision=resolve_mixed_precision(args.mixed_precision),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=log_with,
        project_dir=args.output_dir,
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )


# Arguments a resumed run must share with the run it continues: any of them changes the result. (The number of
# epochs may grow under a constant learning rate; evaluation batch sizes and threads change no rank.)
RESUME_SETTINGS = (
    "learning_rate", "weight_decay", "optimizer", "lr_scheduler_type", "warmup_ratio", "train_batch_size",
    "gradient_accumulation_steps", "seed", "group_by_length", "length_group_batches", "mixed_precision",
    "metric_for_best_model", "eval_ks", "metric_cutoff_offset", "exclude_history", "max_steps_per_epoch",
    "augment", "word_drop_ratio",
)  # fmt: skip
CHECKSUMS_FILE = "checksums.json"


def _resume_settings(args, model=None, train_rows: int | None = None) -> dict:
    settings = {name: getattr(args, name) for name in RESUME_SETTINGS if hasattr(args, name)}
    if model is not None:  # the model's own settings (temperature, dropout, regulariser, mode, ...)
        config = model.config.to_diff_dict()
        for name in ("num_interests", "architectures", "auto_map", "transformers_version"):
            config.pop(name, None)
        settings["model_config"] = json.dumps(config, sort_keys=True, default=str)
        settings["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if train_rows is not None:
        settings["train_rows"] = train_rows  # e.g. another train_users_fraction
    if getattr(args, "lr_scheduler_type", "constant") != "constant":
        settings["num_train_epochs"] = args.num_train_epochs  # the schedule spans them
    return settings


def _file_checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (relative names), to tell a damaged checkpoint from a whole one."""
    import hashlib

    sums = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (STATE_FILE, CHECKSUMS_FILE)):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        sums[str(path.relative_to(folder))] = digest.hexdigest()
    return sums


# What a finished or running training leaves in its output folder (logs alone do not count), including the
# hidden halves of an interrupted swap or commit; --overwrite_output_dir removes all of it.
RUN_OUTPUTS = (
    "config.json", "model.safetensors", "metrics.json", "pretrain_metrics.json", CHECKPOINT_DIR, BEST_DIR,
    f".{CHECKPOINT_DIR}.tmp", f".{CHECKPOINT_DIR}.old", f".{BEST_DIR}.tmp", f".{BEST_DIR}.old", ".commit.json",
    ".staging",
)  # fmt: skip
MODEL_FILES = ("item_ids.json", "training_state.pt", "results.md", "README.md", "lora_adapter", "*.py")


def _claim_output_dir(output_dir: Path, args) -> None:
    """Refuse to start a new run over another run's results (HF's convention), unless told to resume it or
    to overwrite it; overwriting first removes its checkpoints, so that nothing of it is picked up later."""
    if args.resume_from_checkpoint:
        return
    found = sorted(n for n in RUN_OUTPUTS if (output_dir / n).exists())
    found += sorted(p.name for p in output_dir.glob("checkpoint-epoch-*"))
    if not found:
        return
    if not args.overwrite_output_dir:
        raise ValueError(
            f"output_dir {output_dir} already holds a run ({', '.join(found)}); pass --resume_from_checkpoint "
            "latest to continue it, --overwrite_output_dir to start over, or another --output_dir."
        )
    stale = [output_dir / n for n in RUN_OUTPUTS] + list(output_dir.glob("checkpoint-epoch-*"))
    if (output_dir / "config.json").exists():  # a model folder: its other files belong to the old model too
        stale += [path for pattern in MODEL_FILES for path in output_dir.glob(pattern)]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()


def _use_available_cores(accelerator: Accelerator, num_threads: int | None) -> None:
    """A single CPU process uses every core it may run on: `accelerate launch` exports OMP_NUM_THREADS=1 for
    one process, which halves the speed of the README's command on a 2-core machine."""
    if accelerator.num_processes == 1 and accelerator.device.type == "cpu":
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(num_threads or available)
    elif num_threads:
        torch.set_num_threads(num_threads)


def _format_metrics(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "num_users")


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def _resize_interest_state(model, num_interests: int) -> None:
    """Give the centroid buffer the shape of a saved interest state before loading into it (K varies)."""
    tokenizer = model.missrec.interest_tokenizer
    tokenizer.centroids = torch.zeros(
        num_interests + 1, model.config.hidden_size, device=tokenizer.centroids.device, dtype=tokenizer.centroids.dtype
    )
    model.config.num_interests = num_interests


class _AcceleratedLoop:
    """What the fine-tuning and pre-training loops share: the Accelerator, atomic checkpoints, resume,
    atomic model folders, and the epoch of optimisation steps."""

    def __init__(self, model, args):
        self.args = args
        self.accelerator = _make_accelerator(args)
        _use_available_cores(self.accelerator, args.num_threads)
        set_seed(args.seed)
        self.output_dir = Path(args.output_dir)
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            hold_lock(self.output_dir)
            complete_interrupted_commit(self.output_dir)
            _claim_output_dir(self.output_dir, args)
        self.model = model
        self.state = TrainerState()
        world = self.accelerator.num_processes
        if args.train_batch_size % (world * args.gradient_accumulation_steps):
            raise ValueError(
                f"train_batch_size={args.train_batch_size} must be divisible by processes x accumulation steps "
                f"({world} x {args.gradient_accumulation_steps})."
            )
        self.per_device_batch_size = args.train_batch_size // (world * args.gradient_accumulation_steps)
        trainable = [p for p in model.parameters() if p.requires_grad]
        # The fused kernel updates each tensor in one pass (CPU and CUDA); the per-tensor loop it replaces
        # made ~20% of a CPU step on Office, most of it the dense update of the ID table.
        optimizer = torch.optim.AdamW if getattr(args, "optimizer", "adam") == "adamw" else torch.optim.Adam
        self.optimizer = optimizer(trainable, lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)
        self.scheduler = None  # a subclass with a schedule builds it once it knows the epoch length
        base = model.get_base_model() if _is_peft(model) else model
        # A batch-summed regulariser counts the whole optimiser batch (all processes, all micro-batches).
        base.summed_loss_scale = world * args.gradient_accumulation_steps

    def resume_settings(self) -> dict:
        """What a resume of this run must not change: the result-changing arguments, the model's config and
        trainable parameters, and the number of training rows."""
        rows = len(self.train_loader.dataset) if hasattr(self, "train_loader") else None
        return _resume_settings(self.args, self.unwrapped, rows)

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.prepared_model)

    def log(self, message: str, *args) -> None:
        if self.accelerator.is_main_process:
            logger.info(message, *args)

    def start_trackers(self, name: str) -> None:
        if self.accelerator.log_with:
            config = {k: v for k, v in asdict(self.args).items() if isinstance(v, (int, float, str, bool))}
            self.accelerator.init_trackers(name, config=config)

    # --------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        """Weights, optimiser, RNG states and trainer state, swapped into `<output_dir>/checkpoint` at once."""
        final = self.output_dir / CHECKPOINT_DIR
        temporary = self.output_dir / f".{CHECKPOINT_DIR}.tmp"
        if self.accelerator.is_main_process and temporary.exists():
            shutil.rmtree(temporary)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(temporary))
        self.accelerator.wait_for_everyone()  # every rank's RNG file is written before the folder is hashed and swapped
        if self.accelerator.is_main_process:
            write_atomically(temporary / CHECKSUMS_FILE, json.dumps(_file_checksums(temporary), indent=2))
            state = json.dumps(asdict(self.state), indent=2, default=float)
            write_atomically(temporary / STATE_FILE, state)  # last: marks the checkpoint complete
            replace_directory(temporary, final)
        self.accelerator.wait_for_everyone()

    def load_checkpoint(self, path: str) -> None:
        directory = self.output_dir / CHECKPOINT_DIR if path == "latest" else Path(path)
        if path == "latest" and self.accelerator.is_main_process:  # a kill between the two renames of a swap
            recover_directory(directory, self.output_dir / f".{CHECKPOINT_DIR}.tmp", STATE_FILE)
            recover_directory(self.output_dir / BEST_DIR, self.output_dir / f".{BEST_DIR}.tmp", "training_state.pt")
        self.accelerator.wait_for_everyone()
        state_file = directory / STATE_FILE
        if not state_file.exists():
            raise FileNotFoundError(f"resume_from_checkpoint: {state_file} not found (no finished epoch saved there)")
        if (directory / CHECKSUMS_FILE).exists():
            saved, found = json.loads((directory / CHECKSUMS_FILE).read_text()), _file_checksums(directory)
            damaged = sorted(name for name in saved if found.get(name) != saved[name])
            if damaged:
                raise ValueError(
                    f"resume_from_checkpoint: {directory / damaged[0]} is missing or damaged (its checksum "
                    f"differs from the one saved with it{'; also ' + ', '.join(damaged[1:]) if damaged[1:] else ''})"
                    "; resume from an intact checkpoint or start over with --overwrite_output_dir."
                )
        self.state = TrainerState(**json.loads(state_file.read_text()))
        now = self.resume_settings()
        changed = [
            f"{n}: {self.state.settings[n]!r} -> {now[n]!r}"
            for n in now
            if self.state.settings.get(n, now[n]) != now[n]
        ]  # noqa: E501
        if changed:
            raise ValueError(
                f"resume_from_checkpoint: the checkpoint was trained with other settings ({'; '.join(changed)}); "
                "resume with the same ones, or start a new run in another output_dir."
            )
        _resize_interest_state(self.unwrapped, self.state.num_interests)
        self.accelerator.load_state(str(directory))
        self.log("resumed from %s after epoch %d", directory, self.state.epoch)

    def save_model(self, directory: Path, extra_files: Mapping[str, str] | None = None) -> None:
        """`save_pretrained` into a temporary folder, then swapped in: a killed run never leaves half a model.

        With LoRA the folder holds the merged plain model and, in `lora_adapter/`, the adapter on its own.
        `training_state.pt` keeps the exact trainable state for reloading the best epoch."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            model = self.unwrapped
            # The output folder also holds checkpoints and logs: its model files are committed as one set
            # (staged inside it, journalled, moved in); any other folder is swapped in whole.
            in_place = directory == self.output_dir
            temporary = staging_dir(directory) if in_place else directory.with_name(f".{directory.name}.tmp")
            if not in_place and temporary.exists():
                shutil.rmtree(temporary)
            if _is_peft(model):
                model.save_pretrained(temporary / "lora_adapter")
                merged = copy.deepcopy(model).merge_and_unload()
                merged.save_pretrained(temporary)
            else:
                model.save_pretrained(temporary)
            if in_place:
                torch.save(model.state_dict(), temporary / "training_state.pt")
                commit_files(directory, temporary, extra_files)
            else:
                for name, text in (extra_files or {}).items():
                    (temporary / name).write_text(text, encoding="utf-8")
                torch.save(model.state_dict(), temporary / "training_state.pt")  # last: marks the folder whole
                replace_directory(temporary, directory)
        self.accelerator.wait_for_everyone()

    def load_training_state(self, directory: Path) -> None:
        """Reload the weights saved by `save_model` (any model type, LoRA included) into the live model."""
        state = torch.load(directory / "training_state.pt", map_location=self.accelerator.device, weights_only=True)
        key = next(k for k in state if k.endswith("interest_tokenizer.centroids"))
        _resize_interest_state(self.unwrapped, state[key].shape[0] - 1)
        self.unwrapped.load_state_dict(state)

    # ------------------------------------------------------------------------------------------ training
    def compute_loss(self, model, batch) -> torch.Tensor:
        raise NotImplementedError

    def cluster_and_train(self, epoch: int, refresh=None) -> dict:
        """Refresh the interests (seeded by seed + epoch), train one epoch, record both in the state."""
        started = time.perf_counter()
        k = refresh_interests(self.accelerator, self.unwrapped, seed=self.args.seed + epoch, refresh=refresh)
        clustered = time.perf_counter()
        loss, samples = self.train_epoch(epoch)
        trained = time.perf_counter()
        record = {
            "epoch": epoch,
            "loss": loss,
            "num_interests": k,
            "cluster_seconds": clustered - started,
            "train_seconds": trained - clustered,
            "train_samples_per_second": samples * self.accelerator.num_processes / max(trained - clustered, 1e-9),
        }
        self.state.history.append(record)
        self.state.train_seconds += trained - started
        self.state.num_interests = k
        return record

    def train_epoch(self, epoch: int) -> tuple[float, int]:
        """One pass over the training loader; returns the mean loss and the number of samples seen here."""
        model, args = self.prepared_model, self.args
        model.train()
        _set_sampler_epoch(self.train_loader, epoch)
        collate = getattr(self.train_loader, "collate_fn", None)
        if hasattr(collate, "set_epoch"):
            collate.set_epoch(epoch)
        total = torch.zeros((), device=self.accelerator.device)
        steps = samples = 0
        bar = tqdm(
            self.train_loader,
            desc=f"epoch {epoch}",
            disable=not self.accelerator.is_main_process or args.disable_tqdm,
            leave=False,
        )
        for step, batch in enumerate(bar):
            if args.max_steps_per_epoch is not None and step >= args.max_steps_per_epoch:
                break
            with self.accelerator.accumulate(model):
                loss = self.compute_loss(model, batch)
                self.accelerator.backward(loss)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.scheduler is not None and self.accelerator.sync_gradients:
                    self.scheduler.step()
            total += loss.detach()  # no .item(): no host sync per step
            steps += 1
            samples += batch["input_ids"].shape[0]
        return float(total) / max(steps, 1), samples


class MissrecTrainer(_AcceleratedLoop):
    """Fine-tunes a [`MissrecForSequentialRecommendation`] (or its LoRA-wrapped form) on one domain.

    model: built for `catalog` (its features already loaded); dataset: a DatasetDict with train/valid/test.
    """

    def __init__(self, model, dataset, catalog: ItemCatalog, args: TrainingArguments):
        super().__init__(model, args)
        self.catalog = catalog
        self.model_card = None  # metrics -> the README.md committed with the final model (run_finetune sets it)
        base = model.get_base_model() if _is_peft(model) else model
        base.check_inputs = False  # the loader validated every row; avoid a host sync per step
        world = self.accelerator.num_processes
        max_len = model.config.max_seq_length
        self.train_loader = build_loader(
            dataset["train"],
            max_len,
            self.per_device_batch_size,
            True,
            args.seed,
            args.group_factor,
            args.dataloader_num_workers,
        )
        counts = np.bincount(self.train_loader.dataset.targets, minlength=model.config.num_items + 1)
        if model.config.loss_type == "sampled":  # the in-batch candidates' probabilities, for the logQ correction
            base.set_target_frequencies(counts)
        if model.config.history_prior:  # the prior's popularity term: this catalogue's training targets
            base.set_item_popularity(counts)
        eval_per_device = max(1, args.eval_batch_size // world)
        # Batches of unequal size are safe with one process only (see LengthGroupedBatchSampler).
        min_fill = args.eval_min_fill if world == 1 else 0.0
        self.valid_loader, self.test_loader = (
            build_loader(dataset[split], max_len, eval_per_device, False, args.seed, 1, 0, min_fill)
            for split in ("valid", "test")
        )
        self.prepared_model, self.optimizer, self.train_loader, self.valid_loader, self.test_loader = (
            self.accelerator.prepare(model, self.optimizer, self.train_loader, self.valid_loader, self.test_loader)
        )
        if args.lr_scheduler_type != "constant" or args.warmup_ratio:
            self.scheduler = self._build_scheduler()

    def compute_loss(self, model, batch) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    def _build_scheduler(self):
        """The schedule over `num_train_epochs` optimiser steps of this process's loader, stepped by hand after
        each synchronised step (not through `accelerator.prepare`, which would step it once per process)."""
        from transformers import get_scheduler

        args = self.args
        per_epoch = len(self.train_loader)
        if args.max_steps_per_epoch is not None:
            per_epoch = min(per_epoch, args.max_steps_per_epoch)
        total = max(1, args.num_train_epochs * math.ceil(per_epoch / args.gradient_accumulation_steps))
        scheduler = get_scheduler(
            args.lr_scheduler_type, self.optimizer.optimizer, num_warmup_steps=round(args.warmup_ratio * total),
            num_training_steps=total,
        )  # fmt: skip
        self.accelerator.register_for_checkpointing(scheduler)
        return scheduler

    def _evaluate(self, loader: DataLoader, description: str):
        return evaluate_ranking(
            self.unwrapped,
            loader,
            self.accelerator,
            tuple(self.args.eval_ks),
            self.args.exclude_history,
            self.args.eval_block_size,
            show_progress=self.accelerator.is_main_process and not self.args.disable_tqdm,
            description=description,
        )

    def _item_ids_file(self) -> dict[str, str]:
        return {"item_ids.json": json.dumps({"raw_item_ids": self.catalog.raw_item_ids}, ensure_ascii=False)}

    def train(self) -> dict:
        args = self.args
        if args.resume_from_checkpoint:
            self.load_checkpoint(args.resume_from_checkpoint)
        else:
            self.state.settings = self.resume_settings()
        state = self.state
        self.start_trackers("missrec_finetune")
        metric = args.metric_for_best_model
        self.log(
            "evaluation protocol: full ranking over %d items (padding excluded), ties count against the target, "
            "history %s, metrics @K with K=%s (offset %d), early stopping on valid %s with patience %d",
            self.catalog.num_items,
            "excluded" if args.exclude_history else "not excluded",
            args.eval_ks,
            args.metric_cutoff_offset,
            metric,
            args.early_stopping_patience,
        )
        for epoch in range(state.epoch, args.num_train_epochs):
            if state.epochs_without_improvement > args.early_stopping_patience:
                break  # a resumed run that had already stopped early
            record = self.cluster_and_train(epoch)
            trained = time.perf_counter()
            standard, shifted, _ = self._evaluate(self.valid_loader, "valid")
            valid = shifted if args.metric_cutoff_offset else standard
            record["eval_seconds"] = time.perf_counter() - trained
            record.update({f"valid_{name}": value for name, value in valid.items()})
            k, loss = record["num_interests"], record["loss"]
            self.log(
                "epoch %d: loss %.4f, K=%d, cluster %.1fs, train %.1fs (%.0f samples/s), eval %.1fs | valid %s",
                epoch,
                loss,
                k,
                record["cluster_seconds"],
                record["train_seconds"],
                record["train_samples_per_second"],
                record["eval_seconds"],
                _format_metrics(valid),
            )
            if self.accelerator.log_with:
                self.accelerator.log({k_: v for k_, v in record.items() if k_ != "epoch"}, step=epoch)
            if valid[metric] >= state.best_metric:
                state.best_metric, state.best_epoch = valid[metric], epoch
                state.epochs_without_improvement = 0
                self.save_model(self.output_dir / BEST_DIR, self._item_ids_file())
            else:
                state.epochs_without_improvement += 1
            state.epoch = epoch + 1
            self.save_checkpoint()
            if state.epochs_without_improvement > args.early_stopping_patience:
                self.log(
                    "early stopping: no improvement of valid %s for %d epochs", metric, state.epochs_without_improvement
                )
                break
        return self.finish()

    def evaluate_without_training(self) -> dict:
        """Zero-shot: cluster the interests over this catalogue (no gradient step), then evaluate and save the
        model as loaded, as `train` would at its end (`metrics.json` has `epochs_run` 0)."""
        self.state.num_interests = refresh_interests(self.accelerator, self.unwrapped, seed=self.args.seed)
        self.log(
            "zero-shot: no training; %d interests clustered over %d items", self.state.num_interests,
            self.catalog.num_items,
        )  # fmt: skip
        return self.finish(load_best=False)

    def finish(self, load_best: bool = True) -> dict:
        """Reload the best model, evaluate it on valid and test, write the final model and the metrics."""
        best_dir = self.output_dir / BEST_DIR
        if load_best and (best_dir / "training_state.pt").exists():
            self.load_training_state(best_dir)
        valid, valid_shifted, _ = self._evaluate(self.valid_loader, "valid")
        test, test_shifted, _ = self._evaluate(self.test_loader, "test")
        epochs = len(self.state.history)
        metrics = {
            "best_epoch": self.state.best_epoch,
            "epochs_run": epochs,
            "num_interests": self.state.num_interests,
            "trainable_parameters": sum(p.numel() for p in self.unwrapped.parameters() if p.requires_grad),
            "seconds_per_epoch": self.state.train_seconds / max(epochs, 1),
            "valid": valid,
            "valid_at_k_plus_1": valid_shifted,
            "test": test,
            "test_at_k_plus_1": test_shifted,
            "history": self.state.history,
        }
        weights = getattr(getattr(self.unwrapped, "history_prior", None), "weights", None)
        if callable(weights):  # a handful of numbers a person wants to see: how much the model leans on each term
            metrics["history_prior_weights"] = weights()
            self.log("history prior weights: %s", ", ".join(f"{k} {v:+.3f}" for k, v in weights().items()))
        # The metrics and the model card describe these weights: they are committed with them, as one set.
        extra = {
            **self._item_ids_file(),
            "metrics.json": json.dumps(metrics, indent=2, default=float),
            "results.md": results_table(metrics, self.args.eval_ks),
        }
        if self.model_card is not None:
            extra["README.md"] = self.model_card(metrics)
        self.save_model(self.output_dir, extra)
        if self.accelerator.log_with:
            self.accelerator.end_training()
        return metrics


@dataclass
class PretrainingArguments:
    """How to pre-train. Defaults are the paper's FHCKM recipe (reference §5): global batch 4096, 100 epochs,
    a checkpoint every 10 epochs."""

    output_dir: str = field(default="outputs/pretrain", metadata={"help": "Where checkpoints and the model go."})
    num_train_epochs: int = field(default=100, metadata={"help": "Pre-training epochs."})
    train_batch_size: int = field(default=4096, metadata={"help": "Global batch (all processes x accumulation)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate."})
    weight_decay: float = field(default=0.0, metadata={"help": "Adam weight decay."})
    seed: int = field(default=2020, metadata={"help": "Seeds python, numpy, torch, batches, augmentation, k-means."})
    save_every_epochs: int = field(
        default=10, metadata={"help": "Write <output_dir>/checkpoint-epoch-N (a from_pretrained folder) every N."}
    )
    eval_batch_size: int = field(default=1024, metadata={"help": "Users per batch of the zero-shot validation."})
    zero_shot_interest_ratio: float = field(
        default=0.5, metadata={"help": "Interest ratio of the zero-shot validation recommenders (fine-tuning's)."}
    )
    augment: bool = field(default=True, metadata={"help": "Add the sequence-to-augmented-sequence loss."})
    word_drop_ratio: float = field(
        default=0.2, metadata={"help": "Word drop: share of positions whose text is the word-dropped version."}
    )
    mixed_precision: str = field(
        default="no", metadata={"help": "no, fp16 or bf16, or auto: bf16 where the hardware has it."}
    )
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={
            "help": "Micro-batches per optimiser step. The in-batch negatives are those of one micro-batch "
            "(over all processes), so accumulation shrinks them: prefer more processes or memory."
        },
    )
    group_by_length: bool = field(default=True, metadata={"help": "Batch similar history lengths together."})
    length_group_batches: int = field(
        default=50,
        metadata={
            "help": "With group_by_length: batches per length-sorted pool (see run_finetune.py --help); fewer mix "
            "more users and domains into a batch, and so into each other's in-batch negatives."
        },
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader workers (feature gathering)."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "A checkpoint folder, or 'latest' for <output_dir>/checkpoint."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over in an output_dir that holds another run (its checkpoints are removed)."},
    )
    report_to: str = field(default="auto", metadata={"help": "Tracker: tensorboard, none, or auto (if installed)."})
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide progress bars."})
    max_steps_per_epoch: int | None = field(default=None, metadata={"help": "Cut epochs short (smoke tests)."})
    num_threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads of a single-process run (default: every available core; `accelerate launch` "
            "would otherwise pin one process to OMP_NUM_THREADS=1)."
        },
    )

    def __post_init__(self):
        _check_loop_arguments(self)
        _check("eval_batch_size", self.eval_batch_size, lambda v: _is_int(v) and v >= 1, "an integer >= 1")
        _check("save_every_epochs", self.save_every_epochs, lambda v: _is_int(v) and v >= 0, "an integer >= 0")
        _check("word_drop_ratio", self.word_drop_ratio, lambda v: 0 <= v <= 1, "a float in [0, 1]")
        _check("zero_shot_interest_ratio", self.zero_shot_interest_ratio, lambda v: 0 < v <= 1, "a float in (0, 1]")


@dataclass
class PretrainDataArguments:
    """The pre-training domains: atomic-file folders whose train rows are merged (reference §2.4)."""

    domain_dirs: list[str] = field(
        default_factory=lambda: ["data/scientific_mm"],
        metadata={"help": "Atomic-file folders, one per domain (environment variables allowed)."},
    )
    text_features: str | None = field(
        default="{name}.feat1CLS", metadata={"help": "Text feature file per domain ({name} = the domain prefix)."}
    )
    image_features: str | None = field(default="{name}.feat3CLS", metadata={"help": "Image feature file per domain."})
    augmented_text_features: str | None = field(
        default="{name}.feat2CLS",
        metadata={"help": "Word-dropped text features (used for word-drop augmentation when every domain has them)."},
    )
    text_feature_size: int | None = field(default=512, metadata={"help": "Width of raw text feature files."})
    image_feature_size: int | None = field(default=512, metadata={"help": "Width of raw image feature files."})
    validation_dirs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Atomic-file folders of users held out from pre-training, each with its domain's whole "
            "catalogue and the same feature files: after every epoch their valid split is ranked zero-shot "
            "(an inductive recommender with the current backbone, interests clustered over that catalogue, "
            "nothing trained) and NDCG@10 is logged, so that you can see the backbone learn."
        },
    )

    def feature_files(self) -> dict[str, str]:
        files = {"text": self.text_features, "image": self.image_features}
        return {m: f for m, f in files.items() if f}

    def feature_sizes(self) -> dict[str, int]:
        sizes = {"text": self.text_feature_size, "image": self.image_feature_size}
        files = self.feature_files()
        return {m: size for m, size in sizes.items() if size and m in files and not files[m].endswith(".npy")}

    def resolved_domain_dirs(self) -> list[str]:
        return [_expand_path(d, "domain_dirs") for d in self.domain_dirs]

    def load_validation_domains(self) -> list[ZeroShotDomain]:
        """The held-out users' folders as (name, catalogue, valid split)."""
        domains = []
        for directory in (_expand_path(d, "validation_dirs") for d in self.validation_dirs):
            name = find_dataset_name(directory)
            files = {m: pattern.format(name=name) for m, pattern in self.feature_files().items()}
            catalog = load_item_catalog(directory, name, files, self.feature_sizes())
            domains.append(ZeroShotDomain(name, catalog, load_atomic_dataset(directory, name)["valid"]))
        return domains


@dataclass
class ZeroShotDomain:
    """Users held out from pre-training and their domain's catalogue, for the per-epoch zero-shot signal."""

    name: str
    catalog: ItemCatalog
    valid: object  # a datasets.Dataset with `history` and `target`


@dataclass
class PretrainModelArguments:
    """The model to pre-train (content only)."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Continue from a saved MISSRec."})
    interest_ratio: float = field(default=0.02, metadata={"help": "K = ceil(ratio x item tokens); 0.02 in the paper."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "Other MissrecConfig fields, 'name=value,name=value'."}
    )

    def __post_init__(self):
        _check("interest_ratio", self.interest_ratio, lambda v: 0 < v <= 1, "a float in (0, 1]")
        check_config_overrides(parse_overrides(self.config_overrides))


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
    path = _expand_path(model_args.model_name_or_path, "model_name_or_path")
    source = MissrecConfig.from_pretrained(path)
    model = MissrecForPreTraining(_transfer_config(source, settings))
    _load_matching_weights(model, path)
    return model


class MissrecPretrainer(_AcceleratedLoop):
    """Pre-trains a [`MissrecForPreTraining`] on a merged multi-domain corpus with Accelerate."""

    def __init__(
        self,
        model: MissrecForPreTraining,
        corpus: PretrainingCorpus,
        args: PretrainingArguments,
        validation_domains: list[ZeroShotDomain] | tuple = (),
    ):
        super().__init__(model, args)
        self.corpus = corpus
        self.validation_domains = list(validation_domains)
        config = model.config
        collator = PretrainingCollator(
            corpus,
            item_drop_ratio=config.item_drop_ratio,
            item_drop_prob=config.item_drop_prob,
            word_drop_ratio=args.word_drop_ratio,
            seed=args.seed,
            augment=args.augment,
        )
        dataset = HistoryDataset(corpus.train, config.max_seq_length)
        sampler = LengthGroupedBatchSampler(
            dataset.lengths,
            self.per_device_batch_size,
            shuffle=True,
            seed=args.seed,
            group_factor=args.length_group_batches if args.group_by_length else 1,
        )
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=torch.cuda.is_available(),
        )
        self.prepared_model, self.optimizer, self.train_loader = self.accelerator.prepare(model, self.optimizer, loader)
        self.train_loader.collate_fn = collator

    def compute_loss(self, model, batch) -> torch.Tensor:
        return model(**batch).loss

    def zero_shot_validation(self, epoch: int) -> dict:
        """NDCG@10 of each held-out domain's valid users, ranked zero-shot with the current backbone (main
        process; the result is shared with the others). Empty without validation domains. The k-means seed
        is `seed + epoch`: `run_finetune.py --do_train false --seed <that>` on the epoch's checkpoint gives the
        same figure."""
        if not self.validation_domains:
            return {}
        started = time.perf_counter()
        result = [None]
        if self.accelerator.is_main_process:
            scores = {}
            for domain in self.validation_domains:
                model = zero_shot_recommender(
                    self.unwrapped, domain.catalog, self.args.zero_shot_interest_ratio, seed=self.args.seed + epoch
                )
                loader = build_loader(domain.valid, model.config.max_seq_length, self.args.eval_batch_size,
                                      False, 0, 1, 0, min_fill=0.7)  # fmt: skip
                scores[domain.name] = evaluate_ranking(model, loader)[0]["ndcg@10"]
            scores["mean"] = sum(scores.values()) / len(scores)
            result = [scores]
        broadcast_object_list(result)
        return {"zero_shot_valid_ndcg@10": result[0], "zero_shot_seconds": time.perf_counter() - started}

    def train(self) -> dict:
        args = self.args
        if args.resume_from_checkpoint:
            self.load_checkpoint(args.resume_from_checkpoint)
        else:
            self.state.settings = self.resume_settings()
        state = self.state
        self.start_trackers("missrec_pretrain")
        self.log(
            "pre-training on %s; %d processes, global batch %d, negatives gathered from all processes",
            self.corpus.summary(),
            self.accelerator.num_processes,
            args.train_batch_size,
        )
        present = self.corpus.modality_present()
        for epoch in range(state.epoch, args.num_train_epochs):
            record = self.cluster_and_train(
                epoch, lambda model, seed: model.refresh_interests(self.corpus.features, present, seed=seed)
            )
            k, loss = record["num_interests"], record["loss"]
            state.epoch = epoch + 1
            record.update(self.zero_shot_validation(epoch))
            self.log(
                "epoch %d: loss %.4f, K=%d, cluster %.1fs, train %.1fs (%.0f samples/s)%s",
                epoch,
                loss,
                k,
                record["cluster_seconds"],
                record["train_seconds"],
                record["train_samples_per_second"],
                (" | zero-shot valid ndcg@10: " if "zero_shot_valid_ndcg@10" in record else "")
                + ", ".join(f"{name} {value:.4f}" for name, value in record.get("zero_shot_valid_ndcg@10", {}).items()),
            )
            if self.accelerator.log_with:
                self.accelerator.log({k_: v for k_, v in record.items() if k_ != "epoch"}, step=epoch)
            if args.save_every_epochs and state.epoch % args.save_every_epochs == 0:
                self.save_model(self.output_dir / f"checkpoint-epoch-{state.epoch}")
            self.save_checkpoint()
        summary = {
            "epochs_run": len(state.history),
            "num_processes": self.accelerator.num_processes,
            "seconds_per_epoch": state.train_seconds / max(len(state.history), 1),
            "history": state.history,
        }
        self.save_model(self.output_dir, {"pretrain_metrics.json": json.dumps(summary, indent=2, default=float)})
        if self.accelerator.log_with:
            self.accelerator.end_training()
        return summary


def _set_sampler_epoch(loader: DataLoader, epoch: int) -> None:
    """Make the batch order a function of (seed, epoch). Accelerate's loader re-sets its sampler's epoch from
    its own iteration counter on every pass, which restarts at 0 in a resumed run: set that counter too."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    # With several processes our sampler sits inside Accelerate's BatchSamplerShard, which has no set_epoch.
    sampler = loader.batch_sampler
    while sampler is not None:
        if isinstance(sampler, LengthGroupedBatchSampler):
            sampler.set_epoch(epoch)
        sampler = getattr(sampler, "batch_sampler", None)


def results_table(metrics: Mapping, ks) -> str:
    """A Markdown table of valid/test metrics at @K and the original's @K+1."""
    columns = [f"{name}@{k}" for k in ks for name in ("hr", "ndcg")] + ["mrr"]
    lines = [
        f"best epoch {metrics['best_epoch']} of {metrics['epochs_run']}, "
        f"{metrics['seconds_per_epoch']:.1f} s per epoch",
        "",
        "| split | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for split in ("valid", "valid_at_k_plus_1", "test", "test_at_k_plus_1"):
        values = metrics[split]
        label = split.replace("_at_k_plus_1", " (@K+1, as the original)")
        lines.append(f"| {label} | " + " | ".join(f"{values[c]:.4f}" for c in columns) + " |")
    return "\n".join(lines) + "\n"


__all__ = [
    "MissrecPretrainer",
    "PretrainDataArguments",
    "PretrainModelArguments",
    "PretrainingArguments",
    "build_pretraining_model",
    "MissrecTrainer",
    "TrainerState",
    "TrainingArguments",
    "evaluate_ranking",
    "parse_config_and_flags",
    "refresh_interests",
]
