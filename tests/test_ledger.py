"""The used-key ledger's file: appended per record, torn and damaged files, compaction,
other processes writing it, the format before the journal."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from pathlib import Path

import pytest
from pydantic import SecretBytes

from vppmesh.dataplane.state import SaSpec
from vppmesh.errors import ConfigError
from vppmesh.keying import ledger as ledger_module
from vppmesh.keying.ledger import HEADER, KeyLedger, fingerprint


def sas(n: int, salt: int = 1) -> list[SaSpec]:
    return [SaSpec.model_construct(key=SecretBytes(os.urandom(32)), salt=salt) for _ in range(n)]


def line_length(fingerprints: int) -> int:
    """`+` and ` <32 hex>` each, ` <crc32>` and the newline."""
    return 1 + 33 * fingerprints + 9 + 1


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "node1.used-keys.json"


def test_a_record_costs_one_appended_line_and_a_restarted_agent_refuses_its_keys(
        path: Path) -> None:
    ledger = KeyLedger(path)
    first, second = sas(8), sas(8)
    ledger.record(first)
    before, inode = path.read_bytes(), path.stat().st_ino
    ledger.record(second)
    after = path.read_bytes()
    assert after.startswith(before) and len(after) - len(before) == line_length(8)
    assert path.stat().st_ino == inode  # appended, not rewritten
    ledger.record(second)  # nothing new: nothing written
    assert path.read_bytes() == after
    restarted = KeyLedger(path)  # the agent (or VPP) restarted
    assert restarted.reused([*first, *second, *sas(2)]) == [*first, *second]
    assert path.stat().st_mode & 0o777 == 0o600
    assert (path.parent / "node1.used-keys.lock").stat().st_mode & 0o777 == 0o600


def torn(path: Path, keep: int) -> tuple[list[SaSpec], list[SaSpec]]:
    """Records two batches, then cuts the second's line after `keep` bytes: a crash
    during its write (its record() never returned)."""
    ledger = KeyLedger(path)
    recorded, cut = sas(3), sas(3)
    ledger.record(recorded)
    size = path.stat().st_size
    ledger.record(cut)
    os.truncate(path, size + keep)
    return recorded, cut


@pytest.mark.parametrize("keep", [1, 40, line_length(3) - 10, line_length(3) - 2])
def test_a_torn_last_line_is_dropped_and_the_next_change_rewrites_the_file(
        path: Path, keep: int, caplog: pytest.LogCaptureFixture) -> None:
    recorded, cut = torn(path, keep)
    ledger = KeyLedger(path)
    with caplog.at_level(logging.WARNING, "vppmesh"):
        assert ledger.reused([*recorded, *cut]) == recorded
    assert "cut short" in caplog.text and "dropped" in caplog.text
    later = sas(2)
    ledger.record(later)  # not glued to the torn bytes
    assert path.read_bytes().endswith(b"\n")
    assert KeyLedger(path).reused([*recorded, *cut, *later]) == [*recorded, *later]


def test_a_last_line_missing_only_its_newline_is_kept(path: Path) -> None:
    recorded, cut = torn(path, line_length(3) - 1)
    assert KeyLedger(path).reused([*recorded, *cut]) == [*recorded, *cut]


def damage_second_line(data: bytes, how: str) -> bytes:
    lines = data[len(HEADER):].split(b"\n")
    if how == "flip":  # one hex digit of a fingerprint changed
        lines[1] = lines[1][:5] + (b"0" if lines[1][5:6] != b"0" else b"1") + lines[1][6:]
    elif how == "cut":  # bytes lost inside a line
        lines[1] = lines[1][:20] + lines[1][40:]
    elif how == "zeros":  # a block that never reached the disk
        lines[1] = b"\0" * len(lines[1])
    elif how == "joined":  # its newline lost
        lines[1:3] = [lines[1] + lines[2]]
    elif how == "forged":  # a line without its checksum
        lines[1] = lines[1][:-9]
    return HEADER + b"\n".join(lines)


@pytest.mark.parametrize("how", ["flip", "cut", "zeros", "joined", "forged"])
def test_a_damaged_line_before_the_last_fails_closed(path: Path, how: str) -> None:
    ledger = KeyLedger(path)
    for _ in range(3):
        ledger.record(sas(2))
    path.write_bytes(damage_second_line(path.read_bytes(), how))
    with pytest.raises(ConfigError, match=f"{path}.*line 3.*key epoch"):
        KeyLedger(path).used()


def test_a_damaged_last_line_with_its_newline_fails_closed(path: Path) -> None:
    """A whole line was fsynced once (its record() may have returned): never dropped."""
    ledger = KeyLedger(path)
    ledger.record(sas(2))
    ledger.record(sas(2))
    data = bytearray(path.read_bytes())
    data[-5] = ord("0") if data[-5] != ord("0") else ord("1")
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="line 3 is damaged"):
        KeyLedger(path).used()


@pytest.mark.parametrize("content", [b"", b"vppmesh used-keys v3\n", b"{\"outbound\": 3}",
                                     b"{\"outbound\": [\"not a fingerprint\"]}", b"{\"outb"])
def test_a_file_that_is_no_ledger_fails_closed(path: Path, content: bytes) -> None:
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"key ledger {path} is unreadable"):
        KeyLedger(path).used()


def test_forgotten_keys_are_appended_then_compacted_away(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger_module, "COMPACT_SLACK", 3)
    ledger = KeyLedger(path)
    static, agreed = sas(4), sas(4, salt=2)
    ledger.record([*static, *agreed])
    inode = path.stat().st_ino
    ledger.forget([(sa.key.get_secret_value(), sa.salt) for sa in agreed[:2]])
    assert path.stat().st_ino == inode  # 10 written <= 2 x 6 live + 3
    assert path.read_bytes().splitlines()[-1].startswith(b"- ")
    ledger.forget([(sa.key.get_secret_value(), sa.salt) for sa in agreed[2:]])
    assert path.stat().st_ino != inode  # 12 written > 2 x 4 live + 3: rewritten
    assert path.read_bytes() == HEADER + b"+ " + b" ".join(
        sorted(fingerprint(sa).encode() for sa in static)) + path.read_bytes()[-10:]
    assert path.stat().st_mode & 0o777 == 0o600
    assert KeyLedger(path).reused([*static, *agreed]) == static


@pytest.mark.parametrize("crash", ["before the rename", "half way through the write"])
def test_a_crash_during_compaction_keeps_every_key(
        path: Path, monkeypatch: pytest.MonkeyPatch, crash: str) -> None:
    monkeypatch.setattr(ledger_module, "COMPACT_SLACK", 0)
    ledger = KeyLedger(path)
    static, agreed = sas(4), sas(4, salt=2)
    ledger.record([*static, *agreed])
    before = path.read_bytes()

    class Crash(Exception):
        pass

    def crashed(*args: object) -> None:
        raise Crash

    write = os.write

    def half(fd: int, data: bytes) -> int:
        write(fd, bytes(data[:len(data) // 2]))
        raise Crash

    with monkeypatch.context() as patched:
        patched.setattr(os, "replace" if crash == "before the rename" else "write",
                        crashed if crash == "before the rename" else half)
        with pytest.raises(Crash):
            ledger.forget([(sa.key.get_secret_value(), sa.salt) for sa in agreed])
    assert path.read_bytes() == before
    restarted = KeyLedger(path)
    assert restarted.reused([*static, *agreed]) == [*static, *agreed]
    restarted.forget([(sa.key.get_secret_value(), sa.salt) for sa in agreed])  # left-over .tmp
    assert KeyLedger(path).reused([*static, *agreed]) == static


def test_records_by_another_process_are_seen(path: Path) -> None:
    agent, other = KeyLedger(path), KeyLedger(path)
    mine, theirs = sas(2), sas(2)
    agent.record(mine)
    assert agent.reused(theirs) == []
    other.record(theirs)  # `vppmesh rekey`, say
    assert agent.reused([*mine, *theirs]) == [*mine, *theirs]


def test_a_record_by_another_process_while_this_one_waits_for_the_lock_is_kept(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other process appends between this one's read and its lock: the change is
    made from the file as it is under the lock, and the append stays known."""
    monkeypatch.setattr(ledger_module, "COMPACT_SLACK", 0)
    agent, other = KeyLedger(path), KeyLedger(path)
    static, agreed, theirs, mine = sas(4), sas(2, salt=2), sas(2), sas(1)
    agent.record([*static, *agreed])
    agent.used()
    real = agent._locked

    def raced():  # type: ignore[no-untyped-def]
        other.record(theirs)
        return real()

    monkeypatch.setattr(agent, "_locked", raced)
    agent.record(mine)  # appended: must know `theirs` too, from now on
    assert agent.reused(theirs) == theirs
    other.record(sas(1))
    agent.forget([(sa.key.get_secret_value(), sa.salt) for sa in agreed])  # a rewrite
    assert KeyLedger(path).reused([*static, *theirs, *mine]) == [*static, *theirs, *mine]


def test_a_line_being_appended_by_another_process_is_not_taken_for_a_torn_one(
        path: Path, caplog: pytest.LogCaptureFixture) -> None:
    agent = KeyLedger(path)
    agent.record(sas(2))
    agent.used()
    theirs = sas(1)
    line = ledger_module._line(b"+", [fingerprint(theirs[0])])
    lock = os.open(path.with_suffix(".lock"), os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)  # the other process, half way through its append
    with open(path, "ab") as handle:
        handle.write(line[:10])
    seen: list[bool] = []
    reader = threading.Thread(target=lambda: seen.append(bool(agent.reused(theirs))))
    with caplog.at_level(logging.WARNING, "vppmesh"):
        reader.start()
        reader.join(0.2)
        assert reader.is_alive()  # waits for the writer
        with open(path, "ab") as handle:
            handle.write(line[10:])
        os.close(lock)
        reader.join(5)
    assert seen == [True] and "cut short" not in caplog.text
    agent.record(sas(1))
    assert path.stat().st_size == len(HEADER) + line_length(2) + line_length(1) * 2


def test_the_format_before_the_journal_loads_and_is_converted_on_the_first_change(
        path: Path) -> None:
    old = sas(3)
    path.write_text(json.dumps({"outbound": sorted(fingerprint(sa) for sa in old)}))
    ledger = KeyLedger(path)
    assert ledger.reused(old) == old
    new = sas(1)
    ledger.record(new)
    assert path.read_bytes().startswith(HEADER)
    assert path.stat().st_mode & 0o777 == 0o600
    assert KeyLedger(path).reused([*old, *new]) == [*old, *new]
    ledger.record(sas(1))
    assert path.read_bytes().count(b"\n") == 3  # header, the converted file, one append


def test_a_record_is_synced_to_disk_before_it_returns(
        path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The key goes to VPP right after record(): its line must survive a power cut."""
    ledger = KeyLedger(path)
    ledger.record(sas(2))
    synced: list[tuple[str, int]] = []
    fsync = os.fsync

    def watched(fd: int) -> None:
        fsync(fd)
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd).st_size))

    monkeypatch.setattr(os, "fsync", watched)
    ledger.record(sas(2))
    assert synced == [(str(path), path.stat().st_size)]
