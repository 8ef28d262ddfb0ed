"""Run by tests/test_distributed.py under torchrun: one distill per rank, then each rank's weights."""

import sys
from pathlib import Path

import torch

from ensemble_kd import pipeline
from ensemble_kd.config import load_config
from ensemble_kd import distributed


def main(command: str, out_dir: str, *overrides: str) -> None:
    world = distributed.init_from_env("cpu")
    torch.set_num_threads(1)
    config = load_config(None, ["device=cpu", *overrides])
    data = pipeline.prepare_data(config)
    if command == "cache":
        pipeline.cache_teachers(config, Path(out_dir) / "cache", data=data)
    else:
        model, _ = pipeline.distill(config, Path(out_dir) / "run", data=data)
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, Path(out_dir) / f"rank{world.rank}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
