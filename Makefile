# Every target creates .venv on first use: a fresh clone needs nothing else.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := demo-run
SPEC   ?= sweeps/configs/demo.yaml
MLFLOW_PORT ?= 5000
MLFLOW_DB ?= $(CURDIR)/mlflow.db
# the tracking server's accounts (admin, sweep, readers; written with random passwords when missing)
MLFLOW_ACCOUNTS ?= $(HOME)/.config/clockdistill/mlflow-accounts.yaml
SWEEP  ?=

.PHONY: demo demo-teacher demo-student study study-rtdetr ablation test test-fast lint bench best-student report sweep mlflow-ui venv clean

venv: $(STAMP)

# torch first, pinned: an unpinned torch pulls gigabytes of CUDA packages.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,onnx]'
	touch $(STAMP)

# Lint first: a style or pyflakes error fails in seconds, not after the suite.
# Two test processes: most tests wait on Ray, MLflow or subprocesses (tests/conftest.py: GROUPS).
test: lint
	$(PY) -m pytest -q -ra --durations=15 -n 2 --dist loadgroup

test-fast: lint
	$(PY) -m pytest -q -ra -m "not slow" -n 2 --dist loadgroup

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: $(STAMP)
	$(VENV)/bin/clockdistill demo --workdir $(DEMO)

# Rebuild the teacher the demo ships (sweeps/assets/demo-teacher) by its recipe: 30 epochs of
# hybrid-tiny-teacher on 2000 synthetic images, one thread (about 45 min here). Run it when that
# preset's architecture changes; commit the new weights, meta.json and recipe.json together.
demo-teacher: $(STAMP)
	$(VENV)/bin/clockdistill demo build-teacher --out sweeps/assets/demo-teacher --workdir demo-teacher-build

# Rebuild the demo students' pretrained starting weights (sweeps/assets/demo-student) by their recipe:
# 15 epochs of 2000 synthetic images of another seed, one thread (about 9 minutes here).
demo-student: $(STAMP)
	$(VENV)/bin/clockdistill demo build-student --out sweeps/assets/demo-student --workdir demo-student-build

# The fair efficacy study (sweeps/configs/study.yaml): every method tuned with the same budget (8 TPE
# trials of 4 epochs under ASHA), each best setting on 5 new seeds, test AP with paired intervals in
# artifacts/study/study. Rerunning skips what is done.
study: $(STAMP)
	$(VENV)/bin/clockdistill demo study-setup --workdir study-run
	$(VENV)/bin/clockdistill study sweeps/configs/study.yaml

# The same study across architectures (sweeps/configs/study-rtdetr.yaml): the ablation's hybrid teacher
# into the tiny RT-DETR student from its own pretrained weights, learning rates searched for every method.
study-rtdetr: $(STAMP)
	$(VENV)/bin/clockdistill demo study-setup --workdir study-run
	$(VENV)/bin/clockdistill demo study-teacher --workdir ablation-run
	$(VENV)/bin/clockdistill study sweeps/configs/study-rtdetr.yaml

# The method's ablation grid (sweeps/configs/ablation.yaml): its teacher (the shipped demo teacher trained
# on, 14 min on one thread here), 9 methods x 5 seeds at fixed settings two at a time (70 min on 2 cores
# here), the report with the method comparison in artifacts/report/ablation.
ablation: $(STAMP)
	$(VENV)/bin/clockdistill demo study-teacher --workdir ablation-run
	$(VENV)/bin/clockdistill sweep sweeps/configs/ablation.yaml
	$(VENV)/bin/clockdistill report --sweep ablation

bench: $(STAMP)
	$(PY) tests/bench/teacher_quality.py

# A sweep from a spec on a local Ray (or the cluster in RAY_ADDRESS); on a cluster prefer
#   ray job submit --working-dir . -- clockdistill sweep sweeps/configs/kitti.yaml
sweep: $(STAMP)
	$(VENV)/bin/clockdistill sweep $(SPEC)

# The MLflow UI on 127.0.0.1 against the project's default store (sqlite mlflow.db).
mlflow-ui: $(STAMP)
	$(VENV)/bin/clockdistill mlflow-server --accounts $(MLFLOW_ACCOUNTS) --new --backend-store-uri sqlite:///$(MLFLOW_DB) \
		--state $(dir $(MLFLOW_DB))mlflow-auth --host 127.0.0.1 --port $(MLFLOW_PORT)

# The best finished trial of the latest sweep (or SWEEP=name): verified, exported to
# artifacts/best-student/, registered in MLflow with the alias champion.
best-student: $(STAMP)
	$(VENV)/bin/clockdistill best-student $(if $(SWEEP),--sweep $(SWEEP))

# Parquet table and plots of the latest sweep (or SWEEP=name), also logged to its MLflow run.
report: $(STAMP)
	$(VENV)/bin/clockdistill report $(if $(SWEEP),--sweep $(SWEEP))

clean:
	rm -rf $(DEMO) study-run ablation-run demo-teacher-build demo-student-build .pytest_cache sweeps-storage
