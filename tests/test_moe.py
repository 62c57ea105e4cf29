"""The mixture of multi-scale conv experts on its own: routing, dispatch, auxiliary loss."""

import inspect
import re
from pathlib import Path

import pytest
import torch

from convlora import ConvLoraConfig, apply_conv_lora
from convlora.tuner.moe import ConvExpertMixture, cv_squared, moe_aux_loss, reference_expert

CONCEPT_PAGE = Path(__file__).resolve().parents[1] / "docs" / "concepts" / "conv-lora.md"


def random_mixture(**kwargs) -> ConvExpertMixture:
    moe = ConvExpertMixture(**{"channels": 4, "scales": [1, 2, 3, 0.5], **kwargs})
    moe.reset_parameters(init_gate="random")
    torch.nn.init.normal_(moe.expert_bias, std=0.1)
    return moe


def per_sample_reference(moe: ConvExpertMixture, z: torch.Tensor) -> torch.Tensor:
    """The chosen experts of each sample, one sample at a time, combined per the gate: the slow, obvious way."""
    top, combine, _ = moe.route(z)
    outputs = []
    for b in range(z.shape[0]):
        mixed = torch.zeros_like(z[b : b + 1])
        for slot in range(moe.top_k):
            e = int(top[b, slot])
            weight, bias = moe.expert_weight[e], moe.expert_bias[e]
            expert = reference_expert(z[b : b + 1], weight, bias, moe.scales[e], moe.interpolation)
            mixed = mixed + expert * combine[b, slot]
        outputs.append(mixed)
    return torch.cat(outputs)


@pytest.mark.parametrize("kwargs", [{}, {"top_k": 2, "weighted_combine": True}, {"depthwise": True, "top_k": 3}])
def test_batched_dispatch_equals_a_per_sample_reference(kwargs):
    moe = random_mixture(**kwargs).eval()
    z = torch.randn(6, 5, 7, 4)
    assert torch.allclose(moe(z), per_sample_reference(moe, z), atol=1e-6)


def test_the_grid_comes_from_the_tensor_shape():
    moe = random_mixture().eval()
    for shape in [(2, 3, 9, 4), (1, 14, 14, 4), (3, 1, 1, 4)]:
        assert moe(torch.randn(shape)).shape == shape


def test_routing_is_deterministic_at_inference():
    moe = random_mixture().eval()
    z = torch.randn(16, 4, 4, 4)
    first = moe(z)
    counts = moe.last_expert_counts.clone()
    assert torch.equal(moe(z), first)
    assert torch.equal(moe.last_expert_counts, counts)
    assert (counts > 0).sum() > 1, "a random gate should spread samples over several experts"


def test_training_noise_changes_routing_between_calls():
    moe = random_mixture(scales=[1, 1, 1, 1]).train()
    moe.gate_weight.data.zero_()
    moe.noise_weight.data.fill_(1.0)
    z = torch.randn(64, 2, 2, 4)
    moe(z)
    first = moe.last_expert_counts.clone()
    moe(z)
    assert not torch.equal(first, moe.last_expert_counts)


def test_a_zero_gate_sends_every_sample_to_the_first_expert_at_inference():
    moe = ConvExpertMixture(channels=3, scales=[1, 2, 3]).eval()
    moe(torch.randn(5, 4, 4, 3))
    assert moe.last_expert_counts.tolist() == [5, 0, 0]


def test_inputs_that_are_not_channels_last_grids_are_refused():
    moe = ConvExpertMixture(channels=3, scales=[1])
    with pytest.raises(ValueError, match=r"\(b, h, w, 3\)"):
        moe(torch.randn(2, 3, 4, 4))


def test_cv_squared_by_hand():
    # importance [2, 0]: mean 1, unbiased variance ((2-1)^2 + (0-1)^2) / 1 = 2 -> cv^2 = 2
    assert cv_squared(torch.tensor([2.0, 0.0])).item() == pytest.approx(2.0)
    assert cv_squared(torch.tensor([3.0, 3.0, 3.0])).item() == 0.0
    assert cv_squared(torch.tensor([5.0])).item() == 0.0


def test_aux_loss_without_noise_is_the_weighted_imbalance_of_the_routing():
    moe = ConvExpertMixture(channels=2, scales=[1, 2], noisy_gating=False, aux_loss_weight=0.5).train()
    # all 4 samples tie on a zero gate and go to expert 0: importance = load = [4, 0]
    # cv^2([4, 0]) = var / mean^2 = 8 / 4 = 2, so aux = 0.5 * (2 + 2) = 2
    moe(torch.randn(4, 3, 3, 2))
    assert moe.aux_loss.item() == pytest.approx(2.0)


def test_aux_loss_is_differentiable_with_respect_to_gate_and_noise_weights():
    moe = random_mixture().train()
    moe(torch.randn(8, 3, 3, 4))
    moe.aux_loss.backward()
    assert moe.gate_weight.grad.abs().sum() > 0
    assert moe.noise_weight.grad.abs().sum() > 0


def test_weighted_combine_lets_the_task_loss_train_the_gate():
    for weighted, expect_grad in [(True, True), (False, False)]:
        moe = random_mixture(weighted_combine=weighted, aux_loss_weight=0.0).train()
        moe(torch.randn(8, 3, 3, 4)).square().sum().backward()
        has_grad = moe.gate_weight.grad is not None and moe.gate_weight.grad.abs().sum() > 0
        assert has_grad == expect_grad


def test_each_attention_window_is_routed_on_its_own(make_sam, images):
    # tiny SAM: layer 0 is windowed (8x8 grid in 4x4 windows -> 4 windows per image), layer 1 is global
    model = apply_conv_lora(make_sam(), ConvLoraConfig(num_experts=2)).eval()
    model(pixel_values=images, multimask_output=False)
    mixtures = {
        name: m for name, m in model.named_modules() if isinstance(m, ConvExpertMixture) and name.endswith("default")
    }
    counts = {name.split(".layers.")[1][0]: int(m.last_expert_counts.sum()) for name, m in mixtures.items()}
    assert counts == {"0": 2 * 4, "1": 2}


def test_moe_aux_loss_sums_only_the_mixtures_that_ran(make_sam, images, tmp_path):
    model = apply_conv_lora(make_sam(), ConvLoraConfig(init_lora_weights=False))
    model.add_adapter("other", ConvLoraConfig(init_lora_weights=False))
    model.train()
    model.set_adapter("other")
    model(pixel_values=images, multimask_output=False)
    model.set_adapter("default")
    model(pixel_values=images, multimask_output=False)
    ran = [m.aux_loss for n, m in model.named_modules() if isinstance(m, ConvExpertMixture) and "default" in n]
    assert moe_aux_loss(model).item() == pytest.approx(sum(loss.item() for loss in ran))


def test_the_concepts_page_shows_the_reference_expert_as_the_code_has_it():
    blocks = re.findall(r"^```python\n(.*?)^```$", CONCEPT_PAGE.read_text(), re.S | re.M)
    source = inspect.getsource(reference_expert)
    assert any(source in block for block in blocks), "update docs/concepts/conv-lora.md from moe.reference_expert"
