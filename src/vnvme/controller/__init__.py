"""The sans-I/O NVMe controller core."""
