"""Local weights: checkpoints round-trip, towers load by prefix, errors list keys, no unpickling."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from gram.loss import GramLoss
from gram.model import gram_tiny
from gram.weights import load_checkpoint, load_weights, read_state_dict, save_checkpoint


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_round_trip_rebuilds_the_same_model(tiny, tiny_batch, tmp_path, suffix):
    loss = GramLoss(temperature=0.05)
    path = save_checkpoint(tmp_path / f"ckpt{suffix}", tiny, loss, metadata={"step": 7})
    assert not list(tmp_path.glob("*.tmp"))
    model, loss_state, meta = load_checkpoint(path)
    assert meta["step"] == "7"
    assert model.cfg == tiny.cfg
    fresh = GramLoss()
    fresh.load_state_dict(loss_state)
    torch.testing.assert_close(fresh.temperature, torch.tensor(0.05))
    tiny.eval()
    model.eval()
    with torch.no_grad():
        a, b = tiny(tiny_batch), model(tiny_batch)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_checkpoint_of_a_ddp_style_wrapper(tiny, tmp_path):
    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    path = save_checkpoint(tmp_path / "w.safetensors", Wrapper(tiny))
    assert set(read_state_dict(path)) == set(tiny.state_dict())


def test_one_tower_loads_from_a_whole_checkpoint(tiny, tmp_path):
    path = save_checkpoint(tmp_path / "c.safetensors", tiny)
    torch.manual_seed(1)
    other = gram_tiny()
    load_weights(other.encoder("video"), path, prefix="encoders.video.")
    for k, v in other.encoder("video").state_dict().items():
        torch.testing.assert_close(v, tiny.encoder("video").state_dict()[k])
    assert not torch.equal(other.projections["video"].weight, tiny.projections["video"].weight)


def test_plain_state_dict_files(tiny, tmp_path):
    state = tiny.encoder("audio").state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "a.safetensors"))
    torch.save(state, tmp_path / "a.pt")
    torch.save({"state_dict": state}, tmp_path / "b.pth")
    for name in ("a.safetensors", "a.pt", "b.pth"):
        report = load_weights(gram_tiny().encoder("audio"), tmp_path / name)
        assert report.missing == []
        assert report.unexpected == []
    with pytest.raises(ValueError, match="not a gram checkpoint"):
        load_checkpoint(tmp_path / "a.safetensors")


def test_mismatch_errors_list_keys_and_non_strict_reports_them(tiny, tmp_path):
    state = dict(tiny.encoder("video").state_dict())
    state.pop("image.norm.weight")
    state["image.head.weight"] = torch.zeros(10, 64)
    state["image.pos_embed"] = torch.zeros(1, 5, 64)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "v.safetensors"))
    with pytest.raises(ValueError, match="cannot load") as err:
        load_weights(tiny.encoder("video"), tmp_path / "v.safetensors")
    msg = str(err.value)
    assert "missing from the file (1): image.norm.weight" in msg
    assert "not in the model (1): image.head.weight" in msg
    assert "image.pos_embed: file (1, 5, 64) vs model (1, 17, 64)" in msg
    state["image.pos_embed"] = tiny.encoder("video").state_dict()["image.pos_embed"]
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "v.safetensors"))
    report = load_weights(tiny.encoder("video"), tmp_path / "v.safetensors", strict=False)
    assert report.missing == ["image.norm.weight"]
    assert report.unexpected == ["image.head.weight"]


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickles_with_code_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with path.open("wb") as f:
        pickle.dump({"weight": _Payload()}, f, protocol=2)
    with pytest.raises(ValueError, match="weights_only"):
        read_state_dict(path)
    assert "this must never run" not in capsys.readouterr().out


def test_bad_paths_and_formats(tmp_path):
    with pytest.raises(FileNotFoundError, match="local"):
        read_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        read_state_dict(tmp_path / "w.onnx")
    torch.save({"a": torch.zeros(1)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="prefix"):
        load_weights(torch.nn.Linear(1, 1), tmp_path / "x.pt", prefix="encoders.text.")
