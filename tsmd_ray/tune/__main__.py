"""``python -m tsmd_ray.tune``. Tune pickles the trainable and the callbacks by reference to their
modules in ``tsmd_ray.tune``, so that ``--resume`` can restore them: nothing is defined here."""
import sys

from tsmd_ray.tune.cli import main

sys.exit(main())
