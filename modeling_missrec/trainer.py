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
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .accelerator_setup import make_accelerator, quiet_saving, use_available_cores
from .atomic import (
    commit_files,
    complete_interrupted_commit,
    hold_lock,
    recover_directory,
    replace_directory,
    staging_dir,
    write_atomically,
)
from .checkpoints import (
    BEST_DIR,
    CHECKPOINT_DIR,
    CHECKSUMS_FILE,
    STATE_FILE,
    TrainerState,
    claim_output_dir,
    file_checksums,
    resume_settings,
)
from .data import (
    HistoryDataset,
    ItemCatalog,
    LengthGroupedBatchSampler,
    PretrainingCollator,
    PretrainingCorpus,
    build_loader,
)
from .evaluation import evaluate_ranking, results_table
from .modeling_missrec import MissrecForPreTraining
from .training_args import PretrainingArguments, TrainingArguments, ZeroShotDomain
from .transfer import zero_shot_recommender

logger = logging.getLogger(__name__)


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
        _resize_interest_state(model, k[0])
    tokenizer.centroids = broadcast(tokenizer.centroids.contiguous())
    tokenizer.item_interest_ids = broadcast(tokenizer.item_interest_ids.contiguous())
    return k[0]


def _format_metrics(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "num_users")


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def _resize_interest_state(model, num_interests: int) -> None:
    """Give the centroid buffer the shape of a saved interest state before loading into it (K varies)."""
    model.missrec.interest_tokenizer.resize(num_interests)
    model.config.num_interests = num_interests


class _AcceleratedLoop:
    """What the fine-tuning and pre-training loops share: the Accelerator, atomic checkpoints, resume,
    atomic model folders, and the epoch of optimisation steps."""

    def __init__(self, model, args):
        self.args = args
        self.accelerator = make_accelerator(args)
        self._compiled = None  # the compiled training forward, built on first use (torch_compile)
        use_available_cores(self.accelerator, args.num_threads)
        set_seed(args.seed)
        self.output_dir = Path(args.output_dir)
        if self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            hold_lock(self.output_dir)
            complete_interrupted_commit(self.output_dir)
            claim_output_dir(self.output_dir, args)
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
        # A batch-summed regulariser counts the whole optimiser batch (all processes, all micro-batches).
        self.regularizer_scale = world * args.gradient_accumulation_steps

    def resume_settings(self) -> dict:
        """What a resume of this run must not change: the result-changing arguments, the model's config and
        trainable parameters, and the number of training rows."""
        rows = len(self.train_loader.dataset) if hasattr(self, "train_loader") else None
        return resume_settings(self.args, self.unwrapped, rows)

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.prepared_model)

    @property
    def training_forward(self):
        """What the training step calls: the prepared model, or (`torch_compile`) its compiled form, built once
        and sharing its parameters; evaluation and saving keep the eager model."""
        if not self.args.torch_compile:
            return self.prepared_model
        if self._compiled is None:
            self._compiled = torch.compile(self.prepared_model)
        return self._compiled

    def log(self, message: str, *args) -> None:
        if self.accelerator.is_main_process:
            logger.info(message, *args)

    def start(self, tracker_name: str) -> TrainerState:
        """Resume from `resume_from_checkpoint` (or record this run's settings), start the trackers."""
        if self.args.resume_from_checkpoint:
            self.load_checkpoint(self.args.resume_from_checkpoint)
        else:
            self.state.settings = self.resume_settings()
        self.start_trackers(tracker_name)
        return self.state

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
        with quiet_saving():
            self.accelerator.save_state(str(temporary))
        self.accelerator.wait_for_everyone()  # every rank's RNG file is written before the folder is hashed and swapped
        if self.accelerator.is_main_process:
            write_atomically(temporary / CHECKSUMS_FILE, json.dumps(file_checksums(temporary), indent=2))
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
            saved, found = json.loads((directory / CHECKSUMS_FILE).read_text()), file_checksums(directory)
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
        with quiet_saving():
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
            with quiet_saving():
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
                loss = self.compute_loss(self.training_forward, batch)
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
        if base.catalog.raw_item_ids is None:  # saved with the model, so that it recommends in raw ids
            base.set_raw_item_ids(catalog.raw_item_ids)
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
            pad_to_multiple_of=args.pad_to_multiple_of,
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
        # The loader validated every row: no host sync per step for checking them again.
        return model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=batch["labels"],
            check_inputs=False,
            regularizer_scale=self.regularizer_scale,
        ).loss

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
            check_inputs=False,  # the loaders validated every row
        )

    def train(self) -> dict:
        args, state = self.args, self.start("missrec_finetune")
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
                self.save_model(self.output_dir / BEST_DIR)
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
            "metrics.json": json.dumps(metrics, indent=2, default=float),
            "results.md": results_table(metrics, self.args.eval_ks),
        }
        if self.model_card is not None:
            extra["README.md"] = self.model_card(metrics)
        self.save_model(self.output_dir, extra)
        if self.accelerator.log_with:
            self.accelerator.end_training()
        return metrics


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
            groups=corpus.row_domains() if args.domain_batches else None,
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
        return model(**batch, regularizer_scale=self.regularizer_scale).loss

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
        args, state = self.args, self.start("missrec_pretrain")
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


__all__ = [
    "MissrecPretrainer",
    "MissrecTrainer",
    "TrainerState",
    "refresh_interests",
]
