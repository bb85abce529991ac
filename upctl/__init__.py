"""upctl: the command-line face of the uniperceiver library."""
