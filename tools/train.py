"""Train, validate, test or predict any task from one YAML config (Lightning's LightningCLI).

    python tools/train.py fit --config configs/ssdlite_mobilenetv2_synthetic.yaml
    python tools/train.py validate --config CONFIG --ckpt_path runs/.../last.ckpt
    python tools/train.py fit --config CONFIG --data.root /data/coco --trainer.devices 8
    python tools/train.py fit --config CONFIG --ckpt_path last      # resume the newest run

The config names the LightningModule and LightningDataModule by ``class_path``; every
``__init__`` argument and every ``--trainer.*`` flag can be overridden on the command line.

On top of plain LightningCLI every run gets:

* atomic checkpoints, written with the user's umask and read with ``weights_only=True``
  (:class:`tasks.checkpoint_io.AtomicCheckpointIO`, unless the config names its own checkpoint
  plug-in);
* the callbacks of :mod:`tasks.callbacks` (exact resume from any checkpoint, also mid-epoch;
  earlier ``metrics.csv`` rows kept on resume; orphaned temporary files removed; a validation
  after the last step; per-epoch count of ``data.skip_unreadable``; ``curves.png`` of the
  losses and validation scores in the log folder; a closing summary);
* ``--ckpt_path last`` that finds the newest ``last*.ckpt`` of *earlier* runs of the config
  (Lightning alone looks only in the new run's empty ``version_N`` folder and starts over);
* a check of ``--ckpt_path`` before anything reads it otherwise: a file that holds Python
  objects (a pickle that could run code) or names a class that is not one of this project's
  tasks is refused, and so is a checkpoint of the other task, or of a model with other shapes,
  with the options to change;
* errors for people in one line: a data or checkpoint problem raised by this project's code
  prints ``error: <file>: <problem>`` and exits with status 1; ``MOBILEDENSE_VERBOSE=1`` shows
  the whole traceback instead.
* a quiet start (:func:`tasks.startup.quiet_startup`): no deprecation warnings from inside
  torch, Lightning and the other libraries, no adverts for Lightning's cloud services.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from tasks.allocator import keep_freed_memory  # noqa: E402
from tasks.startup import quiet_startup  # noqa: E402

if __name__ == "__main__":
    quiet_startup()  # before torch and Lightning are imported: their import-time warnings too
    keep_freed_memory()  # no page faults on every step's activations (tasks/allocator.py)

from tasks.cli import CLI, error_for_people, main, run  # noqa: E402, F401  (importable from here, as before)

if __name__ == "__main__":
    sys.exit(run())
