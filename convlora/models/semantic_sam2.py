"""Multi-class SAM 2 and SAM 3: one learned query token per class in their own mask decoder.

The idea is :mod:`convlora.models.semantic`'s (class tokens initialised from the first mask token, one
hypernetwork MLP shared by all classes, no matching); SAM 2's and SAM 3's decoders differ from SAM's in two
ways this file handles: an object-score token precedes the IoU token, and the upscaling adds the encoder's
two high-resolution feature maps (projected by the decoder's ``conv_s0`` / ``conv_s1``, which the model
applies before calling the decoder). SAM 3's ``Sam3TrackerMaskDecoder`` is SAM 2's decoder under another
name, so one forward serves both.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from einops import einsum
from torch import nn
from transformers.models.sam2.modeling_sam2 import Sam2MaskDecoder
from transformers.models.sam3_tracker.modeling_sam3_tracker import Sam3TrackerMaskDecoder


class ClassTokens:
    """Class tokens and a shared class MLP on a SAM-family mask decoder (mixed into a decoder subclass).

    Shared by SAM's class-query decoder and SAM 2's / SAM 3's: the constructor takes the stock decoder's
    config and the class count, builds the stock decoder (next in the method resolution order) and adds the
    class tokens; ``init_from_sam`` starts them from the pretrained first mask token and MLP.
    """

    num_classes: int

    def __init__(self, config: Any, num_classes: int) -> None:
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2 (background included), got {num_classes!r}")
        super().__init__(config)  # the stock mask decoder, next in the method resolution order
        self.num_classes = num_classes
        self.class_tokens = nn.Embedding(num_classes, config.hidden_size)
        self.class_mlp = copy.deepcopy(self.output_hypernetworks_mlps[0])

    def init_from_sam(self) -> None:
        """Initialise every class token from the first mask token and the class MLP from the first MLP."""
        with torch.no_grad():
            self.class_tokens.weight.copy_(self.mask_tokens.weight[:1].expand_as(self.class_tokens.weight))
            self.class_mlp.load_state_dict(self.output_hypernetworks_mlps[0].state_dict())


class ClassQueries(ClassTokens):
    """Class tokens and a shared class MLP for a SAM 2 / SAM 3 mask decoder (mixed into a decoder subclass).

    ``forward`` has the signature of ``Sam2MaskDecoder.forward``; it ignores ``multimask_output`` and returns
    one mask-logit map per class ``(b, 1, k, 4h, 4w)``, the first IoU estimate repeated per class, the class
    queries and the object score.
    """

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_positional_embeddings: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool = False,
        high_resolution_features: list[torch.Tensor] | None = None,
        attention_similarity: torch.Tensor | None = None,
        target_embedding: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Masks ``(b, 1, k, 4h, 4w)``, IoU ``(b, 1, k)``, class queries ``(b, 1, k, d)``, object score."""
        batch, channels, height, width = image_embeddings.shape
        if sparse_prompt_embeddings.shape[1] != 1:
            raise ValueError("The multi-class decoder takes at most one prompt set per image")
        fixed = [self.obj_score_token.weight, self.iou_token.weight, self.class_tokens.weight]
        tokens = torch.cat(fixed, dim=0).expand(batch, 1, -1, -1)  # (b, 1, 2 + k, d)
        if sparse_prompt_embeddings.shape[0] != 0:
            tokens = torch.cat([tokens, sparse_prompt_embeddings.to(tokens.dtype)], dim=2)
        queries, keys = self.transformer(
            point_embeddings=tokens,
            image_embeddings=image_embeddings + dense_prompt_embeddings,
            image_positional_embeddings=image_positional_embeddings,
            attention_similarity=attention_similarity,
            target_embedding=target_embedding,
            **kwargs,
        )
        class_queries = queries[:, :, 2 : 2 + self.num_classes, :]  # (b, 1, k, d)
        features = keys.transpose(2, 3).reshape(batch, channels, height, width)
        feat_s0, feat_s1 = high_resolution_features
        upscaled = self.activation(self.upscale_layer_norm(self.upscale_conv1(features) + feat_s1))
        upscaled = self.activation(self.upscale_conv2(upscaled) + feat_s0)  # (b, c, 4h, 4w)
        weights = self.class_mlp(class_queries)  # (b, 1, k, c)
        masks = einsum(weights, upscaled, "b p k c, b c h w -> b p k h w")
        iou = self.iou_prediction_head(queries[:, :, 1, :])[..., :1].expand(-1, -1, self.num_classes)
        object_score = self.pred_obj_score_head(queries[:, :, 0, :])
        return masks, iou, class_queries, object_score


class ClassQuerySam2MaskDecoder(ClassQueries, Sam2MaskDecoder):
    """SAM 2's mask decoder with one query token per class (see :class:`ClassQueries`).

    Args:
        config: the ``Sam2MaskDecoderConfig`` of the model.
        num_classes: number of classes including the background (class 0), at least 2.
    """


class ClassQuerySam3MaskDecoder(ClassQueries, Sam3TrackerMaskDecoder):
    """SAM 3's (``Sam3TrackerModel``'s) mask decoder with one query token per class (see :class:`ClassQueries`).

    Args:
        config: the ``Sam3TrackerMaskDecoderConfig`` of the model.
        num_classes: number of classes including the background (class 0), at least 2.
    """


# Stock decoder class -> its class-query subclass.
CLASS_QUERY_DECODERS: dict[type[nn.Module], type[nn.Module]] = {
    Sam2MaskDecoder: ClassQuerySam2MaskDecoder,
    Sam3TrackerMaskDecoder: ClassQuerySam3MaskDecoder,
}
