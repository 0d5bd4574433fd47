"""CLoCKDistill and its baselines: frozen teacher, GT location masks, target-aware queries, the Distiller."""
