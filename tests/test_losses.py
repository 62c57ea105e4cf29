"""Segmentation losses: hand-computed values, ignore handling, gradients, registry errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from convlora.training.losses import (
    BINARY_LOSSES,
    MULTICLASS_LOSSES,
    BalancedBCELoss,
    BCEDiceLoss,
    BCELoss,
    CEDiceLoss,
    CELoss,
    DiceLoss,
    StructureLoss,
    boundary_weights,
    build_loss,
)


def softplus(x: float) -> float:
    """BCE-with-logits of a background pixel; ``softplus(-x)`` is the one of a foreground pixel."""
    return math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# (name, mode, channels): every registered loss, so the invariant tests cover them all.
LOSS_CASES = [(name, "binary", 1) for name in BINARY_LOSSES] + [(name, "multiclass", 3) for name in MULTICLASS_LOSSES]


def random_case(channels: int, seed: int = 0, size: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (2, channels, size, size) and a target with a blob per class and a few ignored pixels."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, channels, size, size, generator=generator)
    target = torch.zeros(2, size, size, dtype=torch.long)
    target[:, 2:6, 3:7] = 1
    if channels > 2:
        target[1, 6:, :3] = 2
    target[0, 0, :4] = 255
    target[1, 5, 5] = 255
    return logits, target


# ---------------------------------------------------------------- values by hand


def test_bce_averages_over_valid_pixels_only():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]])
    target = torch.tensor([[[0, 1], [1, 255]]])
    # background at logit 0: softplus(0) = log 2; foreground at 2 and -1: softplus(-2), softplus(1);
    # the ignored pixel (logit 3) is left out, so the mean is over 3 pixels.
    expected = (math.log(2) + softplus(-2) + softplus(1)) / 3
    assert BCELoss()(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_dice_matches_hand_computation_with_ignored_pixel():
    logits = torch.zeros(1, 1, 2, 2)  # p = 0.5 everywhere
    target = torch.tensor([[[1, 0], [0, 255]]])
    # valid pixels: p = (0.5, 0.5, 0.5), t = (1, 0, 0): sum(p t) = 0.5, sum(p) = 1.5, sum(t) = 1
    # dice = (2 * 0.5 + 1) / (1.5 + 1 + 1) = 2 / 3.5 = 4/7, loss = 3/7
    assert DiceLoss()(logits, target).item() == pytest.approx(3 / 7, rel=1e-6)


def test_dice_is_averaged_per_image():
    logits = torch.zeros(2, 1, 1, 2)
    target = torch.tensor([[[1, 1]], [[0, 0]]])
    # image 1: (2 * 1 + 1) / (1 + 2 + 1) = 3/4 -> loss 1/4; image 2: (0 + 1) / (1 + 0 + 1) = 1/2 -> loss 1/2
    assert DiceLoss()(logits, target).item() == pytest.approx((1 / 4 + 1 / 2) / 2, rel=1e-6)


def test_bce_dice_is_the_sum_of_its_terms_by_hand():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]])
    target = torch.tensor([[[0, 1], [1, 255]]])
    bce = (math.log(2) + softplus(-2) + softplus(1)) / 3
    p = [0.5, sigmoid(2), sigmoid(-1)]  # valid pixels, targets 0, 1, 1
    dice = (2 * (p[1] + p[2]) + 1) / (sum(p) + 2 + 1)
    assert BCEDiceLoss()(logits, target).item() == pytest.approx(bce + 1 - dice, rel=1e-6)
    weighted = BCEDiceLoss(bce_weight=2.0, dice_weight=0.5)(logits, target).item()
    assert weighted == pytest.approx(2 * bce + 0.5 * (1 - dice), rel=1e-6)


def test_boundary_weights_by_hand_with_zero_padding():
    target = torch.tensor([[[0, 1, 1]]])
    # 3x3 neighbourhoods with zero padding: foreground shares 1/9, 2/9, 2/9
    # weights 1 + 5 |1/9 - 0| = 14/9, 1 + 5 |2/9 - 1| = 44/9, 44/9
    weights = boundary_weights(target, kernel_size=3)
    torch.testing.assert_close(weights, torch.tensor([[[14 / 9, 44 / 9, 44 / 9]]]))


def test_boundary_weights_match_pranet_avg_pool_without_ignored_pixels():
    mask = (torch.rand(2, 40, 40, generator=torch.Generator().manual_seed(3)) > 0.6).long()
    pranet = 1 + 5 * (F.avg_pool2d(mask[:, None].float(), 31, stride=1, padding=15) - mask[:, None]).abs()
    torch.testing.assert_close(boundary_weights(mask), pranet[:, 0])


def test_boundary_weights_leave_ignored_pixels_out_of_neighbourhoods():
    target = torch.tensor([[[1, 255, 0]]])
    valid = target != 255
    # pixel 0: its 3x3 square holds itself (fg), the ignored pixel (not counted) and 7 padding pixels
    # (background): share 1/8 (it would be 1/9 if the ignored pixel were background) -> 1 + 5 * 7/8
    # pixel 2: itself (bg), the ignored pixel and 7 padding pixels: share 0/8 -> weight 1
    # the ignored pixel itself gets weight 0
    weights = boundary_weights(target, valid, kernel_size=3)
    torch.testing.assert_close(weights, torch.tensor([[[1 + 5 * 7 / 8, 0.0, 1.0]]]))


def test_structure_loss_by_hand():
    logits = torch.tensor([[[[-1.0, 0.0, 2.0]]]])
    target = torch.tensor([[[0, 1, 1]]])
    w = [14 / 9, 44 / 9, 44 / 9]  # from test_boundary_weights_by_hand_with_zero_padding
    bce = [softplus(-1), softplus(-0.0), softplus(-2)]  # target 0, 1, 1
    wbce = sum(wi * bi for wi, bi in zip(w, bce, strict=True)) / sum(w)
    p, t = [sigmoid(-1), 0.5, sigmoid(2)], [0, 1, 1]
    inter = sum(wi * pi * ti for wi, pi, ti in zip(w, p, t, strict=True))
    union = sum(wi * (pi + ti) for wi, pi, ti in zip(w, p, t, strict=True)) - inter
    wiou = 1 - (inter + 1) / (union + 1)
    loss = StructureLoss(kernel_size=3)(logits, target).item()
    assert loss == pytest.approx(wbce + wiou, rel=1e-6)


def test_structure_loss_really_weights_its_bce():
    # A boundary example where the errors sit on the boundary: the weighted BCE must differ from the
    # plain mean that the reference code's legacy reduce='none' argument silently computes.
    target = torch.zeros(1, 12, 12, dtype=torch.long)
    target[:, 4:8, 4:8] = 1
    logits = torch.where(target[:, None] == 1, 4.0, -4.0)
    logits[:, :, 4, 4:8] = -1.0  # wrong on the top edge of the object
    loss = StructureLoss(kernel_size=5)
    weights = boundary_weights(target, kernel_size=5)
    assert weights.min() == 1.0 and weights.max() > 2.0
    bce = F.binary_cross_entropy_with_logits(logits[:, 0], target.float(), reduction="none")
    weighted = ((weights * bce).sum() / weights.sum()).item()
    plain = bce.mean().item()
    assert weighted > plain * 1.2
    full = loss(logits, target).item()
    probs, t = torch.sigmoid(logits[:, 0]), target.float()
    inter = (weights * probs * t).sum()
    wiou = (1 - (inter + 1) / ((weights * (probs + t)).sum() - inter + 1)).item()
    assert full == pytest.approx(weighted + wiou, rel=1e-6)
    assert abs(full - (plain + wiou)) > 0.05


def test_balanced_bce_weighs_both_classes_equally():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]])
    target = torch.tensor([[[1, 0], [0, 0]]])
    # foreground mean: softplus(-0) = log 2; background mean: (softplus(2) + softplus(-1) + softplus(3)) / 3
    expected = 0.5 * math.log(2) + 0.5 * (softplus(2) + softplus(-1) + softplus(3)) / 3
    assert BalancedBCELoss()(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_balanced_bce_on_a_single_class_batch_is_that_class_mean():
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 3.0]]]])
    target = torch.tensor([[[0, 0], [0, 255]]])
    expected = (math.log(2) + softplus(2) + softplus(-1)) / 3
    assert BalancedBCELoss()(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_cross_entropy_by_hand_with_ignored_pixel():
    logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [5.0, 0.0, 0.0]])  # 3 pixels, 3 classes
    logits = logits.T.reshape(1, 3, 1, 3)
    target = torch.tensor([[[0, 2, 255]]])
    # pixel 1: -log(e / (e + 2)) = log(e + 2) - 1; pixel 2: -log(1 / (1 + e^2 + 1)) = log(2 + e^2)
    expected = ((math.log(math.e + 2) - 1) + math.log(2 + math.e**2)) / 2
    assert CELoss()(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_ce_dice_by_hand_averages_dice_over_present_classes():
    logits = torch.zeros(1, 3, 1, 3)  # softmax 1/3 everywhere
    target = torch.tensor([[[0, 1, 255]]])
    ce = math.log(3)
    # class 0: (2 * 1/3 + 1) / (2/3 + 1 + 1) = (5/3) / (8/3) = 5/8; class 1 the same;
    # class 2 is absent from the image and left out of the average
    dice_loss = 1 - 5 / 8
    assert CEDiceLoss()(logits, target).item() == pytest.approx(ce + dice_loss, rel=1e-6)


# ---------------------------------------------------------------- invariants over every loss


@pytest.mark.parametrize(("name", "mode", "channels"), LOSS_CASES)
def test_ignored_pixels_do_not_change_the_loss_or_get_gradient(name, mode, channels):
    loss_fn = build_loss(name, mode)
    logits, target = random_case(channels)
    ignored = target == 255
    changed = logits.clone()
    changed[ignored[:, None].expand_as(changed)] = 50.0
    changed.requires_grad_(True)
    loss = loss_fn(changed, target)
    assert loss.item() == pytest.approx(loss_fn(logits, target).item(), rel=1e-6)
    loss.backward()
    assert changed.grad[ignored[:, None].expand_as(changed)].abs().max() == 0


@pytest.mark.parametrize(("name", "mode", "channels"), LOSS_CASES)
def test_all_ignored_batch_gives_zero_loss_that_backpropagates(name, mode, channels):
    logits = torch.randn(2, channels, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), 255)
    loss = build_loss(name, mode)(logits, target)
    assert loss.ndim == 0 and loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize(("name", "mode", "channels"), LOSS_CASES)
def test_loss_and_gradient_are_finite_for_extreme_and_half_precision_logits(name, mode, channels):
    logits, target = random_case(channels)
    for scale, dtype in ((100.0, torch.float32), (1.0, torch.float16)):
        x = (logits * scale).to(dtype).requires_grad_(True)
        loss = build_loss(name, mode)(x, target)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(("name", "mode", "channels"), LOSS_CASES)
def test_better_prediction_has_lower_loss(name, mode, channels):
    _, target = random_case(channels)
    if mode == "binary":
        signs = (2.0 * (target == 1).float() - 1.0)[:, None]  # +1 on the foreground, -1 elsewhere
    else:
        onehot = F.one_hot(torch.where(target == 255, 0, target), channels).permute(0, 3, 1, 2)
        signs = 2.0 * onehot.float() - 1.0  # +1 for the true class, -1 for the others
    loss_fn = build_loss(name, mode)
    good, unsure, bad = (loss_fn(scale * signs, target).item() for scale in (4.0, 0.0, -4.0))
    assert good < unsure < bad


def test_losses_are_scalars_that_train_a_toy_logit_map():
    target = torch.zeros(1, 6, 6, dtype=torch.long)
    target[:, 1:4, 2:5] = 1
    for name in BINARY_LOSSES:
        logits = torch.zeros(1, 1, 6, 6, requires_grad=True)
        optimizer = torch.optim.SGD([logits], lr=5.0)
        loss_fn = build_loss(name, "binary")
        start = loss_fn(logits, target).item()
        for _ in range(20):
            optimizer.zero_grad()
            loss = loss_fn(logits, target)
            loss.backward()
            optimizer.step()
        assert loss_fn(logits, target).item() < start, name
        assert ((logits[:, 0] > 0) == (target == 1)).all(), name


# ---------------------------------------------------------------- registry and input checks


def test_build_loss_defaults_per_mode():
    assert isinstance(build_loss(None, "binary"), BCEDiceLoss)
    assert isinstance(build_loss(None, "multiclass"), CEDiceLoss)
    assert build_loss("structure", "binary", kernel_size=5).kernel_size == 5


def test_build_loss_rejects_unknown_names_and_wrong_modes():
    with pytest.raises(ValueError, match="unknown loss 'focal' for mode 'binary'"):
        build_loss("focal", "binary")
    with pytest.raises(ValueError, match="'ce_dice' is a multiclass loss and does not fit mode 'binary'"):
        build_loss("ce_dice", "binary")
    with pytest.raises(ValueError, match="'structure' is a binary loss"):
        build_loss("structure", "multiclass")
    with pytest.raises(ValueError, match="mode must be one of"):
        build_loss("bce", "auto")


def test_losses_refuse_mismatched_inputs_with_clear_messages():
    with pytest.raises(ValueError, match="expects 1 logit channel, got 3"):
        BCELoss()(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="0/255 mask must be converted"):
        BCELoss()(torch.zeros(1, 1, 2, 2), torch.tensor([[[0, 255], [128, 0]]]))
    with pytest.raises(ValueError, match="resize the logits"):
        StructureLoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="integer class indices"):
        DiceLoss()(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match=r"values \[3\] outside 0..2"):
        CELoss()(torch.zeros(1, 3, 1, 2), torch.tensor([[[3, 255]]]))
    with pytest.raises(ValueError, match="kernel_size must be a positive odd number"):
        StructureLoss(kernel_size=4)
