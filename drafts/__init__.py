"""Draft models and model-free drafts (proposers for the specdec engine)."""
