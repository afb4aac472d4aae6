"""Classifier tables and input ACLs (VPP core, no plugin needed)."""

from __future__ import annotations

from vppmesh.dataplane.vpp.client import Request

NO_TABLE = 0xFFFFFFFF
VECTOR_BYTES = 16
# Input ACL next index 0 is "deny" (in_out_acl.h: ACL_NEXT_INDEX_DENY is first).
ACL_DENY = 0
CLASSIFY_FROM_CURRENT_DATA = 1  # match from the IP header, not from the buffer's start


def add_table(mask: bytes, what: str) -> Request:
    """A one-vector table matched from the current (IP) header; a miss is permitted."""
    return Request("classify_add_del_table", {
        "is_add": True, "del_chain": False, "nbuckets": 2, "memory_size": 256 * 1024,
        "skip_n_vectors": 0, "match_n_vectors": len(mask) // VECTOR_BYTES,
        "miss_next_index": NO_TABLE, "current_data_flag": CLASSIFY_FROM_CURRENT_DATA,
        "current_data_offset": 0, "mask_len": len(mask), "mask": mask,
    }, what)


def del_table(table_index: int, mask: bytes, what: str) -> Request:
    """VPP checks the mask's length against match_n_vectors even on delete."""
    return Request("classify_add_del_table", {
        "is_add": False, "del_chain": False, "table_index": table_index,
        "match_n_vectors": len(mask) // VECTOR_BYTES, "mask_len": len(mask), "mask": mask,
    }, what)


def deny_session(table_index: int, match: bytes, what: str) -> Request:
    return Request("classify_add_del_session", {
        "is_add": True, "table_index": table_index, "hit_next_index": ACL_DENY,
        "match_len": len(match), "match": match}, what)


def set_input_acl(sw_if_index: int, *, ip4: int = NO_TABLE, ip6: int = NO_TABLE,
                  enable: bool = True, what: str = "") -> Request:
    return Request("input_acl_set_interface", {
        "sw_if_index": sw_if_index, "ip4_table_index": ip4, "ip6_table_index": ip6,
        "l2_table_index": NO_TABLE, "is_add": enable}, what)


def tables_of(sw_if_index: int) -> Request:
    return Request("classify_table_by_interface", {"sw_if_index": sw_if_index},
                   "classify tables of the uplink")


def table_info(table_index: int) -> Request:
    return Request("classify_table_info", {"table_id": table_index}, f"table {table_index}")
