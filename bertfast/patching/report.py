"""What ``bertfast.patch`` did to a model: what was swapped, what was left, and why."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Swapped:
    path: str       # the module's name in ``model.named_modules()`` ("" = the model itself)
    original: str   # its class name
    what: str       # what now runs on bertfast ops


@dataclass(frozen=True)
class Left:
    path: str
    original: str
    reason: str     # why bertfast left it as it is


@dataclass
class PatchReport:
    """``swapped``: modules whose forward now runs on bertfast ops; ``left``: modules bertfast
    recognized (or that looked like something it accelerates) and left untouched, with the reason."""

    model: str
    swapped: list[Swapped] = field(default_factory=list)
    left: list[Left] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.swapped)

    def __str__(self) -> str:
        lines = [f"bertfast.patch({self.model}): {len(self.swapped)} swapped, {len(self.left)} left"]
        for s in self.swapped:
            lines.append(f"  swapped  {s.path or '<model>'} ({s.original}): {s.what}")
        for s in self.left:
            lines.append(f"  left     {s.path or '<model>'} ({s.original}): {s.reason}")
        return "\n".join(lines)
