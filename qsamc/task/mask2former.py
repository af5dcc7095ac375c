"""The Mask2Former head (the paper's task setup): SAM's single-scale neck output -> a simple feature
pyramid -> Hugging Face transformers' Mask2Former pixel decoder, masked-attention transformer decoder,
Hungarian matcher and set-prediction loss (`pip install "qsamc[mask2former]"`).

Written here: the ViTDet-style pyramid (SAM's encoder has one stride-16 output; Mask2Former reads
strides 4, 8, 16 and 32: two transposed convs up, one, identity, max-pool down), the targets (semantic:
one binary mask per class present in an image; instance: one per instance, `qsamc.task.instances`), the
semantic inference (per-pixel class probabilities: the queries' class distributions weighted by their
sigmoid masks, as Mask2Former's semantic post-processing does) and the instance inference (`detect`:
the top-k (query, class) pairs by class probability times mask score, as Mask2Former's instance
post-processing does). From transformers: `Mask2FormerPixelDecoder`
(multi-scale deformable attention encoder + FPN), `Mask2FormerTransformerModule`, `Mask2FormerLoss`
(with its Hungarian matcher; scipy), and the weight initialisation of `Mask2FormerPreTrainedModel`.

The head stays float and is never searched: it is trained beside the supernet and is not part of the
exported encoder (its deformable and masked attention have no INT8 kernels to deploy in anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qsamc.errors import ConfigError
from qsamc.sam import check_state_dict
from qsamc.task.instances import instance_targets


def _transformers():
    try:
        from transformers import Mask2FormerConfig
        from transformers.models.mask2former import modeling_mask2former as m2f
    except ImportError:
        raise ConfigError('the mask2former head needs transformers and scipy: pip install "qsamc[mask2former]"') from None
    return Mask2FormerConfig, m2f


@dataclass(frozen=True)
class Mask2FormerSpec:
    """The head's size; Mask2Former's own defaults (256 wide, 100 queries, 9 decoder layers, 6 pixel
    decoder layers). Small supernets and tests take fewer."""

    dim: int = 256
    queries: int = 100
    decoder_layers: int = 9
    encoder_layers: int = 6
    points: int = 12544  # points sampled per mask for the mask and dice losses

    def __post_init__(self) -> None:
        if self.dim < 8 or self.dim % 8 or min(self.queries, self.decoder_layers, self.encoder_layers, self.points) < 1:
            raise ConfigError(f"the mask2former head needs a width that is a multiple of 8 and at least one query, "
                              f"layer and point, got {self}")

    def config(self, num_classes: int):
        Mask2FormerConfig, _ = _transformers()
        return Mask2FormerConfig(
            num_labels=num_classes, feature_size=self.dim, mask_feature_size=self.dim, hidden_dim=self.dim,
            num_queries=self.queries, decoder_layers=self.decoder_layers + 1, encoder_layers=self.encoder_layers,
            encoder_feedforward_dim=4 * self.dim, dim_feedforward=8 * self.dim, num_attention_heads=8,
            train_num_points=self.points, use_auxiliary_loss=True, backbone_config=None, use_timm_backbone=False,
        )


class SimplePyramid(nn.Module):
    """Strides 4, 8, 16, 32 from one stride-16 map (ViTDet's simple feature pyramid)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.up4 = nn.Sequential(nn.ConvTranspose2d(channels, channels, 2, 2), nn.GELU(),
                                 nn.ConvTranspose2d(channels, channels, 2, 2))
        self.up2 = nn.ConvTranspose2d(channels, channels, 2, 2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.up4(x), self.up2(x), x, F.max_pool2d(x, 2)]


def _decoder_class():
    Mask2FormerConfig, m2f = _transformers()

    class Mask2FormerDecoder(m2f.Mask2FormerPreTrainedModel):
        """transformers' pixel decoder + transformer decoder + class predictor, initialised as transformers
        initialises Mask2Former (`post_init`)."""

        def __init__(self, config, channels: int) -> None:
            super().__init__(config)
            self.pixel_decoder = m2f.Mask2FormerPixelDecoder(config, feature_channels=[channels] * 4)
            self.transformer_module = m2f.Mask2FormerTransformerModule(in_features=config.feature_size, config=config)
            self.class_predictor = nn.Linear(config.hidden_dim, config.num_labels + 1)
            self.post_init()

        def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            pixels = self.pixel_decoder(features, return_dict=True)
            decoded = self.transformer_module(pixels.multi_scale_features, pixels.mask_features,
                                              output_hidden_states=True)
            classes = [self.class_predictor(h.transpose(0, 1)) for h in decoded.intermediate_hidden_states]
            return classes, list(decoded.masks_queries_logits)

    return Mask2FormerDecoder, m2f


class Mask2FormerHead(nn.Module):
    """Neck features -> per-query class logits [B, Q, K+1] and mask logits [B, Q, H/4, W/4] per decoder
    layer; `forward(features, size)` gives per-pixel class log-probabilities, as the light head's logits
    are read (argmax, cross-entropy)."""

    def __init__(self, in_channels: int, num_classes: int, spec: Mask2FormerSpec = Mask2FormerSpec(),
                 task: str = "semantic") -> None:
        super().__init__()
        decoder, m2f = _decoder_class()
        config = spec.config(num_classes)
        self.num_classes, self.spec, self.task = num_classes, spec, task
        self.pyramid = SimplePyramid(in_channels)
        self.decoder = decoder(config, in_channels)
        weights = {"loss_cross_entropy": config.class_weight, "loss_mask": config.mask_weight,
                   "loss_dice": config.dice_weight}
        self.criterion = m2f.Mask2FormerLoss(config=config, weight_dict=weights)
        self._weights = weights

    def set_bits(self, bits: int) -> None:
        """The head is float at every bit-width (see the module docstring)."""

    def load_float_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        """A trained Mask2Former head's weights (a reference run's)."""
        check_state_dict(self.state_dict(), state, source, f"a {self.num_classes}-class mask2former head {self.spec}")
        self.load_state_dict(state)

    def predict(self, features: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        return self.decoder(self.pyramid(features))

    def loss(self, features: torch.Tensor, masks: torch.Tensor, ignore_index: int) -> torch.Tensor:
        """Mask2Former's set-prediction loss (weighted class CE, mask BCE and dice on sampled points, every
        decoder layer) against the targets of `masks` [B, H, W]: one binary mask per class present (semantic
        task: class ids) or per instance (instance task: instance codes)."""
        classes, predicted = self.predict(features)
        if self.task == "instance":
            mask_labels, class_labels = instance_targets(masks)
        else:
            mask_labels, class_labels = semantic_targets(masks, self.num_classes, ignore_index)
        auxiliary = [{"masks_queries_logits": m, "class_queries_logits": c} for m, c in zip(predicted[:-1], classes[:-1])]
        terms = self.criterion(masks_queries_logits=predicted[-1], class_queries_logits=classes[-1],
                               mask_labels=mask_labels, class_labels=class_labels, auxiliary_predictions=auxiliary)
        return sum(term * next(w for k, w in self._weights.items() if k in name) for name, term in terms.items())

    def forward(self, features: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
        classes, predicted = self.predict(features)
        probabilities = torch.einsum("bqk,bqhw->bkhw", classes[-1].softmax(-1)[..., :-1], predicted[-1].sigmoid())
        if size is not None:
            probabilities = F.interpolate(probabilities, size=size, mode="bilinear", align_corners=False)
        return torch.log(probabilities.clamp_min(1e-12) / probabilities.sum(1, keepdim=True).clamp_min(1e-12))


    @torch.no_grad()
    def detect(self, features: torch.Tensor, top_k: int = 100) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Instances per image: (class probabilities [k], class indices [k], mask logits [k, H/4, W/4]) of
        the top-k (query, class) pairs by class probability (the null class excluded), as Mask2Former's
        instance post-processing ranks them; the caller scales masks to the image and weighs in the mask
        score (`mask_scores`)."""
        classes, predicted = self.predict(features)
        probabilities = classes[-1].softmax(-1)[..., :-1]  # [B, Q, K]
        found = []
        for scores, masks in zip(probabilities, predicted[-1]):
            best, index = scores.flatten().topk(min(top_k, scores.numel()))
            found.append((best, index % self.num_classes, masks[index // self.num_classes]))
        return found


def mask_scores(logits: torch.Tensor) -> torch.Tensor:
    """Mask2Former's mask score: the mean sigmoid probability inside each binary mask (logits > 0) [k]."""
    binary = (logits > 0).float()
    return (logits.sigmoid() * binary).flatten(1).sum(1) / binary.flatten(1).sum(1).clamp_min(1e-6)


def semantic_targets(masks: torch.Tensor, num_classes: int, ignore_index: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per image: the binary masks [N, H, W] (float) and classes [N] of the classes present in `masks`."""
    mask_labels, class_labels = [], []
    for mask in masks:
        present = [int(c) for c in mask.unique() if int(c) != ignore_index and int(c) < num_classes]
        mask_labels.append(torch.stack([(mask == c).float() for c in present]) if present
                           else mask.new_zeros((0, *mask.shape), dtype=torch.float32))
        class_labels.append(torch.tensor(present, dtype=torch.long, device=mask.device))
    return mask_labels, class_labels
