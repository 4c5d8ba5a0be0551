"""Imported last by multiprocessing's fork server (bench/run/forkserver.py PRELOAD): what every trial
of a sweep would otherwise redo, done once before the first trial is forked.

- results.freeze_environment(): the package versions and the git state of the sweep's start (the
  code the server imported is the code its trials run);
- calibrate.blocks(): the two small transformers blocks the runtime calibration times;
- gc.freeze(): everything imported so far moves to the collector's permanent generation. A trial's
  full collections (forecast.clear_caches, and those the allocator triggers during training) then
  skip the server's ~400,000 objects instead of walking them and copying their pages on write.
"""

import gc

from bench.records import results
from bench.regression import calibrate

try:
    results.freeze_environment()
    calibrate.blocks()
except Exception:  # noqa: BLE001  (only a saving: each trial then computes them itself, as it can)
    pass
gc.freeze()
