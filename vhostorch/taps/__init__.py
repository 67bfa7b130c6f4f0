"""Tap provisioning: read the namespace, plan the changes (pure), apply them all or none.

What a tap should be (`TapSpec`, and `tap_from_mapping`, the way every adapter makes one) lives
in taps.spec; the front doors `ensure`, `create`, `show` and `apply` in taps.apply; the
steps, results and the pure planning in taps.plan; deleting (`delete`, by link group
for many) in taps.teardown. Import this package, not those modules:
``from vhostorch import taps; taps.ensure([taps.TapSpec(...)])``.
"""

from __future__ import annotations

from vhostorch.record import TYPE_CHECKING
from vhostorch.taps.apply import (
    KernelHost,
    TapState,
    apply,
    create,
    ensure,
    resolve_ids,
    show,
)
from vhostorch.taps.plan import (
    MANAGED_ALIAS,
    Change,
    CreateBridge,
    CreateTap,
    DeleteGroup,
    DeleteLink,
    DeleteResult,
    Ids,
    Plan,
    RetuneTap,
    SetGroup,
    SetLink,
    Step,
    TapResult,
    managed,
    mark,
    new_tag,
    plan_ensure,
)
from vhostorch.taps.spec import TapSpec, check_batch, tap_from_mapping
from vhostorch.taps.teardown import (
    check_group,
    delete,
    delete_on,
    plan_delete,
    plan_group_moves,
    random_group,
)

if TYPE_CHECKING:
    from vhostorch.taps.apply import Host as Host  # a Protocol: a name for type checkers only

__all__ = [
    "MANAGED_ALIAS",
    "Change",
    "CreateBridge",
    "CreateTap",
    "DeleteGroup",
    "DeleteLink",
    "DeleteResult",
    "Ids",
    "KernelHost",
    "Plan",
    "RetuneTap",
    "SetGroup",
    "SetLink",
    "Step",
    "TapResult",
    "TapSpec",
    "TapState",
    "apply",
    "check_batch",
    "check_group",
    "create",
    "delete",
    "delete_on",
    "ensure",
    "managed",
    "mark",
    "new_tag",
    "plan_delete",
    "plan_ensure",
    "plan_group_moves",
    "random_group",
    "resolve_ids",
    "show",
    "tap_from_mapping",
]
