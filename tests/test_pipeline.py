"""The pipeline behind `make demo`: its QUICK variant end to end, its parsing and its errors."""
import json
import math
import subprocess
import sys

import pytest

from fgd_d2.errors import ConfigError
from fgd_d2.pipeline import METRICS, read_bbox_metrics, read_train_seconds, results_markdown, run_pipeline
from tiny import REPO


def _strict_json(path):
    def reject(constant):
        raise ValueError(f"{path} holds {constant}")

    return json.loads(path.read_text(), parse_constant=reject)


def test_quick_pipeline_end_to_end(tmp_path):
    output = tmp_path / "demo"
    cmd = [sys.executable, "-m", "fgd_d2.pipeline", "--quick", "--output", str(output)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    results = _strict_json(output / "results.json")
    assert results["family"] == "retinanet" and results["schedule"] == "quick" and results["seeds"] == [0]
    for key in ("teacher", "student", "fgd_student"):
        row = results[key]
        for metric in METRICS:
            assert row[metric] is None or (isinstance(row[metric], float) and 0 <= row[metric] <= 100)
        assert row["train_seconds"] is not None and row["train_seconds"] >= 0
        assert [run["seed"] for run in row["runs"]] == row["seeds"]
    assert (output / "teacher" / "model_final.pth").is_file()
    assert (output / "fgd_student_seed0" / "model_final_student.pth").is_file()
    # The FGD stage really distilled: its metrics carry the per-level FGD terms.
    fgd_metrics = (output / "fgd_student_seed0" / "metrics.json").read_text()
    assert "fgd/p3/fg" in fgd_metrics and "loss_fgd_global" in fgd_metrics
    assert "fgd/" not in (output / "student_seed0" / "metrics.json").read_text()

    table = (output / "results.md").read_text()
    for label in ("teacher", "student alone", "student + FGD"):
        assert f"| {label} |" in table
    assert (output / "attention.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second run reuses every finished stage.
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert proc.stderr.count("not run again") == 3


@pytest.mark.parametrize("family, level", [("faster_rcnn", "p2"), ("fcos", "p3")])
def test_quick_pipeline_of_the_other_families(tmp_path, family, level):
    output = tmp_path / family
    cmd = [sys.executable, "-m", "fgd_d2.pipeline", "--quick", "--family", family, "--output", str(output)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = _strict_json(output / "results.json")
    assert results["family"] == family and {"teacher", "student", "fgd_student"} <= set(results)
    assert f"fgd/{level}/fg" in (output / "fgd_student_seed0" / "metrics.json").read_text()
    assert (output / "attention.png").is_file()


def test_read_bbox_metrics_takes_the_last_evaluation_and_maps_nan_to_null(tmp_path):
    path = tmp_path / "metrics.json"
    lines = [
        {"iteration": 9, "total_loss": 1.0},
        {"iteration": 9, "bbox/AP": 1.0, "bbox/AP50": 2.0, "bbox/AP75": 3.0, "bbox/APs": 4.0, "bbox/APm": 5.0,
         "bbox/APl": 6.0},
        {"iteration": 19, "bbox/AP": 11.0, "bbox/AP50": 12.0, "bbox/AP75": 13.0, "bbox/APs": float("nan"),
         "bbox/APm": 15.0, "bbox/APl": 16.0},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n{\"iteration\": 2")  # last line cut
    metrics = read_bbox_metrics(path)
    assert metrics == {"AP": 11.0, "AP50": 12.0, "AP75": 13.0, "APs": None, "APm": 15.0, "APl": 16.0}
    assert read_bbox_metrics(tmp_path / "absent.json") is None


def test_read_train_seconds(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("x\n[d2] Total training time: 0:01:05 (0:00:02 on hooks)\n"
                   "[d2] Total training time: 1:02:03 (0:00:04 on hooks)\n")
    assert read_train_seconds(log) == 3723.0
    log.write_text("no timing\n")
    assert read_train_seconds(log) is None


def test_results_markdown_has_mean_and_seed_rows():
    def row(ap, seeds):
        runs = [dict(seed=s, train_seconds=60.0, **{m: ap + s for m in METRICS}) for s in seeds]
        mean = {m: sum(r[m] for r in runs) / len(runs) for m in METRICS}
        return dict(mean, train_seconds=60.0, seeds=list(seeds), runs=runs)

    results = dict(dataset="d", family="retinanet", schedule="full", seeds=[0, 1], teacher=row(50.0, [0]),
                   student=row(40.0, [0, 1]), fgd_student=row(42.0, [0, 1]))
    table = results_markdown(results)
    assert "| student alone (mean of 2 seeds) | 40.5 |" in table
    assert "| student + FGD, seed 1 | 43.0 |" in table
    assert "| teacher | 50.0 |" in table
    assert "FGD gain over the student alone: 2.00 AP." in table
    assert not math.isnan(float(table.split("gain over the student alone: ")[1].split(" ")[0]))


def test_missing_annotation_file_fails_before_training(tmp_path):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "annotations").mkdir()
    (data / "annotations" / "instances_train.json").write_text("{}")
    with pytest.raises(ConfigError, match="instances_val.json"):
        run_pipeline(str(data), str(tmp_path / "out"), "retinanet", "quick")
    assert not (tmp_path / "out" / "teacher").exists()


def test_unknown_family_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="--family"):
        run_pipeline(None, str(tmp_path), "yolo", "quick")
