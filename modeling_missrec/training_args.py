"""The arguments of the two entry points, and how they are read: YAML recipe + command-line flags.

`run_finetune.py` takes `DataArguments`, `ModelArguments` and `TrainingArguments`; `run_pretrain.py` takes
`PretrainDataArguments`, `PretrainModelArguments` and `PretrainingArguments`. Every field is checked where it
is built, so a bad value fails at start with its name, its value and what is allowed.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .configuration_missrec import check_setting as _check
from .data import ItemCatalog, find_dataset_name, load_atomic_dataset, load_item_catalog

OPTIMIZERS = ("adam", "adamw")
PRECISIONS = ("no", "fp16", "bf16", "auto")
TRACKERS = ("auto", "none", "tensorboard")
LR_SCHEDULERS = ("constant", "linear", "cosine", "constant_with_warmup")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class LoopArguments:
    """What both training loops read (the fine-tuning defaults; `PretrainingArguments` overrides a few)."""

    output_dir: str = field(
        default="outputs/missrec", metadata={"help": "Where the model, metrics and checkpoints go."}
    )
    num_train_epochs: int = field(
        default=300, metadata={"help": "Maximum epochs (early stopping usually ends sooner)."}
    )
    train_batch_size: int = field(default=512, metadata={"help": "Training batch size per step, over all processes."})
    eval_batch_size: int = field(default=1024, metadata={"help": "Users per evaluation batch, over all processes."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate."})
    weight_decay: float = field(
        default=0.0,
        metadata={
            "help": "Weight decay: L2 in the gradient with adam, decoupled with adamw (fine-tuning's --optimizer)."
        },
    )
    seed: int = field(
        default=2020, metadata={"help": "Seeds python, numpy, torch, batch order, augmentation and k-means."}
    )
    mixed_precision: str = field(
        default="no",
        metadata={"help": "no, fp16 or bf16 (autocast on the accelerator), or auto: bf16 where the hardware has it."},
    )
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    group_by_length: bool = field(
        default=True,
        metadata={
            "help": "Batch similar history lengths together (less padding, faster epochs). False gives random "
            "batches, as the original; with the model's bucket_by_length=true (--config_overrides) each is "
            "computed in groups of similar length, at about the speed of grouped batches."
        },
    )
    length_group_batches: int = field(
        default=50,
        metadata={
            "help": "With group_by_length: each epoch's random order is cut into pools of this many batches, "
            "each pool sorted by length and cut into batches, and the batches shuffled. Fewer batches per pool "
            "mix more users and lengths into a batch (1 = random batches); more pad less. On scientific_mm "
            "(transductive, no history prior, 3 seeds) pools of 4 and random batches gave the test NDCG@10 of 50 "
            "(0.0820, 0.0821, 0.0820; no difference shown) at about 0.55x and 0.25x its training samples/s; "
            "inductive with the history prior, pools of 4 +0.0007 and random batches "
            "computed in length groups (bucket_by_length) -0.0010 (both within the seeds' spread), the latter at "
            "the speed of 50."
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

    torch_compile: bool = field(
        default=False,
        metadata={
            "help": "Compile the model with torch.compile (inductor) for the training step; "
            "evaluation stays eager. Shapes that repeat avoid recompiles: pair it with --pad_to_multiple_of and "
            "the config's interest_set_width=static."
        },
    )

    def __post_init__(self):
        for name in (
            "num_train_epochs",
            "train_batch_size",
            "eval_batch_size",
            "gradient_accumulation_steps",
            "length_group_batches",
        ):
            _check(name, getattr(self, name), lambda v: _is_int(v) and v >= 1, "an integer >= 1")
        _check("learning_rate", self.learning_rate, lambda v: 0 < v < math.inf, "a float > 0")
        _check("weight_decay", self.weight_decay, lambda v: 0 <= v < math.inf, "a float >= 0")
        _check("mixed_precision", self.mixed_precision, PRECISIONS.__contains__, f"one of {list(PRECISIONS)}")
        _check("report_to", self.report_to, TRACKERS.__contains__, f"one of {list(TRACKERS)}")
        _check(
            "dataloader_num_workers", self.dataloader_num_workers, lambda v: _is_int(v) and v >= 0, "an integer >= 0"
        )
        _check("num_threads", self.num_threads, lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1")
        _check(
            "max_steps_per_epoch", self.max_steps_per_epoch, lambda v: v is None or (_is_int(v) and v >= 0),
            "an integer >= 0",
        )  # fmt: skip


@dataclass
class TrainingArguments(LoopArguments):
    """How to train and evaluate. Defaults are the original's fine-tuning settings (reference §5, §11)."""

    do_train: bool = field(
        default=True,
        metadata={
            "help": "False: no training step at all; the interests are clustered over this catalogue and the model "
            "as loaded is evaluated on valid and test (zero-shot ranking with a pre-trained inductive model: "
            "--model_name_or_path DIR --mode inductive --do_train false, with only the modalities it was "
            "pre-trained on, since a new modality's adaptor would start random)."
        },
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
    pad_to_multiple_of: int = field(
        default=1,
        metadata={
            "help": "Pad each training batch's histories to a multiple of this length (at most max_seq_length): "
            "1 = the batch's own longest; 8 gives a few repeating shapes (for torch_compile and GPUs)."
        },
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the final model to the Hub at the end."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository, e.g. 'user/missrec-office'."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})

    def __post_init__(self):
        super().__post_init__()
        _check("eval_block_size", self.eval_block_size, lambda v: _is_int(v) and v >= 1, "an integer >= 1")
        _check("pad_to_multiple_of", self.pad_to_multiple_of, lambda v: _is_int(v) and v >= 1, "an integer >= 1")
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


def expand_path(path: str, name: str) -> str:
    resolved = os.path.expandvars(os.path.expanduser(path))
    if "$" in resolved:
        raise ValueError(f"{name}={path!r}: an environment variable in it is not set")
    return resolved


class _FeatureFileArguments:
    """What the fine-tuning and pre-training data arguments share: one feature file per modality, and the widths
    of the raw float32 ones (a `.npy` file carries its own)."""

    text_features: str | None
    image_features: str | None
    text_feature_size: int | None
    image_feature_size: int | None

    def feature_files(self) -> dict[str, str]:
        files = {"text": self.text_features, "image": self.image_features}
        return {m: f for m, f in files.items() if f}

    def feature_sizes(self) -> dict[str, int]:
        sizes = {"text": self.text_feature_size, "image": self.image_feature_size}
        files = self.feature_files()
        return {m: size for m, size in sizes.items() if size and m in files and not files[m].endswith(".npy")}


@dataclass
class DataArguments(_FeatureFileArguments):
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

    def resolved_data_dir(self) -> str:
        return expand_path(self.data_dir, "data_dir")


@dataclass
class ModelArguments:
    """Which model to train. The modalities follow the feature files given in the data arguments."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A saved MISSRec to start from: a folder or a Hub id ('user/repo'; offline, from the local "
            "cache). None = from scratch."
        },
    )
    model_revision: str | None = field(
        default=None, metadata={"help": "Hub revision (branch, tag or commit) of model_name_or_path."}
    )
    token: str | None = field(
        default=None, metadata={"help": "Hub token for a private model_name_or_path (default: the logged-in one)."}
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
            "original; the default here since it measured better (test NDCG@10, 3 seeds, README: scientific_mm "
            "0.0820 -> 0.1075 transductive, 0.0738 -> 0.1048 inductive). Default: the pre-trained model's setting "
            "(the shipped one has it, calibrated), else on; false gives the paper's scoring."
        },
    )
    temperature: float | None = field(
        default=None,
        metadata={
            "help": "Softmax temperature (logits = scores / temperature). Default: the pre-trained model's own "
            "(0.07, the paper's, for the shipped one); from scratch, transductive, with the history prior 0.1, "
            "since it measured better on validation (README, 'Levers past the paper': valid NDCG@10 +0.0016 on "
            "scientific_mm, +0.0025 on scientific_full, 3-5 seeds); otherwise the paper's 0.07 (inductive, 0.1 was "
            "better on scientific_mm but not on the paper's split; without the prior it was not measured)."
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
        if self.temperature is not None:
            _check("temperature", self.temperature, lambda v: v > 0, "a number > 0")
        overrides = parse_overrides(self.config_overrides)
        check_config_overrides(overrides)
        if self.temperature is not None and overrides.get("temperature", self.temperature) != self.temperature:
            raise ValueError(
                f"temperature={self.temperature} and config_overrides temperature={overrides['temperature']} "
                "disagree: give one of them."
            )
        if self.model_name_or_path is not None:
            self.model_name_or_path = expand_path(self.model_name_or_path, "model_name_or_path")


@dataclass
class PretrainingArguments(LoopArguments):
    """How to pre-train. Defaults are the paper's FHCKM recipe (reference §5): global batch 4096, 100 epochs,
    a checkpoint every 10 epochs."""

    output_dir: str = field(default="outputs/pretrain", metadata={"help": "Where checkpoints and the model go."})
    num_train_epochs: int = field(default=100, metadata={"help": "Pre-training epochs."})
    train_batch_size: int = field(default=4096, metadata={"help": "Global batch (all processes x accumulation)."})
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
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={
            "help": "Micro-batches per optimiser step. The in-batch negatives are those of one micro-batch "
            "(over all processes), so accumulation shrinks them: prefer more processes or memory."
        },
    )
    length_group_batches: int = field(
        default=50,
        metadata={
            "help": "With group_by_length: batches per length-sorted pool (see run_finetune.py --help); fewer mix "
            "more users and domains into a batch, and so into each other's in-batch negatives. 1 (random "
            "batches) with --config_overrides bucket_by_length=true costs about what sorted batches cost."
        },
    )
    domain_batches: bool = field(
        default=False,
        metadata={
            "help": "Draw every training batch from one domain, so that a history's in-batch negatives are "
            "items of its own domain (hard) rather than mostly other domains' (told apart by their text alone)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        _check("save_every_epochs", self.save_every_epochs, lambda v: _is_int(v) and v >= 0, "an integer >= 0")
        _check("word_drop_ratio", self.word_drop_ratio, lambda v: 0 <= v <= 1, "a float in [0, 1]")
        _check("zero_shot_interest_ratio", self.zero_shot_interest_ratio, lambda v: 0 < v <= 1, "a float in (0, 1]")


@dataclass
class PretrainDataArguments(_FeatureFileArguments):
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

    def resolved_domain_dirs(self) -> list[str]:
        return [expand_path(d, "domain_dirs") for d in self.domain_dirs]

    def load_validation_domains(self) -> list[ZeroShotDomain]:
        """The held-out users' folders as (name, catalogue, valid split)."""
        domains = []
        for directory in (expand_path(d, "validation_dirs") for d in self.validation_dirs):
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

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Continue from a saved MISSRec: a folder or a Hub id ('user/repo')."}
    )
    model_revision: str | None = field(default=None, metadata={"help": "Hub revision of model_name_or_path."})
    token: str | None = field(default=None, metadata={"help": "Hub token for a private model_name_or_path."})
    interest_ratio: float = field(default=0.02, metadata={"help": "K = ceil(ratio x item tokens); 0.02 in the paper."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "Other MissrecConfig fields, 'name=value,name=value'."}
    )

    def __post_init__(self):
        _check("interest_ratio", self.interest_ratio, lambda v: 0 < v <= 1, "a float in (0, 1]")
        check_config_overrides(parse_overrides(self.config_overrides))


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


def check_config_overrides(overrides: Mapping) -> None:
    """Refuse a `config_overrides` name that is no MissrecConfig field (a typo would be stored and ignored)."""
    from .configuration_missrec import MissrecConfig

    known = {name for klass in MissrecConfig.__mro__ for name in getattr(klass, "__annotations__", {})}
    unknown = sorted(set(overrides) - known - {"num_items", "modalities"})
    if unknown:
        fields = sorted(n for n in MissrecConfig.__annotations__)
        raise ValueError(f"config_overrides: unknown MissrecConfig field(s) {unknown}; allowed: {fields}")


# Python's spellings too: `history_prior=False` kept as the text "False" would be a true value.
PYTHON_CONSTANTS = {"True": True, "False": False, "None": None}


def parse_overrides(text: str | None) -> dict:
    """'a=1,b=0.5,c=text,d=False' -> {'a': 1, 'b': 0.5, 'c': 'text', 'd': False} (values parsed as JSON when
    they can be, True / False / None as Python's)."""
    overrides = {}
    for part in filter(None, (text or "").split(",")):
        if "=" not in part:
            raise ValueError(f"config_overrides: {part!r} is not 'name=value'")
        name, value = (x.strip() for x in part.split("=", 1))
        if value in PYTHON_CONSTANTS:
            overrides[name] = PYTHON_CONSTANTS[value]
            continue
        try:
            overrides[name] = json.loads(value)
        except json.JSONDecodeError:
            overrides[name] = value
    return overrides
