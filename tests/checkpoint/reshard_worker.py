"""Save and restore under DDP with any world size (run by torchrun or plain python).

--mode save:    train --steps steps (DDP when WORLD_SIZE > 1), save, write the saved state's digest
--mode resume:  restore from the store, write the restored state's digest, train --steps more and save
Rank r writes its digests to OUT.r.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mamba_training.checkpoint import CheckpointManager, CheckpointPolicy  # noqa: E402
from tests.checkpoint.tiny import build, train  # noqa: E402


def digest(state: dict) -> str:
    h = hashlib.sha256()
    model = getattr(state["model"], "module", state["model"])
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode() + tensor.numpy().tobytes())
    optim = state["optimizer"].state_dict()
    for index in sorted(optim["state"]):
        for key, value in sorted(optim["state"][index].items()):
            h.update(f"{index}.{key}".encode() + value.numpy().tobytes())
    h.update(json.dumps([state["trainer"].step, state["sampler"].position, state["scheduler"].last_epoch]).encode())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--mode", choices=["save", "resume"], required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo")
    state = build(seed=3)
    torch.manual_seed(100 + rank)  # each rank sees different data, as under a real sampler
    if world > 1:
        state["model"] = DistributedDataParallel(state["model"])
    mgr = CheckpointManager(args.store, policy=CheckpointPolicy(keep_last=5), cache_dir=args.out.parent / f"cache-{rank}",
                            rank=rank, world_size=world)
    out: dict = {"world_size": world}
    if args.mode == "resume":
        info = mgr.restore(state)
        out.update(restored_step=info.step, restored_from_world=info.world_size, restored=digest(state))
    train(state, args.steps)
    step = state["trainer"].step
    mgr.save(step, state["trainer"].tokens_seen, state)
    mgr.flush()
    mgr.close()
    out.update(saved_step=step, saved=digest(state))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    args.out.with_suffix(f".{rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
