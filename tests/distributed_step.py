"""One optimisation step of a tiny MissrecForPreTraining on its share of a fixed global batch per process.

Run by tests/test_pretraining.py under `torch.distributed.run --nproc_per_node 2` (gloo, CPU); the test
compares the result with one process on the whole batch. Also provides that deterministic setup."""

from __future__ import annotations

import os
import sys

import torch

from modeling_missrec import MissrecConfig, MissrecForPreTraining


def tiny_pretraining_setup(num_rows: int = 8):
    """A deterministic model and global batch (row 5 repeats row 1's target, across the two halves)."""
    torch.manual_seed(0)
    config = MissrecConfig(
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=32,
        text_feature_size=6,
        image_feature_size=5,
        num_items=40,
        use_item_ids=False,
        interest_ratio=0.25,
        hidden_dropout_prob=0.0,
        attention_dropout_prob=0.0,
    )
    model = MissrecForPreTraining(config)
    generator = torch.Generator().manual_seed(1)
    table = {"text": torch.randn(41, 6, generator=generator), "image": torch.randn(41, 5, generator=generator)}
    for features in table.values():
        features[0] = 0
    table["image"][1:4] = 0
    present = torch.stack([table[m].ne(0).any(-1) for m in ("text", "image")])
    model.refresh_interests(table, present, seed=0)
    ids = torch.randint(1, 41, (num_rows, 6), generator=generator)
    ids[::2, 4:] = 0
    targets = torch.randint(1, 41, (num_rows,), generator=generator)
    targets[5] = targets[1]
    augmented = ids.clone()
    augmented[:, 1] = ids[:, 2]
    batch = {
        "input_ids": ids,
        "item_features": {m: t[ids] for m, t in table.items()},
        "target_features": {m: t[targets] for m, t in table.items()},
        "target_ids": targets,
        "augmented_input_ids": augmented,
        "augmented_item_features": {m: t[augmented] for m, t in table.items()},
    }
    return model, batch


def losses_and_gradients(model, batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One forward and backward: the two pre-training losses and every parameter's gradient."""
    model.zero_grad()
    output = model(**batch)
    output.loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output.sequence_item_loss.detach(), output.sequence_sequence_loss.detach(), gradients


def slice_batch(batch, start, end):
    return {
        k: ({m: t[start:end] for m, t in v.items()} if isinstance(v, dict) else v[start:end]) for k, v in batch.items()
    }


def main(out_dir: str, first_share: int) -> None:
    """Rank 0 takes the first `first_share` rows of the global batch, rank 1 the rest."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model, batch = tiny_pretraining_setup()
    rank, world = accelerator.process_index, accelerator.num_processes
    bounds = [0, first_share, batch["input_ids"].shape[0]]
    local = slice_batch(batch, bounds[rank], bounds[rank + 1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer = accelerator.prepare(model, optimizer)
    output = model(**local)
    accelerator.backward(output.loss)
    optimizer.step()
    losses = accelerator.gather(torch.stack([output.loss.detach(), output.sequence_item_loss.detach()])[None])
    if accelerator.is_main_process:
        state = {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        torch.save({"world": world, "state": state, "losses": losses}, f"{out_dir}/two.pt")
    accelerator.wait_for_everyone()  # every collective of both ranks is done; what is left is teardown


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
    # Skip the interpreter's teardown of the gloo group: with work objects that hold Python tensors still in
    # its threads, it can abort (SIGABRT, "terminate called without an active exception", seen in CI) or
    # deadlock (the DDP reducer's destructor joins a gloo thread that waits for the GIL the destructor holds;
    # seen here after an explicit destroy_process_group). pytorch/pytorch#179291 describes the same teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
