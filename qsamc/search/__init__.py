"""Stage 3, search: cost models (BitOPs, latency tables, roofline), budgets and the evolutionary search."""
