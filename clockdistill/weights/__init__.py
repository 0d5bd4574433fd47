"""Weights in: importers of published checkpoints, ImageNet backbones, and a fresh run's starting weights."""
