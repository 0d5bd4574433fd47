"""The sweep subcommands of `clockdistill` (sweep, sync, report, best-student, demo), one `Command`
each; clockdistill/cli.py puts them beside the core's. Each `run` imports Ray, MLflow or torch only
when it runs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clockdistill.commands import Command
from clockdistill.errors import UserError
from clockdistill.metrics import EVALUATED_METRICS, STUDENT_PROPERTIES

METRIC_CHOICES = (*EVALUATED_METRICS, *STUDENT_PROPERTIES)


def _verbose_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--verbose",
        dest="ray_verbose",
        action="store_true",
        help="Ray's own output too: its trial status tables, warnings and the trials' logs (default: one line "
        "per trial event: started with its knobs, each epoch's AP, stopped early, failed, finished)",
    )


def _stored_sweep_arguments(p: argparse.ArgumentParser, out_help: str, out_default: str | None = None) -> None:
    """--sweep, --out and --tracking-uri, shared by the commands that read a sweep from MLflow."""
    p.add_argument("--sweep", help="sweep name (default: the latest sweep in the store)")
    p.add_argument("--out", default=out_default, help=out_help)
    p.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")


def _sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="sweep spec YAML file")
    p.add_argument("--name", help="sweep name (default: the spec's name); the same name resumes the sweep")
    p.add_argument("--summary", help="also write the summary (trials, best trial) as JSON to this file")
    _verbose_argument(p)


def _sweep(args: argparse.Namespace) -> int:
    from sweeps.tune.driver import run_sweep

    summary = run_sweep(args.spec, args.name, verbose=args.ray_verbose or args.verbose)
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=1))
    return 0


def _sync_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="the sweep's spec YAML file (its storage_path and mlflow settings are used)")
    p.add_argument("--name", help="sweep name (default: the spec's name)")


def _sync(args: argparse.Namespace) -> int:
    from sweeps.tracking.sync import sync_sweep

    sync_sweep(args.spec, args.name)
    return 0


def _best_student_arguments(p: argparse.ArgumentParser) -> None:
    _stored_sweep_arguments(p, "export directory (default artifacts/best-student; replaced)", "artifacts/best-student")
    p.add_argument("--metric", choices=METRIC_CHOICES, help="rank by this objective (default: the sweep's first)")
    p.add_argument(
        "--prefer",
        help="multi-objective sweeps: take the Pareto-set trial best in this objective (default: the first objective)",
    )
    p.add_argument(
        "--tolerance", type=float, default=2e-3, help="largest accepted |re-evaluated AP - logged AP| (default 0.002)"
    )
    p.add_argument(
        "--device",
        default="auto",
        help="device of the re-evaluation and the test-split figures: auto (a GPU when there is one, as the "
        "trials ran), cuda[:N] or cpu; in the precision each trial trained in (train.amp) (default auto)",
    )
    p.add_argument("--no-register", action="store_true", help="export only; do not touch the model registry")
    p.add_argument(
        "--confirm",
        type=int,
        default=0,
        metavar="K",
        help="first retrain the top K settings and the student alone with --seeds new seeds (a second Tune run, "
        "<sweep>-confirmKxS, resumable), and take the champion from the setting with the best mean validation "
        "objective; test AP is then reported per setting as a mean with an interval over seeds (default 0: off)",
    )
    p.add_argument("--seeds", type=int, default=3, metavar="S", help="new seeds per setting of --confirm (default 3)")
    _verbose_argument(p)


def _best_student(args: argparse.Namespace) -> int:
    from sweeps.results.best_student import best_student

    if args.tolerance < 0:
        raise UserError(f"--tolerance: expected an AP difference >= 0, got {args.tolerance}")
    if args.confirm < 0 or args.seeds < 1:
        raise UserError(f"--confirm K --seeds S: expected K >= 0 and S >= 1, got {args.confirm} and {args.seeds}")
    if args.confirm and (args.metric or args.prefer):
        raise UserError("--confirm ranks settings by the sweep's first objective; leave out --metric and --prefer")
    best_student(
        args.sweep, args.metric, args.prefer, args.out, args.tracking_uri, args.tolerance, args.device,
        not args.no_register, args.confirm, args.seeds, args.ray_verbose,
    )  # fmt: skip
    return 0


def _report_arguments(p: argparse.ArgumentParser) -> None:
    _stored_sweep_arguments(p, "output directory (default artifacts/report/<sweep>)")
    p.add_argument(
        "--baseline-ap",
        type=float,
        help="AP of a student trained without distillation, drawn as a reference line "
        "(default: the sweep's own distill.method=none trials, if any)",
    )
    p.add_argument("--no-mlflow", action="store_true", help="write the files only; do not log them to the sweep's run")


def _report(args: argparse.Namespace) -> int:
    from sweeps.results.report import build_report

    build_report(args.sweep, args.out, args.tracking_uri, args.baseline_ap, not args.no_mlflow)
    return 0


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="demo-run", help="where data, teacher and sweep storage go (default demo-run)")
    p.add_argument("--train", type=int, default=1000, help="synthetic training images (default 1000)")
    p.add_argument("--val", type=int, default=300, help="synthetic validation images (default 300)")
    p.add_argument(
        "--test",
        type=int,
        default=300,
        help="held-out test images, on which the table's test AP is measured (default 300; 0: none)",
    )
    p.add_argument(
        "--teacher-epochs",
        type=int,
        help="train a teacher here for this many epochs instead of taking the shipped one (AP 0.44 after 30 "
        "epochs on 2000 images; see sweeps/assets/demo-teacher/recipe.json)",
    )
    p.add_argument("--trials", type=int, help="distilled sweep trials (default: the spec's num_samples, 6)")
    p.add_argument("--sweep-epochs", type=int, help="epochs per trial (default: the spec's, 4)")
    _verbose_argument(p)


def _demo(args: argparse.Namespace) -> int:
    from sweeps.demo import run_demo

    run_demo(
        Path(args.workdir), args.train, args.val, args.teacher_epochs, args.trials, args.sweep_epochs,
        verbose=args.ray_verbose or args.verbose, n_test=args.test,
    )  # fmt: skip
    return 0


def _build_arguments(what: str, workdir: str):
    def arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--out", default=f"sweeps/assets/demo-{what}", help=f"where the {what} goes (default: the shipped)"
        )
        p.add_argument("--workdir", default=workdir, help="data and training checkpoints")
        p.add_argument("--threads", type=int, default=1, help="torch threads (the recipe's figures: 1)")

    return arguments


def _build_teacher(args: argparse.Namespace) -> int:
    from sweeps.demo import build_teacher

    build_teacher(Path(args.out), Path(args.workdir), args.threads)
    return 0


def _build_student_arguments(p: argparse.ArgumentParser) -> None:
    _build_arguments("student", "demo-student-build")(p)
    p.add_argument(
        "--preset",
        default="hybrid-tiny-student",
        help="the student preset (default: the demo's, %(default)s; e.g. rtdetr-tiny-student for a real-time "
        "student's starting weights)",
    )


def _build_student(args: argparse.Namespace) -> int:
    from sweeps.demo import build_student

    build_student(Path(args.out), Path(args.workdir), args.threads, args.preset)
    return 0


def _study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="study spec YAML file (a sweep spec with methods and confirm_seeds)")
    p.add_argument("--out", help="where the study page goes (default artifacts/study/<name>)")
    p.add_argument(
        "--device", default="auto", help="device of the test-split evaluations: auto, cuda[:N] or cpu (default auto)"
    )
    _verbose_argument(p)


def _study(args: argparse.Namespace) -> int:
    from sweeps.study import run_study

    run_study(args.spec, args.out, args.device, args.ray_verbose or args.verbose)
    return 0


def _study_setup_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="study-run", help="data and teacher go here (default study-run)")
    p.add_argument("--train", type=int, default=1000, help="synthetic training images (default 1000)")
    p.add_argument("--val", type=int, default=300, help="synthetic validation images (default 300)")
    p.add_argument("--test", type=int, default=1000, help="held-out test images (default 1000)")


def _study_setup(args: argparse.Namespace) -> int:
    from sweeps.demo import prepare_study

    prepare_study(Path(args.workdir), args.train, args.val, args.test)
    return 0


def _study_teacher_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="ablation-run", help="data and teacher go here (default ablation-run)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")


def _study_teacher(args: argparse.Namespace) -> int:
    from sweeps.demo import build_study_teacher
    from sweeps.tune.console import short_path

    best, ap = build_study_teacher(Path(args.workdir), args.threads)
    print(f"study teacher: AP {ap:.4f} -> {short_path(best)}")
    return 0


def _accounts_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--accounts", required=True, help="the accounts YAML file (admin, sweep, readers; chmod 600)")
    p.add_argument("--tracking-uri", required=True, help="the running authenticated server, e.g. http://mlflow:5000")


def _accounts(args: argparse.Namespace) -> int:
    from sweeps.tracking.accounts import create_accounts, load_accounts

    accounts = load_accounts(args.accounts)
    created = create_accounts(args.tracking_uri, accounts)
    print(f"{args.tracking_uri}: created {', '.join(created) or 'no account'} (the others existed)")
    return 0


def _server_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--accounts", required=True, help="the accounts YAML file (admin, sweep, readers; chmod 600)")
    p.add_argument("--new", action="store_true", help="write the accounts file with random passwords if it is missing")
    p.add_argument("--backend-store-uri", default="sqlite:///mlflow.db", help="runs and models (default: %(default)s)")
    p.add_argument("--state", default="mlflow-auth", help="the auth config and user database (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=5000, help="port (default: %(default)s)")


def _server(args: argparse.Namespace) -> int:
    from sweeps.tracking.server import serve_with_accounts

    return serve_with_accounts(args.accounts, args.new, args.backend_store_uri, Path(args.state), args.host, args.port)


def _check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="the sweep's spec YAML file (its storage_path and mlflow settings are read)")
    p.add_argument("--name", help="sweep name (default: the spec's name)")
    p.add_argument("--tracking-uri", help="MLflow store (default: the spec's, else MLFLOW_TRACKING_URI)")


def _check(args: argparse.Namespace) -> int:
    from sweeps.results.invariants import check_invariants, print_invariants

    invariants = check_invariants(args.spec, args.name, args.tracking_uri)
    print_invariants(invariants)
    return 0 if all(i.held for i in invariants) else 1


COMMANDS = (
    Command(
        "check",
        "the invariants a finished sweep must hold, from Tune's storage and MLflow (exit 1 when one breaks)",
        _check_arguments,
        _check,
        "Check a sweep after the fact, whatever happened to it: every trial finished, was stopped by the scheduler "
        "or failed with its reason (within max_failures); MLflow holds one run per trial and every reported epoch "
        "exactly once with Tune's value; no metric went backwards in step; Tune's best trial is best-student's pick.",
    ),
    Command(
        "mlflow-server",
        "an MLflow tracking server with accounts: admin, the sweep account, read-only users (make mlflow-ui)",
        _server_arguments,
        _server,
        "Run MLflow's server with its basic-auth app: every resource READ by default, users in --state, the admin's "
        "first password and the accounts from the --accounts file (written with random passwords by --new when "
        "missing), the sweep account and the readers created once the server is up. Clients authenticate with "
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD; no password is written anywhere else.",
        "example: clockdistill mlflow-server --accounts ~/.config/clockdistill/mlflow-accounts.yaml --new",
    ),
    Command(
        "accounts",
        "create the sweep account and the read-only users on a running authenticated MLflow server",
        _accounts_arguments,
        _accounts,
        "As the accounts file's admin, create its sweep account and readers on the server (existing users are left "
        "as they are): for the cluster's server (cluster/mlflow), whose admin the server creates on its first start.",
    ),
    Command(
        "sweep",
        "run (or resume) a Ray Tune sweep over distillation settings",
        _sweep_arguments,
        _sweep,
        "Validate a sweep spec (sweeps/configs/*.yaml) and run it with Ray Tune: Optuna proposes settings, ASHA "
        "stops bad trials, every trial is an MLflow run under the sweep's run. Runs on the cluster in RAY_ADDRESS "
        "when set (e.g. under `ray job submit`), else on a local Ray. Launching a sweep name again resumes it: "
        "finished trials are not rerun.",
        "example: ray job submit --working-dir . -- clockdistill sweep sweeps/configs/kitti.yaml",
    ),
    Command(
        "sync",
        "write a sweep's results from its storage into MLflow (backfill)",
        _sync_arguments,
        _sync,
        "Read every trial's results and best checkpoint from the sweep's storage_path and write them to the spec's "
        "MLflow store: runs created when missing (found by trial_id otherwise), epochs already logged skipped, "
        "full-budget trials closed FINISHED. For writes a tracking outage left behind, or to copy a sweep into "
        "another store.",
    ),
    Command(
        "best-student",
        "pick, verify, export and register the best student of a sweep",
        _best_student_arguments,
        _best_student,
        "Find the sweep in MLflow (the latest when not named), take the best trial that finished its full budget, "
        "re-evaluate its best checkpoint on the validation split (refused when the AP differs from the logged AP, "
        "or the weights changed since the sweep), export it (safetensors, config, TorchScript, ONNX with the onnx "
        "extra, a model card) and register it in MLflow with the alias champion. Running it again registers no "
        "second version of the same trial. With --confirm K the top K settings and the student alone are first "
        "retrained on --seeds new seeds and the champion comes from the best mean over seeds.",
        "example: clockdistill best-student --sweep demo --out artifacts/best-student --confirm 2 --seeds 3",
    ),
    Command(
        "report",
        "a sweep's trials as a Parquet table and PNG plots, logged to its MLflow run",
        _report_arguments,
        _report,
        "Write every trial of a sweep (the latest when not named) to trials.parquet (config, status, budget reached, "
        "per-epoch metrics) and draw: the objective over epochs with teacher and no-KD baseline lines, the "
        "objective against each searched knob, Optuna's fANOVA parameter importance, the Pareto front "
        "(multi-objective sweeps) and validation images with ground-truth, teacher and best-student boxes. "
        "Everything is also logged under report/ of the sweep's MLflow run.",
    ),
    Command(
        "demo",
        "synthetic data -> teacher -> demo sweep -> report, best student, and what distillation gained",
        _demo_arguments,
        _demo,
        "The embedded default end to end on a CPU, under 10 minutes on 2 cores: write synthetic data, take the "
        "shipped tiny teacher (sweeps/assets/demo-teacher), run the demo sweep (sweeps/configs/demo.yaml: Optuna "
        "TPE + ASHA over distillation knobs on a local Ray, tracked in MLflow, with one student trained without "
        "distillation on the same budget), write the report, export the best student, and print teacher / "
        "student alone / best distilled student with their AP, size and CPU latency. Finished stages are reused "
        "when run again. Its actions rebuild the shipped teacher and the efficacy study's teacher.",
    ),
    Command(
        "demo build-teacher",
        "train the demo teacher by its recipe and write the shipped files (make demo-teacher; about 45 min)",
        _build_arguments("teacher", "demo-teacher-build"),
        _build_teacher,
        "Train hybrid-tiny-teacher by the recipe in sweeps/assets/demo-teacher/recipe.json (30 epochs of 2000 "
        "synthetic images, one thread) and write its weights, metadata without machine paths, and recipe.json "
        "with the command, its sha256 and its figures. Run it when that preset's architecture changes.",
    ),
    Command(
        "demo build-student",
        "pretrain the demo students' starting weights by their recipe (make demo-student; about 9 min)",
        _build_student_arguments,
        _build_student,
        "Train hybrid-tiny-student alone by the recipe in sweeps/assets/demo-student/recipe.json (15 epochs of 2000 "
        "synthetic images of seed 1, none of the demo's; one thread) and write it as the demo's trials start from "
        "it (train.init_from): the students' own pretrained weights, as a real student starts from weights "
        "pretrained elsewhere. Run it when that preset's architecture changes.",
    ),
    Command(
        "study",
        "the fair efficacy study: every method tuned with the same budget, confirmed on seeds, tested",
        _study_arguments,
        _study,
        "Run a study spec (sweeps/configs/study.yaml): one sweep per method with the same search algorithm, "
        "scheduler, trial count and epochs over that method's own knobs (the student alone over its learning "
        "rates); the best setting of each (validation objective) retrained on confirm_seeds new seeds in one grid; "
        "every confirmation run, and each method's chosen and one random tuning trial, evaluated on the test "
        "split. Prints and writes per method the mean test AP with its spread, the paired difference to the "
        "student alone and to the best baseline with 95% intervals over seeds, and the winner's curse "
        "(validation minus test AP of the chosen trial). Every stage resumes when launched again.",
        "example: clockdistill demo study-setup && clockdistill study sweeps/configs/study.yaml",
    ),
    Command(
        "demo study-setup",
        "the data and teacher of sweeps/configs/study.yaml: synthetic train/val/test and the shipped teacher",
        _study_setup_arguments,
        _study_setup,
        "Write the study's synthetic data (the demo's generator and seed, with a larger test split) to "
        "<workdir>/data and install the shipped demo teacher as <workdir>/teacher/best. Reused when done.",
    ),
    Command(
        "demo study-teacher",
        "the ablation's teacher: the shipped one trained on, on 3x the images (14 min on one thread here)",
        _study_teacher_arguments,
        _study_teacher,
        "The teacher of sweeps/configs/ablation.yaml: the shipped demo teacher trained 6 more epochs on 6000 "
        "synthetic images of the same generator (the students' 2000 are its first, with the same validation "
        "split), written to <workdir>/teacher/best. Reused when it is done.",
    ),
)
