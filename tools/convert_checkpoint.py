"""Convert a checkpoint written before tasks took their network as ``model.init_args.network``.

    python tools/convert_checkpoint.py OLD.ckpt NEW.ckpt

The weights are copied unchanged; only the saved options move to today's layout (see
``tasks/checkpoint_conversion.py``). ``tools/test.py``, ``predict.py`` and ``export.py`` read old
checkpoints directly; ``tools/train.py --ckpt_path`` (resume, validate) needs the converted file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from tasks.checkpoints import convert_checkpoint_file  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint of the old layout")
    parser.add_argument("out", type=Path, help="where to write the converted checkpoint")
    args = parser.parse_args(argv)
    try:
        changed = convert_checkpoint_file(args.checkpoint, args.out)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{args.out}: {'converted' if changed else 'already in the current layout, copied'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
