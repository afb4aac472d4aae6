"""What a storm recorded, read back: ping gaps, TCP stalls, the underlay capture's classes,
the key state of every pair, leaks; and the report (JSON, Markdown table, PNG timeline).

Pure functions over files and samples, so each is unit-tested on recorded input
(tests/test_storm.py) without a testbed.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import re
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.stats import median

MARKER = b"VPPMESH-STORM-MARKER"  # every TCP stream payload carries it
POD_NET = ipaddress.IPv4Network("198.18.0.0/16")
CHANNEL_PORT = 4501
NAT_T_PORT = 4500
STALL_SECONDS = 1.0
SILENCE = 0.5  # seconds without a reply that count as a gap even when nothing was lost
PING_LINE = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from \S+ icmp_seq=(\d+) ")


# ---- ping ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gap:
    """Between two answered requests (consecutive in sequence): first_seq..last_seq went
    unanswered (none when last_seq < first_seq), or the pod heard nothing for longer than
    SILENCE (replies held up and delivered late, as af_packet's ring does while a link is
    down, are no answer while they are held)."""

    first_seq: int
    last_seq: int
    start: float  # the reply before the gap (wall clock)
    end: float  # the reply after it

    @property
    def lost(self) -> int:
        return max(0, self.last_seq - self.first_seq + 1)

    def seconds(self, interval: float) -> float:
        """The outage the gap stands for: the silence between the two replies, or the
        unanswered requests' share of the stream, whichever is longer (ping sends more
        slowly while nothing answers)."""
        return max(self.end - self.start, (self.lost + 1) * interval)


def ping_replies(text: str) -> list[tuple[int, float]]:
    """(icmp_seq, reply time) of every answered request of `ping -D` output, in order
    (duplicates dropped; icmp_seq wraps at 65536, unwrapped here)."""
    out: list[tuple[int, float]] = []
    seen: set[int] = set()
    base = last = 0
    for line in text.splitlines():
        found = PING_LINE.match(line)
        if not found:
            continue
        seq = int(found.group(2))
        if seq + base < last - 32768:
            base += 65536
        seq += base
        last = max(last, seq)
        if seq in seen:
            continue
        seen.add(seq)
        out.append((seq, float(found.group(1))))
    out.sort()
    return out


def ping_gaps(replies: list[tuple[int, float]], silence: float = SILENCE) -> list[Gap]:
    """The runs of unanswered requests between answered ones, and the silences longer
    than `silence` (requests still in flight when ping stopped, after the last answer,
    are not losses)."""
    gaps = []
    for (seq, at), (nseq, nat) in itertools.pairwise(replies):
        if nseq > seq + 1 or nat - at > silence:
            gaps.append(Gap(seq + 1, nseq - 1, at, nat))
    return gaps


# ---- TCP --------------------------------------------------------------------------------------
def tcp_stalls(lines: Iterable[str], threshold: float = STALL_SECONDS) -> list[dict[str, Any]]:
    """Stalls > threshold from tcp_stream.py's receiver log (JSON lines {"src", "t"} per
    arrival batch, {"src", "connect"} per new connection): per source, each stretch
    without data longer than `threshold`."""
    last: dict[str, float] = {}
    stalls = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        src, at = event.get("src"), event.get("t")
        if src is None or at is None:
            continue
        before = last.get(src)
        if before is not None and at - before > threshold:
            stalls.append({"src": src, "start": before, "end": at, "seconds": at - before})
        last[src] = at
    return stalls


# ---- the underlay capture ------------------------------------------------------------------
def pcap_frames(path: Path) -> Iterator[tuple[float, bytes]]:
    """(time, frame bytes as captured) of a libpcap file (Ethernet, any snaplen)."""
    with path.open("rb") as f:
        header = f.read(24)
        if len(header) < 24:
            return
        magic = header[:4]
        endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
        nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
        record = struct.Struct(endian + "IIII")
        while True:
            head = f.read(16)
            if len(head) < 16:
                return
            sec, frac, caplen, _ = record.unpack(head)
            data = f.read(caplen)
            if len(data) < caplen:
                return
            yield sec + frac / (1e9 if nano else 1e6), data


def _ip(data: bytes, offset: int) -> tuple[str, str, int, int] | None:
    """(src, dst, protocol, payload offset) of the IPv4 header at `offset`."""
    if len(data) < offset + 20 or data[offset] >> 4 != 4:
        return None
    ihl = (data[offset] & 0x0F) * 4
    src = str(ipaddress.IPv4Address(data[offset + 12:offset + 16]))
    dst = str(ipaddress.IPv4Address(data[offset + 16:offset + 20]))
    return src, dst, data[offset + 9], offset + ihl


def _pod(*addresses: str) -> bool:
    return any(ipaddress.IPv4Address(a) in POD_NET for a in addresses)


def _clear_pod_packet(data: bytes, offset: int) -> bool:
    """A pod's IPv4 packet in clear at `offset`: a header whose checksum holds (so 20 bytes
    of ciphertext never pass for one) with a pod address."""
    if len(data) < offset + 20 or data[offset] != 0x45:
        return False
    header = data[offset:offset + 20]
    total = sum(struct.unpack(">10H", header))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    if total != 0xFFFF:
        return False
    ip = _ip(data, offset)
    return ip is not None and _pod(ip[0], ip[1])


def _udp_kind(frame: bytes, payload: int) -> str:
    """A UDP datagram between nodes: channel (port 4501 on either side, or from/to UDP
    4500 behind RFC 3948's non-ESP marker, as the channel rides a NAT pair's ESP flow),
    esp_udp (UDP 4500 on either side: the other side is a NAT's port; ESP or the NAT
    keepalive 0xFF), clear (a pod's packet in clear in it), or other."""
    if len(frame) < payload + 8:
        return "other"
    sport, dport = struct.unpack_from(">HH", frame, payload)
    body = payload + 8
    if any(_clear_pod_packet(frame, body + skip) for skip in (0, 4, 8)):
        return "clear"  # bare, behind the non-ESP marker, behind an ESP header (null cipher)
    if CHANNEL_PORT in (sport, dport):
        return "channel"
    if NAT_T_PORT in (sport, dport):
        if frame[body:body + 4] == b"\0\0\0\0":
            return "channel"
        return "esp_udp"
    return "other"


def classify(frame: bytes, nodes: set[str], injected_sources: set[str]) -> str:
    """What one underlay frame is: esp, esp_udp, channel, unreachable (a node's ICMP
    answer quoting a channel or ESP header), arp, injected (from an address the storm's
    attacker uses), other (not expected, not clear), or clear (a pod address or the TCP
    marker, in clear: a failure). `nodes`: every address a node's underlay traffic has
    on the bridge, a NAT node's public one included (underlay_addresses)."""
    if MARKER in frame:
        return "clear"
    if len(frame) < 14:
        return "other"
    ethertype = int.from_bytes(frame[12:14], "big")
    offset = 14
    if ethertype == 0x8100 and len(frame) >= 18:  # one VLAN tag
        ethertype, offset = int.from_bytes(frame[16:18], "big"), 18
    if ethertype == 0x0806:
        return "arp"
    if ethertype != 0x0800:
        return "other"
    ip = _ip(frame, offset)
    if ip is None:
        return "other"
    src, dst, proto, payload = ip
    if _pod(src, dst):
        return "clear"
    between_nodes = src in nodes and dst in nodes
    if proto == 4:  # IP in IP: the inner header is in clear
        inner = _ip(frame, payload)
        if inner is not None and _pod(inner[0], inner[1]):
            return "clear"
    if proto == 1 and len(frame) >= payload + 8:  # ICMP: what does it quote?
        quoted = _ip(frame, payload + 8)
        if quoted is not None and _pod(quoted[0], quoted[1]):
            return "clear"
    if src in injected_sources:
        return "injected"
    if not between_nodes:
        return "other"
    if proto == 50:  # a pod's packet right after the ESP header: a null cipher
        return "clear" if _clear_pod_packet(frame, payload + 8) else "esp"
    if proto == 17:
        return _udp_kind(frame, payload)
    if proto == 1 and len(frame) >= payload + 8 and frame[payload] == 3:
        quoted = _ip(frame, payload + 8)
        if quoted is not None and (quoted[2] == 50 or quoted[2] == 17):
            return "unreachable"
    return "other"


def underlay_addresses(nodes: Iterable[Any]) -> set[str]:
    """Every address the nodes' underlay traffic has on the bridge: their own, and for a
    node behind a NAT router the router's public address, which its packets leave from
    (testbed NodeHandles)."""
    found = {str(a.ip) for node in nodes for a in node.underlay}
    found |= {str(node.nat.public) for node in nodes if node.nat is not None}
    return found


def check_capture(path: Path, nodes: set[str], injected_sources: set[str],
                  faults: list[dict[str, Any]], limit: int = 50) -> dict[str, Any]:
    """Every frame of the capture classified; each clear one (up to `limit`) with its time
    and the fault that preceded it."""
    counts: dict[str, int] = {}
    clear: list[dict[str, Any]] = []
    other: list[dict[str, Any]] = []
    for at, frame in pcap_frames(path):
        kind = classify(frame, nodes, injected_sources)
        counts[kind] = counts.get(kind, 0) + 1
        if kind == "clear" and len(clear) < limit:
            clear.append({"t": at, "after": preceding_fault(faults, at), "hex": frame[:64].hex()})
        elif kind == "other" and len(other) < 10:
            other.append({"t": at, "hex": frame[:64].hex()})
    return {"counts": counts, "clear": clear, "other_examples": other}


def preceding_fault(faults: list[dict[str, Any]], at: float) -> str | None:
    """The last fault that started at or before `at` (kind and node)."""
    before = [f for f in faults if f.get("started") is not None and f["started"] <= at]
    if not before:
        return None
    last = before[-1]
    return f"{last['kind']} n{last['node']} at {last['started']:.1f}"


# ---- key state ---------------------------------------------------------------------------
def all_agreed(sample: dict[str, Any]) -> bool:
    """Every pair of one key-state sample on agreed keys both ways, none stopped."""
    pairs = sample["pairs"]
    return bool(pairs) and all(p["agreed"] for p in pairs.values())


def time_to_agreed(samples: list[dict[str, Any]], since: float,
                   until: float | None = None) -> float | None:
    """Seconds from `since` until the first sample with every pair agreed (None: none by
    `until`)."""
    for sample in samples:
        if sample["t"] < since:
            continue
        if until is not None and sample["t"] > until:
            return None
        if all_agreed(sample):
            return sample["t"] - since
    return None


# ---- leaks -----------------------------------------------------------------------------------
def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope (per second) of (t, value) points; None with fewer than 3."""
    if len(points) < 3:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    if den == 0:
        return None
    return sum((t - mt) * (v - mv) for t, v in points) / den


def growth_percent(points: list[tuple[float, float]], start: float) -> float | None:
    """Growth from the first point at or after `start` to the last, in percent."""
    after = [v for t, v in points if t >= start]
    if len(after) < 2 or after[0] == 0:
        return None
    return 100.0 * (after[-1] - after[0]) / after[0]


# ---- per fault kind --------------------------------------------------------------------------
def summarize(values: list[float]) -> dict[str, float | int | None]:
    return {"count": len(values), "median": median(values) if values else None,
            "worst": max(values) if values else None}


def attribute(faults: list[dict[str, Any]], gaps: dict[str, list[Gap]],
              stalls: list[dict[str, Any]], keys: list[dict[str, Any]], interval: float,
              end: float) -> None:
    """Per fault (in place): the longest ping gap of any pair and the pings lost, the TCP
    stalls, and the time until every pair was on agreed keys again, all within its
    window (from its start to the next fault's start; a gap or stall belongs to the
    window holding its middle)."""
    for i, fault in enumerate(faults):
        start = fault.get("started")
        if start is None:
            continue
        stop = faults[i + 1]["started"] if i + 1 < len(faults) and \
            faults[i + 1].get("started") is not None else end

        def owned(a: float, b: float, start: float = start, stop: float = stop) -> bool:
            return start <= (a + b) / 2 < stop  # each gap or stall counts once, by its middle

        inside = [g for pair in gaps.values() for g in pair if owned(g.start, g.end)]
        fault["outage_s"] = max((g.seconds(interval) for g in inside), default=0.0)
        fault["pings_lost"] = sum(g.lost for g in inside)
        mine = [s for s in stalls if owned(s["start"], s["end"])]
        fault["tcp_stalls"] = len(mine)
        fault["tcp_stall_worst_s"] = max((s["seconds"] for s in mine), default=0.0)
        restored = fault.get("restored", start)
        fault["agreed_after_s"] = time_to_agreed(keys, restored, stop)


def per_kind(faults: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for fault in faults:
        if fault.get("started") is not None:
            kinds.setdefault(fault["kind"], []).append(fault)
    out = {}
    for kind, done in kinds.items():
        agreed = [f["agreed_after_s"] for f in done if f.get("agreed_after_s") is not None]
        out[kind] = {
            "count": len(done),
            "outage_s": summarize([f["outage_s"] for f in done]),
            "pings_lost": summarize([float(f["pings_lost"]) for f in done]),
            "tcp_stalls": summarize([float(f["tcp_stalls"]) for f in done]),
            "agreed_after_s": summarize(agreed),
            "never_agreed": len(done) - len(agreed),
        }
    return out


# ---- the report ------------------------------------------------------------------------------
def _cell(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_table(result: dict[str, Any]) -> str:
    m = result["machine"]
    flags = ", ".join(f for f, on in m.get("flags", {}).items() if on) or "none listed"
    lines = [
        f"# Storm {result['run_id']}: seed {result['seed']}, {result['nodes']} nodes, "
        f"{result['tunnels']} tunnels per pair, {result['minutes']:g} min"
        f"{', membership in etcd' if result.get('membership') == 'etcd' else ''}"
        f"{' (quick)' if result.get('quick') else ''}",
        "",
        f"Verdict: **{'PASS' if not result['failures'] else 'FAIL'}**"
        + "".join(f"\n- {f}" for f in result["failures"]),
        "",
        "| Fault | Count | Outage median s | Outage worst s | Pings lost median | "
        "Pings lost worst | TCP stalls (worst) | Agreed keys after, median s | "
        "worst s | Never back |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, row in sorted(result["per_kind"].items()):
        lines.append(
            f"| {kind} | {row['count']} | {_cell(row['outage_s']['median'])} | "
            f"{_cell(row['outage_s']['worst'])} | {_cell(row['pings_lost']['median'], 0)} | "
            f"{_cell(row['pings_lost']['worst'], 0)} | "
            f"{_cell(row['tcp_stalls']['worst'], 0)} | "
            f"{_cell(row['agreed_after_s']['median'])} | "
            f"{_cell(row['agreed_after_s']['worst'])} | {row['never_agreed']} |")
    whole = result["whole_run"]
    cap = result["capture"]["counts"]
    lines += [
        "",
        f"Whole run: {whole['pings_sent']} pings, {whole['pings_lost']} lost "
        f"({whole['loss_percent']:.3f} %), longest gap {whole['longest_gap_s']:.2f} s; "
        f"{whole['tcp_stalls']} TCP stalls > 1 s (longest {whole['tcp_stall_worst_s']:.1f} s); "
        f"key ages above key_max_seconds: {whole['keys_over_limit']}.",
        "",
        "Underlay capture: " + ", ".join(f"{k} {v}" for k, v in sorted(cap.items()))
        + f"; clear frames: {len(result['capture']['clear'])}.",
        "",
        "Agents, each over its longest life (a restarted agent starts over):",
        "",
        "| Agent | life min | RSS start MiB | RSS end MiB | RSS growth from the life's min 5 "
        "% | RSS slope KiB/min | fds start | fds end | fd slope /min |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for node, row in sorted(result["leaks"]["agents"].items()):
        lines.append(
            f"| {node} | {_cell(row.get('life_minutes'))} | {_cell(row['rss_start_mib'])} | "
            f"{_cell(row['rss_end_mib'])} | "
            f"{_cell(row['rss_growth_percent'])} | {_cell(row['rss_slope_kib_min'])} | "
            f"{_cell(row['fds_start'])} | {_cell(row['fds_end'])} | "
            f"{_cell(row['fds_slope_min'], 2)} |")
    vpp = result["leaks"]["vpp"]
    lines += ["", "| VPP | SAs start | SAs end | SA slope /min | heap before MiB | "
              "heap after MiB |", "|---|---:|---:|---:|---:|---:|"]
    for node, row in sorted(vpp.items()):
        lines.append(f"| {node} | {_cell(row['sas_start'])} | {_cell(row['sas_end'])} | "
                     f"{_cell(row['sas_slope_min'], 2)} | {_cell(row.get('heap_start_mib'))} "
                     f"| {_cell(row.get('heap_end_mib'))} |")
    drops = {k: v for k, v in result.get("metrics", {}).items() if v}
    if drops:
        lines += ["", "Agents' counters (summed over nodes and agent lives): " + ", ".join(
            f"`{k}` {v:g}" for k, v in drops.items())]
    lines += ["", f"Faults in order (seed {result['seed']}):", ""]
    for f in result["faults"]:
        if f.get("started") is None:
            continue
        lines.append(f"- t+{f['started'] - result['t0']:.0f} s {f['description']}: outage "
                     f"{f['outage_s']:.2f} s, {f['pings_lost']} pings lost, "
                     f"{f['tcp_stalls']} stalls, agreed after "
                     f"{_cell(f.get('agreed_after_s'))} s"
                     + (f" ({f['error']})" if f.get("error") else "")
                     + (f" [{f['applied']}]" if f.get("applied") else ""))
    lines += ["", f"Machine: {m.get('cpu_model')}, {m.get('cores')} cores ({flags}), kernel "
              f"{m.get('kernel')}. {result.get('notes', '')}".rstrip(), ""]
    return "\n".join(lines)


def render_png(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = result["t0"]
    fig, axes = plt.subplots(3, 1, figsize=(11, 8), sharex=True)
    gaps_ax, keys_ax, rss_ax = axes
    kinds = sorted({f["kind"] for f in result["faults"]})
    colours = {k: plt.cm.tab20(i % 20) for i, k in enumerate(kinds)}
    for ax in axes:
        for f in result["faults"]:
            if f.get("started") is None:
                continue
            ax.axvspan(f["started"] - t0, f.get("restored", f["started"]) - t0 + 0.5,
                       color=colours[f["kind"]], alpha=0.3, lw=0)
    for pair, gaps in sorted(result["ping_gaps"].items()):
        xs = [g["start"] - t0 for g in gaps]
        ys = [g["seconds"] for g in gaps]
        if xs:
            gaps_ax.scatter(xs, ys, s=8, label=pair)
    gaps_ax.set_ylabel("ping gap s")
    gaps_ax.set_yscale("symlog", linthresh=0.1)
    pairs = sorted({p for s in result["key_samples"] for p in s["pairs"]})
    for i, pair in enumerate(pairs):
        xs, ys = [], []
        for sample in result["key_samples"]:
            state = sample["pairs"].get(pair)
            if state is None:
                continue
            xs.append(sample["t"] - t0)
            ys.append(i + (0.0 if state["agreed"] else 0.4 if state.get("stopped") else 0.2))
        keys_ax.step(xs, ys, where="post", lw=1)
    keys_ax.set_yticks(range(len(pairs)), pairs, fontsize=6)
    keys_ax.set_ylabel("key state\n(step up: not agreed)")
    for node, samples in sorted(result["agent_samples"].items()):
        rss_ax.plot([s["t"] - t0 for s in samples], [s["rss_kib"] / 1024 for s in samples],
                    label=node)
    rss_ax.set_ylabel("agent RSS MiB")
    rss_ax.set_xlabel("seconds since the storm started")
    rss_ax.legend(fontsize=6)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[k], alpha=0.3) for k in kinds]
    fig.legend(handles, kinds, loc="upper right", fontsize=6, ncol=4)
    m = result["machine"]
    flags = ",".join(f for f, on in m.get("flags", {}).items() if on)
    fig.suptitle(f"storm seed {result['seed']} ({m.get('cpu_model')}; {flags})", fontsize=8,
                 x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(out: Path, result: dict[str, Any]) -> Path:
    """`<run id>-storm.{json,md,png}` in `out` (PNG when matplotlib is there); the stem."""
    stem = out / f"{result['run_id']}-storm"
    out.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=_json) + "\n")
    table = render_table(result)
    stem.with_suffix(".md").write_text(table)
    try:
        render_png(result, stem.with_suffix(".png"))
    except ImportError:
        print("matplotlib missing: no PNG", file=sys.stderr)
    print(table)
    print(f"wrote {stem}.json, .md and .png", file=sys.stderr)
    return stem


def _json(value: Any) -> Any:
    if isinstance(value, Gap):
        return asdict(value)
    return str(value)
