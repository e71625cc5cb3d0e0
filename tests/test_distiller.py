"""FGDDistiller: losses, teacher handling, levels, weights and checkpoints (tiny models, CPU)."""
import pickle

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import tiny
from fgd_d2 import ConfigError, FGDDistiller
from fgd_d2.checkpoint import FGDCheckpointer, export_student, inherit_teacher_weights
from fgd_d2.trainer import FGDTrainer

FGD_KEYS = {"loss_fgd_fg", "loss_fgd_bg", "loss_fgd_at", "loss_fgd_global"}


@pytest.fixture
def teacher_files(tmp_path):
    return tiny.write_teacher(tmp_path)


def build(teacher_files, arch="RetinaNet", extra=()):
    config, weights, _ = teacher_files
    torch.manual_seed(1)
    return FGDDistiller(tiny.distiller_cfg(config, weights, arch=arch, extra=extra))


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_training_forward_adds_weighted_fgd_terms_that_sum_to_the_totals(teacher_files):
    model = build(teacher_files)
    model.train()
    batch = tiny.make_batch()
    with EventStorage() as storage:
        losses = model(batch)
    assert FGD_KEYS <= set(losses) and {"loss_cls", "loss_box_reg"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    assert model.in_features == ["p3", "p4", "p5", "p6", "p7"]
    # recompute each level's total from the captured features: the four keys add up to the FGD totals
    student_features = model.student.backbone(model.student.preprocess_image(batch).tensor)
    teacher_features = model.teacher_features(batch)
    sizes = [tuple(x["image"].shape[-2:]) for x in batch]
    input_size = tuple(model.student.preprocess_image(batch).tensor.shape[-2:])
    boxes = [x["instances"].gt_boxes.tensor for x in batch]
    expected = sum(model.distill_losses[l](student_features[l], teacher_features[l], boxes, sizes, input_size)["total"]
                   for l in model.in_features)
    assert sum(losses[k] for k in FGD_KEYS).item() == pytest.approx(expected.item(), rel=1e-5)
    logged = storage.histories()
    for level in model.in_features:
        for term in ("fg", "bg", "attention", "global"):
            assert f"fgd/{level}/{term}" in logged


def test_presets_per_family_and_explicit_overrides(teacher_files, tmp_path):
    retina = build(teacher_files)
    loss = retina.distill_losses["p3"]
    assert (loss.temperature, loss.alpha, loss.beta, loss.gamma, loss.lambda_) == (0.5, 1e-3, 5e-4, 5e-4, 5e-6)
    rcnn_teacher = tiny.write_teacher(tmp_path, arch="GeneralizedRCNN", name="rcnn_teacher")
    rcnn = build(rcnn_teacher, arch="GeneralizedRCNN", extra=["MODEL.FGD.ALPHA", "2e-5", "MODEL.FGD.TEMPERATURE", 0.8])
    assert rcnn.in_features == ["p2", "p3", "p4", "p5"]
    loss = rcnn.distill_losses["p2"]
    assert (loss.temperature, loss.alpha, loss.beta, loss.gamma, loss.lambda_) == (0.8, 2e-5, 2.5e-5, 5e-5, 5e-7)


def test_teacher_is_frozen_eval_and_outside_state_and_optimizer(teacher_files):
    model = build(teacher_files)
    teacher_before = state(model.teacher)
    model.train()
    assert not model.teacher.training and all(not m.training for m in model.teacher.modules())
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert not any(k.startswith("teacher") for k in model.state_dict())
    teacher_params = {id(p) for p in model.teacher.parameters()}
    optimizer = FGDTrainer.build_optimizer(tiny.detector_cfg(), model)
    assert not any(id(p) in teacher_params for g in optimizer.param_groups for p in g["params"])
    student_before = state(model.student)
    with EventStorage():
        for seed in range(3):
            losses = model(tiny.make_batch(seed=seed))
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert any(not torch.equal(v, student_before[k]) for k, v in model.student.state_dict().items())


def test_teacher_forward_keeps_no_activations_for_backward(teacher_files):
    model = build(teacher_files)
    model.train()
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        features = model.teacher_features(tiny.make_batch())
    assert saved == [] and all(not f.requires_grad for f in features.values())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), EventStorage():
        model.student(tiny.make_batch())
    assert saved  # the hook does see what a graph-building forward saves


def test_eval_forward_returns_the_students_detections(teacher_files):
    model = build(teacher_files)
    model.eval()
    batch = tiny.make_batch()
    with torch.no_grad():
        ours = model(batch)
        direct = model.student(batch)
    assert len(ours) == 2
    assert torch.equal(ours[0]["instances"].pred_boxes.tensor, direct[0]["instances"].pred_boxes.tensor)


@pytest.mark.parametrize("teacher_format", ["BGR", "RGB"])
def test_teacher_uses_its_own_normalisation_and_format(tmp_path, teacher_format):
    x101_std = [57.375, 57.120, 58.395]
    teacher = tiny.write_teacher(tmp_path, extra=["MODEL.PIXEL_STD", x101_std, "INPUT.FORMAT", teacher_format,
                                                  "MODEL.PIXEL_MEAN", [123.675, 116.28, 103.53]])
    model = build(teacher, extra=["MODEL.PIXEL_STD", [1.0, 1.0, 1.0]])  # an MSRA-style student
    assert model.student.pixel_std.flatten().tolist() == [1.0, 1.0, 1.0]
    batch = tiny.make_batch()
    features = model.teacher_features(batch)
    # Reference: the teacher's own preprocessing of the images in its own channel order.
    flip = teacher_format != "BGR"
    teacher_batch = [dict(x, image=x["image"].flip(0) if flip else x["image"]) for x in batch]
    with torch.no_grad():
        expected = model.teacher.backbone(model.teacher.preprocess_image(teacher_batch).tensor)
    for level in model.in_features:
        assert torch.allclose(features[level], expected[level], atol=1e-5), level
    if flip:  # the flip matters: without it the features differ
        with torch.no_grad():
            unflipped = model.teacher.backbone(model.teacher.preprocess_image(batch).tensor)
        assert not torch.allclose(features["p3"], unflipped["p3"], atol=1e-3)


def test_teacher_pads_like_the_student(tmp_path):
    rcnn_teacher = tiny.write_teacher(tmp_path, arch="GeneralizedRCNN", name="rcnn")
    # a RetinaNet student pads to 128 (p7); the Faster R-CNN teacher alone would pad to 64
    model = build(rcnn_teacher, arch="RetinaNet")
    assert model.in_features == ["p3", "p4", "p5", "p6"]  # p7 is not produced by the teacher
    model.train()
    with EventStorage():
        losses = model(tiny.make_batch(sizes=((70, 150), (64, 64))))
    assert all(torch.isfinite(losses[k]) for k in FGD_KEYS)


def test_in_features_errors(teacher_files, tmp_path):
    with pytest.raises(ConfigError, match="level 'p9'.*student"):
        build(teacher_files, extra=["MODEL.FGD.IN_FEATURES", ["p3", "p9"]])
    rcnn_teacher = tiny.write_teacher(tmp_path, arch="GeneralizedRCNN", name="rcnn")
    config, weights, _ = rcnn_teacher
    cfg = tiny.detector_cfg("GeneralizedRCNN-C4")  # a student without FPN
    cfg.merge_from_list(["MODEL.META_ARCHITECTURE", "FGDDistiller", "MODEL.FGD.TEACHER.CONFIG_FILE", config,
                         "MODEL.FGD.TEACHER.WEIGHTS", weights])
    with pytest.raises(ConfigError, match="use an FPN backbone"):
        FGDDistiller(cfg)


def test_bad_loss_keys_fail_before_the_teacher_is_built(teacher_files):
    config, _, _ = teacher_files
    missing_weights = (config, "/nonexistent/teacher.pth", None)
    for extra, match in ((["MODEL.FGD.BOX_SCALING", "pixels"], "BOX_SCALING"),
                         (["MODEL.FGD.TEMPERATURE", 0.0], "TEMPERATURE"),
                         (["MODEL.FGD.BETA", -1.0], "BETA"),
                         (["MODEL.FGD.GAMMA", "abc"], "GAMMA")):
        with pytest.raises(ConfigError, match=match):
            build(missing_weights, extra=extra)


def test_teacher_weights_must_cover_backbone_and_fpn(teacher_files, tmp_path):
    config, weights, _ = teacher_files
    checkpoint = torch.load(weights)
    del checkpoint["model"]["backbone.fpn_output4.weight"]
    partial = tmp_path / "partial.pth"
    torch.save(checkpoint, partial)
    with pytest.raises(ConfigError, match="backbone.fpn_output4.weight"):
        build((config, str(partial), None))
    with pytest.raises(ConfigError, match="no such file|cannot"):
        build((config, str(tmp_path / "missing.pth"), None))
    with pytest.raises(ConfigError, match="CONFIG_FILE"):
        build((str(tmp_path / "nope.yaml"), weights, None))


def test_teacher_url_offline_error_names_the_cache_and_preseeded_cache_loads(teacher_files, tmp_path, monkeypatch):
    config, weights, _ = teacher_files
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    url = "detectron2://fgd_test/teacher/model_final_abc.pth"
    expected_cache = tmp_path / "cache" / "detectron2" / "fgd_test" / "teacher" / "model_final_abc.pth"

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr("iopath.common.file_io.download", offline)
    with pytest.raises(ConfigError) as info:
        build((config, url, None))
    assert str(expected_cache) in str(info.value) and "MODEL.FGD.TEACHER.WEIGHTS" in str(info.value)
    expected_cache.parent.mkdir(parents=True, exist_ok=True)
    expected_cache.write_bytes(open(weights, "rb").read())
    model = build((config, url, None))
    assert torch.equal(model.teacher.backbone.fpn_output3.weight, torch.load(weights)["model"][
        "backbone.fpn_output3.weight"])


def test_model_zoo_teacher_without_weights_resolves_the_zoo_url(teacher_files, tmp_path, monkeypatch):
    from fgd_d2.teacher import teacher_weights_path
    cfg = tiny.distiller_cfg("COCO-Detection/retinanet_R_101_FPN_3x.yaml", "")
    assert teacher_weights_path(cfg).startswith("https://dl.fbaipublicfiles.com/detectron2/COCO-Detection/"
                                                "retinanet_R_101_FPN_3x/")
    cfg = tiny.distiller_cfg(teacher_files[0], "")
    with pytest.raises(ConfigError, match="MODEL.FGD.TEACHER.WEIGHTS"):
        teacher_weights_path(cfg)


def load_weights(model, path):
    FGDCheckpointer(model).load(str(path))


def test_model_weights_formats_initialise_the_student_only(teacher_files, tmp_path):
    model = build(teacher_files)
    teacher_before = state(model.teacher)
    torch.manual_seed(5)
    donor = build_model(tiny.detector_cfg("RetinaNet", 16))
    donor_state = donor.state_dict()
    key = "head.cls_score.weight"

    # student-only .pth
    torch.save({"model": donor_state}, tmp_path / "student.pth")
    load_weights(model, tmp_path / "student.pth")
    assert torch.equal(model.student.state_dict()[key], donor_state[key])

    # model-zoo style .pkl (numpy arrays under "model")
    zoo = {"model": {k: v.numpy() * 2 for k, v in donor_state.items()}, "__author__": "Detectron2 Model Zoo"}
    with open(tmp_path / "zoo.pkl", "wb") as f:
        pickle.dump(zoo, f)
    load_weights(model, tmp_path / "zoo.pkl")
    assert torch.allclose(model.student.state_dict()[key], donor_state[key] * 2)

    # ImageNet backbone .pkl (torchvision-converted layout: bottom-up keys only, matched by heuristics)
    backbone = {k[len("backbone.bottom_up."):]: v.numpy() * 3 for k, v in donor_state.items()
                if k.startswith("backbone.bottom_up.")}
    with open(tmp_path / "R-18.pkl", "wb") as f:
        pickle.dump({"model": backbone, "__author__": "torchvision", "matching_heuristics": True}, f)
    load_weights(model, tmp_path / "R-18.pkl")
    stem = "backbone.bottom_up.stem.conv1.weight"
    assert torch.allclose(model.student.state_dict()[stem], donor_state[stem] * 3)
    assert torch.allclose(model.student.state_dict()[key], donor_state[key] * 2)  # heads untouched

    # our own training checkpoint
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("ours")
    saved = torch.load(tmp_path / "ours.pth", weights_only=False)["model"]
    assert not any(k.startswith("teacher") for k in saved)
    assert any(k.startswith("distill_losses.") for k in saved)
    fresh = build(teacher_files)
    load_weights(fresh, tmp_path / "ours.pth")
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k

    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k

    # weights that load nothing are an error
    torch.save({"model": {"something.else": torch.zeros(3)}}, tmp_path / "wrong.pth")
    with pytest.raises(ConfigError, match="loads no weight.*MODEL.WEIGHTS"):
        load_weights(model, tmp_path / "wrong.pth")


def test_inherit_copies_shape_matching_weights_outside_bottom_up(tmp_path):
    same_width = tiny.write_teacher(tmp_path, fpn_channels=16, name="same")
    model = build(same_width)
    bottom_before = model.student.backbone.bottom_up.stem.conv1.weight.clone()
    copied, skipped = inherit_teacher_weights(model.student, model.teacher, model.teacher_loaded_keys)
    teacher_state = model.teacher.state_dict()
    assert "head.cls_score.weight" in copied and "backbone.fpn_lateral3.weight" in copied
    assert not any(k.startswith("backbone.bottom_up.") for k in copied)
    for k in copied:
        assert torch.equal(model.student.state_dict()[k], teacher_state[k])
    assert torch.equal(model.student.backbone.bottom_up.stem.conv1.weight, bottom_before)
    # another FPN width: nothing of shape matches in the FPN/heads except width-free tensors; reported as skipped
    model = build(tiny.write_teacher(tmp_path, fpn_channels=24, name="wide"))
    copied, skipped = inherit_teacher_weights(model.student, model.teacher, model.teacher_loaded_keys)
    assert any("head.cls_score.weight (shape" in s for s in skipped)
    assert "head.cls_score.weight" not in copied


def test_export_loads_into_plain_detectron2_with_identical_detections(teacher_files, tmp_path):
    model = build(teacher_files)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_0000001")
    count = export_student(str(tmp_path / "model_0000001.pth"), str(tmp_path / "student.pth"))
    assert count == len(model.student.state_dict())
    exported = torch.load(tmp_path / "student.pth")["model"]
    assert set(exported) == set(model.student.state_dict())
    with pytest.raises(ConfigError, match="not an FGDDistiller checkpoint"):
        export_student(str(tmp_path / "student.pth"), str(tmp_path / "again.pth"))

    plain = build_model(tiny.detector_cfg("RetinaNet", 16))
    DetectionCheckpointer(plain).load(str(tmp_path / "student.pth"))
    plain.eval()
    model.eval()
    batch = tiny.make_batch()
    with torch.no_grad():
        a = model(batch)
        b = plain(batch)
    for x, y in zip(a, b):
        assert torch.equal(x["instances"].pred_boxes.tensor, y["instances"].pred_boxes.tensor)
        assert torch.equal(x["instances"].scores, y["instances"].scores)


def test_eval_only_distiller_has_no_teacher_and_loads_training_checkpoints(teacher_files, tmp_path):
    model = build(teacher_files)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("ckpt")
    config, _, _ = teacher_files
    cfg = tiny.distiller_cfg(config, "/nonexistent/never/read.pth")
    evaluator_model = FGDTrainer.build_model(cfg, with_teacher=False)
    assert evaluator_model.teacher is None
    load_weights(evaluator_model, tmp_path / "ckpt.pth")
    for k, v in evaluator_model.student.state_dict().items():
        assert torch.equal(v, model.student.state_dict()[k])


def test_full_model_gradient_clipping_clips_the_total_norm():
    cfg = tiny.detector_cfg()
    cfg.merge_from_list(["SOLVER.CLIP_GRADIENTS.ENABLED", True, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model",
                         "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 1.0, "SOLVER.BASE_LR", 0.0])
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    optimizer = FGDTrainer.build_optimizer(cfg, model)
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    optimizer.step()
    total = torch.norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert total.item() == pytest.approx(1.0, rel=1e-4)
    # each parameter alone is below the clip value only because the total was clipped
    assert all(p.grad.norm() < 1.0 for p in model.parameters())
