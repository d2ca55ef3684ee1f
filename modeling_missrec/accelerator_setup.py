"""The Accelerator a run gets: mixed precision by what the device computes natively, the tracker, the thread
count of a single CPU process, and the quiet saving of its states."""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs

from .training_args import TrainingArguments


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


def make_accelerator(args: TrainingArguments) -> Accelerator:
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
        # a batch copied to the GPU from pinned memory need not block the host (pin_memory: data.build_loader)
        dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()),
    )


def use_available_cores(accelerator: Accelerator, num_threads: int | None) -> None:
    """A single CPU process uses every core it may run on: `accelerate launch` exports OMP_NUM_THREADS=1 for
    one process, which halves the speed of the README's command on a 2-core machine."""
    if accelerator.num_processes == 1 and accelerator.device.type == "cpu":
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(num_threads or available)
    elif num_threads:
        torch.set_num_threads(num_threads)


@contextlib.contextmanager
def quiet_saving():
    """Accelerate logs seven INFO lines per saved or loaded state (weights, optimiser, each sampler, RNG) and
    transformers draws a progress bar per model written: one epoch's log line should not drown in them.
    Warnings and errors still show."""
    from transformers.utils import logging as hf_logging

    loggers = [logging.getLogger(name) for name in ("accelerate.accelerator", "accelerate.checkpointing")]
    levels = [log.level for log in loggers]
    bars = hf_logging.is_progress_bar_enabled()
    for log in loggers:
        log.setLevel(max(log.getEffectiveLevel(), logging.WARNING))
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()
