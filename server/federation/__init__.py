"""How requests reach the sites: the transport interface, its transports, the ServerApp."""
