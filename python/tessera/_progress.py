"""Training progress: a tqdm bar (``tqdm.auto``: a widget in Jupyter, text in a terminal) when
tqdm is installed, else a line per tenth of the epochs."""

from __future__ import annotations

import json
import sys
from typing import Any


class EpochProgress:
    """Receives the engine's ("start", (epochs, cells)) and ("epoch", record JSON) calls."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.epochs = 0

    def __call__(self, kind: str, value: Any) -> None:
        if kind == "start":
            self.start(*value)
        elif kind == "epoch":
            self.epoch(json.loads(value))

    def start(self, epochs: int, cells: int) -> None:
        self.epochs = epochs
        if not self.enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            print(f"Training {epochs} epochs of {cells} cells", file=sys.stderr)
            return
        self.bar = tqdm(total=epochs, desc="Training", unit="epoch")

    def epoch(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        done = record["epoch"] + 1
        validation = record.get("validation")
        elbo = record["train"]["reconstruction"] + record["train"]["kl"]
        shown = {"elbo_train": f"{elbo:.1f}"}
        if validation:
            shown["elbo_validation"] = f"{validation['reconstruction'] + validation['kl']:.1f}"
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
        elif done == self.epochs or done % max(1, self.epochs // 10) == 0:
            text = ", ".join(f"{k}={v}" for k, v in shown.items())
            print(f"Epoch {done}/{self.epochs}: {text}", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
