"""mesh: a Swarm-style service mesh for Linux.

Services are described in YAML (compose-spec names), run as processes in network namespaces, and
wired with real kernel objects (veth, bridges, macvlan, nftables). See README.md and DESIGN.md.
"""
