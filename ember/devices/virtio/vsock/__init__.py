"""virtio-vsock in Firecracker's model: guest AF_VSOCK ports proxied to host Unix sockets
(VIRTIO 1.2 section 5.10; Firecracker docs/vsock.md)."""

from ember.devices.virtio.vsock.device import VsockDevice

__all__ = ["VsockDevice"]
