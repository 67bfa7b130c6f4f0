"""Tap provisioning: read the namespace, plan the changes (pure), apply them all or none.

The front doors (`ensure`, `create`, `delete`, `show`) and `apply` live in
taps.apply; the steps, results and the pure planning in taps.plan. Import this
package, not those modules: ``from vhostorch import taps; taps.ensure(...)``.
"""

from __future__ import annotations

from vhostorch.record import TYPE_CHECKING
from vhostorch.taps.apply import (
    KernelHost,
    TapState,
    apply,
    create,
    delete,
    ensure,
    resolve_ids,
    show,
)
from vhostorch.taps.plan import (
    MANAGED_ALIAS,
    Change,
    CreateBridge,
    CreateTap,
    DeleteLink,
    Ids,
    Plan,
    RetuneTap,
    SetLink,
    Step,
    TapResult,
    plan_delete,
    plan_ensure,
)

if TYPE_CHECKING:
    from vhostorch.taps.apply import Host as Host  # a Protocol: a name for type checkers only

__all__ = [
    "MANAGED_ALIAS",
    "Change",
    "CreateBridge",
    "CreateTap",
    "DeleteLink",
    "Ids",
    "KernelHost",
    "Plan",
    "RetuneTap",
    "SetLink",
    "Step",
    "TapResult",
    "TapState",
    "apply",
    "create",
    "delete",
    "ensure",
    "plan_delete",
    "plan_ensure",
    "resolve_ids",
    "show",
]
