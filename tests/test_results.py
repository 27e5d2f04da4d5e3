"""tools/collect_results.py and the quickstart's summary: rows read from the runs' own files (run.json,
eval.json, last.pth), seeds grouped into a mean and a sample standard deviation, Markdown, CSV and plot."""
import csv
import json
import statistics

import pytest
import torch

import collect_results as collect
import toy_pipeline
from furnace.config import SETTINGS


def fake_run(folder, miou, seed=0, network="resnet18", method="mgd", partition=8, best=None, epochs=2,
             train_seconds=60.0, **keys):
    """A run folder as a training and an evaluation leave it (its identity reduced to the keys read here)."""
    identity = {**dict(dataset="voc", partition=partition, network=network, method=method, seed=seed,
                       num_classes=6, setting="published", **SETTINGS["published"]), **keys}
    (folder / "snapshot").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"identity": identity}))
    torch.save({"model": {}, "network": network, "num_classes": 6, "epoch": epochs,
                "train_seconds": train_seconds}, folder / "snapshot" / "last.pth")
    entries = [{"checkpoint": str(folder / "snapshot" / "last.pth"), "epoch": None, "miou": miou / 100,
                "iou": [miou / 100] * 6}]
    if best is not None:  # an earlier checkpoint evaluated too (eval.py -e), better than the last
        entries.insert(0, {"checkpoint": str(folder / "snapshot" / "epoch-1.pth"), "epoch": 1, "miou": best / 100,
                           "iou": [best / 100] * 6})
    (folder / "eval.json").write_text(json.dumps(entries))


def test_seeds_grouped_with_mean_and_spread(tmp_path):
    root = tmp_path / "runs"
    for seed, miou in enumerate([60.0, 64.0, 62.0]):
        fake_run(root / "r18" / f"mgd-seed{seed}", miou, seed=seed, best=70.0 if seed == 1 else None)
    for seed, miou in enumerate([50.0, 52.0]):
        fake_run(root / "r18" / f"sup-seed{seed}", miou, seed=seed, method="supervised", train_seconds=30.0)
    fake_run(root / "r18" / "mgd-fast", 66.0, setting="fast", **SETTINGS["fast"])
    fake_run(root / "r18" / "mgd-online", 61.0, setting="fast", **dict(SETTINGS["fast"], teacher_labels="online"))
    (root / "unrelated").mkdir()  # folders without eval.json are not runs

    rows = collect.collect(str(root), str(tmp_path / "out"))
    assert [(r["method"], r["setting"], r["n"]) for r in rows] == [
        ("mgd", "fast", 1), ("mgd", "fast*", 1), ("mgd", "published", 3), ("supervised", "published", 2)]
    mgd = rows[2]
    assert mgd["seeds"] == [0, 1, 2] and mgd["miou_last"] == pytest.approx([60.0, 64.0, 62.0])
    assert mgd["miou_last_mean"] == pytest.approx(62.0) and mgd["miou_last_std"] == pytest.approx(2.0)
    assert mgd["miou_best_mean"] == pytest.approx(statistics.mean([60.0, 70.0, 62.0]))  # seed 1's best: epoch 1
    assert (mgd["epochs"], mgd["train_seconds_mean"]) == (2, 60.0)
    assert mgd["backbone_gflops"] == pytest.approx(34.3, abs=0.1)  # ResNet-18 OS16 at 512x512
    assert rows[3]["miou_last_std"] == pytest.approx(statistics.stdev([50.0, 52.0]))

    table = (tmp_path / "out" / "results.md").read_text()
    assert "| voc | 1/8 | resnet18 | mgd | published | 3 | 62.00 ± 2.00 | 60.0, 64.0, 62.0 |" in table
    with open(tmp_path / "out" / "results.csv") as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 4 and float(lines[2]["miou_last_mean"]) == pytest.approx(62.0)
    assert lines[2]["folders"] == "r18/mgd-seed0 r18/mgd-seed1 r18/mgd-seed2"
    assert not (tmp_path / "out" / "miou_vs_labeled.png").exists()  # one partition only: no plot

    per_run = collect.group_seeds(collect.find_runs(str(root)), str(root), per_run=True)
    assert len(per_run) == 7


def test_plot_across_partitions_and_errors(tmp_path, capsys):
    root = tmp_path / "runs"
    for partition, miou in [(8, 60.0), (16, 50.0)]:
        fake_run(root / f"p{partition}", miou, partition=partition)
    collect.collect(str(root))
    assert (root / "miou_vs_labeled.png").stat().st_size > 1000

    (root / "p8" / "eval.json").write_text("{not json")
    with pytest.raises(SystemExit) as exit_info:
        collect.main([str(root)])
    assert exit_info.value.code == 2 and "p8/eval.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        collect.main([str(tmp_path / "nowhere")])
    assert "results root not found" in capsys.readouterr().err


def test_quickstart_summary_and_verdict(tmp_path):
    """The toy pipeline's rows are its stages' runs read back, seeds together; the verdict compares the gap with
    three times the larger spread."""
    records = []
    for method, values in [("supervised", [60.0, 62.0, 64.0]), ("mgd", [70.0, 71.0, 72.0])]:
        for seed, miou in enumerate(values):
            folder = tmp_path / f"{method}-seed{seed}"
            fake_run(folder, miou, seed=seed, method=method)
            records.append({**collect.read_run(str(folder)), "label": f"ResNet-18 {method}", "role": "student",
                            "params_m": 16.6})
    rows = toy_pipeline.summarise(records)
    assert [(r["label"], r["n"]) for r in rows] == [("ResNet-18 supervised", 3), ("ResNet-18 mgd", 3)]
    assert rows[1]["miou_last_mean"] == pytest.approx(71.0) and rows[0]["miou_last_std"] == pytest.approx(2.0)
    assert "+9.00 mIoU over 3 seeds" in toy_pipeline.verdict(rows) and "a difference" in toy_pipeline.verdict(rows)
    rows[0]["miou_last_std"] = 3.5
    assert "no difference" in toy_pipeline.verdict(rows)
    rows.insert(0, dict(label="WRN-50-2 teacher (CPS)", role="teacher", method="cps", n=1, miou_last_mean=75.0,
                        miou_last_std=0.0))
    lines = toy_pipeline.verdict(rows).splitlines()
    assert lines[1] == ("WRN-50-2 teacher (CPS): +4.00 over mgd (more than 3 x its spread 1.00), +13.00 over "
                        "supervised (more than 3 x its spread 3.50).")
    rows[0]["miou_last_mean"] = 73.0
    assert "+2.00 over mgd (less than 3 x its spread 1.00)" in toy_pipeline.verdict(rows)
    rows[1]["n"] = 1
    assert "not a result" in toy_pipeline.verdict(rows)
    rows.pop(0)  # the teacher row above is reduced to what the verdict reads
    assert "| resnet18 | mgd | 3 | 71.00 ± 1.00 | 70.0, 71.0, 72.0 |" in toy_pipeline.format_table(rows)


def test_teachers_of_another_schedule_are_refused_before_any_work(tmp_path):
    """--teacher-epochs sets the teacher stages' epochs; a teacher folder under --out holding a run of another
    schedule is refused before any stage runs, naming the key, instead of counting as done."""
    from furnace.run import RunRefused, write_identity
    default, shorter = toy_pipeline.teacher_stages(), toy_pipeline.teacher_stages(5)
    assert [s.overrides for s in shorter] == [["epochs=5"], ["epochs=5"]] and default[0].overrides == []
    stage = default[0]
    C = toy_pipeline.load_experiment_config(stage.experiment, toy_pipeline.stage_overrides(stage, str(tmp_path)),
                                            stage.cfg_files)
    assert C.epochs == 10  # toy_teachers.cfg
    (tmp_path / stage.experiment / "cps" / "snapshot").mkdir(parents=True)
    write_identity(C)  # a finished 10-epoch teacher, as training leaves it
    torch.save({}, tmp_path / stage.experiment / "cps" / "snapshot" / "last.pth")
    toy_pipeline.check_stages(default, str(tmp_path))  # the same schedule: nothing to refuse
    with pytest.raises(RunRefused, match="epochs: 10 there, 5 now"):
        toy_pipeline.check_stages(shorter, str(tmp_path))
