"""GuestMemory: translation, bounds checks against hostile ranges, layouts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.errors import ConfigError
from ember.memory import GuestMemory, GuestMemoryError

PAGE = 0x1000
# Two regions with a hole between them, like RAM below and above an MMIO gap.
LOW = (0x0, 0x10 * PAGE)
HIGH = (0x100 * PAGE, 0x8 * PAGE)
LAYOUT = [HIGH, LOW]


@pytest.fixture(scope="module")
def mem():
    with GuestMemory(LAYOUT) as memory:
        yield memory


def _inside(gpa: int, length: int) -> bool:
    return any(start <= gpa and gpa + length <= start + size and gpa < start + size
               for start, size in (LOW, HIGH)) and length >= 0


def test_regions_sorted_with_slots_and_host_addresses(mem):
    assert [(r.gpa, r.size, r.slot) for r in mem.regions] == [(*LOW, 0), (*HIGH, 1)]
    assert mem.size == LOW[1] + HIGH[1]
    assert all(r.host_addr % PAGE == 0 for r in mem.regions)


def test_read_write_and_integer_helpers(mem):
    mem.write(0x10, b"hello")
    assert mem.read(0x10, 5) == b"hello"
    base = HIGH[0] + 0x20
    mem.write_u16(base, 0xBEEF)
    mem.write_u32(base + 2, 0x12345678)
    mem.write_u64(base + 8, 0x1122334455667788)
    assert mem.read(base, 2) == b"\xef\xbe"
    assert (mem.read_u16(base), mem.read_u32(base + 2), mem.read_u64(base + 8)) == (
        0xBEEF, 0x12345678, 0x1122334455667788)
    mem.write_u8(base, 7)
    assert mem.read_u8(base) == 7


def test_view_is_zero_copy_and_writable(mem):
    view = mem.view(0x200, 4)
    view[:] = b"abcd"
    assert mem.read(0x200, 4) == b"abcd"
    mem.write(0x202, b"ZZ")
    assert bytes(view) == b"abZZ"
    assert mem.host_address(0x200) == mem.regions[0].host_addr + 0x200


def test_last_byte_ok_but_straddling_and_holes_rejected(mem):
    end = LOW[0] + LOW[1]
    assert mem.read(end - 1, 1) == bytes(1)
    for gpa, length in ((end - 1, 2), (end, 1), (HIGH[0] - 4, 8),
                        (HIGH[0] + HIGH[1] - 4, 8), (-1, 1), (0, -1)):
        with pytest.raises(GuestMemoryError):
            mem.view(gpa, length)
    with pytest.raises(GuestMemoryError):
        mem.read_u64(end - 4)
    with pytest.raises(GuestMemoryError):
        mem.write(end - 2, b"xyz")


hostile = st.integers(min_value=-(1 << 66), max_value=1 << 66)
near_edges = st.sampled_from([0, LOW[1], HIGH[0], HIGH[0] + HIGH[1]]).flatmap(
    lambda edge: st.integers(min_value=edge - 64, max_value=edge + 64))


@settings(max_examples=500, deadline=None)
@given(gpa=st.one_of(hostile, near_edges), length=st.one_of(hostile, st.integers(-8, 128)))
def test_any_range_is_served_or_rejected_with_guest_memory_error(mem, gpa, length):
    try:
        view = mem.view(gpa, length)
    except GuestMemoryError:
        assert not _inside(gpa, length)
    else:
        assert _inside(gpa, length) and len(view) == length


@settings(max_examples=300, deadline=None)
@given(gpa=st.one_of(hostile, near_edges))
def test_integer_accessors_never_leak_other_errors(mem, gpa):
    for reader, size in ((mem.read_u16, 2), (mem.read_u32, 4), (mem.read_u64, 8)):
        try:
            reader(gpa)
        except GuestMemoryError:
            assert not _inside(gpa, size)
        else:
            assert _inside(gpa, size)
    assert mem.contains(gpa, 8) == _inside(gpa, 8)


@pytest.mark.parametrize("layout", [
    [], [(0, 0)], [(0x10, PAGE)], [(0, PAGE + 1)], [(0, 2 * PAGE), (PAGE, PAGE)], [(-PAGE, PAGE)],
])
def test_bad_layouts_are_config_errors(layout):
    with pytest.raises(ConfigError):
        GuestMemory(layout)


def test_file_backed_memory_is_shared_with_the_file(tmp_path):
    path = tmp_path / "ram"
    with GuestMemory([(0, PAGE), (0x10 * PAGE, PAGE)], backing_file=str(path)) as memory:
        memory.write(0x10 * PAGE + 3, b"snap")
        assert [r.file_offset for r in memory.regions] == [0, PAGE]
    data = path.read_bytes()
    assert len(data) == 2 * PAGE and data[PAGE + 3:PAGE + 7] == b"snap"
    with GuestMemory([(0, PAGE), (0x10 * PAGE, PAGE)], backing_file=str(path)) as memory:
        assert memory.read(0x10 * PAGE + 3, 4) == b"snap"


def test_large_sparse_memory_is_cheap_and_close_tolerates_live_views():
    memory = GuestMemory([(0, 1 << 34)])  # 16 GiB, MAP_NORESERVE: nothing committed
    view = memory.view((1 << 34) - 8, 8)
    view[:] = b"12345678"
    memory.close()  # a live view keeps the mapping until it dies; no exception
    assert bytes(view) == b"12345678"
    assert memory.regions == []


class FakeVm:
    def __init__(self) -> None:
        self.calls = []
        self.bitmaps = {}

    def set_user_memory_region(self, *args):
        self.calls.append(args)

    def get_dirty_log(self, slot, num_pages):
        return self.bitmaps.get(slot, bytes((num_pages + 63) // 64 * 8))


def test_register_and_dirty_pages_decode_bitmaps():
    with GuestMemory(LAYOUT) as memory:
        vm = FakeVm()
        memory.register(vm, track_dirty=True)
        assert [c[:3] + (c[4],) for c in vm.calls] == [(0, *LOW, 1), (1, *HIGH, 1)]
        assert vm.calls[0][3] == memory.regions[0].host_addr
        vm.bitmaps = {0: (0b1000_0001).to_bytes(8, "little"), 1: (1 << 7).to_bytes(8, "little")}
        assert memory.dirty_pages(vm) == [0, 7 * PAGE, HIGH[0] + 7 * PAGE]
        memory.set_dirty_tracking(vm, False)
        assert vm.calls[-1][4] == 0
