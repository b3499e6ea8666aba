"""x86-64 guest layout and Linux boot (see boot.py for the entry points)."""
