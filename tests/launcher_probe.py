"""A Hydra app for tests/test_launcher.py: each grid point records when it ran and with how
many threads, then sleeps, so the test can see how many ran at once."""

import json
import os
import time
from pathlib import Path

import hydra
import torch

from editexp.config import CONFIG_DIR


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg) -> None:
    start = time.time()
    time.sleep(float(cfg.probe.sleep))
    record = {
        "index": int(cfg.probe.index),
        "start": start,
        "end": time.time(),
        "torch_threads": torch.get_num_threads(),
        "omp": os.environ.get("OMP_NUM_THREADS"),
    }
    out = Path(cfg.probe.out) / f"{cfg.probe.index}.json"
    out.write_text(json.dumps(record))


if __name__ == "__main__":
    main()
