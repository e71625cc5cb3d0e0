"""Bad input fails early and clearly; bad data trains without NaN; SIGKILL + --resume; multi-process; bf16."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from detectron2.engine import launch
from detectron2.utils.events import EventStorage

import tiny
from fgd_d2 import ConfigError, FGDDistiller
from fgd_d2.synthetic import make_shapes_dataset

FGD_KEYS = ("loss_fgd_fg", "loss_fgd_bg", "loss_fgd_at", "loss_fgd_global")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    config, weights, _ = tiny.write_teacher(root, fpn_channels=16)
    data = make_shapes_dataset(str(root / "shapes"), num_train=4, num_val=2, image_size=(96, 72))
    return {"root": root, "teacher_config": config, "teacher_weights": weights, "data": data}


def distiller(files, extra=()):
    torch.manual_seed(1)
    return FGDDistiller(tiny.distiller_cfg(files["teacher_config"], files["teacher_weights"], extra=extra))


def write_config(files, name, extra=()):
    cfg = tiny.distiller_cfg(files["teacher_config"], files["teacher_weights"], extra=extra)
    cfg.DATASETS.COCO_FOLDER = files["data"]
    path = files["root"] / f"{name}.yaml"
    path.write_text(cfg.dump())
    return path


def run_train_net(args, timeout=600, env=None):
    full_env = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.run([sys.executable, "train_net.py"] + [str(a) for a in args], cwd=tiny.REPO,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- bad input: clear errors before any work


def test_unparsable_teacher_config(files, tmp_path):
    bad = tmp_path / "teacher.yaml"
    bad.write_text("MODEL: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot read the teacher config MODEL.FGD.TEACHER.CONFIG_FILE"):
        FGDDistiller(tiny.distiller_cfg(str(bad), files["teacher_weights"]))
    unknown_key = tmp_path / "unknown.yaml"
    unknown_key.write_text("MODEL:\n  NOT_A_KEY: 1\n")
    with pytest.raises(ConfigError, match="NOT_A_KEY"):
        FGDDistiller(tiny.distiller_cfg(str(unknown_key), files["teacher_weights"]))


def test_level_the_teacher_lacks(files, tmp_path):
    config, weights, _ = tiny.write_teacher(tmp_path, arch="GeneralizedRCNN", fpn_channels=16, name="rcnn")
    cfg = tiny.distiller_cfg(config, weights, extra=["MODEL.FGD.IN_FEATURES", ["p3", "p7"]])
    with pytest.raises(ConfigError, match="level 'p7' does not exist in the teacher"):
        FGDDistiller(cfg)


def test_feature_size_mismatch_names_the_level_and_both_shapes(files, monkeypatch):
    model = distiller(files)
    model.train()
    real = model.teacher_features

    def shifted(batched_inputs):
        features = real(batched_inputs)
        features["p4"] = features["p4"][..., :-1]
        return features

    monkeypatch.setattr(model, "teacher_features", shifted)
    with EventStorage(0), pytest.raises(ConfigError, match=r"'p4': student feature \(2, 16, \d+, \d+\) and teacher feature \(2, 16, \d+, \d+\)"):
        model(tiny.make_batch())


@pytest.mark.parametrize(
    "opts, message",
    [
        (["MODEL.FGD.BETA", -1.0], "MODEL.FGD.BETA is a loss weight and must be a finite number >= 0"),
        (["MODEL.FGD.TEMPERATURE", 0.0], "MODEL.FGD.TEMPERATURE must be a finite number > 0"),
        (["MODEL.FGD.BOX_SCALING", "cells"], "MODEL.FGD.BOX_SCALING='cells'"),
        (["MODEL.FGD.IN_FEATURES", "['p9']"], "level 'p9' does not exist"),
        (["MODEL.FGD.TEACHER.WEIGHTS", "/nonexistent/teacher.pth"], "MODEL.FGD.TEACHER.WEIGHTS"),
        (["MODEL.FGD.TEACHER.CONFIG_FILE", "/nonexistent/teacher.yaml"], "MODEL.FGD.TEACHER.CONFIG_FILE"),
        (["DATASETS.COCO_FOLDER", "/nonexistent/data"], "DATASETS.COCO_FOLDER='/nonexistent/data'"),
        (["MODEL.WEIGHTS", "/nonexistent/student.pth"], "'/nonexistent/student.pth' does not exist; check MODEL.WEIGHTS"),
        (["MODEL.FGD.FEATURE_MASK", "boxes"], "MODEL.FGD.FEATURE_MASK='boxes'"),
        (["MODEL.FGD.NOT_A_KEY", 1], "Non-existent key: MODEL.FGD.NOT_A_KEY"),
        (["SOLVER.MAX_ITER"], "odd length"),
        (["MODEL.FGD.TEMPERATURE", "inf"], "MODEL.FGD.TEMPERATURE must be a finite number > 0, got inf"),
        (["MODEL.BACKBONE.NAME", "build_resnet_backbone"],
         "the student (RetinaNet) cannot be built: its heads read the feature 'p3', which its backbone "
         "MODEL.BACKBONE.NAME='build_resnet_backbone' does not produce (outputs: ['res3', 'res4', 'res5'])"),
        (["MODEL.FGD.STUDENT_META_ARCHITECTURE", "GeneralizedRCNN"],
         "Check that MODEL.FGD.STUDENT_META_ARCHITECTURE='GeneralizedRCNN' is the detector the config describes"),
    ],
    ids=["negative-weight", "temperature", "box-scaling", "in-features", "teacher-weights", "teacher-config",
         "dataset-folder", "student-weights-missing", "feature-mask", "unknown-key", "odd-options",
         "temperature-inf", "student-without-fpn", "student-arch-mismatch"],
)
def test_train_net_reports_config_errors_without_traceback_before_data_loading(files, opts, message):
    config = write_config(files, "fgd")
    start = time.perf_counter()
    proc = run_train_net(["--config-file", config, "OUTPUT_DIR", files["root"] / "never"] + opts, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert message in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert "Loaded 4 images" not in output  # the dataset was never read
    assert "Starting training" not in output
    assert time.perf_counter() - start < 60


@pytest.mark.parametrize("content, message", [
    ({"model": {"unrelated.weight": torch.zeros(2)}}, "loads no weight"),
    (b"not a checkpoint", "cannot read the checkpoint"),
    (torch.zeros(3), "cannot read the checkpoint"),
    ([1, 2], "holds no state dict under 'model'"),
], ids=["no-matching-key", "garbage-bytes", "bare-tensor", "list"])
def test_model_weights_that_load_nothing_fail_before_training(files, tmp_path, content, message):
    wrong = tmp_path / "wrong.pth"
    if isinstance(content, bytes):
        wrong.write_bytes(content)
    else:
        torch.save(content, wrong)
    config = write_config(files, "fgd")
    proc = run_train_net(["--config-file", config, "OUTPUT_DIR", tmp_path / "out", "MODEL.WEIGHTS", wrong],
                         timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and message in output and "MODEL.WEIGHTS" in output, output[-3000:]
    assert "Traceback" not in output and "Starting training" not in output
    assert "Loaded 4 images" not in output  # before the dataset is read


def test_teacher_weights_that_are_not_a_checkpoint(files, tmp_path):
    garbage = tmp_path / "teacher.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"cannot read the checkpoint .*; check MODEL.FGD.TEACHER.WEIGHTS"):
        FGDDistiller(tiny.distiller_cfg(files["teacher_config"], str(garbage)))


def test_teacher_without_fpn_names_the_teachers_key(files, tmp_path):
    cfg = tiny.distiller_cfg(files["teacher_config"], files["teacher_weights"],
                             extra=["MODEL.FGD.TEACHER.OPTS", ["MODEL.BACKBONE.NAME", "build_resnet_backbone"]])
    with pytest.raises(ConfigError, match="the teacher .* cannot be built.*MODEL.META_ARCHITECTURE of "
                                          "MODEL.FGD.TEACHER.CONFIG_FILE"):
        FGDDistiller(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_on_a_machine_without_cuda(files, tmp_path):
    config = write_config(files, "fgd")
    proc = run_train_net(["--config-file", config, "OUTPUT_DIR", tmp_path / "out", "MODEL.DEVICE", "cuda"],
                         timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "torch finds no CUDA device on this machine; set MODEL.DEVICE cpu" in output
    assert "Traceback" not in output, output[-3000:]


def test_broken_validation_json_fails_before_training(files, tmp_path):
    data = tmp_path / "data"
    make_shapes_dataset(str(data), num_train=4, num_val=2, image_size=(96, 72))
    (data / "annotations" / "instances_val.json").write_text('{"images": [')
    config = write_config(files, "fgd")
    proc = run_train_net(["--config-file", config, "OUTPUT_DIR", tmp_path / "out", "DATASETS.COCO_FOLDER", data],
                         timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert f"DATASETS.COCO_FOLDER: cannot read {data / 'annotations' / 'instances_val.json'}" in output
    assert "Traceback" not in output and "Starting training" not in output


def test_resume_from_a_corrupted_last_checkpoint_names_the_file(files, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "model_0000001.pth").write_bytes(b"truncated")
    (output / "last_checkpoint").write_text("model_0000001.pth")
    config = write_config(files, "fgd")
    proc = run_train_net(["--config-file", config, "--resume", "OUTPUT_DIR", output], timeout=120)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in log, log[-3000:]
    assert f"cannot read the checkpoint '{output / 'model_0000001.pth'}'" in log, log[-3000:]
    assert f"it is the last checkpoint named by {output / 'last_checkpoint'}" in log
    assert "Starting training" not in log


def test_eval_only_without_student_weights_is_an_error(files, tmp_path):
    config = write_config(files, "fgd")
    proc = run_train_net(["--config-file", config, "--eval-only", "OUTPUT_DIR", tmp_path / "out"], timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "--eval-only evaluates the student of MODEL.WEIGHTS" in output, output[-3000:]
    assert "Traceback" not in output
    proc = run_train_net(["--config-file", config, "--eval-only", "MODEL.WEIGHTS", tmp_path / "absent.pth",
                          "OUTPUT_DIR", tmp_path / "out"], timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "does not exist; check MODEL.WEIGHTS" in output and "Traceback" not in output


def test_config_error_in_two_worker_processes_has_no_traceback(files, tmp_path):
    config = write_config(files, "fgd")
    proc = run_train_net(["--config-file", config, "--num-gpus", 2, "--dist-url", "auto", "OUTPUT_DIR",
                          tmp_path / "out", "MODEL.FGD.ALPHA", -1.0], timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "configuration error: MODEL.FGD.ALPHA is a loss weight and must be a finite number >= 0" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]


def test_export_command_errors_are_one_line(files, tmp_path):
    garbage, tensor = tmp_path / "garbage.pth", tmp_path / "tensor.pth"
    garbage.write_bytes(b"not a checkpoint")
    torch.save(torch.zeros(3), tensor)
    for source, message in ((files["teacher_weights"], "is not an FGDDistiller checkpoint"),
                            (tmp_path / "absent.pth", "No such file"),
                            (garbage, f"cannot read {garbage} as a checkpoint"),
                            (tensor, "is not an FGDDistiller checkpoint")):
        proc = subprocess.run([sys.executable, "-m", "fgd_d2.export", str(source), str(tmp_path / "s.pth")],
                              cwd=tiny.REPO, capture_output=True, text=True, timeout=120)
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0 and message in output and "Traceback" not in output, output[-3000:]
        assert not (tmp_path / "s.pth").exists()


# ---------------------------------------------------------------- bad data: no NaN


def _bad_data(files, root):
    """The shapes dataset with: an image without boxes, a crowd-only image, boxes outside, tiny boxes."""
    data = root / "bad_data"
    make_shapes_dataset(str(data), num_train=4, num_val=2, image_size=(96, 72))
    path = data / "annotations" / "instances_train.json"
    coco = json.loads(path.read_text())
    ids = [image["id"] for image in coco["images"]]
    anns = [a for a in coco["annotations"] if a["image_id"] != ids[0]]  # image 0: no box at all
    for a in anns:
        if a["image_id"] == ids[1]:
            a["iscrowd"] = 1  # image 1: crowd only
    next_id = max(a["id"] for a in anns) + 1
    extra = [([-20, -10, 50, 40], ids[2]), ([80, 60, 60, 60], ids[2]),  # partly outside the image
             ([10, 10, 1, 1], ids[3]), ([30, 30, 0.5, 2], ids[3])]  # below one cell
    for bbox, image_id in extra:
        anns.append({"id": next_id, "image_id": image_id, "category_id": 1, "bbox": bbox,
                     "area": bbox[2] * bbox[3], "iscrowd": 0})
        next_id += 1
    coco["annotations"] = anns
    path.write_text(json.dumps(coco))
    return data


def test_bad_data_trains_without_nan(files, tmp_path):
    data = _bad_data(files, tmp_path)
    config = write_config(files, "fgd_bad_data")
    output = tmp_path / "out"
    proc = run_train_net(["--config-file", config, "OUTPUT_DIR", output, "DATASETS.COCO_FOLDER", data,
                          "DATALOADER.FILTER_EMPTY_ANNOTATIONS", False, "SOLVER.MAX_ITER", 8,
                          "SOLVER.IMS_PER_BATCH", 2, "SOLVER.CHECKPOINT_PERIOD", 100])
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "Loaded 4 images" in proc.stdout + proc.stderr  # no image was filtered out
    metrics = [json.loads(line, parse_constant=lambda c: float("nan"))
               for line in (output / "metrics.json").read_text().splitlines()]
    steps = [m for m in metrics if "loss_fgd_fg" in m]
    assert steps
    for m in steps:
        for key, value in m.items():
            if key.startswith(("loss", "fgd/", "total_loss")):
                assert math.isfinite(value), (key, m)


def test_distiller_on_a_batch_without_any_box_has_finite_losses_and_gradients(files):
    model = distiller(files)
    model.train()
    batch = tiny.make_batch(boxes_per_image=0)
    with EventStorage(0):
        losses = model(batch)
    total = sum(losses.values())
    total.backward()
    assert all(torch.isfinite(v) for v in losses.values())
    for name, p in model.distill_losses.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# ---------------------------------------------------------------- mixed precision


def test_bf16_autocast_forward_gives_float32_fgd_terms(files):
    model = distiller(files)
    model.train()
    with EventStorage(0) as storage, torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(tiny.make_batch())
    for key in FGD_KEYS:
        assert losses[key].dtype == torch.float32 and torch.isfinite(losses[key]), key
    logged = {k: v for k, (v, _) in storage.latest().items() if k.startswith("fgd/")}
    assert logged and all(math.isfinite(v) for v in logged.values())
    # Close to the float32 forward: the loss upcasts what autocast computed in bfloat16.
    with EventStorage(0):
        reference = model(tiny.make_batch())
    assert torch.allclose(losses["loss_fgd_fg"], reference["loss_fgd_fg"], rtol=0.1)


# ---------------------------------------------------------------- multi-process


SAME_SIZE_BATCH = dict(sizes=((64, 96),) * 4, seed=3)


def _fgd_terms_and_gradients(model, batch):
    with EventStorage(0):
        losses = model(batch)
    fgd = {k: losses[k] for k in FGD_KEYS}
    params = [p for p in model.student.parameters() if p.requires_grad]
    grads = torch.autograd.grad(sum(fgd.values()), params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return {k: v.detach() for k, v in fgd.items()}, grads


def _two_process_worker(files, output):
    import torch.distributed as dist
    from detectron2.utils import comm

    model = distiller(files)
    model.train()
    rank, world = comm.get_rank(), comm.get_world_size()
    batch = tiny.make_batch(**SAME_SIZE_BATCH)[2 * rank: 2 * rank + 2]
    terms, grads = _fgd_terms_and_gradients(model, batch)
    # What DDP does with gradients (and what metrics.json shows for losses): the mean over processes.
    for tensor in list(terms.values()) + grads:
        dist.all_reduce(tensor)
        tensor /= world
    if rank == 0:
        torch.save({"terms": terms, "grads": grads}, output)


def test_two_processes_of_two_images_equal_one_process_of_four(files, tmp_path):
    output = tmp_path / "two_process.pt"
    launch(_two_process_worker, 2, dist_url="auto", args=(files, str(output)))
    two = torch.load(output)
    model = distiller(files)
    model.train()
    terms, grads = _fgd_terms_and_gradients(model, tiny.make_batch(**SAME_SIZE_BATCH))
    for key in FGD_KEYS:
        assert torch.allclose(two["terms"][key], terms[key], rtol=1e-5), key
    assert len(grads) == len(two["grads"])
    assert any(g.abs().sum() > 0 for g in grads)
    for mine, theirs in zip(grads, two["grads"]):
        assert torch.allclose(theirs, mine, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- interruption


SLOW_SAVE = r'''
import time, torch
_save = torch.save
def _slow_save(obj, f, *args, **kwargs):
    name = getattr(f, "name", str(f))
    if "model_0000005" in str(name):
        f.write(b"partial checkpoint")
        f.flush()
        time.sleep(600)
    return _save(obj, f, *args, **kwargs)
torch.save = _slow_save
'''


def _kill_when(proc, condition, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended before the kill:\n{proc.stderr.read()[-4000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the kill condition never came")


def _start(args, env=None):
    full_env = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.Popen([sys.executable, "train_net.py"] + [str(a) for a in args], cwd=tiny.REPO,
                            env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("moment", ["between-checkpoints", "while-writing-a-checkpoint"])
def test_sigkill_then_resume_continues_from_the_last_complete_checkpoint(files, tmp_path, moment):
    config = write_config(files, "fgd_kill")
    output = tmp_path / "out"
    args = ["--config-file", config, "OUTPUT_DIR", output, "SOLVER.MAX_ITER", 10, "SOLVER.CHECKPOINT_PERIOD", 2,
            "TEST.EVAL_PERIOD", 0]
    if moment == "between-checkpoints":
        proc = _start(args)
        _kill_when(proc, lambda: (output / "model_0000003.pth").is_file()
                   and (output / "last_checkpoint").is_file()
                   and (output / "last_checkpoint").read_text() == "model_0000003.pth")
    else:
        hook_dir = tmp_path / "hook"
        hook_dir.mkdir()
        (hook_dir / "sitecustomize.py").write_text(SLOW_SAVE)
        proc = _start(args, env={"PYTHONPATH": str(hook_dir)})
        partial = output / "model_0000005.pth"
        _kill_when(proc, lambda: partial.is_file() and partial.stat().st_size > 0)
    last = (output / "last_checkpoint").read_text()
    assert last in ("model_0000003.pth", "model_0000005.pth") if moment == "between-checkpoints" \
        else last == "model_0000003.pth"
    resumed_from = int(last[len("model_"):-len(".pth")]) + 1
    saved = torch.load(output / last, weights_only=False)
    teacher_before = torch.load(files["teacher_weights"])["model"]

    proc = run_train_net(["--resume"] + args)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert f"Starting training from iteration {resumed_from}" in log
    assert saved["iteration"] == resumed_from - 1
    # The teacher file is untouched and nothing of the teacher went into a checkpoint.
    teacher_after = torch.load(files["teacher_weights"])["model"]
    assert all(torch.equal(teacher_before[k], teacher_after[k]) for k in teacher_before)
    assert not any(k.startswith("teacher") for k in saved["model"])
    assert "optimizer" in saved["trainer"]["_trainer"] and "LRScheduler" in saved["trainer"]["hooks"]
    # The finished run exports a student that plain Detectron2 loads completely.
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    student = build_model(tiny.detector_cfg(fpn_channels=16))
    DetectionCheckpointer(student).load(str(output / "model_final_student.pth"))
    final = torch.load(output / "model_final_student.pth")["model"]
    assert set(final) == set(student.state_dict())
