"""Per-packet overhead of ESP (AES-GCM) over IPIP, and the MTU that leaves for pods.

With tunnel protection VPP encrypts the IPIP packet in transport mode, so only one outer
IP header is on the wire: outer IP + ESP header (SPI, sequence) + IV + ICV + trailer
(pad length, next header) + 0-3 bytes of padding to a 4-byte boundary. The outer header
is IPv4 (20 bytes) or IPv6 (40 bytes, no extension headers) after the pair's underlay
family; ESP in UDP (RFC 3948, for NAT traversal) puts an 8-byte UDP header between it
and ESP.
"""

IPV4_HEADER = 20
IPV6_HEADER = 40
UDP_HEADER = 8
ESP_HEADER = 8
GCM_IV = 8
GCM_ICV = 16
ESP_TRAILER = 2
MAX_PADDING = 3
# Round the pod MTU down to this multiple so every segment size stays well aligned.
POD_MTU_ALIGN = 8


def outer_headers(*, ipv6_underlay: bool, udp_encap: bool = False) -> int:
    """Bytes in front of the ESP header: the outer IP header, and UDP when encapsulated."""
    return (IPV6_HEADER if ipv6_underlay else IPV4_HEADER) + (UDP_HEADER if udp_encap else 0)


def max_overhead(*, ipv6_underlay: bool, udp_encap: bool = False) -> int:
    """Worst-case bytes ESP-over-IPIP adds to an inner packet."""
    outer = outer_headers(ipv6_underlay=ipv6_underlay, udp_encap=udp_encap)
    return outer + ESP_HEADER + GCM_IV + GCM_ICV + ESP_TRAILER + MAX_PADDING


def encrypted_size(inner: int, *, ipv6_underlay: bool, udp_encap: bool = False) -> int:
    """Exact size on the wire of an encrypted inner packet of `inner` bytes."""
    outer = outer_headers(ipv6_underlay=ipv6_underlay, udp_encap=udp_encap)
    payload = inner + ESP_TRAILER
    padded = (payload + 3) // 4 * 4
    return outer + ESP_HEADER + GCM_IV + padded + GCM_ICV


def pod_mtu_for(underlay_mtu: int, *, ipv6_underlay: bool, udp_encap: bool = False) -> int:
    """Largest aligned inner MTU whose encrypted packets fit the underlay MTU."""
    return aligned_mtu(underlay_mtu, max_overhead(ipv6_underlay=ipv6_underlay,
                                                  udp_encap=udp_encap))


def aligned_mtu(underlay_mtu: int, overhead: int) -> int:
    """Largest aligned inner MTU that leaves `overhead` bytes of the underlay MTU free."""
    return (underlay_mtu - overhead) // POD_MTU_ALIGN * POD_MTU_ALIGN
