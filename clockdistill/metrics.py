"""The names of everything a run reports, and their one owner: the engine, the distiller and the sweep
trial loop emit them under these names; the MLflow schema, the report, the console and the CLI read
them from here. (No heavy imports: evaluation.py computes the COCO metrics.)"""

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
# KITTI's own metric (evaluation/kitti.py), on data converted by `clockdistill data kitti`: AP|R40 per
# class and difficulty ("kitti/Car/moderate"), AP|R11 ("kitti/Car/moderate/R11"), and the mean AP|R40
# over the classes ("kitti/mean/moderate")
KITTI_CLASSES = ("Car", "Pedestrian", "Cyclist")
KITTI_DIFFICULTIES = ("easy", "moderate", "hard")


def kitti_metric(cls: str | None, difficulty: str, r11: bool = False) -> str:
    """The name of a KITTI figure: a class's AP|R40 (or AP|R11), or with cls None the classes' mean AP|R40."""
    return f"kitti/{cls or 'mean'}/{difficulty}" + ("/R11" if r11 else "")


KITTI_METRICS = tuple(
    kitti_metric(c, d, r11) for d in KITTI_DIFFICULTIES for c in KITTI_CLASSES for r11 in (False, True)
) + tuple(kitti_metric(None, d) for d in KITTI_DIFFICULTIES)
EVALUATED_METRICS = COCO_METRICS + KITTI_METRICS  # what an evaluation epoch can report and a sweep select on

# every epoch of a training run (engine.fit)
EPOCH = "epoch"  # 1-based; the MLflow step
LR = "lr"
LOSS = "loss"  # the weighted total; each unweighted term under its own name (loss_cls_0, kd_mem_fg, ...)
TRAIN_TIME = "train_time_s"
EVAL_TIME = "eval_time_s"
# a distillation run adds (Distiller.extra_metrics): each part's weighted contribution to the loss,
# and the teacher's AP as its checkpoint records it (the reference line)
LOSS_DET = "loss_det"
LOSS_KD_MEM = "loss_kd_mem"
LOSS_KD_LOGIT = "loss_kd_logit"
LOSS_PARTS = (LOSS_DET, LOSS_KD_MEM, LOSS_KD_LOGIT)
KD_PREFIX = "kd_"  # every distillation term; these prefixes are memory terms, the other kd_ terms logit terms
MEMORY_TERM_PREFIXES = ("kd_mem", "kd_fitnet", "kd_feat")
TEACHER_AP = "teacher_AP"
# with a teacher exchange (distill/exchange.py): the fraction of the epoch's teacher outputs that
# another run on the same batch computed
TEACHER_SHARED = "teacher_shared"
# a sweep trial adds (sweeps/tune/trial.py): the student's properties an objective can trade AP
# against, and the trial's own clock
PARAMS = "params"
LATENCY = "latency_ms"
STUDENT_PROPERTIES = (PARAMS, LATENCY)
STARTUP = "startup_s"  # imports, model and data set-up, cache opening, the first checkpoint (first report)
TRIAL_WALL = "trial_wall_s"  # since the trial's process started (or finished its previous trial)
TRIAL_OVERHEAD = "trial_overhead_s"  # the part of it not spent in training or evaluation epochs
TIMINGS = (TRAIN_TIME, EVAL_TIME, STARTUP, TRIAL_WALL, TRIAL_OVERHEAD)
# best-student, on the held-out test split (each with LOW / HIGH: its 95% bootstrap interval over images)
TEST_AP = "test_AP"
TEST_GAIN = "test_AP_gain_vs_alone"  # the winner minus the sweep's student trained alone, on the same resamples
SELECTION_GAP = "selection_minus_test_AP"  # the winner's validation AP (what chose it) minus its test AP
LOW, HIGH = "_low", "_high"


def loss_part(term: str) -> str:
    """The weighted part (LOSS_PARTS) an unweighted loss term belongs to."""
    if not term.startswith(KD_PREFIX):
        return LOSS_DET
    return LOSS_KD_MEM if term.startswith(MEMORY_TERM_PREFIXES) else LOSS_KD_LOGIT
