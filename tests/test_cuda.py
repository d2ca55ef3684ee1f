"""The same model on CUDA as on the CPU: forward, loss, gradients, clustering, ranking, training in bf16.

Skipped without a GPU (CI has none); `bench/gpu_check.sh` runs the whole suite on a GPU machine, where the
trainer tests also run on CUDA (Accelerate picks the GPU)."""

from __future__ import annotations

import pytest
import torch
from test_modeling import histories, tiny_model

from modeling_missrec.interests import interest_sets, kmeans, reference_interest_sets
from modeling_missrec.metrics import reference_ranks, streaming_ranks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _on(device: str):
    return tiny_model().to(device)  # interests refreshed on the CPU, then moved


def test_forward_loss_and_gradients_agree_with_the_cpu():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cpu = _on("cpu")
    gpu = tiny_model().to("cuda")
    gpu.load_state_dict(cpu.state_dict())  # the same weights and interest state
    cpu.eval()
    gpu.eval()
    ids = histories()
    mask = ids != 0
    labels = torch.arange(1, ids.shape[0] + 1)
    out_cpu = cpu(input_ids=ids, attention_mask=mask, labels=labels)
    out_gpu = gpu(input_ids=ids.cuda(), attention_mask=mask.cuda(), labels=labels.cuda())
    torch.testing.assert_close(out_gpu.logits.cpu(), out_cpu.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_gpu.loss.cpu(), out_cpu.loss, rtol=1e-4, atol=1e-4)
    out_cpu.loss.backward()
    out_gpu.loss.backward()
    for (name, p_cpu), p_gpu in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        if p_cpu.grad is not None:
            torch.testing.assert_close(p_gpu.grad.cpu(), p_cpu.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_bf16_autocast_forward_stays_close_to_fp32():
    model = _on("cuda")
    model.eval()
    ids = histories().cuda()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=ids != 0).logits
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(input_ids=ids, attention_mask=ids != 0).logits
    assert torch.isfinite(low[:, 1:]).all() and torch.isinf(low[:, 0]).all()  # column 0 is padding
    # logits are cosine / 0.07 (|logit| <= ~15): bf16 keeps about 3 significant digits.
    assert (low[:, 1:].float() - reference[:, 1:]).abs().max() < 0.3


def test_kmeans_on_cuda_is_deterministic_and_as_good_as_on_cpu():
    x = torch.randn(20_000, 32, generator=torch.Generator().manual_seed(0))
    for init in ("k-means++", "batched-k-means++"):
        first = kmeans(x.cuda(), 200, seed=3, init=init)
        second = kmeans(x.cuda(), 200, seed=3, init=init)
        assert torch.equal(first.labels, second.labels) and torch.equal(first.centroids, second.centroids)
        on_cpu = kmeans(x, 200, seed=3, init=init)
        assert abs(first.inertia - on_cpu.inertia) / on_cpu.inertia < 0.02  # different draws, same quality


def test_interest_sets_on_cuda_equal_the_reference():
    generator = torch.Generator().manual_seed(1)
    lookups = [torch.randint(0, 30, (101,), generator=generator) for _ in range(2)]
    for table in lookups:
        table[0] = 0  # the padding item has no interest
    ids = torch.randint(0, 101, (64, 50), generator=generator)
    expected = reference_interest_sets(ids, lookups)
    got = interest_sets(ids.cuda(), [table.cuda() for table in lookups])
    assert torch.equal(got.cpu(), expected)


def test_streaming_ranks_on_cuda_equal_brute_force():
    generator = torch.Generator().manual_seed(2)
    scores = torch.randn(300, 5000, generator=generator).round(decimals=1)  # with ties
    targets = torch.randint(1, 5000, (300,), generator=generator)
    expected = reference_ranks(scores, targets)
    gpu = scores.cuda()
    got = streaming_ranks(
        lambda start, end: gpu[:, start:end],
        targets.cuda(),
        4999,
        block_size=777,
    )
    assert torch.equal(got.ranks.cpu(), expected)
