"""What an uplink driver decides, and the two kinds of driver there are.

The takeover (vppmesh/host/uplink/__init__.py) is the same for every driver: save the NIC's
Linux configuration, give VPP the NIC, bridge it with the host link and the BVI, give the
host link the NIC's addresses; restore undoes it. What differs by driver is asked of a
`Driver`, one module each (af_packet.py, af_xdp.py, avf.py, dpdk.py), the way Calico/VPP's
vpp-manager/uplink/ has one UplinkDriver per file. Nothing outside these modules
compares a driver's name (tests/test_imports.py checks it).

Two kinds share their work here: a `LinuxNic` (af_packet, af_xdp) stays a Linux netdev
that VPP opens at takeover and that Linux can have back whenever VPP is away; a `NicInVpp`
(avf, dpdk) is given to VPP by startup.conf when VPP starts, bound to vfio-pci, so its
Linux configuration must be saved before VPP starts, and Linux cannot have it back until
it is bound to its kernel driver again.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vppmesh.dataplane.vpp import interfaces
from vppmesh.dataplane.vpp.client import Request, VppApi
from vppmesh.errors import ConfigError, HostError

if TYPE_CHECKING:
    from vppmesh.host.uplink import SavedUplink, UplinkSpec

IFF_PROMISC = 0x100


def set_promisc(ipr: Any, index: int, on: bool) -> None:
    ipr.link("set", index=index, flags=IFF_PROMISC if on else 0, change=IFF_PROMISC)


class Driver(ABC):
    """One uplink driver: how VPP gets the NIC, and what becomes of it when VPP goes."""

    name: ClassVar[str]  # as configured (--driver, --uplink-driver, UplinkSpec.driver)
    # startup.conf hands VPP the NIC when VPP starts: its Linux configuration is saved
    # before VPP starts, and Linux cannot have it back while VPP is away.
    nic_in_vpp: ClassVar[bool]

    @abstractmethod
    def check(self, spec: UplinkSpec) -> None:
        """Refuse a spec this driver cannot take, before anything is saved or touched."""

    def not_found_hint(self, ifname: str) -> str:
        """What to add when the NIC is not in Linux at capture ("" for nothing)."""
        return ""

    @abstractmethod
    def request(self, saved: SavedUplink) -> Request | None:
        """The API call that gives VPP the NIC (None: startup.conf gave it at VPP start)."""

    @abstractmethod
    def hand_over(self, ipr: Any, index: int, saved: SavedUplink) -> None:
        """Linux's side before VPP opens the NIC (link `index`, still named saved.ifname)."""

    @abstractmethod
    def vpp_port(self, api: VppApi, saved: SavedUplink) -> int:
        """VPP's sw_if_index of the NIC."""

    @abstractmethod
    def delete_port(self, api: VppApi, saved: SavedUplink, nic: int | None,
                    opened: dict[str, int]) -> None:
        """Restore: VPP lets go of the NIC. `nic`: the port tagged as the uplink NIC (if
        any); `opened`: VPP's af_packet interfaces by host name."""

    @abstractmethod
    def not_in_linux(self, saved: SavedUplink, path: Path) -> list[str]:
        """Restore found no NIC in Linux to give the configuration back to; `path` holds
        the saved configuration. Returns what it did, or raises."""

    @abstractmethod
    def vpp_gone(self, saved: SavedUplink, give_back: Callable[[], list[str]]) -> list[str]:
        """VPP is gone (release_all): what becomes of the NIC; `give_back` restores it to
        Linux without VPP. Returns what was done, as restore does."""

    @abstractmethod
    def vpp_restarted(self, saved: SavedUplink, path: Path,
                      give_back: Callable[[], list[str]]) -> None:
        """A new VPP has none of the saved takeover (ensure): make it ready to be taken
        again."""


class LinuxNic(Driver):
    """The NIC stays a Linux netdev, renamed `<name>-nic` so the host link can take its
    name; VPP opens it at takeover, and Linux has it back whenever VPP is away."""

    nic_in_vpp = False

    def check(self, spec: UplinkSpec) -> None:
        pass  # any netdev of this namespace will do

    @abstractmethod
    def request(self, saved: SavedUplink) -> Request:
        """The API call that opens the netdev in VPP."""

    def hand_over(self, ipr: Any, index: int, saved: SavedUplink) -> None:
        # Linux: the NIC loses its addresses (and so its routes) and its name.
        ipr.flush_addr(index=index)
        ipr.link("set", index=index, state="down")
        ipr.link("set", index=index, ifname=saved.nic_name)
        mac = self.linux_mac(saved)
        if mac is not None:
            ipr.link("set", index=index, address=mac)
        ipr.link("set", index=index, state="up")
        set_promisc(ipr, index, True)

    def linux_mac(self, saved: SavedUplink) -> str | None:
        """The NIC's Linux MAC while VPP has it (None: its own)."""
        return None

    def vpp_port(self, api: VppApi, saved: SavedUplink) -> int:
        return int(api.call(self.request(saved)).sw_if_index)

    def not_in_linux(self, saved: SavedUplink, path: Path) -> list[str]:
        raise HostError(f"the NIC {saved.ifname} is not here to restore (driver "
                        f"{self.name}: give it back to the kernel driver first); "
                        f"its configuration stays saved in {path}")

    def vpp_gone(self, saved: SavedUplink, give_back: Callable[[], list[str]]) -> list[str]:
        return give_back()

    def vpp_restarted(self, saved: SavedUplink, path: Path,
                      give_back: Callable[[], list[str]]) -> None:
        give_back()  # then taken anew, from a fresh capture


class NicInVpp(Driver):
    """startup.conf gives VPP the NIC when VPP starts (`devices:` / `dpdk_devices:` in the
    profile) and binds it to vfio-pci: takeover finds VPP's port by the name the profile
    gave it (`--vpp-interface`), and Linux has no NIC meanwhile."""

    nic_in_vpp = True

    def check(self, spec: UplinkSpec) -> None:
        if spec.vpp_interface is None:
            raise ConfigError(f"driver {self.name}: name VPP's port (the port name of the "
                              "profile's device, e.g. uplink0) with --vpp-interface")

    def not_found_hint(self, ifname: str) -> str:
        return (f"; with {self.name} save its configuration before VPP takes it: "
                f"`vppmesh uplink take --interface {ifname} --driver {self.name} "
                "--vpp-interface PORT` while VPP is stopped")

    def request(self, saved: SavedUplink) -> None:
        return None

    def hand_over(self, ipr: Any, index: int, saved: SavedUplink) -> None:
        pass  # Linux no longer has the NIC

    def vpp_port(self, api: VppApi, saved: SavedUplink) -> int:
        wanted = saved.spec.vpp_interface
        found = next((i for i in interfaces.dump_interfaces(api) if i.name == wanted), None)
        if found is None:
            raise ConfigError(
                f"driver {self.name}: VPP has no interface {wanted!r}; give the NIC to "
                "VPP in startup.conf (profile `devices:` for iavf, `dpdk_devices:` for dpdk) "
                "and name that port with --vpp-interface")
        return found.sw_if_index

    def delete_port(self, api: VppApi, saved: SavedUplink, nic: int | None,
                    opened: dict[str, int]) -> None:
        pass  # the port is startup.conf's: it stays VPP's

    def not_in_linux(self, saved: SavedUplink, path: Path) -> list[str]:
        # Still bound to vfio-pci: only its kernel driver gives Linux the NIC back.
        self._untaken(saved, path)
        return [f"{saved.ifname} is still bound to VPP's driver ({self.name}): "
                "bind it to its kernel driver again, then run `vppmesh uplink "
                f"restore`; its configuration stays in {path}"]

    def vpp_gone(self, saved: SavedUplink, give_back: Callable[[], list[str]]) -> list[str]:
        # Nothing can give it to Linux meanwhile; its takeover is made again when VPP
        # is back.
        return [f"{saved.ifname} stays bound to VPP's {self.name} driver until "
                "VPP is back (the host has no link through it meanwhile)"]

    def vpp_restarted(self, saved: SavedUplink, path: Path,
                      give_back: Callable[[], list[str]]) -> None:
        self._untaken(saved, path)  # a new VPP has the port again: take it over anew

    @staticmethod
    def _untaken(saved: SavedUplink, path: Path) -> None:
        saved.taken = False
        path.write_text(saved.model_dump_json(indent=2))
