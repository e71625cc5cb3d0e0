"""The paper's ablation switches, the Non-local relation module, FCOS students and heterogeneous teacher/student pairs."""
import logging

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.utils.events import EventStorage

import tiny
from fgd_d2 import ConfigError, FGDDistiller, add_fgd_config
from fgd_d2.checkpoint import inherit_teacher_weights
from fgd_d2.loss import FGDLoss, attention_maps
from fgd_d2.masks import focal_masks
from fgd_d2.relation import GcBlock, NonLocalBlock

TERMS = ("fg", "bg", "attention", "global")


def features(seed=0, n=2, c=8, h=12, w=16):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, c, h, w, generator=g)
    teacher = torch.randn(n, c, h, w, generator=g)
    boxes = [torch.tensor([[8.0, 8.0, 40.0, 30.0], [50.0, 20.0, 60.0, 44.0]]), torch.tensor([[0.0, 0.0, 20.0, 20.0]])]
    return student, teacher, boxes, [(48, 64), (40, 60)], (48, 64)


def make_loss(**kwargs):
    """An FGDLoss whose relation blocks are perturbed away from their identity init, identically for every call."""
    loss = FGDLoss(student_channels=8, teacher_channels=8, **kwargs)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in loss.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return loss


def terms_of(loss):
    return {k: v.detach() for k, v in loss(*features()).items()}


def hand_focal_terms(spatial=True, channel=True, temperature=0.5):
    """fg, bg and attention of FGD_SPEC.md with the teacher's attention optionally replaced by 1."""
    student, teacher, boxes, sizes, input_size = features()
    n, _, h, w = teacher.shape
    s_spatial, s_channel = attention_maps(student, temperature)
    t_spatial, t_channel = attention_maps(teacher, temperature)
    fg_mask, bg_mask = focal_masks(boxes, sizes, input_size, (h, w))
    weight = torch.ones(n, 1, h, w)
    if spatial:
        weight = weight * t_spatial[:, None]
    if channel:
        weight = weight * t_channel[:, :, None, None]
    error = weight * (student - teacher) ** 2
    fg = (error * fg_mask[:, None]).sum() / n
    bg = (error * bg_mask[:, None]).sum() / n
    uniform = error.sum() / (h * w) / n
    attention = torch.zeros(())
    if channel:
        attention = attention + (s_channel - t_channel).abs().sum() / n
    if spatial:
        attention = attention + (s_spatial - t_spatial).abs().sum() / n
    return {"fg": fg, "bg": bg, "attention": attention, "uniform": uniform}


@pytest.fixture(scope="module")
def method():
    return terms_of(make_loss())


def assert_same(terms, reference, names):
    for name in names:
        assert torch.allclose(terms[name], reference[name], rtol=1e-5), name


def test_method_terms_are_nonzero(method):
    assert all(method[name] > 0 for name in TERMS)


@pytest.mark.parametrize("mask", ["foreground", "background", "uniform"])
def test_feature_mask_changes_only_the_feature_terms(method, mask):
    terms = terms_of(make_loss(feature_mask=mask))
    assert_same(terms, method, ("attention", "global"))
    hand = hand_focal_terms()
    if mask == "foreground":
        assert_same(terms, method, ("fg",))
        assert terms["bg"] == 0
    elif mask == "background":
        assert_same(terms, method, ("bg",))
        assert terms["fg"] == 0
    else:  # one mask 1/(H*W) everywhere, in the fg term
        assert torch.allclose(terms["fg"], hand["uniform"], rtol=1e-5) and terms["bg"] == 0
        assert not torch.allclose(terms["fg"], method["fg"])
    assert torch.allclose(terms["total"], 1e-3 * terms["fg"] + 5e-4 * terms["bg"] + 5e-4 * terms["attention"]
                          + 5e-6 * terms["global"], rtol=1e-5)


def test_focal_off_keeps_only_the_global_term(method):
    terms = terms_of(make_loss(focal_loss=False))
    assert terms["fg"] == terms["bg"] == terms["attention"] == 0
    assert_same(terms, method, ("global",))


def test_global_off_keeps_the_focal_terms_and_has_no_relation_modules(method):
    loss = make_loss(global_loss=False)
    assert not hasattr(loss, "student_relation") and not any(True for _ in loss.parameters())
    terms = terms_of(loss)
    assert terms["global"] == 0
    assert_same(terms, method, ("fg", "bg", "attention"))


@pytest.mark.parametrize("spatial, channel", [(False, True), (True, False), (False, False)])
def test_attention_switches_change_feature_and_attention_terms_only(method, spatial, channel):
    terms = terms_of(make_loss(spatial_attention=spatial, channel_attention=channel))
    hand = hand_focal_terms(spatial=spatial, channel=channel)
    for name in ("fg", "bg", "attention"):
        assert torch.allclose(terms[name], hand[name], rtol=1e-5), name
        if name != "attention" or spatial or channel:
            assert not torch.allclose(terms[name], method[name]), name
    if not (spatial or channel):
        assert terms["attention"] == 0
    assert_same(terms, method, ("global",))


def test_temperature_changes_the_focal_terms_not_the_global_term(method):
    terms = terms_of(make_loss(temperature=1.0))
    hand = hand_focal_terms(temperature=1.0)
    for name in ("fg", "bg", "attention"):
        assert torch.allclose(terms[name], hand[name], rtol=1e-5) and not torch.allclose(terms[name], method[name])
    assert_same(terms, method, ("global",))


def test_nonlocal_relation_changes_only_the_global_term(method):
    loss = make_loss(relation="NonLocal")
    assert isinstance(loss.student_relation, NonLocalBlock) and isinstance(loss.teacher_relation, NonLocalBlock)
    terms = terms_of(loss)
    assert_same(terms, method, ("fg", "bg", "attention"))
    assert not torch.allclose(terms["global"], method["global"])
    student, teacher = features()[:2]
    expected = (loss.student_relation(student) - loss.teacher_relation(teacher)).pow(2).sum() / 2
    assert torch.allclose(terms["global"], expected.detach())


def test_nonlocal_block_is_the_identity_at_init_and_matches_its_formula():
    torch.manual_seed(0)
    block = NonLocalBlock(6)
    x = torch.randn(2, 6, 3, 4)
    assert torch.equal(block(x), x)
    with torch.no_grad():
        block.out.weight.normal_()
        block.out.bias.normal_()
    theta, phi, g = (conv(x).flatten(2) for conv in (block.theta, block.phi, block.g))  # (N, 3, 12)
    y = torch.zeros_like(g)
    for n in range(2):
        for i in range(12):
            weights = torch.softmax(torch.stack([theta[n, :, i] @ phi[n, :, j] for j in range(12)]), dim=0)
            y[n, :, i] = sum(weights[j] * g[n, :, j] for j in range(12))
    expected = x + block.out(y.view(2, 3, 3, 4))
    assert torch.allclose(block(x), expected, atol=1e-5)


def test_both_terms_off_and_unknown_switch_values_are_errors():
    with pytest.raises(ValueError, match="nothing to distil"):
        FGDLoss(focal_loss=False, global_loss=False)
    with pytest.raises(ValueError, match="feature_mask"):
        FGDLoss(feature_mask="boxes")
    with pytest.raises(ValueError, match="relation"):
        FGDLoss(relation="Transformer")


@pytest.mark.parametrize("opts, message", [
    (["MODEL.FGD.FEATURE_MASK", "boxes"], "MODEL.FGD.FEATURE_MASK='boxes'"),
    (["MODEL.FGD.RELATION", "Transformer"], "MODEL.FGD.RELATION='Transformer'"),
    (["MODEL.FGD.FOCAL_LOSS", False, "MODEL.FGD.GLOBAL_LOSS", False], "nothing to distil"),
])
def test_bad_ablation_keys_are_config_errors_before_the_teacher_is_built(opts, message):
    cfg = tiny.distiller_cfg("/nonexistent/teacher.yaml", "/nonexistent/teacher.pth", extra=opts)
    with pytest.raises(ConfigError, match=message):
        FGDDistiller(cfg)


ABLATION_SETTINGS = {
    "table1_foreground_only": dict(feature_mask="foreground"),
    "table1_background_only": dict(feature_mask="background"),
    "table1_no_split": dict(feature_mask="uniform"),
    "table1_split": {},
    "table4_focal_only": dict(global_loss=False),
    "table4_global_only": dict(focal_loss=False),
    "table4_focal_and_global": {},
    "table5_no_attention": dict(spatial_attention=False, channel_attention=False),
    "table5_spatial_only": dict(channel_attention=False),
    "table5_channel_only": dict(spatial_attention=False),
    "table5_spatial_and_channel": {},
    "table6_gcblock": dict(focal_loss=False),
    "table6_nonlocal": dict(focal_loss=False, relation="NonLocal"),
    **{f"table7_temperature_{t}": dict(temperature=float(t)) for t in ("0.3", "0.5", "0.8", "1.0", "1.2")},
}
METHOD = dict(feature_mask="split", focal_loss=True, global_loss=True, spatial_attention=True,
              channel_attention=True, relation="GcBlock", temperature=0.5)


@pytest.mark.parametrize("name", sorted(ABLATION_SETTINGS))
def test_ablation_configs_set_exactly_their_row(name, tmp_path):
    from fgd_d2.distiller import resolve_loss_params

    path = tiny.REPO / "configs" / "ablations" / f"{name}.yaml"
    cfg = get_cfg()
    add_fgd_config(cfg)
    cfg.merge_from_file(str(path))
    family = "GeneralizedRCNN" if name.startswith("table6") else "RetinaNet"
    assert cfg.MODEL.FGD.STUDENT_META_ARCHITECTURE == family
    params = resolve_loss_params(cfg)
    expected = dict(METHOD, **ABLATION_SETTINGS[name])
    assert {k: params[k] for k in expected} == expected
    assert cfg.OUTPUT_DIR == f"output/ablations/{name}"


def test_every_ablation_config_is_listed():
    shipped = {p.stem for p in (tiny.REPO / "configs" / "ablations").glob("*.yaml")}
    assert shipped == set(ABLATION_SETTINGS)


# ---------------------------------------------------------------- FCOS and heterogeneous pairs


def test_fcos_student_distils_p3_to_p7_with_the_anchor_free_preset(tmp_path):
    config, weights, _ = tiny.write_teacher(tmp_path, arch="FCOS", fpn_channels=24)
    torch.manual_seed(1)
    model = FGDDistiller(tiny.distiller_cfg(config, weights, arch="FCOS"))
    assert model.in_features == ["p3", "p4", "p5", "p6", "p7"]
    loss = model.distill_losses["p3"]
    assert (loss.temperature, loss.alpha, loss.beta, loss.gamma, loss.lambda_) == (0.8, 1.6e-3, 8e-4, 8e-4, 8e-6)
    assert loss.align is not None  # 16 student channels, 24 teacher channels
    model.train()
    with EventStorage(0):
        losses = model(tiny.make_batch())
    assert {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr", "loss_fgd_fg", "loss_fgd_global"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        detections = model(tiny.make_batch())
    assert "instances" in detections[0]


def test_faster_rcnn_teacher_for_a_retinanet_student(tmp_path, caplog):
    config, weights, _ = tiny.write_teacher(tmp_path, arch="GeneralizedRCNN", fpn_channels=24)
    torch.manual_seed(1)
    with caplog.at_level(logging.INFO, logger="fgd_d2"):
        model = FGDDistiller(tiny.distiller_cfg(config, weights, arch="RetinaNet"))
    # The teacher has p2-p6: the RetinaNet defaults it also has are p3-p6 (p7 is not distilled).
    assert model.in_features == ["p3", "p4", "p5", "p6"]
    assert "distilling ['p3', 'p4', 'p5', 'p6']" in caplog.text
    assert all(model.distill_losses[level].align is not None for level in model.in_features)
    model.train()
    with EventStorage(0):
        losses = model(tiny.make_batch())
    assert all(torch.isfinite(v) for v in losses.values())

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fgd_d2"):
        copied, skipped = inherit_teacher_weights(model.student, model.teacher, model.teacher_loaded_keys)
    assert copied == []  # other FPN width, other heads: nothing matches
    assert "the heads were not inherited, nothing was inherited" in caplog.text


def test_inheritance_across_families_copies_only_the_fpn_and_says_so(tmp_path, caplog):
    config, weights, teacher = tiny.write_teacher(tmp_path, arch="GeneralizedRCNN", fpn_channels=16)
    model = FGDDistiller(tiny.distiller_cfg(config, weights, arch="RetinaNet", fpn_channels=16))
    with caplog.at_level(logging.INFO, logger="fgd_d2"):
        copied, skipped = inherit_teacher_weights(model.student, model.teacher, model.teacher_loaded_keys)
    # RetinaNet's P6 conv reads res5 (512 channels), Faster R-CNN has no P6 conv: the lateral and output
    # convs of p3-p5 match in name and shape.
    assert copied and all(k.startswith("backbone.fpn_") for k in copied)
    assert any(k.startswith("head.") for k in (s.split(" ")[0] for s in skipped))
    assert "the heads were not inherited, only the FPN was inherited" in caplog.text
    state = model.student.state_dict()
    teacher_state = teacher.state_dict()
    assert all(torch.equal(state[k], teacher_state[k]) for k in copied)
