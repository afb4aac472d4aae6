"""The CNI plugin's data: its network configuration, results and errors (CNI spec 1.0/1.1).

Everything the runtime hands over is validated here, before anything is touched, so a bad
configuration never half-attaches a pod; every error names the field and says the fix.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vppmesh.validation import describe

SUPPORTED_VERSIONS = ("0.4.0", "1.0.0", "1.1.0")
LATEST_VERSION = SUPPORTED_VERSIONS[-1]
PLUGIN_TYPE = "vppmesh-cni"
DEFAULT_STATE_DIR = Path("/var/lib/cni/vppmesh")
# VppClient's default too; not imported from there, which would load vpp-papi for VERSION.
DEFAULT_API_SOCKET = Path("/run/vpp/api.sock")

# Error codes of the CNI spec (section "Error"); 999 and above are this plugin's own.
ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN = 11
ERR_NOT_AVAILABLE = 50
ERR_NOT_AVAILABLE_LIMITED = 51  # and existing pods may have limited connectivity
ERR_VPP = 1000  # VPP refused a request or the mesh is not up on this node
ERR_LINUX = 1001  # the Linux side (namespace, link, address, route) failed
ERR_IPAM = 1002  # the delegated IPAM plugin failed
ERR_CHECK = 1003  # CHECK found the attachment not as it was made

# Keys the runtime (libcni) or the spec put into any plugin's configuration.
STANDARD_KEYS = frozenset({
    "cniVersion", "cniVersions", "name", "type", "args", "ipMasq", "ipam", "dns",
    "runtimeConfig", "capabilities", "prevResult", "disableCheck", "disableGC", "plugins",
    "cni.dev/valid-attachments", "cni.dev/attachments",
})
CONTAINER_ID = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")
IFNAME_FORBIDDEN = re.compile(r"[/:\s]")


class CniError(Exception):
    """An error the plugin reports as the spec's error JSON (and a non-zero exit)."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Dns(Spec):
    nameservers: list[str] = Field(default_factory=list)
    domain: str | None = None
    search: list[str] = Field(default_factory=list)
    options: list[str] = Field(default_factory=list)


class Ipam(BaseModel):
    """The IPAM section: handed to the named plugin as it is (host-local by default)."""

    model_config = ConfigDict(extra="allow")
    type: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")] = "host-local"


class NetConf(BaseModel):
    """This plugin's network configuration (one entry of a conflist's `plugins`).

    The mesh comes from the mesh file (`mesh`, plus `node`, default the hostname): the mesh
    VRF, the pod MTU and, for host-local without ranges, this node's pod CIDR. Without a
    mesh file, `meshTable` and `mtu` name the VRF and the MTU directly.
    """

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    cni_version: Annotated[str, Field(alias="cniVersion")]
    name: Annotated[str, Field(min_length=1, pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$")]
    type: str = PLUGIN_TYPE
    api_socket: Annotated[Path, Field(alias="apiSocket")] = DEFAULT_API_SOCKET
    mesh: Path | None = None
    node: str | None = None
    mesh_table: Annotated[int | None, Field(alias="meshTable", ge=1, le=2**32 - 2)] = None
    mtu: Annotated[int | None, Field(ge=576, le=9000)] = None
    node_number: Annotated[int, Field(alias="nodeNumber", ge=0, le=0xFFFF)] = 0
    attachment: Literal["auto", "tap", "af_packet"] = "auto"
    queues: Annotated[int | None, Field(ge=1, le=16)] = None
    state_dir: Annotated[Path, Field(alias="stateDir")] = DEFAULT_STATE_DIR
    log_file: Annotated[Path | None, Field(alias="logFile")] = None
    ipam: Ipam | None = None
    dns: Dns | None = None
    args: dict[str, Any] | None = None
    runtime_config: Annotated[dict[str, Any] | None, Field(alias="runtimeConfig")] = None
    prev_result: Annotated[dict[str, Any] | None, Field(alias="prevResult")] = None

    @model_validator(mode="after")
    def _one_source_of_mesh(self) -> NetConf:
        if self.mesh is not None and self.mesh_table is not None:
            raise ValueError("give either `mesh` (a mesh file: VRF and MTU come from it) or "
                             "`meshTable` with `mtu`, not both")
        if self.mesh is None and (self.mesh_table is None or self.mtu is None):
            raise ValueError("the mesh is not named: set `mesh` to the mesh file (with `node`), "
                             "or set both `meshTable` (the mesh VRF, 1717 by default) and `mtu`")
        if self.mesh is None and self.ipam is None:
            raise ValueError("`ipam` is missing: without a mesh file the pod range must be "
                             "given, e.g. {\"type\": \"host-local\", \"ranges\": "
                             "[[{\"subnet\": \"198.18.1.0/24\"}]]}")
        return self

    def unknown_keys(self) -> dict[str, Any]:
        """Top-level keys neither this plugin nor the spec defines (typos, mostly)."""
        return {k: v for k, v in (self.model_extra or {}).items() if k not in STANDARD_KEYS}


def parse_netconf(raw: bytes) -> NetConf:
    """Decode and validate stdin; spec error codes 6 (not JSON), 1, 2 and 7."""
    import json

    try:
        data = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CniError(ERR_DECODE, "the network configuration on stdin is not JSON",
                       str(exc)) from None
    if not isinstance(data, dict):
        raise CniError(ERR_DECODE, "the network configuration on stdin must be a JSON object")
    version = data.get("cniVersion")
    if isinstance(version, str) and version not in SUPPORTED_VERSIONS:
        raise CniError(ERR_INCOMPATIBLE_VERSION,
                       f"cniVersion {version} is not supported",
                       f"supported: {', '.join(SUPPORTED_VERSIONS)}")
    try:
        conf = NetConf.model_validate(data)
    except ValidationError as exc:
        raise CniError(ERR_INVALID_CONFIG, "invalid network configuration: "
                       + describe(exc), "") from None
    unknown = conf.unknown_keys()
    if unknown:
        key, value = next(iter(sorted(unknown.items())))
        raise CniError(ERR_UNSUPPORTED_FIELD,
                       f"unsupported field {key}={value!r} in the network configuration",
                       "fields of this plugin: apiSocket, mesh, node, meshTable, mtu, "
                       "nodeNumber, attachment, queues, stateDir, logFile, ipam, dns")
    return conf


class CniEnv(BaseModel):
    """The CNI_* environment variables, checked per command as the spec requires them."""

    command: Literal["ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC"]
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: str = ""
    path: tuple[Path, ...] = ()

    @classmethod
    def from_environ(cls, environ: dict[str, str]) -> CniEnv:
        command = environ.get("CNI_COMMAND", "")
        if command not in ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC"):
            raise CniError(ERR_INVALID_ENV, f"CNI_COMMAND={command!r} is not a CNI command",
                           "use ADD, DEL, CHECK, VERSION, STATUS or GC")
        env = cls(command=command,  # type: ignore[arg-type]
                  container_id=environ.get("CNI_CONTAINERID", ""),
                  netns=environ.get("CNI_NETNS", ""), ifname=environ.get("CNI_IFNAME", ""),
                  args=environ.get("CNI_ARGS", ""),
                  path=tuple(Path(p) for p in environ.get("CNI_PATH", "").split(":") if p))
        env.validate_for_command()
        return env

    def validate_for_command(self) -> None:
        needs: dict[str, tuple[str, ...]] = {
            "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
            "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
            "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
            "GC": ("CNI_PATH",),
        }
        values = {"CNI_CONTAINERID": self.container_id, "CNI_NETNS": self.netns,
                  "CNI_IFNAME": self.ifname, "CNI_PATH": ":".join(map(str, self.path))}
        for name in needs.get(self.command, ()):
            if not values[name]:
                raise CniError(ERR_INVALID_ENV, f"{name} is required for {self.command}",
                               "the container runtime must set it")
        if self.container_id and not CONTAINER_ID.match(self.container_id):
            raise CniError(ERR_INVALID_ENV, f"CNI_CONTAINERID={self.container_id!r} is not a "
                           "valid container id (letters, digits, '_', '.', '-')")
        if self.ifname and (len(self.ifname) > 15 or self.ifname in (".", "..")
                            or IFNAME_FORBIDDEN.search(self.ifname)):
            raise CniError(ERR_INVALID_ENV, f"CNI_IFNAME={self.ifname!r} is not a valid Linux "
                           "interface name (at most 15 characters, no '/', ':' or spaces)")
        if self.netns and self.command in ("ADD", "CHECK") and not Path(self.netns).exists():
            raise CniError(ERR_INVALID_ENV, f"CNI_NETNS={self.netns} does not exist",
                           "the runtime must create the network namespace first")

    def cni_args(self) -> dict[str, str]:
        """CNI_ARGS (K=V;K=V), e.g. K8S_POD_NAMESPACE and K8S_POD_NAME."""
        pairs = (p.split("=", 1) for p in self.args.split(";") if "=" in p)
        return {k: v for k, v in pairs}


class ResultInterface(Spec):
    name: str
    mac: str | None = None
    mtu: int | None = None
    sandbox: str | None = None


class ResultIp(Spec):
    address: str
    gateway: str | None = None
    interface: int | None = None
    version: str | None = None  # 0.4.0 only


class ResultRoute(Spec):
    dst: str
    gw: str | None = None


class Result(Spec):
    """The success result of ADD (and the prevResult CHECK and DEL receive)."""

    cni_version: Annotated[str, Field(alias="cniVersion")] = LATEST_VERSION
    interfaces: list[ResultInterface] = Field(default_factory=list)
    ips: list[ResultIp] = Field(default_factory=list)
    routes: list[ResultRoute] = Field(default_factory=list)
    dns: Dns = Field(default_factory=Dns)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


class IpamIp(BaseModel):
    model_config = ConfigDict(extra="ignore")
    address: str
    gateway: str | None = None


class IpamResult(BaseModel):
    """What we read from the IPAM plugin's result: its addresses (any result version)."""

    model_config = ConfigDict(extra="ignore")
    ips: list[IpamIp] = Field(default_factory=list)

    def ipv4(self) -> ipaddress.IPv4Address:
        for ip in self.ips:
            iface = ipaddress.ip_interface(ip.address)
            if iface.version == 4:
                return iface.ip  # type: ignore[return-value]
        raise CniError(ERR_IPAM, "the IPAM plugin returned no IPv4 address",
                       "the mesh carries IPv4 pod addresses: give the IPAM an IPv4 range")


class Attachment(BaseModel):
    """What ADD made, kept until DEL: enough to check or undo it without the runtime."""

    model_config = ConfigDict(extra="forbid")
    network: str
    container_id: str
    ifname: str
    netns: str
    name: str
    address: ipaddress.IPv4Address
    kind: Literal["tap", "af_packet"]
    node_number: int
    pod_index: int
    vpp_ifname: str
    mesh_table: int
    mtu: int
    queues: int = 1
    offloads: bool = False
    pod: dict[str, str] = Field(default_factory=dict)
    # The IPAM section ADD used: DEL releases from it even if the mesh file changed.
    ipam: dict[str, Any] = Field(default_factory=dict)
