"""What a libvirt domain's XML asks for, as far as vhost is concerned."""

from __future__ import annotations

from vhostorch.errors import InvalidSpec
from vhostorch.record import Record


class Interface(Record):
    """One ``<interface>``: its type, tap, model, ``<driver name= queues=>`` and alias."""

    __slots__ = ("type", "target", "model", "driver", "queues", "alias", "mac")
    type: str
    target: str | None
    model: str | None
    driver: str | None
    queues: int
    alias: str | None
    mac: str | None

    def __init__(
        self,
        type: str,
        target: str | None,
        model: str | None,
        driver: str | None,
        queues: int,
        alias: str | None,
        mac: str | None,
    ) -> None:
        self._init(
            type=type, target=target, model=model, driver=driver, queues=queues, alias=alias,
            mac=mac,
        )  # fmt: skip

    @property
    def netdev_id(self) -> str | None:
        """libvirt names the netdev of alias ``net0`` ``hostnet0``."""
        return f"host{self.alias}" if self.alias else None


class Domain(Record):
    __slots__ = ("name", "type", "interfaces")
    name: str
    type: str
    interfaces: tuple[Interface, ...]

    def __init__(self, name: str, type: str, interfaces: tuple[Interface, ...]) -> None:
        self._init(name=name, type=type, interfaces=interfaces)


def parse(xml: str) -> Domain:
    """Read a domain's XML. Raises InvalidSpec when it is not domain XML."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError as err:
        raise InvalidSpec(f"domain XML does not parse: {err}") from None
    if root.tag != "domain":
        raise InvalidSpec(f"not a domain's XML (root element <{root.tag}>)")
    interfaces = []
    for iface in root.iterfind("devices/interface"):
        driver = iface.find("driver")
        queues = driver.get("queues", "1") if driver is not None else "1"
        interfaces.append(
            Interface(
                type=iface.get("type", ""),
                target=_attr(iface, "target", "dev"),
                model=_attr(iface, "model", "type"),
                driver=driver.get("name") if driver is not None else None,
                queues=int(queues) if queues.isdigit() else 1,
                alias=_attr(iface, "alias", "name"),
                mac=_attr(iface, "mac", "address"),
            )
        )
    return Domain(root.findtext("name", ""), root.get("type", ""), tuple(interfaces))


def _attr(parent: object, child: str, attr: str) -> str | None:
    found = parent.find(child)  # type: ignore[attr-defined]
    return found.get(attr) if found is not None else None
