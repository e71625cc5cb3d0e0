"""
Export the student of an FGDDistiller training checkpoint as a plain Detectron2 checkpoint:

    python -m fgd_d2.export output/.../model_0089999.pth student.pth
"""
import argparse
import sys

from .checkpoint import export_student
from .errors import ConfigError


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0])
    parser.add_argument("checkpoint", help="an FGD training checkpoint, e.g. output/model_0004999.pth")
    parser.add_argument("output", help="where to write the student-only .pth")
    args = parser.parse_args(argv)
    try:
        count = export_student(args.checkpoint, args.output)
    except (ConfigError, OSError) as e:
        sys.exit(f"fgd_d2.export: {e}")
    print(f"wrote {count} student tensors to {args.output}")


if __name__ == "__main__":
    main()
