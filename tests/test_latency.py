"""A sweep's latency objective: measured once per architecture, size, device and precision on a node,
by the prebuild step before any trial starts, and read by every trial of that architecture."""

import pytest

from clockdistill import latency as L
from clockdistill.config.layers import resolve_config


def _cfg(tmp_path, **model):
    return resolve_config(
        {"model": {"preset": "hybrid-tiny-student", **model}, "data": {"max_size": 64, "cache_dir": str(tmp_path)}}
    )


def test_the_node_table_measures_each_architecture_once(tmp_path, monkeypatch):
    import torch

    from clockdistill.models.build import build_detector

    calls = []
    real = L.deployment_latency_ms
    monkeypatch.setattr(L, "deployment_latency_ms", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    cpu = torch.device("cpu")
    cfg = _cfg(tmp_path)
    model = build_detector(cfg.model, 3)
    first, measured = L.node_latency_ms(model, cfg, cpu, "first")
    again, measured_again = L.node_latency_ms(model, cfg, cpu, "second")
    assert measured and not measured_again and again == first > 0 and calls == [64]
    wider = _cfg(tmp_path, dec_layers=2)  # another architecture: its own entry
    L.node_latency_ms(build_detector(wider.model, 3), wider, cpu, "third")
    bigger = cfg.updated({"data.max_size": 96})  # another input size too
    L.node_latency_ms(model, bigger, cpu, "fourth")
    assert calls == [64, 64, 96]
    table = L.latency_table(tmp_path)
    assert sorted(e["measured"] for e in table.values()) == ["first", "fourth", "third"]
    assert {e["precision"] for e in table.values()} == {"fp32"}  # a CPU runs fp32 whatever train.amp says


def test_the_prebuild_measures_alone_and_trials_read_it(tmp_path, tiny_teacher, caplog):
    from sweeps.tune.prebuild import _build, needs_node_caches
    from sweeps.tune.spec import parse_spec, spec_to_json
    from sweeps.tune.trial import student_properties, trial_config

    spec = parse_spec(
        {
            "name": "lat",
            "teacher": str(tiny_teacher),
            "student": "hybrid-tiny-student",
            "epochs": 1,
            "config": {"data": {"cache_dir": str(tmp_path)}},
            "search_space": {"distill.logit.weight": {"loguniform": [0.25, 4.0]}},
            "objectives": [{"metric": "AP", "mode": "max"}, {"metric": "latency_ms", "mode": "min"}],
        }
    )
    assert needs_node_caches(spec)
    built = _build(spec_to_json(spec))
    table = L.latency_table(tmp_path)
    assert [e["measured"] for e in table.values()] == ["before the sweep, alone"]
    with caplog.at_level("WARNING"):
        for weight in (0.5, 2.0):  # two trials of the same architecture
            props = student_properties(trial_config(spec, {"distill.logit.weight": weight}, tmp_path / "t"), True)
            assert props["latency_ms"] == pytest.approx(built["latency_ms"])
    assert "measured by the trial itself" not in caplog.text
    wider = student_properties(trial_config(spec, {"model.dec_layers": 2}, tmp_path / "t"), True)
    assert wider["latency_ms"] > 0 and "measured by the trial itself" in caplog.text
