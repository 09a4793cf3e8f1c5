"""Which online level change moves a running VM from one protection level to another (pure).

  0/1 -> 2   RAISE_TO_COMPONENT   disks mirrored to this host's copy, then replicated
  2 -> 0/1   LOWER_FROM_COMPONENT replica released (to 1: disks mirrored to shared images)
  0/1/2 -> 3 RAISE_TO_SYSTEM      the VM moves live into a checkpointed QEMU on this host
  3 -> 0/1/2 LOWER_FROM_SYSTEM    checkpointing ends (to 2: then as RAISE_TO_COMPONENT)

Level 0 <-> 1 has no transition while running (the disks would have to move between shared
and local storage and nothing would protect them meanwhile): stop the VM first. The
steps of each are in agent/levels.py.
"""

from __future__ import annotations

from enum import Enum

from .model import Level


class Transition(str, Enum):
    RAISE_TO_COMPONENT = "raise to level 2"
    LOWER_FROM_COMPONENT = "lower from level 2"
    RAISE_TO_SYSTEM = "raise to level 3"
    LOWER_FROM_SYSTEM = "lower from level 3"


def transition(current: Level, wanted: Level) -> Transition | None:
    """The online change from `current` to `wanted`, None if there is none."""
    if current == wanted:
        return None
    if wanted is Level.SYSTEM:
        return Transition.RAISE_TO_SYSTEM
    if current is Level.SYSTEM:
        return Transition.LOWER_FROM_SYSTEM
    if wanted is Level.COMPONENT:
        return Transition.RAISE_TO_COMPONENT
    if current is Level.COMPONENT:
        return Transition.LOWER_FROM_COMPONENT
    return None
