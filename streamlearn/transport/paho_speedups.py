"""paho-mqtt's MQTT 5 ``Properties``, made cheap to create.

paho 2.x makes a ``Properties`` object for every PUBLISH and every PUBACK it reads,
and each one builds its own copy of three lookup tables (7 type names, 27 property
names, 27 property entries with a ``list.index`` call each), then ``unpack`` calls
``clear``, which walks the 27 names with a ``str.replace`` and a ``hasattr`` each.
In an agent flooded at QoS 1 that was 10-15% of the process's time under the GIL
(py-spy, ``--gil``), on paho's network thread, which the agent's own thread waits
for. The tables never change after they are built, so :func:`install` makes every
``Properties`` share one copy of them, and ``clear`` look only at the attributes
that are set. Nothing else changes: the same attributes with equal values, the
same validation in ``__setattr__``, the same packets on the wire
(``tests/test_paho_speedups.py`` packs and unpacks every property both ways).

The patch checks first that the installed paho builds the tables it expects and
leaves paho as it is otherwise (logged). :func:`uninstall` puts the originals back
(the benchmark measures both in one run: ``benchmarks/paho_properties.py``).
"""

from __future__ import annotations

import logging
from typing import Any

from paho.mqtt import properties as _properties
from paho.mqtt.packettypes import PacketTypes

logger = logging.getLogger(__name__)

_PRIVATE = ("packetType", "types", "names", "properties")
_ORIGINAL_INIT = _properties.Properties.__init__
_ORIGINAL_CLEAR = _properties.Properties.clear


def installed() -> bool:
    return _properties.Properties.__init__ is not _ORIGINAL_INIT


def install() -> bool:
    """Share the lookup tables of every ``Properties``; True when the patch is in place."""
    if installed():
        return True
    cls = _properties.Properties
    template = cls.__new__(cls)
    _ORIGINAL_INIT(template, PacketTypes.PUBLISH)
    if tuple(vars(template)) != _PRIVATE:
        logger.info("paho-mqtt's Properties holds %s, not the expected tables: left as it is",
                    sorted(vars(template)))
        return False
    types, names, table = template.types, template.names, template.properties
    compressed = tuple(name.replace(" ", "") for name in names)

    def __init__(self: Any, packetType: int) -> None:
        # the original assigns the same four attributes through __setattr__'s private-name branch
        d = self.__dict__
        d["packetType"] = packetType
        d["types"] = types
        d["names"] = names
        d["properties"] = table

    def clear(self: Any) -> None:
        d = self.__dict__
        if len(d) == len(_PRIVATE):  # no property set: nothing to delete
            return
        for name in compressed:
            if name in d:
                delattr(self, name)

    cls.__init__ = __init__  # type: ignore[method-assign]
    cls.clear = clear  # type: ignore[method-assign]
    return True


def uninstall() -> None:
    """Put paho's own ``__init__`` and ``clear`` back."""
    _properties.Properties.__init__ = _ORIGINAL_INIT  # type: ignore[method-assign]
    _properties.Properties.clear = _ORIGINAL_CLEAR  # type: ignore[method-assign]
