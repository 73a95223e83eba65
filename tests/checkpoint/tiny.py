"""A tiny, seeded training setup with every kind of Stateful the trainer hands the checkpoint
manager: model, AdamW, LR scheduler, a sampler-like object and a counters+RNG object.

Used by the checkpoint tests and by the standalone scripts they start (kill trials, torchrun).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import nn


class Counters:
    """Step/token counters and the RNG states, like the trainer's TrainState."""

    def __init__(self) -> None:
        self.step = 0
        self.tokens_seen = 0

    def state_dict(self) -> dict[str, Any]:
        py = random.getstate()
        npr = np.random.get_state()
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "rng_python": [py[0], list(py[1]), py[2]],
            "rng_numpy": [npr[0], npr[1].tolist(), int(npr[2]), int(npr[3]), float(npr[4])],
            "rng_torch": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        version, internal, gauss = state["rng_python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = state["rng_numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(state["rng_torch"])


class Sampler:
    """Global position + seed (reshardable), with a nested dict and a tuple to exercise encoding."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.position = 0
        self.history = (0, 0)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "position": self.position, "meta": {"history": self.history, "none": None}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"sampler seed {state['seed']} != {self.seed}")
        self.position = state["position"]
        self.history = tuple(state["meta"]["history"])


def build(seed: int = 0, width: int = 16) -> dict[str, Any]:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model = nn.Sequential(nn.Linear(8, width), nn.GELU(), nn.Linear(width, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler,
            "sampler": Sampler(seed), "trainer": Counters()}


def train(app_state: dict[str, Any], steps: int, batch: int = 4) -> None:
    """Steps whose data comes from the RNGs, so the RNG state must be restored to continue exactly."""
    model, optimizer = app_state["model"], app_state["optimizer"]
    counters, sampler = app_state["trainer"], app_state["sampler"]
    for _ in range(steps):
        x = torch.randn(batch, 8) + float(np.random.rand()) + random.random()
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        app_state["scheduler"].step()
        counters.step += 1
        counters.tokens_seen += batch
        sampler.position += batch
        sampler.history = (sampler.history[1], counters.step)


def weights(app_state: dict[str, Any]) -> dict[str, torch.Tensor]:
    model = app_state["model"]
    model = getattr(model, "module", model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
