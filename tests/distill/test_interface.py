"""Every distillation method is an nn.Module the training loop switches with ``train()`` / ``eval()``: no method
may shadow an ``nn.Module`` attribute (UnKD's ``self.train`` once broke ``task.train()`` at the first epoch)."""

import re
from pathlib import Path

from torch import nn

DISTILL = Path(__file__).resolve().parents[2] / "rayrec" / "distill"


def test_no_method_assigns_an_nn_module_attribute():
    reserved = {name for name in dir(nn.Module) if not name.startswith("__")}
    clashes = []
    for path in sorted(DISTILL.glob("*.py")):
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for name in re.findall(r"\bself\.(\w+)\s*(?::[^=]+)?=(?!=)", line):
                if name in reserved:
                    clashes.append(f"{path.name}:{lineno}: self.{name}")
    assert not clashes, clashes
