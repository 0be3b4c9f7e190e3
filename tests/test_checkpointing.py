"""Per-block gradient checkpointing with two LoRA adapters switched between forwards."""

import pytest
import torch
from diffusers import SD3Transformer2DModel
from peft import LoraConfig

from swd.distill.adapters import adapter_state, lora_layers, use_adapter
from swd.distill.grad_checkpointing import enable_block_checkpointing


def two_adapter_transformer() -> SD3Transformer2DModel:
    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=2, out_channels=2, num_layers=3, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
                                  pos_embed_max_size=8)
    model.requires_grad_(False)
    for name in ("student", "critic"):
        model.add_adapter(LoraConfig(r=2, target_modules=["to_q", "to_v", "ff.net.2"], init_lora_weights=False), adapter_name=name)
    return model


def student_then_critic_grads(model: SD3Transformer2DModel) -> dict[str, torch.Tensor]:
    """The generator's pattern: the student's output goes through the critic (frozen) into the loss."""
    torch.manual_seed(1)
    x, ctx, pooled = torch.randn(2, 2, 8, 8), torch.randn(2, 3, 16), torch.randn(2, 16)
    t = torch.tensor([500.0, 200.0])
    student = [p for n, p in model.named_parameters() if ".student." in n]
    for p in student:
        p.requires_grad_(True)
        p.grad = None
    use_adapter(model, "student")
    y = model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t, return_dict=False)[0]
    use_adapter(model, "critic")
    z = model(hidden_states=y, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t, return_dict=False)[0]
    use_adapter(model, None)  # the backward runs with yet another adapter state
    (z**2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if ".student." in n}
    assert all(g.abs().sum() > 0 for g in grads.values())
    return grads


def test_block_checkpointing_recomputes_each_block_with_its_own_adapter():
    plain = student_then_critic_grads(two_adapter_transformer())
    model = two_adapter_transformer()
    enable_block_checkpointing(model)
    for n, p in model.named_parameters():
        p.requires_grad_(".student." in n)
    checkpointed = student_then_critic_grads(model)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    # the adapter state and the trainable flags are as the backward found them
    assert adapter_state(lora_layers(model.transformer_blocks[0])) == (True, ("critic",))
    assert all(p.requires_grad == (".student." in n) for n, p in model.named_parameters() if "lora_" in n)


def test_plain_block_checkpointing_would_recompute_with_the_wrong_adapter():
    """Why the adapter-aware function exists: diffusers' default recomputes under the adapter active
    at backward time, which torch detects (or which gives other gradients)."""
    plain = student_then_critic_grads(two_adapter_transformer())
    model = two_adapter_transformer()
    model.enable_gradient_checkpointing()
    try:
        wrong = student_then_critic_grads(model)
    except torch.utils.checkpoint.CheckpointError:
        return
    assert any(not torch.allclose(wrong[n], plain[n], atol=1e-6) for n in plain)
