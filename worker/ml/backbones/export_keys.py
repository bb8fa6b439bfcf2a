"""Write `app/models/architectures.json`: each architecture's state_dict keys and shapes, torch-free.

The api checks an upload's architecture without importing torch, so it reads this table; regenerate it
(`python -m worker.ml.backbones.export_keys`) whenever a backbone changes, and a test keeps the two equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from worker.ml.backbones import ARCHITECTURES, build_backbone

TABLE_PATH = Path(__file__).resolve().parents[3] / "app" / "models" / "architectures.json"


def architecture_table() -> dict[str, dict[str, list[int]]]:
    """Architecture → {state_dict key: shape}, in state_dict order, from weightless (meta-device) builds."""
    table: dict[str, dict[str, list[int]]] = {}
    for arch in ARCHITECTURES:
        with torch.device("meta"):
            model = build_backbone(arch)
        table[arch] = {key: list(value.shape) for key, value in model.state_dict().items()}
    return table


def render(table: dict[str, dict[str, list[int]]]) -> str:
    """One line per architecture: compact, yet a change shows up as a readable diff."""
    lines = [f"{json.dumps(arch)}:{json.dumps(keys, separators=(',', ':'))}" for arch, keys in table.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main() -> None:
    TABLE_PATH.write_text(render(architecture_table()), encoding="utf-8")
    print(f"wrote {TABLE_PATH}")


if __name__ == "__main__":
    main()
