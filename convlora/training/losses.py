"""Segmentation losses for binary masks (one logit channel) and multi-class label maps.

Every loss takes logits ``(b, c, h, w)`` and integer targets ``(b, h, w)`` and returns a scalar:
``c = 1`` with targets in ``{0, 1, ignore_index}`` for binary tasks, ``c = num_classes`` with targets in
``0 .. c - 1`` or ``ignore_index`` for multi-class tasks (class 0 is the background). Ignored pixels
contribute nothing to any term; a batch with no valid pixel gives a zero loss that still backpropagates
(zero gradients, no NaN). Losses are computed in float32 whatever the logits' dtype (mixed precision).

Pick a loss by name with :func:`build_loss`; the registries are plain dicts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..models.processing import IGNORE_INDEX


def _check_inputs(logits: torch.Tensor, target: torch.Tensor, binary: bool, ignore_index: int) -> None:
    """Shape, dtype and value checks shared by all losses (one host sync for the value check)."""
    kind = "binary" if binary else "multi-class"
    if logits.ndim != 4:
        raise ValueError(f"logits must be (b, c, h, w), got shape {tuple(logits.shape)}")
    if target.ndim != 3:
        raise ValueError(f"target must be (b, h, w) class indices, got shape {tuple(target.shape)}")
    if logits.shape[0] != target.shape[0] or logits.shape[2:] != target.shape[1:]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree in batch or size; "
            "resize the logits to the target size first"
        )
    if target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class indices (int64), got dtype {target.dtype}")
    channels = logits.shape[1]
    if binary and channels != 1:
        raise ValueError(f"a binary loss expects 1 logit channel, got {channels}; use a multi-class loss")
    if not binary and channels < 2:
        raise ValueError(f"a multi-class loss expects num_classes >= 2 logit channels, got {channels}")
    num_classes = 2 if binary else channels
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        found = target[bad][:5].tolist()
        raise ValueError(
            f"{kind} target holds values {found} outside 0..{num_classes - 1} and the ignore index {ignore_index}"
            + (" (a 0/255 mask must be converted to 0/1 first)" if binary else "")
        )


def _zero_loss(logits: torch.Tensor) -> torch.Tensor:
    """A zero scalar connected to ``logits``, so that ``backward()`` works and gives zero gradients."""
    return logits.float().sum() * 0.0


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over the pixels where ``mask`` is true (zero when there are none)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def _soft_dice(probs: torch.Tensor, onehot: torch.Tensor, valid: torch.Tensor, smooth: float) -> torch.Tensor:
    """Soft Dice coefficient per image and class, ``(b, c)``, over the valid pixels.

    ``probs`` and ``onehot`` are ``(b, c, h, w)``, ``valid`` is ``(b, 1, h, w)`` float.
    """
    intersection = (probs * onehot * valid).sum(dim=(2, 3))
    total = (probs * valid).sum(dim=(2, 3)) + (onehot * valid).sum(dim=(2, 3))
    return (2.0 * intersection + smooth) / (total + smooth)


class BinaryLoss(nn.Module):
    """Base of the binary losses: checks inputs, casts to float32 and handles the ignore index.

    Args:
        ignore_index: target value of pixels that contribute nothing.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar loss of logits ``(b, 1, h, w)`` against a target ``(b, h, w)`` in ``{0, 1, ignore}``."""
        _check_inputs(logits, target, binary=True, ignore_index=self.ignore_index)
        valid = target != self.ignore_index  # (b, h, w)
        if not bool(valid.any()):
            return _zero_loss(logits)
        x = logits.float()[:, 0]  # (b, h, w)
        t = (target == 1).float()  # ignored pixels become 0 here and are masked out below
        return self.binary_loss(x, t, valid)

    def binary_loss(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The loss on float32 logits ``(b, h, w)``, a float 0/1 target and a boolean valid mask."""
        raise NotImplementedError


class BCELoss(BinaryLoss):
    """Binary cross-entropy with logits, averaged over the valid pixels of the batch.

    >>> round(float(BCELoss()(torch.zeros(1, 1, 2, 2), torch.tensor([[[0, 1], [1, 255]]]))), 4)  # log(2)
    0.6931
    """

    def binary_loss(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return _masked_mean(bce, valid)


class DiceLoss(BinaryLoss):
    """Soft Dice loss ``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` on sigmoid probabilities.

    Computed per image over its valid pixels and averaged over the images that have any. An image with
    an empty mask still counts: it pushes the predicted foreground towards zero.

    Args:
        smooth: the constant ``s`` (in pixels), which also keeps an empty image defined.
        ignore_index: target value of pixels that contribute nothing.

    >>> round(float(DiceLoss()(torch.zeros(1, 1, 2, 2), torch.tensor([[[0, 1], [1, 0]]]))), 4)  # 1 - 3/5
    0.4
    """

    def __init__(self, smooth: float = 1.0, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__(ignore_index)
        if smooth <= 0:
            raise ValueError(f"smooth must be > 0, got {smooth}")
        self.smooth = smooth

    def binary_loss(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        probs, onehot, counted = (rearrange(x, "b h w -> b 1 h w") for x in (logits.sigmoid(), target, valid.float()))
        dice = _soft_dice(probs, onehot, counted, self.smooth)[:, 0]  # (b,)
        has_pixels = valid.flatten(1).any(dim=1)
        return _masked_mean(1.0 - dice, has_pixels)


class BCEDiceLoss(BinaryLoss):
    """BCE with logits plus soft Dice (the default binary loss): ``bce_weight * BCE + dice_weight * Dice``.

    Args:
        bce_weight: weight of the BCE term.
        dice_weight: weight of the Dice term.
        smooth: Dice smoothing constant.
        ignore_index: target value of pixels that contribute nothing.

    >>> round(float(BCEDiceLoss()(torch.zeros(1, 1, 2, 2), torch.tensor([[[0, 1], [1, 0]]]))), 4)  # log(2) + 0.4
    1.0931
    """

    def __init__(
        self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0, ignore_index: int = IGNORE_INDEX
    ) -> None:
        super().__init__(ignore_index)
        self.bce = BCELoss(ignore_index)
        self.dice = DiceLoss(smooth, ignore_index)
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight

    def binary_loss(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        bce = self.bce.binary_loss(logits, target, valid)
        dice = self.dice.binary_loss(logits, target, valid)
        return self.bce_weight * bce + self.dice_weight * dice


def boundary_weights(
    target: torch.Tensor,
    valid: torch.Tensor | None = None,
    kernel_size: int = 31,
    boundary_weight: float = 5.0,
) -> torch.Tensor:
    """Pixel weights ``1 + boundary_weight * |local_mean(mask) - mask|`` of the structure loss, ``(b, h, w)``.

    ``local_mean`` is the foreground share of the ``kernel_size`` square around each pixel, counting
    pixels outside the image as background (PraNet's ``avg_pool2d`` with zero padding). Ignored pixels
    are left out of the neighbourhoods and get weight 0. Pixels near a boundary weigh up to
    ``1 + boundary_weight / 2``; pixels deep inside or far outside an object weigh 1.

    Args:
        target: float or integer 0/1 mask ``(b, h, w)`` (values other than 1 count as background).
        valid: boolean mask of the pixels that count; all when ``None``.
        kernel_size: odd side of the square neighbourhood (31 in PraNet, at 352 px).
        boundary_weight: the factor on the boundary term (5 in PraNet).

    >>> boundary_weights(torch.tensor([[[0, 1, 1]]]), kernel_size=3)  # local means 1/9, 2/9, 2/9
    tensor([[[1.5556, 4.8889, 4.8889]]])
    """
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    valid = torch.ones_like(target, dtype=torch.bool) if valid is None else valid
    fg = rearrange(((target == 1) & valid).float(), "b h w -> b 1 h w")
    counted = rearrange(valid.float(), "b h w -> b 1 h w")
    pad = (kernel_size // 2,) * 4
    # Outside the image counts as (valid) background, inside only valid pixels count: without ignored
    # pixels this is exactly avg_pool2d(mask, kernel_size, stride=1, padding=kernel_size // 2).
    fg_share = F.avg_pool2d(F.pad(fg, pad, value=0.0), kernel_size, stride=1)
    counted_share = F.avg_pool2d(F.pad(counted, pad, value=1.0), kernel_size, stride=1)
    local_mean = fg_share / counted_share.clamp_min(1e-12)
    weights = (1.0 + boundary_weight * (local_mean - fg).abs()) * counted
    return weights[:, 0]


class StructureLoss(BinaryLoss):
    """PraNet's structure loss: boundary-weighted BCE plus boundary-weighted soft IoU, per image.

    With ``w`` from :func:`boundary_weights`, per image: ``wbce = sum(w * bce) / sum(w)`` and
    ``wiou = 1 - (sum(w p t) + 1) / (sum(w (p + t)) - sum(w p t) + 1)``; the loss is the mean of
    ``wbce + wiou`` over the images with valid pixels. Unlike the reference code, whose legacy
    ``reduce='none'`` argument makes its BCE a plain unweighted mean, the BCE here really is weighted.

    Args:
        kernel_size: odd side of the neighbourhood defining the boundary band.
        boundary_weight: extra weight of boundary pixels.
        ignore_index: target value of pixels that contribute nothing.

    >>> loss = StructureLoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    """

    def __init__(self, kernel_size: int = 31, boundary_weight: float = 5.0, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__(ignore_index)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        self.kernel_size = kernel_size
        self.boundary_weight = boundary_weight

    def binary_loss(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        weights = boundary_weights(target, valid, self.kernel_size, self.boundary_weight)  # 0 where ignored
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        weight_sum = weights.sum(dim=(1, 2))
        wbce = (weights * bce).sum(dim=(1, 2)) / weight_sum.clamp_min(1e-12)
        probs = torch.sigmoid(logits)
        intersection = (weights * probs * target).sum(dim=(1, 2))
        union = (weights * (probs + target)).sum(dim=(1, 2)) - intersection
        wiou = 1.0 - (intersection + 1.0) / (union + 1.0)
        return _masked_mean(wbce + wiou, weight_sum > 0)


class BalancedBCELoss(BinaryLoss):
    """Class-balanced BCE (shadow detection): ``0.5 * mean BCE(foreground) + 0.5 * mean BCE(background)``.

    The two means run over the valid foreground and background pixels of the whole batch, so a rare
    class weighs as much as a frequent one. A batch with only one class present is the mean over that
    class. (The HED-style form used by the reference, weights ``n_bg / n`` on foreground pixels and
    ``n_fg / n`` on background pixels, has the same gradient direction scaled by ``2 n_fg n_bg / n^2``,
    which vanishes on single-class batches such as shadow-free images.)

    >>> logits, target = torch.zeros(1, 1, 2, 2), torch.tensor([[[1, 0], [0, 0]]])
    >>> round(float(BalancedBCELoss()(logits, target)), 4)  # log(2) on both classes
    0.6931
    """

    def binary_loss(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        fg = valid & (target == 1)
        bg = valid & (target == 0)
        has_fg, has_bg = fg.any(), bg.any()
        fg_mean, bg_mean = _masked_mean(bce, fg), _masked_mean(bce, bg)
        # Each class weighs 0.5 when both are present, the present one weighs 1 otherwise.
        fg_weight = torch.where(has_bg, 0.5, 1.0) * has_fg
        bg_weight = torch.where(has_fg, 0.5, 1.0) * has_bg
        return fg_weight * fg_mean + bg_weight * bg_mean


class MulticlassLoss(nn.Module):
    """Base of the multi-class losses: checks inputs, casts to float32 and handles the ignore index.

    Args:
        ignore_index: target value of pixels that contribute nothing.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar loss of logits ``(b, num_classes, h, w)`` against class indices ``(b, h, w)``."""
        _check_inputs(logits, target, binary=False, ignore_index=self.ignore_index)
        valid = target != self.ignore_index
        if not bool(valid.any()):
            return _zero_loss(logits)
        return self.multiclass_loss(logits.float(), torch.where(valid, target, 0), valid)

    def multiclass_loss(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The loss on float32 logits, a target with ignored pixels set to class 0, and the valid mask."""
        raise NotImplementedError


class CELoss(MulticlassLoss):
    """Cross-entropy averaged over the valid pixels of the batch.

    Args:
        label_smoothing: as in ``torch.nn.functional.cross_entropy``.
        ignore_index: target value of pixels that contribute nothing.

    >>> round(float(CELoss()(torch.zeros(1, 4, 1, 2), torch.tensor([[[3, 255]]]))), 4)  # log(4)
    1.3863
    """

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__(ignore_index)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def multiclass_loss(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, target, reduction="none", label_smoothing=self.label_smoothing)
        return _masked_mean(ce, valid)


class CEDiceLoss(MulticlassLoss):
    """Cross-entropy plus multi-class soft Dice over the softmax (the default multi-class loss).

    The Dice term is computed per image and class over the valid pixels and averaged over the (image,
    class) pairs whose class is present in that image's target. Averaging over absent classes as well
    would let them dominate with many classes (with smoothing 1 an absent class scores near 0 as soon
    as it gets a pixel's worth of probability); their false positives are still paid for through the
    softmax, in the present classes' Dice and in the cross-entropy.

    Args:
        ce_weight: weight of the cross-entropy term.
        dice_weight: weight of the Dice term.
        smooth: Dice smoothing constant (in pixels).
        label_smoothing: label smoothing of the cross-entropy.
        ignore_index: target value of pixels that contribute nothing.

    >>> round(float(CEDiceLoss()(torch.zeros(1, 2, 1, 2), torch.tensor([[[0, 1]]]))), 4)  # log(2) + 1 - 2/3
    1.0265
    """

    def __init__(
        self,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        smooth: float = 1.0,
        label_smoothing: float = 0.0,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__(ignore_index)
        if smooth <= 0:
            raise ValueError(f"smooth must be > 0, got {smooth}")
        self.ce = CELoss(label_smoothing, ignore_index)
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.smooth = smooth

    def multiclass_loss(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        ce = self.ce.multiclass_loss(logits, target, valid)
        num_classes = logits.shape[1]
        onehot = rearrange(F.one_hot(target, num_classes).float(), "b h w c -> b c h w")
        counted = rearrange(valid.float(), "b h w -> b 1 h w")
        dice = _soft_dice(torch.softmax(logits, dim=1), onehot, counted, self.smooth)  # (b, c)
        present = (onehot * counted).sum(dim=(2, 3)) > 0  # (b, c)
        return self.ce_weight * ce + self.dice_weight * _masked_mean(1.0 - dice, present)


BINARY_LOSSES: dict[str, type[nn.Module]] = {
    "bce_dice": BCEDiceLoss,
    "structure": StructureLoss,
    "balanced_bce": BalancedBCELoss,
    "bce": BCELoss,
    "dice": DiceLoss,
}
MULTICLASS_LOSSES: dict[str, type[nn.Module]] = {
    "ce_dice": CEDiceLoss,
    "ce": CELoss,
}
LOSSES: dict[str, dict[str, type[nn.Module]]] = {"binary": BINARY_LOSSES, "multiclass": MULTICLASS_LOSSES}
DEFAULT_LOSSES: dict[str, str] = {"binary": "bce_dice", "multiclass": "ce_dice"}


def build_loss(name: str | None, mode: str, **kwargs: object) -> nn.Module:
    """The loss called ``name`` for a ``"binary"`` or ``"multiclass"`` task.

    Args:
        name: a key of ``BINARY_LOSSES`` or ``MULTICLASS_LOSSES``; the mode's default
            (``DEFAULT_LOSSES``) when ``None``.
        mode: ``"binary"`` (one logit channel) or ``"multiclass"`` (one channel per class).
        kwargs: constructor arguments of the loss, e.g. ``ignore_index`` or ``smooth``.

    >>> build_loss("structure", "binary")
    StructureLoss()
    >>> type(build_loss(None, "multiclass")).__name__
    'CEDiceLoss'
    """
    if mode not in LOSSES:
        raise ValueError(f"mode must be one of {sorted(LOSSES)}, got {mode!r}")
    name = DEFAULT_LOSSES[mode] if name is None else name
    registry = LOSSES[mode]
    if name not in registry:
        other = next((m for m, losses in LOSSES.items() if name in losses), None)
        if other is not None:
            raise ValueError(
                f"loss {name!r} is a {other} loss and does not fit mode {mode!r}; choose one of {sorted(registry)}"
            )
        raise ValueError(f"unknown loss {name!r} for mode {mode!r}; choose one of {sorted(registry)}")
    return registry[name](**kwargs)


def per_mask_losses(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Per-mask focal, BCE and soft-Dice losses and IoU of ``logits`` ``(..., m, h, w)`` against ``target``.

    Every one of the ``m`` masks is scored against the same target, so SAM's several masks per prompt
    (or per image) get one loss each; the prompted step back-propagates the best of them.

    Args:
        logits: ``(..., m, h, w)`` mask logits.
        target: ``(..., h, w)`` objects (bool or 0/1).
        valid: ``(..., h, w)`` pixels that count (padding and ignored pixels do not); all when ``None``.

    Returns:
        tensors of shape ``(..., m)``: ``focal``, ``bce``, ``dice`` (differentiable, means over the valid
        pixels) and ``iou`` of the thresholded mask (no gradient; 1 when mask and target are both empty).

    >>> out = per_mask_losses(torch.zeros(1, 2, 4, 4), torch.ones(1, 4, 4))
    >>> [round(float(v), 3) for v in out["iou"][0]]
    [0.0, 0.0]
    """
    x = logits.float().flatten(-2)
    t = target.unsqueeze(-3).float().expand_as(logits).flatten(-2)
    w = None if valid is None else valid.unsqueeze(-3).float().expand_as(logits).flatten(-2)
    count = x.shape[-1] if w is None else w.sum(-1).clamp_min(1.0)

    def mean(values: torch.Tensor) -> torch.Tensor:  # over the valid pixels
        return values.mean(-1) if w is None else (values * w).sum(-1) / count

    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
    p_t = p * t + (1 - p) * (1 - t)
    focal = mean(ce * (1 - p_t) ** 2)
    if w is not None:
        p, t = p * w, t * w
    dice = 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)
    with torch.no_grad():
        hard = (x > 0).float() if w is None else (x > 0).float() * w
        inter, union = (hard * t).sum(-1), ((hard + t) > 0).float().sum(-1)
        iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    return {"focal": focal, "bce": mean(ce), "dice": dice, "iou": iou}
