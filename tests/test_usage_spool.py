"""The local usage spool (`gateway/usage/spool.py`) on a real filesystem: framing and checksums, replay
order and compaction, torn and corrupt lines, locks between processes sharing a directory,
adoption of what a dead process left, and the fsync policies. No Redis here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gateway.usage import spool as spool_module
from gateway.usage.spool import FileSpool, MemorySpool, frame, open_spool, unframe
from tests.conftest import REPO


def payloads(n: int, start: int = 0) -> list[bytes]:
    return [b'{"n":%d}' % i for i in range(start, start + n)]


def replay_all(spool: FileSpool | MemorySpool, page: int = 7) -> list[bytes]:
    seen: list[bytes] = []
    while spool.records:
        batch, end = spool.read(page)
        spool.commit(end, len(batch))
        seen += batch
        if not batch and spool.records:
            raise AssertionError("records counted but none readable")
    return seen


def test_frame_round_trip_and_corruption() -> None:
    line = frame(b'{"a":1}')
    assert line.endswith(b"\n") and line[8:9] == b" "
    assert unframe(line[:-1]) == b'{"a":1}'
    assert unframe(line[:-2]) is None  # torn
    assert unframe(line[:-1].replace(b"1", b"2")) is None  # a flipped byte
    assert unframe(b"") is None and unframe(b"zzzzzzzz {}") is None and unframe(b"12345678") is None


def test_append_read_commit_in_order_then_truncate(tmp_path: Path) -> None:
    spool = FileSpool(tmp_path / "u.spool")
    assert not (tmp_path / "u.spool").exists()  # nothing is created before something is spooled
    spool.append(payloads(10))
    spool.append(payloads(5, 10))
    assert spool.records == 15
    first, end = spool.read(4)
    assert first == payloads(4)
    spool.append(payloads(3, 15))  # appends while a replay is under way land behind it
    spool.commit(end, 4)
    assert spool.records == 14
    assert replay_all(spool) == payloads(14, 4)
    assert spool.records == 0
    assert (tmp_path / "u.spool").stat().st_size == 0  # compacted once fully replayed
    spool.append(payloads(2, 100))
    assert replay_all(spool) == payloads(2, 100)
    spool.close()
    assert not (tmp_path / "u.spool").exists()  # an empty spool leaves nothing behind


def test_a_read_that_is_not_committed_is_read_again(tmp_path: Path) -> None:
    spool = FileSpool(tmp_path / "u.spool")
    spool.append(payloads(5))
    batch, _ = spool.read(3)
    again, end = spool.read(3)  # the store failed: nothing was committed
    assert batch == again == payloads(3)
    spool.commit(end, 3)
    assert spool.read(10)[0] == payloads(2, 3)


def test_close_keeps_unreplayed_records_for_the_next_process(tmp_path: Path) -> None:
    path = tmp_path / "u.spool"
    spool = FileSpool(path)
    spool.append(payloads(6))
    spool.commit(spool.read(2)[1], 2)
    spool.close()
    assert path.exists()
    successor = FileSpool(path)
    assert successor.recover() == 6  # not committed to disk: replayed again (idempotent in the store)
    assert replay_all(successor) == payloads(6)


def test_torn_last_line_is_cut_with_a_warning_and_appends_stay_readable(tmp_path: Path, capsys) -> None:
    path = tmp_path / "u.spool"
    path.write_bytes(b"".join(frame(p) for p in payloads(3)) + frame(b'{"n":3}')[:-6])  # power loss mid-line
    spool = FileSpool(path)
    assert spool.recover() == 3
    assert "usage_spool_torn_tail" in capsys.readouterr().out
    spool.append(payloads(2, 10))  # must not extend the torn fragment into a corrupt line
    assert replay_all(spool) == payloads(3) + payloads(2, 10)
    assert spool.skipped == 0


def test_corrupt_line_in_the_middle_is_skipped_with_a_warning(tmp_path: Path, capsys) -> None:
    path = tmp_path / "u.spool"
    lines = [frame(p) for p in payloads(5)]
    lines[2] = lines[2].replace(b'"n"', b'"x"')  # checksum no longer matches
    path.write_bytes(b"".join(lines) + b"garbage without checksum\n")
    spool = FileSpool(path)
    assert spool.recover() == 4
    assert replay_all(spool) == [payloads(5)[i] for i in (0, 1, 3, 4)]
    assert spool.skipped == 2
    assert capsys.readouterr().out.count("usage_spool_corrupt_line") == 2
    assert path.stat().st_size == 0


def test_processes_sharing_a_path_each_lock_their_own_file(tmp_path: Path) -> None:
    path = tmp_path / "u.spool"
    first, second = FileSpool(path), FileSpool(path)
    first.append(payloads(2))
    second.append(payloads(3, 2))
    assert first.file == path and second.file == tmp_path / "u.spool.1"
    third = FileSpool(path)
    assert third.recover() == 0  # both files are held by live spools: not adopted
    first.close()
    second.close()
    # Both holders are gone: the next process adopts both files, in one spool, in order.
    heir = FileSpool(path)
    assert heir.recover() == 5
    assert replay_all(heir) == payloads(5)
    heir.close()
    assert sorted(os.listdir(tmp_path)) == []


def test_a_file_held_by_another_process_is_not_adopted(tmp_path: Path) -> None:
    path = tmp_path / "u.spool"
    with subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from gateway.usage.spool import FileSpool
            s = FileSpool({str(path)!r})
            s.append([b'{{"held":1}}'])
            print("ready", flush=True)
            sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO,
    ) as holder:  # fmt: skip
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == b"ready"
            other = FileSpool(path)
            assert other.recover() == 0
            other.append(payloads(1))
            assert other.file == tmp_path / "u.spool.1"
            other.close()
        finally:
            holder.kill()  # dies without closing its spool: the file stays, unlocked
            holder.wait()
    heir = FileSpool(path)  # both are abandoned now (the holder died, `other` closed with a record)
    assert heir.recover() == 2
    assert replay_all(heir) == [b'{"held":1}', *payloads(1)]


@pytest.mark.parametrize(("policy", "per_append"), [("always", True), ("interval", False), ("never", False)])
def test_fsync_policies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str, per_append: bool) -> None:
    calls: list[int] = []
    real = os.fsync

    def counting_fsync(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(spool_module.os, "fsync", counting_fsync)
    now = [100.0]
    spool = FileSpool(tmp_path / "u.spool", fsync=policy, fsync_interval=1.0, clock=lambda: now[0])
    spool.append(payloads(1))
    calls.clear()  # creating the file syncs its directory
    spool.append(payloads(1, 1))
    assert bool(calls) == per_append
    if policy == "interval":
        assert spool.sync_due(now[0]) == pytest.approx(1.0)  # due one interval after the first append
        now[0] += 1.0
        assert spool.sync_due(now[0]) == 0
        spool.sync()
        assert calls and spool.sync_due(now[0]) is None
    else:
        assert spool.sync_due(now[0]) is None
    calls.clear()
    spool.close()  # stopping always syncs what it keeps
    assert calls or not (tmp_path / "u.spool").exists()


def test_bad_policy_and_memory_spool(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fsync"):
        FileSpool(tmp_path / "x", fsync="sometimes")
    assert isinstance(open_spool(None), MemorySpool)
    assert isinstance(open_spool(str(tmp_path / "x")), FileSpool)
    memory = MemorySpool()
    memory.append(payloads(4))
    assert replay_all(memory, page=3) == payloads(4)


def test_a_failed_write_leaves_no_half_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = FileSpool(tmp_path / "u.spool")
    spool.append(payloads(2))
    real_write = os.write

    def short_then_fail(fd: int, data: bytes) -> int:
        monkeypatch.setattr(spool_module.os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(28, "No space")))
        return real_write(fd, bytes(data[:5]))

    monkeypatch.setattr(spool_module.os, "write", short_then_fail)
    with pytest.raises(OSError):
        spool.append(payloads(1, 2))
    monkeypatch.setattr(spool_module.os, "write", real_write)
    spool.append(payloads(1, 3))
    assert spool.records == 3
    assert replay_all(spool) == payloads(2) + payloads(1, 3)
    assert spool.skipped == 0
