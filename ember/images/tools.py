"""Host tools the image builders run, and the Debian packages that provide them.

A missing tool is reported as one EmberError naming the tool and the apt
package to install, before any long build starts.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ember.errors import EmberError

# tool (program on PATH, or absolute path of a header/file) -> Debian package
KERNEL_TOOLS: dict[str, str] = {
    "make": "make",
    "bash": "bash",
    "gcc": "gcc",
    "ld": "binutils",
    "flex": "flex",
    "bison": "bison",
    "bc": "bc",
    "tar": "tar",
    "xz": "xz-utils",
    "sed": "sed",
    "awk": "mawk",
    "/usr/include/gelf.h": "libelf-dev",
    "/usr/include/openssl/opensslv.h": "libssl-dev",
}
ROOTFS_TOOLS: dict[str, str] = {
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
}
HELPER_TOOLS: dict[str, str] = {  # the guest's static C helpers (rootfs.py)
    "gcc": "gcc",
    "/usr/lib/x86_64-linux-gnu/libc.a": "libc6-dev",
    "/usr/include/linux/vm_sockets.h": "linux-libc-dev",
}
SBIN_DIRS = ("/usr/sbin", "/sbin")


def find_tool(tool: str) -> str | None:
    """Path of ``tool`` (also looked up in sbin dirs, often off a user's PATH)."""
    if tool.startswith("/"):
        return tool if Path(tool).exists() else None
    return shutil.which(tool) or shutil.which(tool, path=":".join(SBIN_DIRS))


def require_tools(tools: dict[str, str]) -> dict[str, str]:
    """Map each tool to its path, or raise EmberError naming what to install."""
    found: dict[str, str] = {}
    for tool, package in tools.items():
        path = find_tool(tool)
        if path is None:
            raise EmberError(f"'{tool}' is missing on this host: install it with 'apt-get install {package}'")
        found[tool] = path
    return found
