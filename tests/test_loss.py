"""FGDLoss against FGD_SPEC.md sections 1 and 3-6."""
import pytest
import torch

from fgd_d2.loss import FGDLoss, attention_maps
from fgd_d2.masks import focal_masks

TERMS = ("fg", "bg", "attention", "global")


def make_inputs(n=2, c=4, h=8, w=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, c, h, w, generator=g, dtype=dtype, requires_grad=True)
    teacher = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    boxes = [torch.tensor([[4.0, 8.0, 30.0, 40.0], [20.0, 2.0, 60.0, 20.0]]), torch.tensor([[0.0, 0.0, 16.0, 64.0]])]
    return student, teacher, boxes[:n] + [torch.zeros(0, 4)] * max(0, n - 2), [(64, 64)] * n, (64, 64)


def double_loss(**kw):
    return FGDLoss(student_channels=kw.pop("student_channels", 4), teacher_channels=4, **kw).double()


def test_defaults_are_the_one_stage_preset_and_public():
    loss = FGDLoss()
    assert (loss.temperature, loss.alpha, loss.beta, loss.gamma, loss.lambda_) == (0.5, 1e-3, 5e-4, 5e-4, 5e-6)
    assert loss.box_scaling == "padded" and loss.align is None
    with pytest.raises(TypeError):
        FGDLoss(256, 256)  # keywords only


@pytest.mark.parametrize("kw,match", [(dict(temperature=0), "temperature"), (dict(alpha=-1), "alpha"),
                                      (dict(lambda_=-1e-9), "lambda_"), (dict(box_scaling="x"), "box_scaling"),
                                      (dict(temperature=float("inf")), "temperature"),
                                      (dict(beta=float("nan")), "beta")])
def test_rejects_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        FGDLoss(**kw)


def test_attention_by_hand():
    f = torch.tensor([[[[1.0, -2.0], [0.0, 3.0]], [[-1.0, 0.0], [2.0, 1.0]]]], dtype=torch.float64)  # (1,2,2,2)
    spatial, channel = attention_maps(f, temperature=0.5)
    g_s = torch.tensor([1.0, 1.0, 1.0, 2.0], dtype=torch.float64)  # mean_c |F|
    expected_s = 4 * torch.softmax(g_s / 0.5, 0)
    g_c = torch.tensor([1.5, 1.0], dtype=torch.float64)  # mean_hw |F|
    expected_c = 2 * torch.softmax(g_c / 0.5, 0)
    assert torch.allclose(spatial.flatten(), expected_s)
    assert torch.allclose(channel.flatten(), expected_c)


def test_attention_sums_to_hw_and_c():
    f = torch.randn(3, 5, 6, 7, dtype=torch.float64)
    spatial, channel = attention_maps(f, 0.8)
    assert torch.allclose(spatial.sum(dim=(1, 2)), torch.full((3,), 42.0, dtype=torch.float64))
    assert torch.allclose(channel.sum(dim=1), torch.full((3,), 5.0, dtype=torch.float64))


def explicit_terms(student, teacher, boxes, sizes, input_size, temperature, mode="padded"):
    """The spec's formulas written with explicit loops over n, c, h, w (float64)."""
    n, c, h, w = student.shape
    fg_mask, bg_mask = focal_masks(boxes, sizes, input_size, (h, w), box_scaling=mode, dtype=torch.float64)
    s_sp, s_ch = attention_maps(student, temperature)
    t_sp, t_ch = attention_maps(teacher, temperature)
    fg = bg = at = 0.0
    for i in range(n):
        for k in range(c):
            at += abs(s_ch[i, k] - t_ch[i, k])
            for y in range(h):
                for x in range(w):
                    d2 = (student[i, k, y, x] - teacher[i, k, y, x]) ** 2
                    fg += fg_mask[i, y, x] * t_sp[i, y, x] * t_ch[i, k] * d2
                    bg += bg_mask[i, y, x] * t_sp[i, y, x] * t_ch[i, k] * d2
        at += (s_sp[i] - t_sp[i]).abs().sum()
    return fg / n, bg / n, at / n, ((student - teacher) ** 2).sum() / n


def test_terms_match_the_explicit_formulas():
    student, teacher, boxes, sizes, input_size = make_inputs(n=2, c=3, h=4, w=5)
    loss = FGDLoss(student_channels=3, teacher_channels=3, temperature=0.7, alpha=2.0, beta=3.0, gamma=5.0,
                   lambda_=7.0).double()
    terms = loss(student, teacher, boxes, sizes, input_size)
    fg, bg, at, gl = explicit_terms(student.detach(), teacher, boxes, sizes, input_size, 0.7)
    assert terms["fg"].item() == pytest.approx(fg.item(), rel=1e-12)
    assert terms["bg"].item() == pytest.approx(bg.item(), rel=1e-12)
    assert terms["attention"].item() == pytest.approx(at.item(), rel=1e-12)
    assert terms["global"].item() == pytest.approx(gl.item(), rel=1e-12)  # GcBlocks are identity at init
    total = 2 * fg + 3 * bg + 5 * at + 7 * gl
    assert terms["total"].item() == pytest.approx(total.item(), rel=1e-12)
    assert terms["fg"] > 0 and terms["bg"] > 0


def test_duplicating_the_batch_leaves_the_terms_unchanged():
    student, teacher, boxes, sizes, input_size = make_inputs()
    loss = double_loss()
    once = loss(student, teacher, boxes, sizes, input_size)
    twice = loss(torch.cat([student, student]), torch.cat([teacher, teacher]), boxes * 2, sizes * 2, input_size)
    for name in TERMS:
        assert twice[name].item() == pytest.approx(once[name].item(), rel=1e-12)


def test_fg_gradient_is_the_analytic_form():
    student, teacher, boxes, sizes, input_size = make_inputs()
    loss = double_loss()
    terms = loss(student, teacher, boxes, sizes, input_size)
    (grad,) = torch.autograd.grad(terms["fg"], student)
    fg_mask, _ = focal_masks(boxes, sizes, input_size, student.shape[-2:], dtype=torch.float64)
    t_sp, t_ch = attention_maps(teacher, 0.5)
    expected = 2.0 / student.shape[0] * fg_mask[:, None] * t_sp[:, None] * t_ch[:, :, None, None] * (
        student.detach() - teacher)
    assert torch.allclose(grad, expected, rtol=1e-10, atol=1e-14)


def test_no_gradient_reaches_the_teacher_feature():
    student, teacher, boxes, sizes, input_size = make_inputs()
    teacher.requires_grad_(True)
    double_loss()(student, teacher, boxes, sizes, input_size)["total"].backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_at_init_only_the_last_channel_add_convs_get_gradient():
    student, teacher, boxes, sizes, input_size = make_inputs()
    loss = double_loss()
    loss(student, teacher, boxes, sizes, input_size)["total"].backward()
    for name, p in loss.named_parameters():
        assert p.grad is not None, name
        last = name.split(".")[1] == "channel_add" and name.split(".")[2] == "3"
        if last:
            assert p.grad.abs().sum() > 0, name
        else:
            assert torch.all(p.grad == 0), name


def test_gcblock_init():
    loss = FGDLoss(student_channels=16, teacher_channels=16)
    for block in (loss.student_relation, loss.teacher_relation):
        assert torch.all(block.channel_add[-1].weight == 0) and torch.all(block.channel_add[-1].bias == 0)
        assert torch.all(block.conv_mask.bias == 0)
        std = block.conv_mask.weight.std().item()
        assert 0.2 < std / (2.0 / 16) ** 0.5 < 2.0  # kaiming normal, fan_in, relu gain
    assert loss.student_relation.conv_mask.weight.data_ptr() != loss.teacher_relation.conv_mask.weight.data_ptr()


def test_align_conv_when_channels_differ_and_all_params_used_without_boxes():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 6, 8, 8, generator=g, requires_grad=True)
    teacher = torch.randn(2, 4, 8, 8, generator=g)
    loss = FGDLoss(student_channels=6, teacher_channels=4)
    assert isinstance(loss.align, torch.nn.Conv2d) and loss.align.weight.shape == (4, 6, 1, 1)
    terms = loss(student, teacher, [torch.zeros(0, 4), torch.zeros(0, 4)], [(64, 64)] * 2, (64, 64))
    assert terms["fg"].item() == 0.0
    terms["total"].backward()
    for name, p in loss.named_parameters():
        assert p.grad is not None, f"{name} is not in the graph for a batch without boxes"


def test_edge_cases_give_finite_terms():
    student, teacher, _, _, _ = make_inputs(n=4)
    boxes = [
        torch.tensor([[0.0, 0.0, 64.0, 64.0]]),  # the whole map
        torch.tensor([[-20.0, -5.0, 30.0, 90.0], [0.0, 0.0, 0.0, 0.0]]),  # partly outside, all-zero
        torch.tensor([[10.0, 10.0, 10.2, 10.1], [5.0, 5.0, 4.0, 9.0]]),  # tiny, degenerate
        torch.zeros(0, 4),  # none
    ]
    terms = double_loss()(student, teacher, boxes, [(64, 64)] * 4, (64, 64))
    for name in TERMS + ("total",):
        assert torch.isfinite(terms[name]), name
    terms["total"].backward()
    assert torch.isfinite(student.grad).all()


def test_padded_and_image_modes_differ_exactly_when_padded():
    student, teacher, boxes, _, _ = make_inputs()
    padded = FGDLoss(student_channels=4, teacher_channels=4, box_scaling="padded").double()
    image = FGDLoss(student_channels=4, teacher_channels=4, box_scaling="image").double()
    image.load_state_dict(padded.state_dict())
    same = [(64, 64)] * 2
    assert padded(student, teacher, boxes, same, (64, 64))["fg"] == image(student, teacher, boxes, same, (64, 64))["fg"]
    smaller = [(48, 56), (64, 40)]
    assert padded(student, teacher, boxes, smaller, (64, 64))["fg"] != image(
        student, teacher, boxes, smaller, (64, 64))["fg"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_features_are_computed_in_float32(dtype):
    student, teacher, boxes, sizes, input_size = make_inputs(dtype=torch.float32)
    loss = FGDLoss(student_channels=4, teacher_channels=4)
    reference = loss(student.to(dtype).float(), teacher.to(dtype).float(), boxes, sizes, input_size)
    terms = loss(student.to(dtype), teacher.to(dtype), boxes, sizes, input_size)
    for name in TERMS + ("total",):
        assert terms[name].dtype == torch.float32
        assert terms[name].item() == pytest.approx(reference[name].item(), rel=1e-5)


def test_autocast_does_not_lower_precision():
    student, teacher, boxes, sizes, input_size = make_inputs(dtype=torch.float32, c=8)
    loss = FGDLoss(student_channels=8, teacher_channels=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = loss(student, teacher, boxes, sizes, input_size)
    assert all(terms[name].dtype == torch.float32 for name in TERMS)


def test_float64_stays_float64_and_mismatch_is_explained():
    student, teacher, boxes, sizes, input_size = make_inputs()
    terms = double_loss()(student, teacher, boxes, sizes, input_size)
    assert terms["total"].dtype == torch.float64
    with pytest.raises(TypeError, match="double"):
        FGDLoss(student_channels=4, teacher_channels=4)(student, teacher, boxes, sizes, input_size)


def test_shape_mismatch_is_a_clear_error():
    loss = FGDLoss(student_channels=4, teacher_channels=4)
    with pytest.raises(ValueError, match="spatial size"):
        loss(torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 6), [torch.zeros(0, 4)], [(64, 64)], (64, 64))
