"""``python -m tsmd_ray.tracking``: upload runs, print the tracking URI."""
import sys

from tsmd_ray.tracking.upload import main

sys.exit(main())
