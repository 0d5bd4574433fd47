"""The names of the COCO metrics a run reports (no heavy imports: the CLI and the sweep schema read
them; evaluation.py computes them)."""

STAT_NAMES = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR1",
    "AR10",
    "AR100",
    "ARs",
    "ARm",
    "ARl",
)  # COCOeval.stats order
COCO_METRICS = STAT_NAMES[:6]  # the precision metrics: what a sweep can maximise and a model card reports
