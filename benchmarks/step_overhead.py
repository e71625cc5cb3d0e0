#!/usr/bin/env python
"""
Cost of an FGD training step at the COCO configs' model sizes, against its physical floor.

Builds ``configs/fgd_retinanet.yaml`` (RetinaNet R50-FPN student, RetinaNet R101-FPN teacher; random weights,
nothing is downloaded) and times, alternating in one process on the same batch of 2 images of 512x768 pixels:

  * student: the student alone, forward + backward + SGD step;
  * teacher: the teacher's no-grad backbone + FPN forward, as the distiller runs it;
  * fgd:     the distiller's training step (student + teacher forward + FGD losses), forward + backward + step.

The floor of an FGD step is student + teacher; the FGD losses should add little (target: fgd / floor <= 1.15).

Memory, per variant (student step vs FGD step):

  * activations kept for backward: bytes of the tensors autograd saves during the forward (the teacher runs under
    no_grad and must add nothing; what the FGD step adds is the loss's own activations);
  * peak memory of one step in a fresh process that holds only that model (the student alone, or the distiller
    with the teacher's weights): Linux's resident high-water mark (VmHWM, reset before the step), or
    ``max_memory_allocated`` on CUDA. The step's growth above the memory held before it is the activations and
    transient buffers; the teacher's no-grad forward should add only its transient buffers.

Usage: python benchmarks/step_overhead.py [--device cuda] [--repeats 3] [--config-file ...]
"""
import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from fgd_d2 import add_fgd_config
from fgd_d2.distiller import build_student
from fgd_d2.teacher import load_teacher_config

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = (512, 768)  # (h, w) pixels, as resized by the data loader


def distiller_cfg(config_file, teacher_weights, device):
    cfg = get_cfg()
    add_fgd_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(["MODEL.DEVICE", device, "MODEL.WEIGHTS", "", "MODEL.FGD.TEACHER.WEIGHTS", teacher_weights])
    return cfg


def write_random_teacher(cfg, path):
    """A checkpoint of the teacher architecture with random weights (no network here)."""
    teacher_cfg = load_teacher_config(cfg)
    teacher_cfg.MODEL.DEVICE = "cpu"
    torch.save({"model": build_model(teacher_cfg).state_dict()}, path)


def make_batch(num_classes, seed=0, boxes_per_image=20):
    g = torch.Generator().manual_seed(seed)
    h, w = IMAGE_SIZE
    batch = []
    for _ in range(2):
        xy = torch.rand(boxes_per_image, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
        wh = 16 + torch.rand(boxes_per_image, 2, generator=g) * torch.tensor([w * 0.2, h * 0.2])
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        instances.gt_classes = torch.randint(0, num_classes, (boxes_per_image,), generator=g)
        image = torch.randint(0, 256, (3, h, w), generator=g).float()
        batch.append({"image": image, "instances": instances, "height": h, "width": w})
    return batch


class Variants:
    """The three timed callables, sharing one student initialisation and one batch."""

    def __init__(self, cfg):
        torch.manual_seed(0)
        self.distiller = build_model(cfg)
        self.distiller.train()
        self.student = self.distiller.student
        self.batch = make_batch(cfg.MODEL.RETINANET.NUM_CLASSES)
        self.device = torch.device(cfg.MODEL.DEVICE)
        self.student_optimizer = torch.optim.SGD(self.student.parameters(), lr=1e-5, momentum=0.9)
        self.fgd_optimizer = torch.optim.SGD(self.distiller.parameters(), lr=1e-5, momentum=0.9)

    def losses(self, model):
        with EventStorage(0):
            return model(self.batch)

    def _step(self, model, optimizer):
        optimizer.zero_grad(set_to_none=True)
        sum(self.losses(model).values()).backward()
        optimizer.step()

    def student_step(self):
        self._step(self.student, self.student_optimizer)

    def fgd_step(self):
        self._step(self.distiller, self.fgd_optimizer)

    def teacher_forward(self):
        self.distiller.teacher_features(self.batch)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def saved_activation_bytes(fn):
    """Bytes of the distinct tensors autograd saves for backward during ``fn()`` (the forward of a step)."""
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def time_alternating(variants, repeats):
    fns = {"student": variants.student_step, "teacher": variants.teacher_forward, "fgd": variants.fgd_step}
    times = {name: [] for name in fns}
    for repeat in range(repeats + 1):
        for name, fn in fns.items():
            variants.sync()
            start = time.perf_counter()
            fn()
            variants.sync()
            if repeat:  # the first round is a warm-up
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _proc_status_mib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_memory_child(args):
    """
    Run in a fresh process: build the student alone ('student') or the distiller ('fgd'), run one warm-up step,
    then measure one step. Prints the resident memory before the step and its peak during the step (MiB), or the
    CUDA peak. On Linux, writing 5 to /proc/self/clear_refs resets the peak (VmHWM) to the current RSS.
    """
    cfg = distiller_cfg(args.config_file, args.teacher_weights, args.device)
    torch.manual_seed(0)
    model = build_model(cfg) if args.peak_of == "fgd" else build_student(cfg)
    model.train()
    batch = make_batch(cfg.MODEL.RETINANET.NUM_CLASSES)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-5, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with EventStorage(0):
            sum(model(batch).values()).backward()
        optimizer.step()

    step()
    if torch.device(cfg.MODEL.DEVICE).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status_mib("VmRSS")
        step()
        peak = _proc_status_mib("VmHWM")
    print(json.dumps({"before": before, "peak": peak}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=str(REPO / "configs" / "fgd_retinanet.yaml"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--teacher-weights", help=argparse.SUPPRESS)
    parser.add_argument("--peak-of", choices=["student", "fgd"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_of:
        return peak_memory_child(args)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")

    with tempfile.TemporaryDirectory() as tmp:
        args.teacher_weights = str(Path(tmp) / "teacher.pth")
        cfg = distiller_cfg(args.config_file, args.teacher_weights, args.device)
        write_random_teacher(cfg, args.teacher_weights)
        variants = Variants(cfg)
        seconds = time_alternating(variants, args.repeats)
        saved = {"student": saved_activation_bytes(lambda: variants.losses(variants.student)),
                 "fgd": saved_activation_bytes(lambda: variants.losses(variants.distiller))}
        del variants
        peaks = {}
        for name in ("student", "fgd"):
            out = subprocess.run(
                [sys.executable, __file__, "--config-file", args.config_file, "--device", args.device,
                 "--teacher-weights", args.teacher_weights, "--peak-of", name],
                check=True, capture_output=True, text=True,
            ).stdout
            peaks[name] = json.loads(out.strip().splitlines()[-1])

    floor = seconds["student"] + seconds["teacher"]
    h, w = IMAGE_SIZE
    print(f"config={Path(args.config_file).name} device={args.device} batch=2x{h}x{w} repeats={args.repeats} "
          f"threads={torch.get_num_threads()}")
    print(f"student step (fwd+bwd+SGD):       {seconds['student'] * 1000:9.0f} ms")
    print(f"teacher backbone+FPN (no_grad):   {seconds['teacher'] * 1000:9.0f} ms")
    print(f"floor = student + teacher:        {floor * 1000:9.0f} ms")
    print(f"FGD step (fwd+bwd+SGD):           {seconds['fgd'] * 1000:9.0f} ms   "
          f"fgd / floor = {seconds['fgd'] / floor:.3f}x (target <= 1.15x), fgd / student = "
          f"{seconds['fgd'] / seconds['student']:.2f}x")
    mib = {k: v / 2**20 for k, v in saved.items()}
    print(f"activations saved for backward:   student {mib['student']:.0f} MiB, FGD {mib['fgd']:.0f} MiB "
          f"(+{mib['fgd'] - mib['student']:.0f} MiB, fgd / student = {mib['fgd'] / mib['student']:.3f}x)")
    s, f = peaks["student"], peaks["fgd"]
    what = "CUDA memory allocated" if args.device.startswith("cuda") else "resident memory (Linux VmHWM)"
    print(f"peak {what} during one step, fresh process each:")
    print(f"  student alone: {s['peak']:.0f} MiB ({s['before']:.0f} before the step, +{s['peak'] - s['before']:.0f})")
    print(f"  FGD:           {f['peak']:.0f} MiB ({f['before']:.0f} before the step, +{f['peak'] - f['before']:.0f}); "
          f"fgd / student = {f['peak'] / s['peak']:.3f}x, step growth fgd / student = "
          f"{(f['peak'] - f['before']) / (s['peak'] - s['before']):.3f}x")


if __name__ == "__main__":
    main()
