"""`bucket_by_length`: a batch of mixed lengths computed in groups of similar length gives the block's values
(logits, loss, regulariser, gradients) up to float rounding, for every regulariser pooling and both modes."""

from __future__ import annotations

import pytest
import torch
from distributed_step import losses_and_gradients, tiny_pretraining_setup
from hypothesis import given, settings
from hypothesis import strategies as st
from test_static_shapes import twin_models

from modeling_missrec import MissrecConfig, MissrecForSequentialRecommendation
from modeling_missrec.modeling_missrec import length_groups

MAX_LENGTH = 12


def _twin_models(**config) -> tuple[MissrecForSequentialRecommendation, MissrecForSequentialRecommendation]:
    """The same model computed as one block and in length groups."""
    return twin_models({"bucket_by_length": True}, max_seq_length=MAX_LENGTH, **config)


def _batch(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    input_ids = torch.randint(1, 31, (len(lengths), int(lengths.max())), generator=generator)
    input_ids[torch.arange(input_ids.shape[1])[None, :] >= lengths[:, None]] = 0
    return input_ids, torch.randint(1, 31, (len(lengths),), generator=generator)


def _assert_same_step(block, bucketed, input_ids, labels) -> None:
    outputs = []
    for model in (block, bucketed):
        model.zero_grad()
        out = model(input_ids, labels=labels)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        outputs.append((out, grads))
    (reference, reference_grads), (got, got_grads) = outputs
    torch.testing.assert_close(got.logits, reference.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, reference.loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.interest_regularization, reference.interest_regularization, atol=1e-6, rtol=1e-5)
    assert got_grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("pooling", ["mean", "original", "batch_share"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("use_item_ids", [True, False])
def test_groups_give_the_block_step(pooling, reduction, use_item_ids):
    block, bucketed = _twin_models(
        interest_reg_pooling=pooling, interest_reg_reduction=reduction, use_item_ids=use_item_ids
    )
    input_ids, labels = _batch([1, 12, 3, 2, 7, 1, 5, 4, 12, 9], seed=1)
    assert len(length_groups(input_ids != 0)) == 5  # the batch really is split
    # A regulariser that the comparison can see: 1e-4 would hide it under the loss's rounding.
    for model in (block, bucketed):
        model.config.interest_reg_weight = 1.0
    _assert_same_step(block, bucketed, input_ids, labels)


def test_every_position_and_the_backbone_outputs_agree():
    block, bucketed = _twin_models(last_position_only=False)
    input_ids, _ = _batch([2, 9, 1, 4], seed=2)
    features = {m: f[input_ids] for m, f in block.item_features.items()}
    with torch.no_grad():
        reference = block.missrec(input_ids, item_features=features, last_position_only=False)
        got = bucketed.missrec(input_ids, item_features=features, last_position_only=False)
    real = input_ids != 0
    torch.testing.assert_close(got.last_hidden_state[real], reference.last_hidden_state[real], atol=1e-5, rtol=1e-5)
    assert got.last_hidden_state.shape == reference.last_hidden_state.shape
    torch.testing.assert_close(got.sequence_embedding, reference.sequence_embedding, atol=1e-5, rtol=1e-5)
    # Interest sets: the same ids per row (padded to the batch's largest set), the same states at real slots.
    assert torch.equal(got.interest_ids, reference.interest_ids)
    slots = reference.interest_ids != 0
    torch.testing.assert_close(
        got.interest_hidden_states[slots], reference.interest_hidden_states[slots], atol=1e-5, rtol=1e-5
    )


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, MAX_LENGTH), min_size=1, max_size=9),
    seed=st.integers(0, 2**16),
)
def test_random_batches_give_the_block_scores(lengths, seed):
    block, bucketed = _twin_models()
    input_ids, labels = _batch(lengths, seed)
    with torch.no_grad():
        reference, got = block(input_ids, labels=labels), bucketed(input_ids, labels=labels)
    torch.testing.assert_close(got.logits, reference.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.loss, reference.loss, atol=1e-5, rtol=1e-5)


def test_length_groups_cover_every_row_once_within_twice_its_length():
    lengths = torch.tensor([3, 1, 8, 9, 2, 4, 5, 16, 17, 1])
    mask = torch.arange(17)[None, :] < lengths[:, None]
    groups = length_groups(mask)
    rows = torch.cat([group for group, _ in groups])
    assert sorted(rows.tolist()) == list(range(len(lengths)))
    for group, width in groups:
        assert width == int(lengths[group].max()) and (2 * lengths[group] > width).all()
    assert [width for _, width in groups] == [1, 2, 4, 8, 16, 17]


def test_bucketing_and_static_interest_sets_are_refused_together():
    with pytest.raises(ValueError, match="bucket_by_length"):
        MissrecConfig(bucket_by_length=True, interest_set_width="static")


def test_pretraining_step_is_the_same_in_length_groups():
    model, batch = tiny_pretraining_setup()
    assert len(length_groups(batch["input_ids"] != 0)) == 2  # histories of 4 and 6 items
    results = []
    for bucket in (False, True):
        model.config.bucket_by_length = bucket
        results.append(losses_and_gradients(model, batch))
    (item_ref, seq_ref, reference), (item, seq, got) = results
    torch.testing.assert_close(item, item_ref)
    torch.testing.assert_close(seq, seq_ref)
    assert got.keys() == reference.keys()
    for name, gradient in reference.items():
        torch.testing.assert_close(got[name], gradient, atol=1e-6, rtol=1e-4, msg=name)


def test_ids_past_the_mask_and_empty_rows_are_computed_as_the_block_does():
    block, bucketed = _twin_models()
    input_ids = torch.tensor([[3, 4, 5, 0], [7, 8, 9, 10], [2, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])  # row 0's item 5 is masked, not padding
    with torch.no_grad():
        reference = block(input_ids, attention_mask=mask, check_inputs=False).logits
        torch.testing.assert_close(bucketed(input_ids, attention_mask=mask, check_inputs=False).logits, reference)
    assert length_groups(torch.tensor([[False, False], [True, True]]))[0][1] == 1  # an empty row keeps a slot
