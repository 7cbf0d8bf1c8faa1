"""hugepages.py: which of a process's mappings are collapsed into huge pages, and why a machine
may have none."""

from __future__ import annotations

import pytest

from tron.services.daemon.hugepages import HUGE, Collapsed, huge_page_size, ranges, unavailable_reason

M = 2 << 20


@pytest.mark.parametrize(("line", "expected"), [
    # private, writable, anonymous: cut to whole 2 MiB pages
    (f"{M:x}-{5 * M:x} rw-p 00000000 00:00 0", [(M, 5 * M)]),
    (f"{M + 4096:x}-{5 * M - 4096:x} rw-p 00000000 00:00 0", [(2 * M, 4 * M)]),
    # the brk heap is anonymous too
    (f"{0:x}-{2 * M:x} rw-p 00000000 00:00 0 [heap]", [(0, 2 * M)]),
    # too small for one whole huge page
    (f"{M + 4096:x}-{3 * M - 4096:x} rw-p 00000000 00:00 0", []),
    # a file's pages, a shared mapping, read-only memory, the stack: left alone
    (f"{0:x}-{4 * M:x} rw-p 00001000 08:01 1234 /usr/lib/libpython3.11.so", []),
    (f"{0:x}-{4 * M:x} rw-s 00000000 00:01 99 /dev/shm/x", []),
    (f"{0:x}-{4 * M:x} r--p 00000000 00:00 0", []),
    (f"{0:x}-{4 * M:x} rw-p 00000000 00:00 0 [stack]", []),
    # an anonymous mapping its program named (prctl PR_SET_VMA_ANON_NAME) is anonymous still
    (f"{0:x}-{4 * M:x} rw-p 00000000 00:00 0 [anon:cpython:pymalloc]", [(0, 4 * M)]),
    ("", []),
])
def test_only_private_writable_anonymous_memory_in_whole_huge_pages_is_collapsed(line, expected):
    assert HUGE == M
    assert ranges(line) == expected


def test_a_machine_with_larger_huge_pages_is_cut_to_its_own():
    big = 512 << 20  # arm64 with 64 KiB pages
    assert ranges(f"{big - 4096:x}-{3 * big + 4096:x} rw-p 00000000 00:00 0", big) == [(big, 3 * big)]


@pytest.mark.parametrize(("setting", "size", "why", "huge"), [
    ("always [madvise] never\n", "2097152\n", None, M),
    ("[always] madvise never\n", "536870912\n", None, 512 << 20),
    ("always madvise [never]\n", None, "set to never", M),
    (None, None, "not in this kernel", M),
])
def test_a_machine_without_huge_pages_is_named_and_its_huge_page_size_read(tmp_path, setting, size, why, huge):
    if setting is not None:
        (tmp_path / "enabled").write_text(setting)
    if size is not None:
        (tmp_path / "hpage_pmd_size").write_text(size)
    said = unavailable_reason(str(tmp_path))
    assert (said is None) if why is None else (why in said)
    assert huge_page_size(str(tmp_path)) == huge


def test_what_was_done_is_said_in_whole_megabytes():
    assert Collapsed(bytes=110 * 2**20, seconds=0.2734).log_fields() == {"mb": 110, "seconds": 0.273}
    assert Collapsed(refused={"EINVAL": 3}, unavailable="old kernel").log_fields() == {
        "mb": 0, "seconds": 0.0, "refused": {"EINVAL": 3}, "unavailable": "old kernel"}


def test_past_its_budget_nothing_more_is_collapsed_and_what_is_left_is_counted():
    """On a machine whose free memory is fragmented, each huge page may need compaction first:
    the fork server stops at its budget (here none) rather than wait."""
    from tron.services.daemon.hugepages import collapse

    done = collapse(budget=0.0)
    if done.unavailable:
        assert done.bytes == 0 and not done.refused
    else:
        assert done.bytes == 0 and done.refused.get("unfinished", 0) > 0
