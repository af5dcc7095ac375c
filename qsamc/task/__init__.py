"""The segmentation task around the encoder: datasets, the head, losses, the metric and evaluation."""
