#!/usr/bin/env python
"""Training-step throughput with shapes that repeat: static interest sets, padded histories, torch.compile.

    python bench/static_shapes.py                                   # the three variants, batches of 512
    python bench/static_shapes.py --steps 4 --batch_size 64 --variants eager compiled --output_dir /tmp/b

The reference model of `bench/model_step.py` (hidden 300, text and image features of 512, 4,385 items,
transductive), trained on batches whose history lengths are drawn from the train split of data/scientific_mm
and batched by the trainer's sampler (`real_grouped`). Variants:
  eager      the defaults: interest sets as wide as the batch's largest (one host read-back per forward),
             histories padded to the batch's longest;
  static     `interest_set_width="static"` and histories padded to a multiple of `--pad_to_multiple_of`:
             no read-back, few distinct shapes, more (masked) padding;
  compiled   `static` with the model compiled by `torch.compile` (inductor), as `--torch_compile` does.
Each variant runs the same batches twice: the first pass compiles (its time is reported as `first_pass_s`), the
second is timed step by step. On a CPU the read-back costs nothing, so `static` shows the cost of its padding
and `compiled` what inductor's fused kernels give; the variants exist for GPUs, where a read-back stalls the
stream (the H100 step was 33 ms of wall time for 9 ms of kernels).

Results: a table on stdout and `<output_dir>/static_shapes.json` and `.md`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from help_format import HelpFormatter
from measurement import synchronize
from model_step import build_model, make_batches, real_lengths
from provenance import header_markdown, run_header
from result_files import DEFAULT_RESULTS_DIR, markdown_table, write_json_atomically, write_text_atomically

VARIANTS = ("eager", "static", "compiled")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="What to time.")
    parser.add_argument("--batch_size", type=int, default=512, help="Histories per training step.")
    parser.add_argument("--steps", type=int, default=20, help="Timed training steps (the batches of both passes).")
    parser.add_argument("--num_items", type=int, default=4385, help="Catalogue size (4385 = Scientific).")
    parser.add_argument("--pad_to_multiple_of", type=int, default=8, help="History padding of static/compiled.")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="Adam learning rate.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the model and the data.")
    parser.add_argument("--device", default="cpu", help="Torch device (cpu, cuda, ...); CUDA work is synchronised.")
    parser.add_argument("--num_threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_RESULTS_DIR, help="Where the results go.")
    args = parser.parse_args(argv)
    for name in ("batch_size", "steps", "num_items", "pad_to_multiple_of"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    args.warmup = 0  # make_batches builds warmup + steps batches
    return args


def one_pass(step, batches, device: torch.device) -> list[float]:
    seconds = []
    for batch in batches:
        synchronize(device)
        started = time.perf_counter()
        step(batch)
        synchronize(device)
        seconds.append(time.perf_counter() - started)
    return seconds


def time_variant(variant: str, args, lengths, device: torch.device) -> dict:
    static = variant != "eager"
    model, info = build_model(args, device, interest_set_width="static" if static else "longest")
    batches = make_batches("real_grouped", args, lengths, model.config.max_seq_length,
                           args.pad_to_multiple_of if static else 1)  # fmt: skip
    batches = [{k: v.to(device) for k, v in b.items() if k != "row_index"} for b in batches]
    forward = torch.compile(model) if variant == "compiled" else model
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    losses = []

    def step(batch):
        output = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"], check_inputs=False)  # fmt: skip
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(output.loss.detach())

    first = one_pass(step, batches, device)
    timed = one_pass(step, batches, device)
    samples = sum(int(b["input_ids"].shape[0]) for b in batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["input_ids"].numel() for b in batches)
    return {
        "variant": variant,
        "samples_per_second": samples / sum(timed),
        "ms_per_step_median": 1000 * statistics.median(timed),
        "first_pass_s": sum(first),
        "distinct_widths": len({int(b["input_ids"].shape[1]) for b in batches}),
        "padding_efficiency": real / padded,
        "final_loss": float(losses[-1]),
        "num_interests": info["num_interests"],
    }


def render_markdown(result: dict) -> str:
    rows = [
        [r["variant"], f"{r['samples_per_second']:.0f}", f"{r['ms_per_step_median']:.1f}", f"{r['first_pass_s']:.1f}",
         r["distinct_widths"], f"{r['padding_efficiency']:.2f}", f"{r['final_loss']:.4f}"]
        for r in result["records"]
    ]  # fmt: skip
    table = markdown_table(
        ["variant", "samples/s", "ms/step (median)", "first pass s", "history widths", "real/padded", "final loss"],
        rows,
    )
    settings = result["settings"]
    return (
        "# Training step with shapes that repeat (bench/static_shapes.py)\n\n"
        + header_markdown(result["meta"])
        + f"\n\nBatches of {settings['batch_size']}, {settings['steps']} steps per pass, lengths of the scientific_mm "
        f"train split, static variants padded to multiples of {settings['pad_to_multiple_of']}.\n\n" + table + "\n"
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = torch.device(args.device)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result = {"meta": run_header(args.device), "settings": settings, "records": []}
    lengths = real_lengths("train")
    for variant in args.variants:
        record = time_variant(variant, args, lengths, device)
        result["records"].append(record)
        print(f"{variant}: {record['samples_per_second']:.0f} samples/s, first pass {record['first_pass_s']:.1f} s",
              flush=True)  # fmt: skip
        write_json_atomically(args.output_dir / "static_shapes.json", result)
        write_text_atomically(args.output_dir / "static_shapes.md", render_markdown(result))
    print(render_markdown(result))
    return result


if __name__ == "__main__":
    main()
