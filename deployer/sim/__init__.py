"""The simulated fleet: real sshd/dropbear servers on 127.0.0.1 (`deploy sim`), and the network between (netsim)."""
