"""Multi-class SAM: one learned query token per class in SAM's own mask decoder.

SAM's mask decoder turns a few output tokens into masks: each token goes through SAM's two-way
transformer together with the image embedding, then a small MLP (the "hypernetwork") maps it to weights
that are dotted with the upscaled image features. SAM has four such tokens, meant for ambiguity, not for
classes, and used prompt-free a single token cannot tell classes apart.

:class:`ClassQueryMaskDecoder` keeps every pretrained part of the decoder and adds ``num_classes`` class
tokens (class 0 is the background), all initialised from SAM's first mask token, and one hypernetwork
MLP shared by all classes, initialised from SAM's first one. Its output is one mask-logit map per class,
``(b, 1, num_classes, h, w)``, trained with per-pixel cross-entropy + Dice like any semantic
segmentation head. The class of each token is fixed, so no bipartite matching (as in MaskFormer-style
set prediction) is needed, any number of classes works (the cost is one extra token per class in the
decoder's attention), and the shared MLP keeps the added parameters at ``num_classes * d`` plus one MLP.
SAM 2's and SAM 3's decoders get the same treatment in :mod:`convlora.models.semantic_sam2`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.sam.modeling_sam import SamMaskDecoder

from ..tuner.merged import guard_save_pretrained
from .family import family_of, find_sam
from .semantic_sam2 import CLASS_QUERY_DECODERS, ClassQueries, ClassTokens


class ClassQueryMaskDecoder(ClassTokens, SamMaskDecoder):
    """SAM's mask decoder with one query token per class and a shared hypernetwork MLP.

    Build it with :func:`install_class_decoder` from a (pretrained) SAM model. ``forward`` has the
    signature of ``SamMaskDecoder.forward``; it ignores ``multimask_output`` and returns one mask per
    class and an IoU estimate for SAM's first (class-agnostic) token, repeated per class.

    Args:
        config: the ``SamMaskDecoderConfig`` of the model.
        num_classes: number of classes including the background (class 0), at least 2.
    """

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_positional_embeddings: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor | None,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool = False,
        attention_similarity: torch.Tensor | None = None,
        target_embedding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One mask-logit map per class ``(b, 1, k, 4h, 4w)`` and the IoU estimate ``(b, 1, k)``."""
        batch, channels, height, width = image_embeddings.shape
        tokens = torch.cat([self.iou_token.weight, self.class_tokens.weight], dim=0)  # (1 + k, d)
        tokens = tokens.unsqueeze(0).unsqueeze(0).expand(batch, 1, -1, -1)  # (b, 1, 1 + k, d)
        if sparse_prompt_embeddings is not None:
            if sparse_prompt_embeddings.shape[1] != 1:
                raise ValueError("The multi-class decoder takes at most one prompt set per image")
            tokens = torch.cat([tokens, sparse_prompt_embeddings.to(tokens.dtype)], dim=2)
        image = image_embeddings + dense_prompt_embeddings
        queries, keys = self.transformer(
            point_embeddings=tokens,
            image_embeddings=image,
            image_positional_embeddings=image_positional_embeddings,
            attention_similarity=attention_similarity,
            target_embedding=target_embedding,
        )
        class_queries = queries[:, :, 1 : 1 + self.num_classes, :]  # (b, 1, k, d)
        features = keys.transpose(2, 3).reshape(batch, channels, height, width)
        upscaled = self.activation(self.upscale_layer_norm(self.upscale_conv1(features)))
        upscaled = self.activation(self.upscale_conv2(upscaled))  # (b, c, 4h, 4w)
        weights = self.class_mlp(class_queries)  # (b, 1, k, c)
        _, up_channels, up_height, up_width = upscaled.shape
        masks = weights @ upscaled.reshape(batch, 1, up_channels, up_height * up_width)
        masks = masks.reshape(batch, 1, self.num_classes, up_height, up_width)
        iou = self.iou_prediction_head(queries[:, :, 0, :])[..., :1].expand(-1, -1, self.num_classes)
        return masks, iou


def install_class_decoder(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the mask decoder of a SAM model by a :class:`ClassQueryMaskDecoder` (in place).

    Pretrained decoder weights are kept; class tokens and the shared class MLP start from SAM's first mask
    token and MLP. Call it before applying adapters, and identically before loading a trained adapter.
    Stock transformers does not know the class tokens, so the SAM's ``save_pretrained`` then writes
    convlora's layout (see ``convlora.save_merged``), which ``convlora.load_sam`` reads back.

    Args:
        model: a ``SamModel``, ``Sam2Model`` or ``Sam3TrackerModel`` (not wrapped in PEFT).
        num_classes: classes including the background.

    >>> from convlora.models import random_sam, tiny_sam_config
    >>> sam = install_class_decoder(random_sam(tiny_sam_config()), num_classes=12)
    >>> sam(pixel_values=torch.randn(1, 3, 64, 64)).pred_masks.shape
    torch.Size([1, 1, 12, 32, 32])
    """
    sam = find_sam(model)
    family = family_of(sam)
    old = sam.mask_decoder
    decoder_cls = ClassQueryMaskDecoder if type(old) is SamMaskDecoder else CLASS_QUERY_DECODERS.get(type(old))
    if not family.multiclass or decoder_cls is None:
        raise ValueError(
            f"Multi-class segmentation (num_classes={num_classes}) needs the standard mask decoder of SAM, SAM 2 "
            f"or SAM 3, found {type(old).__name__}: {family.description} supports binary segmentation only"
        )
    reference = next(old.parameters())
    decoder = decoder_cls(sam.config.mask_decoder_config, num_classes)
    decoder.to(device=reference.device, dtype=reference.dtype)
    missing, unexpected = decoder.load_state_dict(old.state_dict(), strict=False)
    new_parameters = {n for n, _ in decoder.named_parameters() if n.startswith(("class_tokens", "class_mlp"))}
    if set(missing) != new_parameters or unexpected:
        raise RuntimeError(f"Unexpected mask decoder layout: missing {missing}, unexpected {unexpected}")
    decoder.init_from_sam()
    decoder.train(old.training)
    sam.mask_decoder = decoder
    guard_save_pretrained(sam)
    return model


def class_decoder_classes(model: nn.Module) -> int | None:
    """Number of classes of a model's class-query decoder, or ``None`` for SAM's standard decoder."""
    for module in model.modules():
        if isinstance(module, (ClassQueryMaskDecoder, ClassQueries)):
            return module.num_classes
    return None
