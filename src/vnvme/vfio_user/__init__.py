"""vfio-user: the protocol, a server for any device, a client."""
