"""The model: configuration, parameter counts, interests, fusion, masking, gradients, errors, save/reload."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModel

from modeling_missrec import MissrecConfig, MissrecForSequentialRecommendation, MissrecModel
from modeling_missrec.interests import reference_interest_sets

NUM_ITEMS = 30


def tiny_config(**overrides) -> MissrecConfig:
    settings = dict(
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=32,
        text_feature_size=8,
        image_feature_size=6,
        num_items=NUM_ITEMS,
        max_seq_length=12,
        hidden_dropout_prob=0.1,
        attention_dropout_prob=0.1,
    )
    settings.update(overrides)
    return MissrecConfig(**settings)


def tiny_features(num_items: int = NUM_ITEMS, missing_images: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = {
        "text": torch.randn(num_items, 8, generator=generator),
        "image": torch.randn(num_items, 6, generator=generator),
    }
    features["image"][:missing_images] = 0  # items 1..missing_images have no image
    return features


def tiny_model(**overrides) -> MissrecForSequentialRecommendation:
    torch.manual_seed(0)
    model = MissrecForSequentialRecommendation(tiny_config(**overrides))
    model.load_item_features(tiny_features())
    model.refresh_interests(seed=0)
    return model


def histories() -> torch.Tensor:
    return torch.tensor([[3, 7, 9, 0, 0], [1, 2, 3, 4, 5], [30, 0, 0, 0, 0], [12, 12, 4, 0, 0]])


# ------------------------------------------------------------------------------------------ configuration
@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("hidden_size", 301, "not divisible"),
        ("modalities", ["text", "audio"], "modalities"),
        ("hidden_dropout_prob", 1.0, r"\[0, 1\)"),
        ("attention_dropout_prob", -0.1, r"\[0, 1\)"),
        ("item_fusion", "concat", "dynamic_shared"),
        ("temperature", 0.0, "temperature"),
        ("interest_ratio", 0.0, "interest_ratio"),
        ("num_items", -1, "num_items"),
    ],
)
def test_invalid_config_values_name_the_field_and_the_allowed_values(field, value, fragment):
    with pytest.raises(ValueError, match=fragment) as error:
        MissrecConfig(**{field: value})
    assert field in str(error.value)
    assert repr(value) in str(error.value) or str(value) in str(error.value)


def test_defaults_are_the_original_hyperparameters():
    config = MissrecConfig()
    assert (config.hidden_size, config.num_encoder_layers, config.num_decoder_layers) == (300, 1, 1)
    assert (config.num_attention_heads, config.intermediate_size, config.hidden_dropout_prob) == (4, 256, 0.5)
    assert (config.hidden_act, config.layer_norm_eps, config.max_seq_length) == ("gelu", 1e-12, 50)
    assert (config.temperature, config.interest_ratio, config.item_fusion) == (0.07, 0.5, "dynamic_shared")
    assert config.modalities == ["text", "image"] and config.text_feature_size == config.image_feature_size == 512


# --------------------------------------------------------------------------------------- parameter counts
def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_parameter_counts_of_the_reference_configuration():
    assert trainable(MissrecForSequentialRecommendation(MissrecConfig(use_item_ids=False))) == 1_719_513
    with_ids = MissrecForSequentialRecommendation(MissrecConfig(num_items=4385, use_item_ids=True))
    assert trainable(with_ids) == 3_035_313
    inductive = MissrecForSequentialRecommendation(MissrecConfig(use_item_ids=False))
    assert inductive.freeze_backbone_for_transfer() == 308_401
    # frozen catalogue features are buffers, never parameters
    assert not any("features" in name for name, _ in with_ids.named_parameters())


def test_text_and_image_widths_may_differ_and_one_modality_is_enough():
    model = MissrecForSequentialRecommendation(tiny_config(modalities=["image"], text_feature_size=999))
    assert set(model.missrec.adaptors) == {"image"}
    assert model.missrec.adaptors["image"].in_features == 6
    model.load_item_features({"image": tiny_features()["image"]})
    model.refresh_interests()
    output = model(histories(), labels=torch.tensor([1, 2, 3, 4]))
    assert torch.isfinite(output.loss)


# ---------------------------------------------------------------------------------------------- interests
def test_refresh_builds_the_interest_vocabulary_from_present_tokens():
    model = tiny_model()
    tokenizer = model.missrec.interest_tokenizer
    present_tokens = NUM_ITEMS + (NUM_ITEMS - 5)  # 5 items have no image
    k = math.ceil(0.5 * present_tokens)
    assert model.config.num_interests == k
    assert tokenizer.centroids.shape == (k + 1, 16)
    assert torch.count_nonzero(tokenizer.centroids[0]) == 0
    ids = tokenizer.item_interest_ids
    assert ids.shape == (2, NUM_ITEMS + 1) and (ids[:, 0] == 0).all()
    assert (ids[1, 1:6] == 0).all(), "a missing image has no image interest"
    assert (ids[0, 1:] >= 1).all() and (ids[1, 6:] >= 1).all() and ids.max() <= k


def test_original_behaviour_clusters_the_missing_modality_bias():
    model = tiny_model(mask_missing_modalities=False)
    ids = model.missrec.interest_tokenizer.item_interest_ids
    assert (ids[:, 1:] >= 1).all()
    # the five missing images all become the adaptor bias: one identical point, one cluster
    assert ids[1, 1:6].unique().numel() == 1


def test_interest_sets_are_those_of_the_reference_and_ignore_order():
    model = tiny_model()
    lookups = list(model.missrec.interest_tokenizer.item_interest_ids)
    batch = histories()
    ids, vectors, mask = model.missrec.interest_tokenizer(batch)
    assert torch.equal(ids, reference_interest_sets(batch, lookups))
    assert torch.equal(vectors, model.missrec.interest_tokenizer.centroids[ids])
    permuted = batch.clone()
    permuted[1] = batch[1].flip(0)
    assert torch.equal(model.missrec.interest_tokenizer(permuted)[0], ids)


def test_encoder_sees_a_set_reordering_history_changes_only_the_decoder_positions():
    model = tiny_model().eval()
    a = torch.tensor([[4, 9, 2]])
    b = torch.tensor([[9, 4, 2]])
    out_a, out_b = model.encode(a), model.encode(b)
    torch.testing.assert_close(out_a.interest_hidden_states, out_b.interest_hidden_states)
    assert not torch.allclose(out_a.sequence_embedding, out_b.sequence_embedding)


def test_padding_to_a_wider_batch_does_not_change_the_representation():
    model = tiny_model().eval()
    narrow = model.encode(torch.tensor([[5, 6, 7]])).sequence_embedding
    wide = model.encode(torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0]])).sequence_embedding
    torch.testing.assert_close(narrow, wide, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------- scoring
def manual_scores(model, sequence, item_ids):
    """The paper's fusion written out for single candidates."""
    tokens = model.missrec.adapt(model.item_features)
    present = model.item_modality_present
    ids = model.missrec.item_embeddings.weight
    factor = model.fusion.fusion_factor
    scores = []
    for item in item_ids:
        cos = [torch.dot(sequence, torch.nn.functional.normalize(tokens[m, item], dim=0)) for m in range(2)]
        weights = [torch.exp(factor * c) if present[m, item] else torch.zeros(()) for m, c in enumerate(cos)]
        fused = sum(w * c for w, c in zip(weights, cos)) / sum(weights)
        id_score = torch.dot(sequence, torch.nn.functional.normalize(ids[item], dim=0))
        scores.append((id_score + 2 * fused) / 3)
    return torch.stack(scores)


def test_dynamic_fusion_scores_match_the_formula_and_missing_images_are_masked():
    model = tiny_model().eval()
    with torch.no_grad():
        model.fusion.fusion_factor.fill_(1.7)
        output = model(histories())
        sequence = output.sequence_embedding[0]
        items = list(range(1, NUM_ITEMS + 1))
        expected = manual_scores(model, sequence, items) / model.config.temperature
    torch.testing.assert_close(output.logits[0, 1:], expected, rtol=1e-4, atol=1e-4)
    assert output.logits[:, 0].eq(float("-inf")).all(), "padding is never a candidate"


def test_a_missing_modality_does_not_leak_the_adaptor_bias():
    masked = tiny_model().eval()
    with torch.no_grad():
        before = masked(histories()).logits
        masked.missrec.adaptors["image"].bias.add_(5.0)
        after = masked(histories()).logits
    # history 1 and candidates 1..5 have no image; history 3 ([30]) has one, so its embedding changes.
    # The candidate scores of image-less items for an unchanged sequence embedding must not move:
    # check through the fusion head with a fixed sequence embedding.
    sequence = torch.nn.functional.normalize(torch.randn(1, 16), dim=-1)
    masked_items = masked.item_tokens()
    base = tiny_model().eval()
    for model, expect_equal in ((masked, True),):
        scores_a = model.fusion(sequence, masked_items)[0, 1:6]
        scores_b = base.fusion(sequence, base.item_tokens())[0, 1:6]
        assert torch.allclose(scores_a, scores_b) == expect_equal
    assert not torch.allclose(before, after)

    original = tiny_model(mask_missing_modalities=False).eval()
    reference = tiny_model(mask_missing_modalities=False).eval()
    with torch.no_grad():
        original.missrec.adaptors["image"].bias.add_(5.0)
        shifted = original.fusion(sequence, original.item_tokens())[0, 1:6]
        unshifted = reference.fusion(sequence, reference.item_tokens())[0, 1:6]
    assert not torch.allclose(shifted, unshifted), "the original's behaviour feeds the bias in"


def test_score_items_block_equals_the_full_score_matrix():
    model = tiny_model(item_fusion="dynamic_instance").eval()
    with torch.no_grad():
        model.fusion.fusion_factor.uniform_(-2, 2)
        sequence = model.encode(histories()).sequence_embedding
        items = model.item_tokens()
        full = model.fusion(sequence, items)
        block = model.score_items(sequence, items, 5, 12)
    torch.testing.assert_close(block, full[:, 5:12])


@pytest.mark.parametrize("fusion", ["static", "dynamic_shared"])
def test_inductive_and_static_modes_give_finite_losses(fusion):
    model = tiny_model(use_item_ids=False, item_fusion=fusion)
    output = model(histories(), labels=torch.tensor([1, 2, 3, 4]))
    assert torch.isfinite(output.loss) and output.logits.shape == (4, NUM_ITEMS + 1)


# ------------------------------------------------------------------------------------------------ training
def test_gradient_reaches_every_trainable_parameter_and_padding_row_stays_fixed():
    model = tiny_model(hidden_dropout_prob=0.0, attention_dropout_prob=0.0)
    model.train()
    padding_row = model.missrec.item_embeddings.weight[0].detach().clone()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(3):
        output = model(histories(), labels=torch.tensor([4, 8, 15, 16]))
        output.loss.backward()
        missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, f"no gradient for {missing}"
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(model.missrec.item_embeddings.weight[0], padding_row)
    assert torch.count_nonzero(padding_row) == 0


def test_loss_is_cross_entropy_plus_weighted_regulariser():
    model = tiny_model().eval()
    labels = torch.tensor([4, 8, 15, 16])
    output = model(histories(), labels=labels)
    expected = torch.nn.functional.cross_entropy(output.logits, labels)
    expected = expected + model.config.interest_reg_weight * output.interest_regularization
    torch.testing.assert_close(output.loss, expected)
    assert output.interest_regularization > 0


def test_frozen_transfer_leaves_backbone_untouched():
    model = tiny_model()
    model.freeze_backbone_for_transfer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(histories(), labels=torch.tensor([4, 8, 15, 16])).loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param)
        frozen = any(part in name for part in ("encoder", "decoder", "position_embeddings"))
        assert changed != frozen, name


# -------------------------------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"features\['text'\] has shape \(30, 9\), expected \(30, 8\)"):
        model.load_item_features({"text": torch.zeros(NUM_ITEMS, 9), "image": torch.zeros(NUM_ITEMS, 6)})
    with pytest.raises(ValueError, match=r"features\['image'\] has shape \(29, 6\), expected \(30, 6\)"):
        model.load_item_features({"text": torch.zeros(NUM_ITEMS, 8), "image": torch.zeros(NUM_ITEMS - 1, 6)})
    nan = torch.zeros(NUM_ITEMS, 8)
    nan[3, 1] = float("nan")
    with pytest.raises(ValueError, match="row 3 holds NaN"):
        model.load_item_features({"text": nan, "image": torch.zeros(NUM_ITEMS, 6)})
    with pytest.raises(ValueError, match=r"item id 31, expected ids in 0..30"):
        model(torch.tensor([[1, 31]]))
    with pytest.raises(ValueError, match=r"item id -2"):
        model(torch.tensor([[1, -2]]))
    with pytest.raises(ValueError, match="row 1 is an empty history"):
        model(torch.tensor([[1, 2], [0, 0]]))
    with pytest.raises(ValueError, match="at most max_seq_length=12"):
        model(torch.ones(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be item ids in 1..30"):
        model(torch.tensor([[1, 2]]), labels=torch.tensor([0]))


# ------------------------------------------------------------------------------------------- save / reload
def assert_identical(a: torch.nn.Module, b: torch.nn.Module) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert state_a[name].dtype == state_b[name].dtype, name
        assert torch.equal(state_a[name], state_b[name]), name


def test_save_and_reload_is_bit_identical(tmp_path):
    model = tiny_model().eval()
    with torch.no_grad():
        model.fusion.fusion_factor.fill_(0.3)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = MissrecForSequentialRecommendation.from_pretrained(tmp_path).eval()
    assert_identical(model, reloaded)
    assert reloaded.config.num_interests == model.config.num_interests
    with torch.no_grad():
        torch.testing.assert_close(reloaded(histories()).logits, model(histories()).logits, rtol=0, atol=0)


def test_backbone_alone_saves_and_reloads(tmp_path):
    model = tiny_model()
    model.missrec.save_pretrained(tmp_path)
    backbone = MissrecModel.from_pretrained(tmp_path)
    assert_identical(model.missrec, backbone)


def test_auto_classes_and_trust_remote_code_rebuild_the_recommender(tmp_path):
    model = tiny_model().eval()
    model.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text()
    assert '"auto_map"' in config and "MissrecForSequentialRecommendation" in config
    for name in ("modeling_missrec.py", "configuration_missrec.py", "interests.py", "atomic.py"):
        assert (tmp_path / name).exists(), f"{name} not copied for trust_remote_code"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MissrecConfig)
    direct = AutoModel.from_pretrained(tmp_path)
    assert isinstance(direct, MissrecForSequentialRecommendation)
    with torch.no_grad():
        expected = {"input_ids": histories(), "logits": model(histories()).logits}
    torch.save(expected, tmp_path / "expected.pt")
    # A fresh interpreter in which the package cannot be imported: only the copied code can build the model.
    script = f"""
import sys
sys.modules["modeling_missrec"] = None
import torch
from transformers import AutoModel
from safetensors.torch import load_file
model = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
assert type(model).__name__ == "MissrecForSequentialRecommendation", type(model)
assert "transformers_modules" in type(model).__module__, type(model).__module__
saved = load_file({str(tmp_path / "model.safetensors")!r})
state = model.state_dict()
assert saved.keys() == state.keys(), saved.keys() ^ state.keys()
assert all(torch.equal(saved[k], state[k]) for k in saved), [k for k in saved if not torch.equal(saved[k], state[k])]
expected = torch.load({str(tmp_path / "expected.pt")!r})
with torch.no_grad():
    logits = model(expected["input_ids"]).logits
assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
top = model.recommend(expected["input_ids"], k=5)  # top-k, not only logits, for remote-code users
assert torch.equal(top.item_ids, expected["logits"].topk(5).indices), (top.item_ids, expected["logits"].topk(5))
print("remote-code-ok")
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "remote-code-ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("history_prior", [False, True])
def test_recommend_is_the_top_k_of_the_logits_without_the_score_matrix(history_prior):
    model = tiny_model(history_prior=history_prior).eval()
    if history_prior:  # weights of both signs, so that every term moves the order
        with torch.no_grad():
            model.history_prior.weight.copy_(torch.tensor([0.3, -0.2, -0.5, 0.1])[: model.history_prior.weight.numel()])
    input_ids = histories()
    with torch.no_grad():
        logits = model(input_ids).logits
    top = model.recommend(input_ids, k=7, block_size=4)
    assert torch.equal(top.item_ids, logits.topk(7).indices)
    torch.testing.assert_close(top.scores / model.config.temperature, logits.topk(7).values)
    excluded = model.recommend(input_ids, k=NUM_ITEMS, exclude_history=True, block_size=5)
    for row, history in enumerate(input_ids.tolist()):
        kept = [i for i in excluded.item_ids[row].tolist() if i]
        assert not set(kept) & set(history) and len(kept) == NUM_ITEMS - len(set(history) - {0})
        masked = logits[row].clone()
        masked[[i for i in history if i]] = float("-inf")
        assert kept == masked.topk(len(kept)).indices.tolist()


def test_static_fusion_has_no_trainable_factor_so_every_trainable_parameter_gets_a_gradient():
    model = tiny_model(item_fusion="static", hidden_dropout_prob=0.0, attention_dropout_prob=0.0)
    assert not model.fusion.fusion_factor.requires_grad
    model(histories(), labels=torch.tensor([4, 8, 15, 16])).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_summed_regulariser_counts_the_whole_optimiser_batch():
    model = tiny_model().eval()
    labels = torch.tensor([4, 8, 15, 16])
    base = model(histories(), labels=labels)
    scaled = model(histories(), labels=labels, regularizer_scale=4)  # e.g. two processes x two accumulation steps
    expected = base.loss + 3 * model.config.interest_reg_weight * base.interest_regularization
    torch.testing.assert_close(scaled.loss, expected)


# ------------------------------------------------------------------------------------------ last-position decoding
def record_last_layer_widths(decoder) -> list[int]:
    """The number of positions the last decoder layer outputs, per forward."""
    widths = []
    decoder.layers[-1].register_forward_hook(lambda module, inputs, output: widths.append(output[0].shape[1]))
    return widths


def random_histories(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded histories of the given lengths and a label each, drawn with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.randint(1, NUM_ITEMS + 1, (length,), generator=generator)
    return input_ids, torch.randint(1, NUM_ITEMS + 1, (len(lengths),), generator=generator)


def assert_same_loss_logits_and_gradients(fast: tuple, reference: tuple) -> None:
    torch.testing.assert_close(fast[0], reference[0])
    torch.testing.assert_close(fast[1], reference[1])
    assert fast[2].keys() == reference[2].keys()
    for name, gradient in fast[2].items():
        torch.testing.assert_close(gradient, reference[2][name], msg=name)


def _loss_logits_and_gradients(model, input_ids, labels):
    model.zero_grad()
    output = model(input_ids, labels=labels)
    output.loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output.loss.detach(), output.logits.detach(), gradients


@settings(max_examples=20, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=5),
    num_decoder_layers=st.integers(1, 2),
    use_item_ids=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_last_position_decoding_gives_the_reference_loss_scores_and_gradients(
    lengths, num_decoder_layers, use_item_ids, seed
):
    model = tiny_model(num_decoder_layers=num_decoder_layers, use_item_ids=use_item_ids).eval()  # no dropout
    input_ids, labels = random_histories(lengths, seed)
    assert model.config.last_position_only  # the default
    widths = record_last_layer_widths(model.missrec.decoder)
    fast = _loss_logits_and_gradients(model, input_ids, labels)
    model.config.last_position_only = False
    reference = _loss_logits_and_gradients(model, input_ids, labels)
    assert widths == [1, max(lengths)]  # the fast path computed one row per history, the reference all
    assert_same_loss_logits_and_gradients(fast, reference)


def test_backbone_last_position_only_returns_one_state_per_history():
    model = tiny_model().eval()
    input_ids = histories()
    tokens, present = model._catalog_raw_tokens()[:, input_ids], model._present()[:, input_ids]
    full = model.missrec(input_ids, item_tokens=tokens, modality_mask=present)
    last = model.missrec(input_ids, item_tokens=tokens, modality_mask=present, last_position_only=True)
    assert full.last_hidden_state.shape == (4, 5, 16) and last.last_hidden_state.shape == (4, 1, 16)
    final = torch.tensor([2, 4, 0, 2])
    torch.testing.assert_close(last.last_hidden_state[:, 0], full.last_hidden_state[torch.arange(4), final])
    torch.testing.assert_close(last.sequence_embedding, full.sequence_embedding)


def original_regulariser(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The original's R, written the way its code computes it: each history padded to max_seq_length, its
    interest set the sorted unique ids of every position's text and image interests *including* 0 (padding),
    sets right-padded with 0 across the batch, the encoder run over them (id 0 masked as a key), then
    p_b = (n_b / Q) x the sum over all Q slots and R = sum_b ||p_b||^2 / H."""
    backbone = model.missrec
    tokenizer = backbone.interest_tokenizer
    full = torch.nn.functional.pad(input_ids, (0, model.config.max_seq_length - input_ids.shape[1]))
    rows = []
    for history in full:
        ids = torch.cat([table[history] for table in tokenizer.item_interest_ids])
        rows.append(sorted(set(ids.tolist())))
    width = max(len(r) for r in rows)
    sets = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    states = backbone.encoder(tokenizer.centroids[sets], sets != 0).last_hidden_state
    count = (sets != 0).sum(1, keepdim=True).float()
    pooled = count / width * states.sum(1)
    return (pooled.pow(2).sum(-1) / states.shape[-1]).sum()


@pytest.mark.parametrize("mask_missing", [False, True])
@pytest.mark.parametrize("full_length", [False, True], ids=["short", "full-length"])
def test_original_regulariser_pooling_is_exactly_the_originals(mask_missing, full_length):
    model = tiny_model(interest_reg_pooling="original", mask_missing_modalities=mask_missing).eval()
    input_ids = histories()
    if full_length:  # a history of max_seq_length items, one without an image (ids 1..5): no padding id
        input_ids = torch.tensor([[2, *range(10, 21)], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]])
    with torch.no_grad():
        got = model(input_ids).interest_regularization
        expected = original_regulariser(model, input_ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # and it is far from the default pooling at the same gamma
        mean = tiny_model(mask_missing_modalities=mask_missing).eval()(input_ids).interest_regularization
    assert float(got) > 2 * float(mean)


def test_a_broken_saved_model_is_refused_with_one_line_naming_what_is_wrong(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    tiny_model().save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))

    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(ValueError, match=r"config.json disagrees with model.safetensors \(intermediate_size=48\)"):
        MissrecForSequentialRecommendation.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))

    partial = {k: v for k, v in weights.items() if k != "fusion.fusion_factor"}
    save_file(partial, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 tensor\(s\) of this configuration \(\['fusion.fusion_factor'\]\)"):
        MissrecForSequentialRecommendation.from_pretrained(tmp_path)

    poisoned = dict(weights)
    poisoned["missrec.position_embeddings.weight"] = poisoned["missrec.position_embeddings.weight"].clone()
    poisoned["missrec.position_embeddings.weight"][3, 1] = float("nan")
    save_file(poisoned, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="tensor missrec.position_embeddings.weight holds NaN or infinite values"):
        MissrecForSequentialRecommendation.from_pretrained(tmp_path)

    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model, info = MissrecForSequentialRecommendation.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and isinstance(model, MissrecForSequentialRecommendation)


# ------------------------------------------------------------------- HF behaviour: attention, outputs, checkpointing
def test_eager_and_sdpa_attention_give_the_same_logits(tmp_path):
    model = tiny_model().eval()
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        sdpa = model(histories()).logits
        model.set_attn_implementation("eager")
        eager = model(histories()).logits
    torch.testing.assert_close(eager, sdpa, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = MissrecForSequentialRecommendation.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert loaded.missrec.encoder.layers[0].self_attn.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(loaded(histories()).logits, eager)


def test_output_attentions_and_hidden_states_return_what_they_say():
    model = tiny_model().eval()
    model.config.last_position_only = False  # every position, so that the decoder's weights cover the whole history
    input_ids = histories()
    with torch.no_grad():
        plain = model(input_ids)
        out = model(input_ids, output_attentions=True, output_hidden_states=True)
    torch.testing.assert_close(out.logits, plain.logits, rtol=1e-5, atol=1e-5)  # eager weights, same scores
    assert plain.decoder_attentions is None and plain.encoder_hidden_states is None
    config, (batch, length) = model.config, input_ids.shape
    assert len(out.encoder_attentions) == config.num_encoder_layers
    assert len(out.decoder_attentions) == len(out.cross_attentions) == config.num_decoder_layers
    assert len(out.decoder_hidden_states) == config.num_decoder_layers + 1
    assert len(out.encoder_hidden_states) == config.num_encoder_layers + 1
    for weights in out.decoder_attentions:
        assert weights.shape == (batch, config.num_attention_heads, length, length)
        torch.testing.assert_close(weights.sum(-1), torch.ones(batch, config.num_attention_heads, length))
        assert (weights.transpose(1, 3)[input_ids == 0] == 0).all()  # no weight on a padded key
    interests = out.cross_attentions[0].shape[-1]
    assert out.encoder_attentions[0].shape == (batch, config.num_attention_heads, interests, interests)
    assert out.decoder_hidden_states[0].shape == (batch, length, config.hidden_size)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    labels = torch.tensor([4, 8, 15, 16])
    grads = []
    for checkpointing in (False, True):
        model = tiny_model(hidden_dropout_prob=0.0, attention_dropout_prob=0.0)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            assert model.missrec.decoder.layers[0].gradient_checkpointing
        loss = model(histories(), labels=labels).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grad_a), (loss_b, grad_b) = grads
    torch.testing.assert_close(loss_a, loss_b)
    assert grad_a.keys() == grad_b.keys()
    for name in grad_a:
        torch.testing.assert_close(grad_a[name], grad_b[name], rtol=1e-5, atol=1e-6)


def test_left_padded_histories_and_unknown_keywords_are_refused():
    model = tiny_model().eval()
    with pytest.raises(ValueError, match="row 1 has padding before an item"):
        model(torch.tensor([[3, 7, 9], [0, 2, 3]]))
    with pytest.raises(TypeError, match="labelz"):
        model(histories(), labelz=torch.tensor([1, 2, 3, 4]))


def test_behaviour_is_asked_for_in_the_call_not_set_on_the_model():
    model = tiny_model().eval()
    bad = torch.tensor([[3, NUM_ITEMS + 5]])
    with pytest.raises(ValueError, match="item id"):
        model(bad)
    with pytest.raises(ValueError, match="labels must be item ids"):
        model(histories(), labels=torch.tensor([0, 1, 2, 3]))
    checked = model(histories(), labels=torch.tensor([4, 8, 15, 16]))
    unchecked = model(histories(), labels=torch.tensor([4, 8, 15, 16]), check_inputs=False)
    torch.testing.assert_close(checked.loss, unchecked.loss, rtol=0, atol=0)
    assert not any(hasattr(model, name) for name in ("check_inputs", "last_position_only", "summed_loss_scale"))


# ------------------------------------------------------------------------------------------ interest vocabulary
def record_first_projection_rows(model) -> list[tuple[int, ...]]:
    """The shape of the input of the encoder's first query projection, per forward."""
    shapes = []
    projection = model.missrec.encoder.layers[0].self_attn.q_proj
    projection.register_forward_hook(lambda module, inputs, output: shapes.append(tuple(inputs[0].shape)))
    return shapes


@settings(max_examples=10, deadline=None)
@given(
    lengths=st.lists(st.integers(4, 12), min_size=8, max_size=12),
    pooling=st.sampled_from(["mean", "original"]),
    num_encoder_layers=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_projecting_each_centroid_once_gives_the_per_slot_loss_scores_and_gradients(
    lengths, pooling, num_encoder_layers, seed
):
    # The encoder's input is centroid rows, so its first layer may project the K + 1 centroids and gather
    # instead of projecting every slot of every set: the same values up to float rounding.
    model = tiny_model(interest_reg_pooling=pooling, num_encoder_layers=num_encoder_layers).eval()
    input_ids, labels = random_histories(lengths, seed)
    tokenizer = model.missrec.interest_tokenizer
    vocabulary_rows = tokenizer.centroids.shape[0]
    assume(tokenizer(input_ids)[0].numel() > vocabulary_rows)  # more slots than centroids: the fast path's case
    shapes = record_first_projection_rows(model)
    fast = _loss_logits_and_gradients(model, input_ids, labels)
    tokenizer.vocabulary = lambda ids: None  # every slot projected: the reference
    reference = _loss_logits_and_gradients(model, input_ids, labels)
    assert shapes[0] == (vocabulary_rows, 16) and len(shapes[1]) == 3  # the centroids, then the [B, S] slots
    assert_same_loss_logits_and_gradients(fast, reference)


def test_a_batch_with_fewer_slots_than_centroids_projects_its_slots():
    model = tiny_model().eval()
    shapes = record_first_projection_rows(model)
    with torch.no_grad():
        model(torch.tensor([[3, 7, 9]]))
    assert len(shapes[0]) == 3  # [1, S, H]: one short history does not pay for the whole vocabulary


def test_lora_in_training_projects_every_slot_and_in_evaluation_each_centroid():
    # peft's LoRA layers may drop their input per slot while training; sharing one draw per centroid would
    # change that, so the vocabulary path waits for evaluation there.
    from modeling_missrec.training_args import ModelArguments
    from modeling_missrec.transfer import wrap_with_lora

    model = tiny_model()
    wrapped = wrap_with_lora(model, ModelArguments(model_name_or_path="unused", finetune_method="lora"))
    input_ids = torch.randint(1, NUM_ITEMS + 1, (16, 10), generator=torch.Generator().manual_seed(0))
    rows = model.missrec.interest_tokenizer.centroids.shape[0]
    assert model.missrec.interest_tokenizer(input_ids)[0].numel() > rows
    shapes = []
    projection = model.missrec.encoder.layers[0].self_attn.q_proj.base_layer
    projection.register_forward_hook(lambda module, inputs, output: shapes.append(tuple(inputs[0].shape)))
    wrapped.train()
    wrapped(input_ids=input_ids)
    wrapped.eval()
    with torch.no_grad():
        wrapped(input_ids=input_ids)
    assert len(shapes[0]) == 3 and shapes[1] == (rows, 16)


def test_a_step_through_the_centroid_projections_repeats_bit_for_bit():
    # A resumed run must repeat an uninterrupted one: the gathered projections' backward has to sum in a fixed
    # order (advanced indexing's backward does not on the CPU once a batch is this large).
    model = tiny_model(hidden_dropout_prob=0.0, attention_dropout_prob=0.0)
    input_ids, labels = random_histories([10] * 512, seed=0)
    shapes = record_first_projection_rows(model)
    first, second = (_loss_logits_and_gradients(model, input_ids, labels)[2] for _ in range(2))
    assert len(shapes[0]) == 2  # the vocabulary path was taken
    for name, gradient in first.items():
        assert torch.equal(gradient, second[name]), name
