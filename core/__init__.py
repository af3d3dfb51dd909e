"""dlorch.core: what every role shares (specs, storage, image IO, the engine)."""
