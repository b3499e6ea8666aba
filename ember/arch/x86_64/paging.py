"""Identity-mapped page tables for the 64-bit entry.

The 64-bit boot protocol (Documentation/arch/x86/boot.rst) needs the kernel,
zero page and command line identity mapped.  We map the first 4 GiB with
2 MiB pages: PML4 -> one PDPT -> four page directories (Intel SDM vol. 3A 4.5).
"""

from __future__ import annotations

import struct

from . import layout

PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_PAGE_SIZE = 1 << 7  # a PD entry mapping a 2 MiB page
ENTRIES_PER_TABLE = 512
LARGE_PAGE_SIZE = 2 * layout.MiB
IDENTITY_MAPPED = layout.PD_COUNT * ENTRIES_PER_TABLE * LARGE_PAGE_SIZE


def page_tables() -> dict[int, bytes]:
    """{gpa: table bytes} for the PML4, PDPT and page directories."""
    table_flags = PTE_PRESENT | PTE_WRITABLE
    pml4 = [layout.PDPT_START | table_flags]
    pdpt = [(layout.PD_START + i * layout.PAGE_SIZE) | table_flags for i in range(layout.PD_COUNT)]
    tables = {layout.PML4_START: _table(pml4), layout.PDPT_START: _table(pdpt)}
    for i in range(layout.PD_COUNT):
        first = i * ENTRIES_PER_TABLE
        pd = [((first + j) * LARGE_PAGE_SIZE) | table_flags | PTE_PAGE_SIZE
              for j in range(ENTRIES_PER_TABLE)]
        tables[layout.PD_START + i * layout.PAGE_SIZE] = _table(pd)
    return tables


def write_page_tables(memory) -> int:
    """Write the identity map; returns the CR3 value (the PML4 gpa)."""
    for gpa, data in page_tables().items():
        memory.write(gpa, data)
    return layout.PML4_START


def _table(entries: list[int]) -> bytes:
    padded = entries + [0] * (ENTRIES_PER_TABLE - len(entries))
    return struct.pack(f"<{ENTRIES_PER_TABLE}Q", *padded)
