"""Stage 2, train: `qsamc train` fine-tunes the supernet once; its config, run folders and checkpoints."""
