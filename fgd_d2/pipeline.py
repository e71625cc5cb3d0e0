"""
The FGD pipeline behind ``make demo``: teacher -> student alone -> student with FGD, evaluated, in one command.

    python -m fgd_d2.pipeline [--data COCO_FOLDER] [--output DIR] [--family retinanet|faster_rcnn|fcos] [--quick]
                              [--seeds 0 1]

Stages, each a ``train_net.py`` run of a config under ``configs/cpu/`` (Detectron2's logging shows progress and ETA):

1. the teacher (skipped when ``OUTPUT/teacher/model_final.pth`` exists);
2. the student alone, once per seed;
3. the student with FGD from that teacher, same config and schedule, once per seed;
4. COCO evaluation of each (Detectron2's COCOEvaluator at the end of every training run, read from its
   ``metrics.json``);
5. ``OUTPUT/results.json`` and ``OUTPUT/results.md``: box AP, AP50, AP75, APs, APm, APl on Detectron2's 0-100 scale
   (``null`` where COCO leaves a value undefined), ``train_seconds`` (Detectron2's "Total training time", evaluation
   excluded), the students' means over seeds and every run;
6. ``OUTPUT/attention.png``: spatial and channel attention (FGD_SPEC.md section 1) of teacher, student and FGD
   student on one validation image.

Without ``--data`` it runs on a shapes dataset it generates deterministically (``fgd_d2.synthetic``) with a shorter
schedule; ``--quick`` runs a few iterations per stage (a smoke test). A stage whose ``stage.json`` records the same
command is not run again, so an interrupted pipeline continues where it stopped.
"""
import argparse
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .data import coco_folder_files
from .errors import ConfigError

__all__ = ["FAMILIES", "main", "run_pipeline"]

logger = logging.getLogger("fgd_d2.pipeline")

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_NET = REPO_ROOT / "train_net.py"

# Configs per detector family (relative to the repository root).
FAMILIES = {
    "retinanet": dict(
        teacher="configs/cpu/retinanet_R34_teacher.yaml",
        student="configs/cpu/retinanet_R18_student.yaml",
        fgd_student="configs/cpu/fgd_retinanet_R18_from_R34.yaml",
        level="p3",
    ),
    "faster_rcnn": dict(
        teacher="configs/cpu/faster_rcnn_R34_teacher.yaml",
        student="configs/cpu/faster_rcnn_R18_student.yaml",
        fgd_student="configs/cpu/fgd_faster_rcnn_R18_from_R34.yaml",
        level="p2",
    ),
    "fcos": dict(
        teacher="configs/cpu/fcos_R34_teacher.yaml",
        student="configs/cpu/fcos_R18_student.yaml",
        fgd_student="configs/cpu/fgd_fcos_R18_from_R34.yaml",
        level="p3",
    ),
}

# Schedules: the configs' own (a dataset given by path), the embedded dataset's, and the smoke test's.
# iters = (teacher, students); None keeps the config's MAX_ITER.
SCHEDULES = {
    "full": dict(iters=None, input=None, seeds=(0, 1), dataset=None),
    "embedded": dict(iters=(500, 250), input=(192, 256), seeds=(0, 1), dataset=dict(num_train=160, num_val=40)),
    "quick": dict(iters=(3, 2), input=(96, 128), seeds=(0,), dataset=dict(num_train=8, num_val=4)),
}

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
ROWS = (("teacher", "teacher"), ("student", "student alone"), ("fgd_student", "student + FGD"))


def _schedule_opts(max_iter: Optional[int], input_size) -> List[str]:
    opts = []
    if max_iter is not None:
        warmup = min(100, max(1, max_iter // 4))
        opts += ["SOLVER.MAX_ITER", str(max_iter), "SOLVER.STEPS", f"({max(warmup, int(0.75 * max_iter))},)",
                 "SOLVER.WARMUP_ITERS", str(warmup), "SOLVER.CHECKPOINT_PERIOD", str(max_iter)]
    if input_size is not None:
        short, long = input_size
        opts += ["INPUT.MIN_SIZE_TRAIN", f"({short},)", "INPUT.MAX_SIZE_TRAIN", str(long),
                 "INPUT.MIN_SIZE_TEST", str(short), "INPUT.MAX_SIZE_TEST", str(long)]
    return opts


def read_bbox_metrics(metrics_json: Path) -> Optional[Dict[str, Optional[float]]]:
    """The last ``bbox/*`` evaluation in a Detectron2 ``metrics.json``; NaN (undefined in COCO) becomes None."""
    if not metrics_json.is_file():
        return None
    found = None
    with open(metrics_json) as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:  # a line cut by an interrupted run
                continue
            if "bbox/AP" in entry:
                found = entry
    if found is None:
        return None
    return {k: _finite_or_none(found.get(f"bbox/{k}")) for k in METRICS}


def read_train_seconds(log_txt: Path) -> Optional[float]:
    """Detectron2's last "Total training time: H:MM:SS" in a ``log.txt`` (evaluation excluded), in seconds."""
    if not log_txt.is_file():
        return None
    matches = re.findall(r"Total training time: (?:(\d+) days?, )?(\d+):(\d+):(\d+)", log_txt.read_text())
    if not matches:
        return None
    days, h, m, s = matches[-1]
    return float(int(days or 0) * 86400 + int(h) * 3600 + int(m) * 60 + int(s))


def _finite_or_none(value) -> Optional[float]:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), 3)


def _mean_or_none(values: Sequence[Optional[float]]) -> Optional[float]:
    if not values or any(v is None for v in values):
        return None
    return round(sum(values) / len(values), 3)


class Stage:
    """One ``train_net.py`` run in ``OUTPUT/<name>``."""

    def __init__(self, name: str, config: str, opts: List[str], output: Path, seed: int):
        self.name, self.seed = name, seed
        self.dir = output / name
        self.config_file = str(REPO_ROOT / config)
        self.opts = [*opts, "SEED", str(seed), "OUTPUT_DIR", str(self.dir)]
        self.command = [sys.executable, str(TRAIN_NET), "--config-file", self.config_file, *self.opts]

    def detector_cfg(self, config_file: str, weights: Path):
        """This stage's config read as train_net.py reads it (plain detector ``config_file``), with ``weights``."""
        from detectron2.config import get_cfg

        from .config import add_fgd_config
        from .data import apply_coco_folder

        cfg = get_cfg()
        add_fgd_config(cfg)
        cfg.merge_from_file(config_file)
        cfg.merge_from_list(self.opts + ["MODEL.WEIGHTS", str(weights)])
        apply_coco_folder(cfg)
        return cfg

    @property
    def record_path(self) -> Path:
        return self.dir / "stage.json"

    def done(self) -> bool:
        if not self.record_path.is_file():
            return False
        return json.loads(self.record_path.read_text()).get("command") == self.command[1:]

    def run(self) -> Dict[str, object]:
        if not self.done():
            logger.info("%s: %s", self.name, " ".join(self.command))
            subprocess.run(self.command, cwd=REPO_ROOT, check=True)
            self._write_record()
        else:
            logger.info("%s: done before (%s), not run again", self.name, self.record_path)
        return json.loads(self.record_path.read_text())

    def _write_record(self) -> None:
        metrics = read_bbox_metrics(self.dir / "metrics.json")
        if metrics is None:
            raise ConfigError(f"{self.name}: {self.dir / 'metrics.json'} holds no bbox evaluation; a checkpoint "
                              f"in {self.dir} not trained by train_net.py? Remove {self.dir} to train it here")
        record = dict(command=self.command[1:], seed=self.seed, **metrics,
                      train_seconds=read_train_seconds(self.dir / "log.txt"))
        self.record_path.write_text(json.dumps(record, indent=1, allow_nan=False))


def _summary(records: List[Dict[str, object]]) -> Dict[str, object]:
    summary = {k: _mean_or_none([r[k] for r in records]) for k in METRICS + ("train_seconds",)}
    summary["seeds"] = [r["seed"] for r in records]
    summary["runs"] = [{k: r[k] for k in ("seed",) + METRICS + ("train_seconds",)} for r in records]
    return summary


def _fmt(value: Optional[float], digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def results_markdown(results: Dict[str, object]) -> str:
    """The results table (Markdown): one row per model (students: mean over seeds) and one per run."""
    lines = [
        f"Dataset: `{results['dataset']}`, family: {results['family']}, schedule: {results['schedule']}, "
        f"seeds: {results['seeds']}. Box AP on the validation split (COCOEvaluator, 0-100).",
        "",
        "| model | " + " | ".join(METRICS) + " | train time (min) |",
        "|---" * (len(METRICS) + 2) + "|",
    ]
    for key, label in ROWS:
        row = results[key]
        runs = row["runs"]
        mean_label = label if len(runs) == 1 else f"{label} (mean of {len(runs)} seeds)"
        seconds = row["train_seconds"]
        lines.append(f"| {mean_label} | " + " | ".join(_fmt(row[k]) for k in METRICS)
                     + f" | {_fmt(None if seconds is None else seconds / 60)} |")
        if len(runs) > 1:
            for run in runs:
                seconds = run["train_seconds"]
                lines.append(f"| {label}, seed {run['seed']} | " + " | ".join(_fmt(run[k]) for k in METRICS)
                             + f" | {_fmt(None if seconds is None else seconds / 60)} |")
    gain = None
    if results["fgd_student"]["AP"] is not None and results["student"]["AP"] is not None:
        gain = results["fgd_student"]["AP"] - results["student"]["AP"]
    lines += ["", f"FGD gain over the student alone: {_fmt(gain, 2)} AP."]
    return "\n".join(lines) + "\n"


def run_pipeline(data: Optional[str], output: str, family: str, schedule: str,
                 seeds: Optional[Sequence[int]] = None) -> Dict[str, object]:
    """Run every stage; returns the content of ``results.json``."""
    if family not in FAMILIES:
        raise ConfigError(f"--family {family!r}: choose one of {sorted(FAMILIES)}")
    if not TRAIN_NET.is_file():
        raise ConfigError(f"{TRAIN_NET} not found: run the pipeline from a source checkout of fgd_d2 "
                          "(pip install -e .)")
    output_dir = Path(output).resolve()
    plan = SCHEDULES[schedule]
    seeds = list(seeds if seeds else plan["seeds"])
    if data is None:
        data_dir = output_dir / "shapes"
        if not (data_dir / "annotations" / "instances_val.json").is_file():
            from .synthetic import make_shapes_dataset

            short, long = plan["input"]
            make_shapes_dataset(str(data_dir), image_size=(long, short), **plan["dataset"])
    else:
        data_dir = Path(data).resolve()
    coco_folder_files(str(data_dir))  # a clear error before any training

    configs = FAMILIES[family]
    teacher_iters, student_iters = plan["iters"] or (None, None)
    common = ["DATASETS.COCO_FOLDER", str(data_dir)]
    teacher_opts = common + _schedule_opts(teacher_iters, plan["input"])
    student_opts = common + _schedule_opts(student_iters, plan["input"])
    teacher_weights = output_dir / "teacher" / "model_final.pth"
    fgd_opts = student_opts + ["MODEL.FGD.TEACHER.CONFIG_FILE", str(REPO_ROOT / configs["teacher"]),
                               "MODEL.FGD.TEACHER.WEIGHTS", str(teacher_weights)]

    teacher = Stage("teacher", configs["teacher"], teacher_opts, output_dir, seed=0)
    students = [Stage(f"student_seed{s}", configs["student"], student_opts, output_dir, s) for s in seeds]
    fgd_students = [Stage(f"fgd_student_seed{s}", configs["fgd_student"], fgd_opts, output_dir, s) for s in seeds]
    stages = [teacher] + students + fgd_students

    start = time.perf_counter()
    records = {}
    for index, stage in enumerate(stages, 1):
        logger.info("stage %d/%d: %s (%.0f s elapsed)", index, len(stages), stage.name,
                    time.perf_counter() - start)
        if stage is teacher and teacher_weights.is_file() and not stage.done():
            logger.info("teacher: %s exists, not trained again", teacher_weights)
            stage._write_record()
        records[stage.name] = stage.run()

    results = {
        "dataset": str(data_dir),
        "family": family,
        "schedule": schedule,
        "seeds": seeds,
        "teacher": _summary([records[teacher.name]]),
        "student": _summary([records[s.name] for s in students]),
        "fgd_student": _summary([records[s.name] for s in fgd_students]),
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    (output_dir / "results.md").write_text(results_markdown(results))

    from .attention_figure import attention_figure
    from .distiller import resolve_loss_params

    fgd_cfg = fgd_students[0].detector_cfg(fgd_students[0].config_file, teacher_weights)
    val_json = coco_folder_files(str(data_dir))[2]
    first_image = json.loads(Path(val_json).read_text())["images"][0]["file_name"]
    student_config = str(REPO_ROOT / configs["student"])
    attention_figure(
        models=[("teacher", teacher.detector_cfg(teacher.config_file, teacher_weights)),
                ("student alone", students[0].detector_cfg(student_config, students[0].dir / "model_final.pth")),
                ("student + FGD", fgd_students[0].detector_cfg(
                    student_config, fgd_students[0].dir / "model_final_student.pth"))],
        level=configs["level"],
        temperature=resolve_loss_params(fgd_cfg)["temperature"],
        image_path=str(data_dir / "images" / first_image),
        path=str(output_dir / "attention.png"),
    )
    logger.info("wrote %s, %s and %s in %.0f s", output_dir / "results.json", output_dir / "results.md",
                output_dir / "attention.png", time.perf_counter() - start)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--data", help="a COCO-format folder (images/, annotations/instances_{train,val}.json); "
                                       "default: a generated shapes dataset")
    parser.add_argument("--output", help="where everything goes (default: output/demo_<family>[_quick])")
    parser.add_argument("--family", default="retinanet", choices=sorted(FAMILIES))
    parser.add_argument("--quick", action="store_true", help="a few iterations per stage (smoke test)")
    parser.add_argument("--seeds", type=int, nargs="+", help="student seeds (default: 0 1; --quick: 0)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    schedule = "quick" if args.quick else ("full" if args.data else "embedded")
    output = args.output or os.path.join("output", f"demo_{args.family}" + ("_quick" if args.quick else ""))
    try:
        results = run_pipeline(args.data, output, args.family, schedule, args.seeds)
    except ConfigError as e:
        sys.exit(f"fgd_d2.pipeline: {e}")
    except subprocess.CalledProcessError as e:
        sys.exit(f"fgd_d2.pipeline: a stage failed (exit status {e.returncode}): {' '.join(e.cmd)}")
    print(results_markdown(results))


if __name__ == "__main__":
    main()
