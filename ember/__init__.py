"""Ember: a virtual machine monitor for Linux KVM, written in Python.

Ember opens /dev/kvm, lays out guest memory, runs vCPUs, emulates a small
device model and boots unmodified Linux guests as microVMs.
"""

__version__ = "0.1.0"
