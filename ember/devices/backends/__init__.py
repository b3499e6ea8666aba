"""Host-side backends that devices move guest data through (TAP network devices)."""
