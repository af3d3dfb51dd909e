"""dlorch.core.engine: self-configuring deep-learning engine (segmentation, denoising)."""
