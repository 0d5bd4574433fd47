"""COCO-format data: the reader and its Parquet index, transforms, the synthetic generator, KITTI."""
