"""The segmentation task around the encoder: datasets, the heads (light, Mask2Former), losses, the metric,
evaluation, and COCO-format instance data with mask AP."""

from qsamc.task import instances  # noqa: F401  (registers the instance task's dataset formats)
