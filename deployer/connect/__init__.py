"""Reaching a device: SSH (Paramiko) or the controller itself, exec channels, host keys, retries and deadlines."""
