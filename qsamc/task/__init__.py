"""The segmentation task around the encoder: datasets, the heads (light, Mask2Former), losses, the metric,
evaluation, and COCO-format instance data with mask AP."""
