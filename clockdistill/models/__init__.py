"""The detector families: Deformable DETR, DAB-DETR and DINO as their reference implementations, and
this project's hybrid (build.py picks one from a ModelConfig's `arch`)."""
