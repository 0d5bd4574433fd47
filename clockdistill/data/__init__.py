from clockdistill.data.dataset import CocoDetection
from clockdistill.data.index import build_index, load_index
from clockdistill.data.transforms import DetectionTransform, collate

__all__ = ["CocoDetection", "DetectionTransform", "build_index", "collate", "load_index"]
