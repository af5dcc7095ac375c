"""Latency tables: `qsamc profile` times every fused part on a target's latency backend for search."""
