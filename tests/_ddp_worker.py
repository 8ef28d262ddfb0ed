"""Run by tests/test_distributed.py under torchrun: one distill per rank, then each rank's weights."""

import json
import os
import signal
import sys
from pathlib import Path

import torch

from ensemble_kd import pipeline
from ensemble_kd.config import load_config
from ensemble_kd import distributed


SAVED: list[int] = []  # the steps this rank saved at


def stop_at_step_3_on_rank_1(rank: int) -> None:
    from ensemble_kd.engine.trainer import Trainer

    step, save = Trainer._step, Trainer.save

    def signalled_step(self, batch):
        if rank == 1 and self.pos.step == 2:  # the third step
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batch)

    def recorded_save(self):
        SAVED.append(self.pos.step)
        return save(self)

    Trainer._step, Trainer.save = signalled_step, recorded_save


def main(command: str, out_dir: str, *overrides: str) -> None:
    world = distributed.init_from_env("cpu")
    torch.set_num_threads(1)
    config = load_config(None, ["device=cpu", *overrides])
    if command == "prepare":  # which rank indexed which tar shard, and what each rank listed
        from ensemble_kd.data import samples

        built, index = [], samples._index_shard
        samples._index_shard = lambda path: built.append(str(path)) or index(path)
        data = pipeline.prepare_data(config)
        listed = {"built": built, "digest": data.splits.train.digest()}
        (Path(out_dir) / f"prepared{world.rank}.json").write_text(json.dumps(listed))
    elif command == "cache":
        pipeline.cache_teachers(config, Path(out_dir) / "cache", data=pipeline.prepare_data(config))
    elif command == "distill-signalled":  # rank 1 alone gets SIGTERM during step 3, as from a scheduler
        stop_at_step_3_on_rank_1(world.rank)
        try:
            pipeline.distill(config, Path(out_dir) / "run", data=pipeline.prepare_data(config))
        except KeyboardInterrupt:
            (Path(out_dir) / f"stopped{world.rank}.json").write_text(json.dumps(SAVED))
    else:
        model, _ = pipeline.distill(config, Path(out_dir) / "run", data=pipeline.prepare_data(config))
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, Path(out_dir) / f"rank{world.rank}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
