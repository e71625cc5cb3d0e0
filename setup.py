from setuptools import find_packages, setup

# torch, torchvision and Detectron2 are deliberately not listed: Detectron2 is not on PyPI under its own
# name and must match the installed torch. scripts/setup_venv.sh installs all three (see README.md).
setup(
    name="fgd_d2",
    version="0.1.0",
    description="Focal and Global Knowledge Distillation (FGD, CVPR 2022) for Detectron2 detectors",
    packages=find_packages(include=["fgd_d2", "fgd_d2.*"]),
    python_requires=">=3.9",
    install_requires=["fvcore>=0.1.5,<0.1.6", "iopath>=0.1.7,<0.1.10", "pycocotools", "numpy", "matplotlib"],
)
