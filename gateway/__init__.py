"""The gateway: command line now; server, workers, key store and SDK as they land."""
