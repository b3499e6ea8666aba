"""VirtIO devices over the virtio-mmio transport (VIRTIO 1.2 sections 2, 4.2, 5)."""
