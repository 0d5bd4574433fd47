"""Evaluation: COCO mAP through pycocotools (coco.py) and bootstrap intervals over images (bootstrap.py)."""
