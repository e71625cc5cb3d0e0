"""train_net.py end to end on a tiny generated COCO folder: train, checkpoints, resume, export, eval-only, DDP."""
import json
import sys

import pytest
import torch

import tiny
from fgd_d2.synthetic import make_shapes_dataset
from fgd_d2.trainer import FGDTrainer

TRAIN_OPTS = ["SOLVER.MAX_ITER", 4, "SOLVER.CHECKPOINT_PERIOD", 2, "TEST.EVAL_PERIOD", 0,
              "MODEL.FGD.INHERIT_TEACHER", True]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_net")
    data = make_shapes_dataset(str(root / "shapes"), num_train=8, num_val=4, image_size=(96, 72))
    config, weights, _ = tiny.write_teacher(root, fpn_channels=16)
    cfg = tiny.distiller_cfg(config, weights)
    cfg.DATASETS.COCO_FOLDER = data
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0  # an untrained model still detects something
    config_path = root / "fgd_tiny.yaml"
    config_path.write_text(cfg.dump())
    output = root / "output"
    proc = tiny.run_script(["train_net.py", "--config-file", config_path, "OUTPUT_DIR", output] + TRAIN_OPTS)
    return {"root": root, "data": data, "config": config_path, "output": output, "log": proc.stdout + proc.stderr}


def test_training_writes_metrics_checkpoints_and_the_student_export(workspace):
    output = workspace["output"]
    metrics = [json.loads(line) for line in (output / "metrics.json").read_text().splitlines()]
    last = [m for m in metrics if "loss_fgd_fg" in m][-1]
    assert last["iteration"] == 3
    for key in ("loss_fgd_fg", "loss_fgd_bg", "loss_fgd_at", "loss_fgd_global", "fgd/p3/fg", "fgd/p7/global"):
        assert key in last, key
    assert "INHERIT_TEACHER copied" in workspace["log"]
    assert any("bbox/AP" in m for m in metrics)  # COCO evaluation after training
    for name in ("model_0000001.pth", "model_final.pth"):
        state = torch.load(output / name, weights_only=False)["model"]
        assert not any(k.startswith("teacher") for k in state)
        assert any(k.startswith("distill_losses.p3.") for k in state)
    student = torch.load(output / "model_final_student.pth")["model"]
    final = torch.load(output / "model_final.pth", weights_only=False)["model"]
    assert set(student) == {k[len("student."):] for k in final if k.startswith("student.")}
    for k, v in student.items():
        assert torch.equal(v, final["student." + k])


PLAIN_DETECTRON2 = r"""
import json, sys
import cv2, torch
from detectron2.config import get_cfg
from detectron2.engine import DefaultPredictor
cfg = get_cfg()
cfg.set_new_allowed(True)
cfg.merge_from_file(sys.argv[1])
cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
cfg.MODEL.WEIGHTS = sys.argv[2]
predictor = DefaultPredictor(cfg)
assert not any(m.startswith("fgd_d2") for m in sys.modules), "fgd_d2 was imported"
out = predictor(cv2.imread(sys.argv[3]))["instances"]
print(json.dumps({"boxes": out.pred_boxes.tensor.tolist(), "scores": out.scores.tolist()}))
"""


def test_student_export_runs_in_stock_detectron2_with_the_distillers_detections(workspace):
    import cv2
    from detectron2.engine import DefaultPredictor

    image = str(workspace["data"]) + "/images/val_00000.png"
    proc = tiny.run_script(["-c", PLAIN_DETECTRON2, workspace["config"],
                            workspace["output"] / "model_final_student.pth", image])
    plain = json.loads(proc.stdout.strip().splitlines()[-1])

    cfg = tiny.detector_cfg()
    cfg.merge_from_file(str(workspace["config"]))
    cfg.MODEL.WEIGHTS = str(workspace["output"] / "model_final.pth")
    distiller = FGDTrainer.build_model(cfg, with_teacher=False)
    from fgd_d2.checkpoint import FGDCheckpointer
    FGDCheckpointer(distiller).load(cfg.MODEL.WEIGHTS)
    plain_cfg = cfg.clone()
    plain_cfg.MODEL.META_ARCHITECTURE = "RetinaNet"
    plain_cfg.MODEL.WEIGHTS = ""
    predictor = DefaultPredictor(plain_cfg)
    predictor.model = distiller.eval()
    ours = predictor(cv2.imread(image))["instances"]
    assert len(plain["scores"]) == len(ours) > 0
    assert torch.allclose(torch.tensor(plain["boxes"]), ours.pred_boxes.tensor, atol=1e-4)
    assert torch.allclose(torch.tensor(plain["scores"]), ours.scores, atol=1e-6)


def test_resume_restores_student_and_iteration_and_does_not_inherit(workspace):
    cfg = tiny.detector_cfg()
    cfg.merge_from_file(str(workspace["config"]))
    from fgd_d2.data import apply_coco_folder
    apply_coco_folder(cfg)
    cfg.merge_from_list(["OUTPUT_DIR", str(workspace["output"]), "SOLVER.MAX_ITER", 6,
                         "MODEL.FGD.INHERIT_TEACHER", True])
    trainer = FGDTrainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 4
    final = torch.load(workspace["output"] / "model_final.pth", weights_only=False)
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, final["model"][k]), k
    saved = final["trainer"]
    assert trainer.scheduler.last_epoch == saved["hooks"]["LRScheduler"]["last_epoch"] == 4
    restored = trainer.optimizer.state_dict()["state"]
    assert restored.keys() == saved["_trainer"]["optimizer"]["state"].keys() and restored
    for index, param_state in restored.items():
        assert torch.equal(param_state["momentum_buffer"],
                           saved["_trainer"]["optimizer"]["state"][index]["momentum_buffer"])

    proc = tiny.run_script(["train_net.py", "--config-file", workspace["config"], "--resume",
                            "OUTPUT_DIR", workspace["output"]] + TRAIN_OPTS[:-4] + ["SOLVER.MAX_ITER", 6])
    log = proc.stdout + proc.stderr
    assert "Starting training from iteration 4" in log
    assert "INHERIT_TEACHER copied" not in log


def test_eval_only_never_builds_the_teacher_and_eval_teacher_runs(workspace):
    proc = tiny.run_script(["train_net.py", "--config-file", workspace["config"], "--eval-only",
                            "MODEL.WEIGHTS", workspace["output"] / "model_final.pth",
                            "MODEL.FGD.TEACHER.WEIGHTS", "/nonexistent/teacher.pth",
                            "OUTPUT_DIR", workspace["root"] / "eval"])
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in proc.stdout + proc.stderr
    proc = tiny.run_script(["train_net.py", "--config-file", workspace["config"], "--eval-only", "--eval-teacher",
                            "OUTPUT_DIR", workspace["root"] / "eval_teacher"])
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in proc.stdout + proc.stderr


def test_two_process_cpu_training(workspace):
    output = workspace["root"] / "ddp"
    proc = tiny.run_script(["train_net.py", "--config-file", workspace["config"], "--num-gpus", 2,
                            "--dist-url", "auto", "OUTPUT_DIR", output, "SOLVER.IMS_PER_BATCH", 4,
                            "SOLVER.MAX_ITER", 2, "SOLVER.CHECKPOINT_PERIOD", 100])
    assert (output / "model_final_student.pth").is_file()
    metrics = [json.loads(line) for line in (output / "metrics.json").read_text().splitlines()]
    assert any("loss_fgd_fg" in m and m["iteration"] == 1 for m in metrics)


def test_student_export_is_written_before_the_final_evaluation(workspace, tmp_path, monkeypatch):
    from detectron2.config import get_cfg

    from fgd_d2 import add_fgd_config
    from fgd_d2.data import apply_coco_folder

    cfg = get_cfg()
    add_fgd_config(cfg)
    cfg.merge_from_file(str(workspace["config"]))
    cfg.merge_from_list(["SOLVER.MAX_ITER", 1, "OUTPUT_DIR", str(tmp_path)])
    apply_coco_folder(cfg)

    def failing_evaluation(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(FGDTrainer, "test", failing_evaluation)
    trainer = FGDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        trainer.train()
    assert (tmp_path / "model_final_student.pth").is_file()


def test_coco_folder_registration_gives_class_names_before_loading(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from fgd_d2.data import register_coco_folder

    data = make_shapes_dataset(str(tmp_path / "shapes"), num_train=2, num_val=2, image_size=(64, 48))
    train, val, num_classes = register_coco_folder(data)
    names = MetadataCatalog.get(val).thing_classes
    assert num_classes == 3 and names == ["square", "disc", "triangle"]
    assert len(DatasetCatalog.get(val)) == 2  # load_coco_json agrees with the names set at registration
    assert MetadataCatalog.get(val).thing_classes == names
