import pytest
import torch

from swd.config import ModelConfig
from swd.models import Condition, build_denoiser, load_denoiser, save_denoiser
from swd.schedule import ScaleSchedule


@pytest.fixture
def model(tiny_model_config):
    torch.manual_seed(0)
    return build_denoiser(tiny_model_config).eval()


@pytest.mark.parametrize("size", [16, 20, 32, (16, 24)])
def test_velocity_shape_at_every_size(model, size):
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(3, 1, h, w)
    v = model(x, torch.rand(3), torch.tensor([0, 1, 10]))
    assert v.shape == x.shape


def test_timestep_convention_is_sigma_times_1000(model):
    captured = {}

    def hook(_module, inputs, _output):
        captured["t"] = inputs[0]

    handle = model.transformer.time_text_embed.register_forward_hook(hook)
    model(torch.randn(2, 1, 16, 16), torch.tensor([0.25, 1.0]), torch.tensor([0, 1]))
    handle.remove()
    assert torch.allclose(captured["t"], torch.tensor([250.0, 1000.0]))


def test_denoise_is_x_minus_sigma_v(model):
    x, sigma, labels = torch.randn(2, 1, 16, 16), torch.tensor([0.3, 0.9]), torch.tensor([2, 3])
    v = model(x, sigma, labels)
    assert torch.allclose(model.denoise(x, sigma, labels), x - sigma.view(-1, 1, 1, 1) * v, atol=1e-6)


def test_block_features_and_hooks_removed(model):
    x = torch.randn(2, 1, 16, 16)
    with model.block_features([0, 1]) as feats:
        model(x, torch.rand(2), torch.tensor([0, 1]))
    assert feats[0].shape == (2, 64, model.transformer.inner_dim)
    assert feats[1].shape == (2, 64, model.transformer.inner_dim)
    assert all(len(b._forward_hooks) == 0 for b in model.blocks)


def test_hooks_removed_on_error(model):
    with pytest.raises(RuntimeError, match="boom"):
        with model.block_features([0]):
            raise RuntimeError("boom")
    assert all(len(b._forward_hooks) == 0 for b in model.blocks)
    with pytest.raises(ValueError, match="out of range"):
        with model.block_features([5]):
            pass


def test_size_checks(model):
    with pytest.raises(ValueError, match="not divisible by the patch size 2"):
        model.check_size(17)
    with pytest.raises(ValueError, match="exceeds what the position embedding supports"):
        model.check_size(64)
    with pytest.raises(ValueError, match="schedule stage 1"):
        model.check_schedule(ScaleSchedule([16, 33], [1.0, 0.5, 0.0]))


def test_class_labels_validated(model):
    with pytest.raises(ValueError, match="labels must lie in 0..10"):
        model.condition(torch.tensor([11]))


def test_null_condition_and_drop(model):
    null = model.null_condition(3)
    assert isinstance(null, Condition) and len(null) == 3
    dropped = model.conditioner.drop(torch.tensor([1, 2, 3]), torch.tensor([True, False, True]))
    assert dropped.tolist() == [10, 2, 10]


def test_save_load_roundtrip(model, tiny_model_config, tmp_path):
    save_denoiser(model, tmp_path / "m", tiny_model_config)
    loaded, cfg = load_denoiser(tmp_path / "m")
    assert cfg == tiny_model_config
    x = torch.randn(2, 1, 16, 16)
    args = (x, torch.tensor([0.5, 0.7]), torch.tensor([1, 10]))
    assert torch.allclose(model(*args), loaded(*args))


def test_load_missing_directory_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a model directory written by swd"):
        load_denoiser(tmp_path)


def test_text_conditioning_from_local_encoder(tmp_path):
    """Any transformers encoder from a local directory (the path a hub id would take after download)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from swd.models.conditioning import resolve_text_encoder

    tokenizer = AutoTokenizer.from_pretrained(resolve_text_encoder("minilm"))
    encoder = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    encoder.save_pretrained(tmp_path / "enc")
    tokenizer.save_pretrained(tmp_path / "enc")
    cfg = ModelConfig(conditioning="text", text_encoder=str(tmp_path / "enc"), in_channels=3, num_layers=1,
                      attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                      pooled_projection_dim=16, max_text_length=8)
    model = build_denoiser(cfg).eval()
    cond = model.condition(["a red shoe", "a bag"])
    assert cond.tokens.shape == (2, 8, 16) and cond.pooled.shape == (2, 16)
    assert not torch.allclose(cond.pooled[0], cond.pooled[1])
    v = model(torch.randn(2, 3, 16, 16), torch.rand(2), ["a red shoe", ""])
    assert v.shape == (2, 3, 16, 16)
    # only the projections are saved; the encoder comes from its own path
    save_denoiser(model, tmp_path / "m", cfg)
    loaded, _ = load_denoiser(tmp_path / "m")
    assert torch.allclose(loaded.condition(["a bag"]).pooled, model.condition(["a bag"]).pooled)
    assert not any(k.startswith("encoder.") for k in model.conditioner.trainable_state_dict())
