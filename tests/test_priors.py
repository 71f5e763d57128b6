import pytest
import torch

from fastem_ext.models import unet as unet_module
from fastem_ext.models.unet import UNet, load_guided_diffusion_checkpoint
from fastem_ext.priors import load_prior

TINY = {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
        "attention_resolutions": "16", "num_head_channels": 16, "learn_sigma": True}


def test_checkpoint_is_recognised_by_its_keys(tmp_path, monkeypatch):
    monkeypatch.setattr(unet_module, "KNOWN_CONFIGS", {"other": {**TINY, "num_channels": 64},
                                                       "tiny": TINY})
    model = UNet.from_config(**TINY)
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    loaded = load_guided_diffusion_checkpoint(tmp_path / "tiny.pt")
    assert loaded.model_channels == 32
    prior = load_prior(str(tmp_path / "tiny.pt"), torch.device("cpu"))
    assert prior.size_multiple == 2
    assert not any(p.requires_grad for p in prior.model.parameters())


def test_unknown_checkpoint_is_a_clear_error(tmp_path):
    torch.save({"foo": torch.zeros(3)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="not a known guided-diffusion checkpoint"):
        load_prior(str(tmp_path / "bad.pt"), torch.device("cpu"))


@pytest.mark.parametrize("content", [b"", b"hello", b"\x80\x02}q\x00."])
def test_an_empty_or_foreign_pt_file_names_the_file_and_the_error(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_prior(str(path), torch.device("cpu"))
    message = str(info.value)
    assert "model.pt" in message and not message.rstrip().endswith(":"), message
    assert "()" not in message and ": )" not in message, message


def test_missing_named_checkpoint_says_what_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTEM_WEIGHTS", str(tmp_path))
    with pytest.raises(ValueError, match="256x256_diffusion_uncond.pt") as err:
        load_prior("imagenet", torch.device("cpu"))
    assert str(tmp_path) in str(err.value) and "never downloads" in str(err.value)


def test_a_module_is_used_as_it_is():
    model = UNet.from_config(**TINY)
    prior = load_prior(model, torch.device("cpu"))
    assert prior.model is model and prior.size_multiple == 2


def test_natural_weights_file_is_a_prior(tmp_path):
    from fastem_ext.models.natural_prior import build_natural_prior, save_natural_prior

    path = tmp_path / "mine.safetensors"
    save_natural_prior(build_natural_prior(), path)
    prior = load_prior(str(path), torch.device("cpu"))
    assert prior.name == "mine" and prior.size_multiple == 16
    assert prior.model.prediction == "v"
    with pytest.raises(ValueError, match="missing.safetensors"):
        load_prior(str(tmp_path / "missing.safetensors"), torch.device("cpu"))
