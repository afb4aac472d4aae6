"""Errors that reach the operator: each says what is wrong and what to do."""


class VppMeshError(Exception):
    """Base of every error vppmesh reports to the operator."""


class ConfigError(VppMeshError):
    """The mesh file, a key file or a command-line option is not usable."""


class KeyFileError(ConfigError):
    """A key file is missing, malformed or readable by others."""


# The VPP return values an operator is most likely to meet (vnet/error.h).
VPP_RETVALS = {
    -1: "unspecified error",
    -2: "invalid sw_if_index",
    -3: "no such FIB / VRF",
    -6: "no such entry",
    -7: "invalid value",
    -60: "address not found for interface",
    -65: "no such table",
    -79: "interface already exists",
    -81: "value already exists",
    -114: "address found for interface",
    -116: "entry already exists",
    -147: "instance in use",
}


class VppApiError(VppMeshError):
    """VPP refused a request; carries the message name and VPP's return value."""

    def __init__(self, message: str, retval: int, detail: str = "") -> None:
        self.message = message
        self.retval = retval
        meaning = VPP_RETVALS.get(retval, "see vnet/error.h")
        text = f"VPP refused {message}: retval {retval} ({meaning})"
        super().__init__(f"{text} for {detail}" if detail else text)


class VppUnavailableError(VppMeshError):
    """No VPP answers on the API socket."""


class SourceUnavailableError(VppMeshError):
    """The mesh source (the datastore) does not answer: VPP keeps the mesh it has and
    the agent asks again, as it does for VPP (not a failed reconcile)."""


class UplinkMissingError(ConfigError):
    """VPP answers but no interface of it is the node's uplink. Right after VPP started
    that is VPP (or whoever gives it the NIC) not ready yet, and the agent waits; later it
    is a configuration error."""


class HostError(VppMeshError):
    """The Linux side (namespaces, links, routes) could not be set up."""
